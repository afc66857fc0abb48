/* cloneaware native layer: thin wrappers around the extent and clone ioctls.
 *
 * Rules (docs/DESIGN.md, "The native layer"): each function makes one system call, or one batched
 * loop of the same call; keeps no memory past the call except what it hands
 * to the caller; prints nothing; returns >= 0 or -errno.
 */
#include <stdint.h>
#include <stddef.h>

/* One extent as returned to Python: 32 bytes, a numpy structured dtype. */
struct ca_extent {
    uint64_t logical;
    uint64_t physical;
    uint64_t length;
    uint32_t flags;
    uint32_t reserved;
};

/* One Btrfs file extent item (struct btrfs_file_extent_item, with its key
 * offset) as returned to Python: 64 bytes, a numpy structured dtype. */
struct ca_file_extent {
    uint64_t logical;        /* the key offset: where the item starts in the file */
    uint64_t disk_bytenr;    /* 0 for a hole and for inline data */
    uint64_t disk_num_bytes; /* bytes on disk (compressed size, sector-aligned) */
    uint64_t offset;         /* where the file's range starts in the (uncompressed) extent */
    uint64_t num_bytes;      /* bytes of the file it covers (inline: ram_bytes) */
    uint64_t ram_bytes;      /* uncompressed size of the whole extent */
    uint64_t generation;
    uint8_t compression;     /* BTRFS_COMPRESS_*: 0 none, 1 zlib, 2 lzo, 3 zstd */
    uint8_t type;            /* 0 inline, 1 regular, 2 prealloc */
    uint8_t encryption;
    uint8_t reserved0;
    uint32_t reserved;
};

/* The metadata of one BTRFS_IOC_ENCODED_READ or _WRITE (struct
 * btrfs_ioctl_encoded_io_args without the iovecs). */
struct ca_encoded {
    uint64_t len;              /* bytes of the file */
    uint64_t unencoded_len;    /* decompressed size of the extent */
    uint64_t unencoded_offset; /* where the file's bytes start in it */
    uint32_t compression;      /* BTRFS_ENCODED_IO_COMPRESSION_* */
    uint32_t encryption;
};

/* Version of the package this object was built for. */
const char *ca_version(void);

/* FS_IOC_FIEMAP over the whole file with FIEMAP_FLAG_SYNC, looping until the
 * extent flagged LAST.  On success *out is a malloc'd array of *count extents
 * (free it with ca_free) and 0 is returned; on failure -errno. */
int ca_fiemap(int fd, struct ca_extent **out, size_t *count);
void ca_free(void *p);

/* At most n malloc arenas from now on (mallopt M_ARENA_MAX): glibc gives
 * each thread that allocates its own, up to 8 per core, and a backup's
 * workers and a restore's readers left each holding freed memory (issue 36:
 * night 1 of 99,000 files about 330 -> 310 MB peak, a restore 567 -> 522 MiB
 * with 2, medians of alternating runs). */
int ca_arena_max(int n);

/* Give the memory malloc holds free back to the kernel (malloc_trim): the
 * whole pages free inside the heap too, not only its top.  A step that
 * builds large arrays through temporaries leaves them free but resident
 * (issue 36: loading an index of 465,000 blobs, 22 MiB of arrays, left the
 * process 80 MiB larger; 34 MiB after a trim). */
void ca_trim(void);

/* One directory entry as ca_list_stat returns it: its lstat (through the
 * directory), or the errno of that lstat in err.  88 bytes, no padding; the
 * Python side unpacks it with struct (native.LIST_STAT). */
struct ca_dstat {
    uint32_t mode, uid, gid;
    int32_t err;
    uint64_t ino, dev, nlink, size;
    int64_t atime_ns, mtime_ns, ctime_ns;
    uint64_t rdev, blocks;
};

/* One directory of a ca_list_dirs batch.  In: parent_fd and leaf, the
 * directory leaf beneath parent_fd (opened O_NOFOLLOW), or leaf NULL for
 * parent_fd itself.  Out: fd, the directory opened (the caller's to close;
 * -1 if leaf is NULL or it could not be opened), err (the errno of opening
 * or listing it, else 0), its entries but . and .. in the order the
 * filesystem lists them, NUL-terminated one after another in names
 * (names_len bytes), and their lstats in st (count of them); names and st
 * malloc'ed (ca_free). */
struct ca_dirlist {
    int parent_fd;
    int fd;
    const char *leaf;
    int err;
    char *names;
    size_t names_len;
    struct ca_dstat *st;
    size_t count;
};

/* List and lstat n directories at once, on up to threads threads (this one
 * among them; at most CA_LIST_THREADS_MAX): the directories spread over
 * them, then their entries in chunks, so that a walk from a cold cache has
 * several metadata reads in flight, and no GIL is taken for an entry
 * (cloneaware/source/walk.py).  0, or -ENOMEM (nothing is then returned). */
#define CA_LIST_THREADS_MAX 16
int ca_list_dirs(struct ca_dirlist *dirs, size_t n, int threads);


/* FICLONERANGE on dst_fd from src_fd. */
int ca_ficlonerange(int dst_fd, int src_fd, uint64_t src_offset,
                    uint64_t length, uint64_t dst_offset);
/* FICLONE: the whole of src_fd into dst_fd. */
int ca_ficlone(int dst_fd, int src_fd);
/* FIDEDUPERANGE on src_fd against count destinations.  Per destination the
 * bytes deduped and the status (0 SAME, 1 DIFFERS, or -errno) are written to
 * bytes_deduped[i] and status[i].  Returns 0 or -errno for the call itself. */
int ca_fideduperange(int src_fd, uint64_t src_offset, uint64_t length,
                     const int *dst_fds, const uint64_t *dst_offsets,
                     uint16_t count, uint64_t *bytes_deduped, int32_t *status);
/* BTRFS_IOC_FS_INFO: the filesystem's fsid (16 bytes). */
int ca_btrfs_fsid(int fd, uint8_t *uuid16);
/* fstatfs(2): the filesystem's magic type and its block size. */
int ca_fstatfs(int fd, uint64_t *fs_type, uint64_t *block_size);
/* syncfs(2): write out the filesystem fd lives on; reports writeback errors. */
int ca_syncfs(int fd);
/* sync_file_range(SYNC_FILE_RANGE_WRITE): start writeback, do not wait. */
int ca_sync_file_range(int fd, int64_t offset, int64_t length);
/* BTRFS_IOC_SNAP_CREATE_V2 on dst_dir_fd: a snapshot of the subvolume src_fd
 * named name in that directory (read-only if readonly). */
int ca_btrfs_snapshot(int src_fd, int dst_dir_fd, const char *name, int readonly);
/* BTRFS_IOC_SNAP_DESTROY: delete the subvolume name in the directory dir_fd. */
int ca_btrfs_snap_destroy(int dir_fd, const char *name);
/* BTRFS_IOC_TREE_SEARCH_V2 over the subvolume tree tree_id (0: the one fd
 * is in), for the EXTENT_DATA items of inode ino, looping until none is left.  On success *out is a
 * malloc'd array of *count items in file order (free it with ca_free) and 0
 * is returned; on failure -errno (EPERM without CAP_SYS_ADMIN). */
int ca_btrfs_file_extents(int fd, uint64_t tree_id, uint64_t ino,
                          struct ca_file_extent **out, size_t *count);
/* BTRFS_IOC_ENCODED_READ at offset: the extent there as stored, into buf
 * (buflen bytes), its metadata into *meta.  Returns the bytes read or -errno
 * (ENOBUFS: buf too small). */
/* BTRFS_IOC_LOGICAL_INO_V2 with BTRFS_LOGICAL_INO_ARGS_IGNORE_OFFSET: every
 * file extent item that refers to the extent at disk address logical, as
 * *count (inode, offset, root) triples in a malloc'd *out (free it with
 * ca_free).  An extent nothing refers to gives none.  -errno on failure
 * (EPERM without CAP_SYS_ADMIN, EOVERFLOW past 16 MiB of answers). */
int ca_btrfs_logical_ino(int fd, uint64_t logical, uint64_t **out, size_t *count);
int ca_btrfs_encoded_read(int fd, uint64_t offset, void *buf, size_t buflen,
                          struct ca_encoded *meta);
/* BTRFS_IOC_ENCODED_WRITE at offset of buflen encoded bytes described by
 * *meta.  Returns the bytes written or -errno. */
int ca_btrfs_encoded_write(int fd, uint64_t offset, const void *buf, size_t buflen,
                           const struct ca_encoded *meta);
/* FS_IOC_GETFLAGS: the inode flags of fd (an int, whatever <linux/fs.h>
 * says of its size: the kernel reads and writes an int). */
int ca_getflags(int fd, uint32_t *flags);
/* FS_IOC_SETFLAGS: set the inode flags of fd to flags. */
int ca_setflags(int fd, uint32_t flags);
/* BTRFS_IOC_SUBVOL_CREATE_V2 on dir_fd: a new, empty subvolume named name. */
int ca_btrfs_subvol_create(int dir_fd, const char *name);
/* BTRFS_IOC_GET_SUBVOL_INFO on fd (any file of the subvolume): its UUID, its
 * parent UUID (the subvolume it is a snapshot of; zeros if none) and its
 * root item's flags (BTRFS_ROOT_SUBVOL_RDONLY, not BTRFS_SUBVOL_RDONLY) and
 * its tree id (the root that LOGICAL_INO names). */
int ca_btrfs_subvol_info(int fd, uint8_t *uuid16, uint8_t *parent_uuid16, uint64_t *flags,
                         uint64_t *tree_id);
/* BTRFS_IOC_SUBVOL_SETFLAGS on fd (the subvolume's root): its flags. */
int ca_btrfs_subvol_setflags(int fd, uint64_t flags);
/* renameat2(2), for RENAME_NOREPLACE. */
int ca_renameat2(int olddirfd, const char *oldpath, int newdirfd,
                 const char *newpath, unsigned int flags);
/* The gear table of the content-defined cuts: entry i. */
uint64_t ca_gear(unsigned int i);
/* The length of the first manifest piece in buf[0 .. len) (docs/REPOSITORY.md,
 * "Manifest blobs"): the gear hash's cut (at least min_len bytes in, else
 * max_len) moved on to the first record boundary at or after it; if that is
 * beyond max_len, the last record boundary before; the hash's cut when no
 * record ends in the first max_len bytes (a record longer than a piece).  Records are framed (docs/FORMAT.md): an 8-byte
 * header whose u32 at 4 is the payload length, the payload, a 4-byte CRC; the
 * first starts at `first`.  `final`: buf holds the rest of the manifest, else
 * 0 is returned while len < max_len.  *next: where the first record starts in
 * the bytes after the cut. */
size_t ca_manifest_cut(const uint8_t *buf, size_t len, uint64_t first, size_t min_len,
                       size_t max_len, unsigned int bits, int final, uint64_t *next);

/* The BLOB records of a manifest piece whose first record starts at
 * `start` (cloneaware/repo/pieces.py): the offset of each one's payload in
 * offsets (at most max), every record's CRC checked; *next: where the first
 * record starts in the next piece.  -1 when the walk cannot follow: a BLOB
 * record (or a header) across pieces, a bad CRC, a BLOB of another size. */
int ca_piece_blobs(const uint8_t *buf, size_t len, uint64_t start, uint16_t blob_type,
                   uint32_t blob_payload, uint64_t *offsets, size_t max, size_t *n,
                   uint64_t *next);

/* One regular file taken from the files cache (cloneaware/repo/sink.py). */
struct ca_reg {
    uint32_t mode, uid, gid, iflags;
    int64_t atime, mtime;
    uint64_t size, ino;
    int64_t ctime;
    uint64_t path_off, path_len;
    uint64_t xa_start, xa_end;   /* its xattrs in the cache's encoding */
    uint64_t seg_start, seg_end; /* its blob ranges */
};
/* A blob range as the files cache holds it (filescache.SEG). */
struct ca_seg {
    uint64_t offset;
    uint32_t length, blob, blob_offset;
} __attribute__((packed));
/* The version 6 ENTRY, STAT, BLOB and END records of n such files into out:
 * the bytes written, and each file's ENTRY offset in out and its bytes in
 * blobs; -ENOSPC if out is too small, -EINVAL on a range out of bounds. */
int64_t ca_encode_regulars(const struct ca_reg *files, size_t n, const uint8_t *paths,
                           const uint8_t *xattrs, size_t xattrs_len,
                           const struct ca_seg *segs, size_t nsegs,
                           const uint8_t *blob_ids, size_t nblobs,
                           uint8_t *out, size_t out_len,
                           uint64_t *entry_at, uint64_t *blob_bytes);
/* One small regular file a restore makes whole in one go
 * (cloneaware/restore/smallfiles.py): its name (temporary, or final below a
 * new directory; NUL-terminated, at name_off in names) in dirfd: where
 * clone_len is not 0, its first clone_len bytes cloned from src_fd at
 * src_off (FICLONERANGE; where the kernel says it cannot clone that --
 * EOPNOTSUPP, ENOTTY, EINVAL, EXDEV, ENOSYS -- copied, its errno in
 * clone_err); then the data_len bytes at data_off in data, after them; a
 * trailing hole up to size; then owner (CA_SMALL_CHOWN), mode and times.  Out: err and step (1 open, 2 write, 3 truncate, 4 close, 5
 * clone or copy, 6 the source ended before clone_len) where it failed, and
 * the errno of each metadata call that failed. */
#define CA_SMALL_CHOWN 1
struct ca_small {
    int32_t dirfd;
    uint32_t mode, uid, gid, flags, name_len;
    uint64_t name_off, data_off, data_len, size;
    int64_t atime_sec, atime_nsec, mtime_sec, mtime_nsec;
    int32_t src_fd, reserved;
    uint64_t src_off, clone_len;
    int32_t err, step, chown_err, chmod_err, times_err, clone_err;
} __attribute__((packed));
/* Make files[0..n), on up to ``threads`` threads (CA_LIST_THREADS_MAX at
 * most), as if in order: the number made before the first that failed
 * (its err and step set, its name removed); those after it are left, or
 * removed again where another thread had made them.  No file may be
 * another's clone source. */
size_t ca_write_small(struct ca_small *files, size_t n, const uint8_t *names,
                      const uint8_t *data, int threads);

/* Small files read ahead of a backup's writer, in one call without the
 * GIL: each opened beneath dirfd (O_NOFOLLOW, O_NONBLOCK, O_NOATIME where
 * allowed), its fstat taken, its first ``want`` bytes read into data at
 * data_off (zeros past its end); with CA_RSMALL_META in ``what`` the
 * size of its xattr list (flistxattr) and its inode flags (FS_IOC_GETFLAGS)
 * or the errno of each, before the read; with CA_RSMALL_MAP its extent map
 * (FIEMAP with FIEMAP_FLAG_SYNC) taken just after the read: the first
 * CA_RSMALL_EXT extents, and their count.  Out: fd (left open for the
 * caller; -1 if not opened), got, and err and step (1 open, 2 fstat,
 * 3 read, 4 FIEMAP) of the step that failed.  Nothing is
 * read from a file that is not regular (its mode says so).  The files are
 * shared out among up to ``threads`` threads (CA_LIST_THREADS_MAX at most). */
#define CA_RSMALL_EXT 8
#define CA_RSMALL_MAP 1
#define CA_RSMALL_META 2
struct ca_rsmall {
    int32_t dirfd;
    uint32_t name_len;
    uint64_t name_off, data_off, want;
    int32_t fd, err;
    uint32_t step, n_ext;
    uint64_t got;
    int32_t xattr_err, iflags_err;
    uint32_t xattr_len, iflags;
    struct ca_dstat st;
    struct ca_extent ext[CA_RSMALL_EXT];
};
void ca_read_small(struct ca_rsmall *files, size_t n, const uint8_t *names, uint8_t *data,
                   int what, int threads);

