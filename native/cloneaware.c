/* cloneaware native layer.  See cloneaware.h for the contract. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <linux/btrfs.h>
#include <linux/btrfs_tree.h>
#include <sys/uio.h>
#include <sys/xattr.h>

#include "cloneaware.h"

#ifndef CA_VERSION
#error "CA_VERSION must be defined by the builder"
#endif

#define CA_FIEMAP_BATCH 512

const char *ca_version(void)
{
    return CA_VERSION;
}

void ca_free(void *p)
{
    free(p);
}

int ca_fiemap(int fd, struct ca_extent **out, size_t *count)
{
    size_t bufsize = sizeof(struct fiemap) +
                     CA_FIEMAP_BATCH * sizeof(struct fiemap_extent);
    struct fiemap *fm = malloc(bufsize);
    struct ca_extent *res = NULL;
    size_t n = 0, cap = 0;
    uint64_t start = 0;
    uint32_t reqflags = FIEMAP_FLAG_SYNC;
    int done = 0;

    *out = NULL;
    *count = 0;
    if (!fm)
        return -ENOMEM;
    while (!done) {
        memset(fm, 0, sizeof(struct fiemap));
        fm->fm_start = start;
        fm->fm_length = FIEMAP_MAX_OFFSET - start;
        fm->fm_flags = reqflags;
        fm->fm_extent_count = CA_FIEMAP_BATCH;
        if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0) {
            int err = errno;
            free(fm);
            free(res);
            return -err;
        }
        reqflags = 0; /* one sync is enough */
        if (fm->fm_mapped_extents == 0)
            break;
        if (n + fm->fm_mapped_extents > cap) {
            size_t ncap = cap ? cap * 2 : CA_FIEMAP_BATCH;
            struct ca_extent *nres;
            while (ncap < n + fm->fm_mapped_extents)
                ncap *= 2;
            nres = realloc(res, ncap * sizeof(*res));
            if (!nres) {
                free(fm);
                free(res);
                return -ENOMEM;
            }
            res = nres;
            cap = ncap;
        }
        for (uint32_t i = 0; i < fm->fm_mapped_extents; i++) {
            struct fiemap_extent *fe = &fm->fm_extents[i];
            res[n].logical = fe->fe_logical;
            res[n].physical = fe->fe_physical;
            res[n].length = fe->fe_length;
            res[n].flags = fe->fe_flags;
            res[n].reserved = 0;
            n++;
            if (fe->fe_flags & FIEMAP_EXTENT_LAST)
                done = 1;
        }
        {
            struct fiemap_extent *last =
                &fm->fm_extents[fm->fm_mapped_extents - 1];
            uint64_t next = last->fe_logical + last->fe_length;
            if (next <= start || next >= FIEMAP_MAX_OFFSET)
                done = 1; /* no progress: never loop forever */
            start = next;
        }
    }
    free(fm);
    *out = res;
    *count = n;
    return 0;
}

int ca_arena_max(int n)
{
    return mallopt(M_ARENA_MAX, n) ? 0 : -EINVAL;
}

void ca_trim(void)
{
    malloc_trim(0);
}

/* The names of directory fd into l (names, their offsets, count); the
 * stats array allocated, zeroed.  0 or -errno. */
static int list_names(int fd, struct ca_dirlist *l, size_t **offs_out)
{
    int dfd = dup(fd), err = 0;
    DIR *d;
    size_t ncap = 0, ocap = 0, *offs = NULL;
    struct dirent *de;

    *offs_out = NULL;
    if (dfd < 0)
        return -errno;
    d = fdopendir(dfd);
    if (!d) {
        err = errno;
        close(dfd);
        return -err;
    }
    rewinddir(d);  /* the dup shares fd's offset, which a listing moved */
    for (;;) {
        size_t len;

        errno = 0;
        de = readdir(d);
        if (!de) {
            err = errno;
            break;
        }
        if (de->d_name[0] == '.' &&
            (de->d_name[1] == 0 || (de->d_name[1] == '.' && de->d_name[2] == 0)))
            continue;
        len = strlen(de->d_name) + 1;
        if (l->names_len + len > ncap) {
            size_t nc = ncap ? ncap : 4096;
            char *nn;

            while (l->names_len + len > nc)
                nc *= 2;
            nn = realloc(l->names, nc);
            if (!nn) {
                err = ENOMEM;
                break;
            }
            l->names = nn;
            ncap = nc;
        }
        if (l->count == ocap) {
            size_t *no = realloc(offs, (ocap ? ocap * 2 : 64) * sizeof(*offs));

            if (!no) {
                err = ENOMEM;
                break;
            }
            offs = no;
            ocap = ocap ? ocap * 2 : 64;
        }
        memcpy(l->names + l->names_len, de->d_name, len);
        offs[l->count++] = l->names_len;
        l->names_len += len;
    }
    closedir(d);
    if (!err && l->count) {
        l->st = calloc(l->count, sizeof(*l->st));
        if (!l->st)
            err = ENOMEM;
    }
    if (err) {
        free(offs);
        return -err;
    }
    *offs_out = offs;
    return 0;
}

static void fill_dstat(const struct stat *sp, struct ca_dstat *o)
{
    const struct stat s = *sp;

    o->mode = s.st_mode;
    o->uid = s.st_uid;
    o->gid = s.st_gid;
    o->ino = s.st_ino;
    o->dev = s.st_dev;
    o->nlink = s.st_nlink;
    o->size = (uint64_t)s.st_size;
    o->atime_ns = (int64_t)s.st_atim.tv_sec * 1000000000 + s.st_atim.tv_nsec;
    o->mtime_ns = (int64_t)s.st_mtim.tv_sec * 1000000000 + s.st_mtim.tv_nsec;
    o->ctime_ns = (int64_t)s.st_ctim.tv_sec * 1000000000 + s.st_ctim.tv_nsec;
    o->rdev = s.st_rdev;
    o->blocks = (uint64_t)s.st_blocks;
}

static void stat_one(int dir_fd, const char *name, struct ca_dstat *o)
{
    struct stat s;

    if (fstatat(dir_fd, name, &s, AT_SYMLINK_NOFOLLOW) < 0) {
        o->err = errno;
        return;
    }
    fill_dstat(&s, o);
}

/* The entries of a batch are stat'ed in chunks of this many, taken by the
 * threads from a shared counter. */
#define CA_STAT_CHUNK 32

struct list_job {
    struct ca_dirlist *dirs;
    size_t n;
    size_t **offs;         /* per directory */
    size_t *chunk_dir;     /* per chunk: its directory and first entry */
    size_t *chunk_first;
    size_t nchunks;
    size_t next;           /* phase 1: next directory; phase 2: next chunk */
    int phase;
};

static void list_open_one(struct list_job *j, size_t i)
{
    struct ca_dirlist *l = &j->dirs[i];
    int fd = l->parent_fd;

    if (l->leaf) {
        fd = openat(l->parent_fd, l->leaf, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            l->err = errno;
            return;
        }
        l->fd = fd;
    }
    l->err = -list_names(fd, l, &j->offs[i]);
}

static void *list_worker(void *arg)
{
    struct list_job *j = arg;

    for (;;) {
        size_t k = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);

        if (j->phase == 1) {
            if (k >= j->n)
                break;
            list_open_one(j, k);
        } else {
            struct ca_dirlist *l;
            size_t end;

            if (k >= j->nchunks)
                break;
            l = &j->dirs[j->chunk_dir[k]];
            end = j->chunk_first[k] + CA_STAT_CHUNK;
            if (end > l->count)
                end = l->count;
            for (size_t e = j->chunk_first[k]; e < end; e++)
                stat_one(l->leaf ? l->fd : l->parent_fd,
                         l->names + j->offs[j->chunk_dir[k]][e], &l->st[e]);
        }
    }
    return NULL;
}

/* worker(job) on up to threads threads (CA_LIST_THREADS_MAX at most, no
 * more than work items), this one among them; back when all are done.
 * A thread that cannot be started leaves fewer: the same result. */
static void on_threads(void *(*worker)(void *), void *job, size_t work, int threads)
{
    pthread_t t[CA_LIST_THREADS_MAX];
    int started = 0;

    if (threads > CA_LIST_THREADS_MAX)
        threads = CA_LIST_THREADS_MAX;
    if (threads > 0 && (size_t)threads > work)
        threads = (int)work;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&t[started], NULL, worker, job) != 0)
            break;
        started++;
    }
    worker(job);
    for (int i = 0; i < started; i++)
        pthread_join(t[i], NULL);
}

/* Run the current phase on up to threads threads (this one among them). */
static void list_phase(struct list_job *j, size_t work, int threads)
{
    j->next = 0;
    on_threads(list_worker, j, work, threads);
}

int ca_list_dirs(struct ca_dirlist *dirs, size_t n, int threads)
{
    struct list_job j;
    size_t c = 0;
    int rc = 0;

    memset(&j, 0, sizeof(j));
    j.dirs = dirs;
    j.n = n;
    for (size_t i = 0; i < n; i++) {
        dirs[i].fd = -1;
        dirs[i].err = 0;
        dirs[i].names = NULL;
        dirs[i].st = NULL;
        dirs[i].names_len = dirs[i].count = 0;
    }
    j.offs = calloc(n ? n : 1, sizeof(*j.offs));
    if (!j.offs)
        return -ENOMEM;
    j.phase = 1;
    list_phase(&j, n, threads);
    for (size_t i = 0; i < n; i++)
        if (!dirs[i].err)
            j.nchunks += (dirs[i].count + CA_STAT_CHUNK - 1) / CA_STAT_CHUNK;
    j.chunk_dir = malloc((j.nchunks ? j.nchunks : 1) * sizeof(size_t));
    j.chunk_first = malloc((j.nchunks ? j.nchunks : 1) * sizeof(size_t));
    if (!j.chunk_dir || !j.chunk_first) {
        rc = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        for (size_t e = 0; !dirs[i].err && e < dirs[i].count; e += CA_STAT_CHUNK) {
            j.chunk_dir[c] = i;
            j.chunk_first[c++] = e;
        }
    j.phase = 2;
    list_phase(&j, j.nchunks, threads);
out:
    for (size_t i = 0; i < n; i++)
        free(j.offs[i]);
    free(j.offs);
    free(j.chunk_dir);
    free(j.chunk_first);
    if (rc < 0)
        for (size_t i = 0; i < n; i++) {
            if (dirs[i].fd >= 0)
                close(dirs[i].fd);
            free(dirs[i].names);
            free(dirs[i].st);
            dirs[i].fd = -1;
            dirs[i].names = NULL;
            dirs[i].st = NULL;
        }
    return rc;
}

int ca_ficlonerange(int dst_fd, int src_fd, uint64_t src_offset,
                    uint64_t length, uint64_t dst_offset)
{
    struct file_clone_range r = {
        .src_fd = src_fd,
        .src_offset = src_offset,
        .src_length = length,
        .dest_offset = dst_offset,
    };
    return ioctl(dst_fd, FICLONERANGE, &r) < 0 ? -errno : 0;
}

int ca_ficlone(int dst_fd, int src_fd)
{
    return ioctl(dst_fd, FICLONE, src_fd) < 0 ? -errno : 0;
}

int ca_fideduperange(int src_fd, uint64_t src_offset, uint64_t length,
                     const int *dst_fds, const uint64_t *dst_offsets,
                     uint16_t count, uint64_t *bytes_deduped, int32_t *status)
{
    size_t size = sizeof(struct file_dedupe_range) +
                  (size_t)count * sizeof(struct file_dedupe_range_info);
    struct file_dedupe_range *r = calloc(1, size);
    int ret = 0;

    if (!r)
        return -ENOMEM;
    r->src_offset = src_offset;
    r->src_length = length;
    r->dest_count = count;
    for (uint16_t i = 0; i < count; i++) {
        r->info[i].dest_fd = dst_fds[i];
        r->info[i].dest_offset = dst_offsets[i];
    }
    if (ioctl(src_fd, FIDEDUPERANGE, r) < 0) {
        ret = -errno;
    } else {
        for (uint16_t i = 0; i < count; i++) {
            bytes_deduped[i] = r->info[i].bytes_deduped;
            status[i] = r->info[i].status;
        }
    }
    free(r);
    return ret;
}

int ca_btrfs_fsid(int fd, uint8_t *uuid16)
{
    struct btrfs_ioctl_fs_info_args args;

    memset(&args, 0, sizeof(args));
    if (ioctl(fd, BTRFS_IOC_FS_INFO, &args) < 0)
        return -errno;
    memcpy(uuid16, args.fsid, 16);
    return 16;
}

int ca_renameat2(int olddirfd, const char *oldpath, int newdirfd,
                 const char *newpath, unsigned int flags)
{
    return renameat2(olddirfd, oldpath, newdirfd, newpath, flags) < 0
               ? -errno : 0;
}

int ca_fstatfs(int fd, uint64_t *fs_type, uint64_t *block_size)
{
    struct statfs st;

    if (fstatfs(fd, &st) < 0)
        return -errno;
    *fs_type = (uint64_t)st.f_type;
    *block_size = (uint64_t)st.f_bsize;
    return 0;
}

int ca_syncfs(int fd)
{
    return syncfs(fd) < 0 ? -errno : 0;
}

int ca_sync_file_range(int fd, int64_t offset, int64_t length)
{
    return sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) < 0 ? -errno : 0;
}

int ca_btrfs_snapshot(int src_fd, int dst_dir_fd, const char *name, int readonly)
{
    struct btrfs_ioctl_vol_args_v2 args;

    if (strlen(name) > BTRFS_SUBVOL_NAME_MAX)
        return -ENAMETOOLONG;
    memset(&args, 0, sizeof(args));
    args.fd = src_fd;
    args.flags = readonly ? BTRFS_SUBVOL_RDONLY : 0;
    strcpy(args.name, name);
    return ioctl(dst_dir_fd, BTRFS_IOC_SNAP_CREATE_V2, &args) < 0 ? -errno : 0;
}

int ca_btrfs_snap_destroy(int dir_fd, const char *name)
{
    struct btrfs_ioctl_vol_args args;

    if (strlen(name) > BTRFS_PATH_NAME_MAX)
        return -ENAMETOOLONG;
    memset(&args, 0, sizeof(args));
    strcpy(args.name, name);
    return ioctl(dir_fd, BTRFS_IOC_SNAP_DESTROY, &args) < 0 ? -errno : 0;
}

int ca_getflags(int fd, uint32_t *flags)
{
    int f = 0;

    if (ioctl(fd, FS_IOC_GETFLAGS, &f) < 0)
        return -errno;
    *flags = (uint32_t)f;
    return 0;
}

int ca_setflags(int fd, uint32_t flags)
{
    int f = (int)flags;

    return ioctl(fd, FS_IOC_SETFLAGS, &f) < 0 ? -errno : 0;
}

int ca_btrfs_subvol_create(int dir_fd, const char *name)
{
    struct btrfs_ioctl_vol_args_v2 args;

    if (strlen(name) > BTRFS_SUBVOL_NAME_MAX)
        return -ENAMETOOLONG;
    memset(&args, 0, sizeof(args));
    strcpy(args.name, name);
    return ioctl(dir_fd, BTRFS_IOC_SUBVOL_CREATE_V2, &args) < 0 ? -errno : 0;
}

int ca_btrfs_subvol_info(int fd, uint8_t *uuid16, uint8_t *parent_uuid16, uint64_t *flags,
                         uint64_t *tree_id)
{
    struct btrfs_ioctl_get_subvol_info_args args;

    memset(&args, 0, sizeof(args));
    if (ioctl(fd, BTRFS_IOC_GET_SUBVOL_INFO, &args) < 0)
        return -errno;
    memcpy(uuid16, args.uuid, 16);
    memcpy(parent_uuid16, args.parent_uuid, 16);
    *flags = args.flags;
    *tree_id = args.treeid;
    return 0;
}

int ca_btrfs_subvol_setflags(int fd, uint64_t flags)
{
    return ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, &flags) < 0 ? -errno : 0;
}

#define CA_SEARCH_BUF (64 * 1024)

int ca_btrfs_file_extents(int fd, uint64_t tree_id, uint64_t ino,
                          struct ca_file_extent **out, size_t *count)
{
    struct btrfs_ioctl_search_args_v2 *args =
        malloc(sizeof(*args) + CA_SEARCH_BUF);
    struct ca_file_extent *res = NULL;
    size_t n = 0, cap = 0;
    uint64_t start = 0;

    *out = NULL;
    *count = 0;
    if (!args)
        return -ENOMEM;
    for (;;) {
        struct btrfs_ioctl_search_key *k = &args->key;
        size_t pos = 0;
        uint64_t last = 0;

        memset(k, 0, sizeof(*k));
        k->tree_id = tree_id; /* 0: the subvolume fd is in */
        k->min_objectid = k->max_objectid = ino;
        k->min_type = k->max_type = BTRFS_EXTENT_DATA_KEY;
        k->min_offset = start;
        k->max_offset = (uint64_t)-1;
        k->min_transid = 0;
        k->max_transid = (uint64_t)-1;
        k->nr_items = (uint32_t)-1;
        args->buf_size = CA_SEARCH_BUF;
        if (ioctl(fd, BTRFS_IOC_TREE_SEARCH_V2, args) < 0) {
            int err = errno;
            free(args);
            free(res);
            return -err;
        }
        if (k->nr_items == 0)
            break;
        for (uint32_t i = 0; i < k->nr_items; i++) {
            struct btrfs_ioctl_search_header sh;
            const uint8_t *item;

            if (pos + sizeof(sh) > CA_SEARCH_BUF)
                break;
            memcpy(&sh, args->buf + pos, sizeof(sh));
            pos += sizeof(sh);
            if (pos + sh.len > CA_SEARCH_BUF)
                break;
            item = args->buf + pos;
            pos += sh.len;
            last = sh.offset;
            /* generation(8) ram_bytes(8) compression encryption other(2) type
             * = 21 bytes, then disk_bytenr disk_num_bytes offset num_bytes */
            if (sh.objectid != ino || sh.type != BTRFS_EXTENT_DATA_KEY || sh.len < 21)
                continue;
            if (n == cap) {
                size_t ncap = cap ? cap * 2 : 256;
                struct ca_file_extent *nres = realloc(res, ncap * sizeof(*res));
                if (!nres) {
                    free(args);
                    free(res);
                    return -ENOMEM;
                }
                res = nres;
                cap = ncap;
            }
            {
                struct ca_file_extent *e = &res[n++];
                memset(e, 0, sizeof(*e));
                e->logical = sh.offset;
                memcpy(&e->generation, item, 8);
                memcpy(&e->ram_bytes, item + 8, 8);
                e->compression = item[16];
                e->encryption = item[17];
                e->type = item[20];
                if (e->type != BTRFS_FILE_EXTENT_INLINE && sh.len >= 53) {
                    memcpy(&e->disk_bytenr, item + 21, 8);
                    memcpy(&e->disk_num_bytes, item + 29, 8);
                    memcpy(&e->offset, item + 37, 8);
                    memcpy(&e->num_bytes, item + 45, 8);
                } else {
                    e->num_bytes = e->ram_bytes;
                }
            }
        }
        if (last == (uint64_t)-1 || last < start)
            break; /* the end of the key space, or no progress */
        start = last + 1;
    }
    free(args);
    *out = res;
    *count = n;
    return 0;
}

int ca_btrfs_logical_ino(int fd, uint64_t logical, uint64_t **out, size_t *count)
{
    /* the kernel caps the container at 16 MiB (SZ_16M for version 2) */
    size_t size = 64 * 1024;

    *out = NULL;
    *count = 0;
    for (;;) {
        struct btrfs_ioctl_logical_ino_args a;
        struct btrfs_data_container *c = calloc(1, size);

        if (!c)
            return -ENOMEM;
        memset(&a, 0, sizeof(a));
        a.logical = logical;
        a.size = size;
        a.flags = BTRFS_LOGICAL_INO_ARGS_IGNORE_OFFSET;
        a.inodes = (uintptr_t)c;
        if (ioctl(fd, BTRFS_IOC_LOGICAL_INO_V2, &a) < 0) {
            int err = errno;
            free(c);
            return err == ENOENT ? 0 : -err; /* ENOENT: nothing refers to it */
        }
        if (c->bytes_missing && size < 16 * 1024 * 1024) {
            size_t want = size + c->bytes_missing;
            free(c);
            size = want < 16 * 1024 * 1024 ? want : 16 * 1024 * 1024;
            continue;
        }
        if (c->elem_missed) {
            free(c);
            return -EOVERFLOW; /* more references than 16 MiB holds */
        }
        {
            size_t n = c->elem_cnt / 3;
            uint64_t *res = malloc((n ? n : 1) * 3 * sizeof(uint64_t));
            if (!res) {
                free(c);
                return -ENOMEM;
            }
            memcpy(res, c->val, n * 3 * sizeof(uint64_t));
            free(c);
            *out = res;
            *count = n;
            return 0;
        }
    }
}

int ca_btrfs_encoded_read(int fd, uint64_t offset, void *buf, size_t buflen,
                          struct ca_encoded *meta)
{
    struct iovec iov = { .iov_base = buf, .iov_len = buflen };
    struct btrfs_ioctl_encoded_io_args a;
    int rc;

    memset(&a, 0, sizeof(a));
    a.iov = &iov;
    a.iovcnt = 1;
    a.offset = (int64_t)offset;
    rc = ioctl(fd, BTRFS_IOC_ENCODED_READ, &a);
    if (rc < 0)
        return -errno;
    meta->len = a.len;
    meta->unencoded_len = a.unencoded_len;
    meta->unencoded_offset = a.unencoded_offset;
    meta->compression = a.compression;
    meta->encryption = a.encryption;
    return rc;
}

int ca_btrfs_encoded_write(int fd, uint64_t offset, const void *buf, size_t buflen,
                           const struct ca_encoded *meta)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = buflen };
    struct btrfs_ioctl_encoded_io_args a;
    int rc;

    memset(&a, 0, sizeof(a));
    a.iov = &iov;
    a.iovcnt = 1;
    a.offset = (int64_t)offset;
    a.len = meta->len;
    a.unencoded_len = meta->unencoded_len;
    a.unencoded_offset = meta->unencoded_offset;
    a.compression = meta->compression;
    a.encryption = meta->encryption;
    rc = ioctl(fd, BTRFS_IOC_ENCODED_WRITE, &a);
    return rc < 0 ? -errno : rc;
}

/* Content-defined cuts (docs/REPOSITORY.md, "Manifest blobs"): a gear
 * rolling hash, h = (h << 1) + GEAR[byte], whose top bits depend on the
 * last 64 bytes only; a cut follows the first byte, at least min_len in,
 * after which the top `bits` bits of h are all zero, and comes at max_len at
 * the latest.  The table is splitmix64's sequence from seed 0, so that any
 * writer cuts the same bytes in the same places. */
static uint64_t gear[256];

__attribute__((constructor)) static void gear_init(void)
{
    uint64_t x = 0;
    for (int i = 0; i < 256; i++) {
        uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        gear[i] = z ^ (z >> 31);
    }
}

uint64_t ca_gear(unsigned int i)
{
    return gear[i & 255];
}

static size_t gear_cut(const uint8_t *buf, size_t end, size_t min_len, unsigned int bits)
{
    uint64_t mask = bits ? ~0ULL << (64 - bits) : 0, h = 0;
    size_t i = min_len > 64 ? min_len - 64 : 0;
    for (; i < end; i++) {
        h = (h << 1) + gear[buf[i]];
        if (i + 1 >= min_len && !(h & mask))
            return i + 1;
    }
    return end;
}

size_t ca_manifest_cut(const uint8_t *buf, size_t len, uint64_t first, size_t min_len,
                       size_t max_len, unsigned int bits, int final, uint64_t *next)
{
    size_t end = len < max_len ? len : max_len, c, cut;
    uint64_t r = first, last = 0;
    *next = 0;
    if (len == 0 || (!final && len < max_len))
        return 0;
    c = end > min_len ? gear_cut(buf, end, min_len, bits) : end;
    if (first > 0 && first <= end)
        last = first;
    while (r < c && r + 8 <= len) {
        uint32_t l = (uint32_t)buf[r + 4] | (uint32_t)buf[r + 5] << 8 |
                     (uint32_t)buf[r + 6] << 16 | (uint32_t)buf[r + 7] << 24;
        r += 12 + (uint64_t)l;
        if (r <= end)
            last = r;
    }
    if (r >= c && r <= end)
        cut = r;
    else if (last)
        cut = last;
    else {
        cut = c;  /* inside a record longer than the piece: where the hash says */
        if (r > c)
            *next = r - c;
    }
    return cut;
}

/* --- manifest records of files taken from the files cache, in batches ----- */

static uint32_t crc_table[256];

__attribute__((constructor)) static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_of(const uint8_t *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFU;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFU;
}

int ca_piece_blobs(const uint8_t *buf, size_t len, uint64_t start, uint16_t blob_type,
                   uint32_t blob_payload, uint64_t *offsets, size_t max, size_t *n,
                   uint64_t *next)
{
    uint64_t pos = start;
    *n = 0;
    *next = 0;
    while (pos + 8 <= len) {
        uint16_t type = (uint16_t)(buf[pos] | buf[pos + 1] << 8);
        uint32_t l = (uint32_t)buf[pos + 4] | (uint32_t)buf[pos + 5] << 8 |
                     (uint32_t)buf[pos + 6] << 16 | (uint32_t)buf[pos + 7] << 24;
        uint64_t end = pos + 12 + (uint64_t)l, crc;
        if (end > len) {
            if (type == blob_type)
                return -1;  /* a BLOB record across pieces */
            *next = end - len;  /* a long record, on into the next pieces */
            return 0;
        }
        crc = (uint64_t)buf[end - 4] | (uint64_t)buf[end - 3] << 8 |
              (uint64_t)buf[end - 2] << 16 | (uint64_t)buf[end - 1] << 24;
        if (crc32_of(buf + pos, 8 + (size_t)l) != crc)
            return -1;
        if (type == blob_type) {
            if (l != blob_payload || *n >= max)
                return -1;
            offsets[(*n)++] = pos + 8;
        }
        pos = end;
    }
    if (pos < len)
        return -1;  /* a record header across pieces */
    *next = pos - len;
    return 0;
}

static uint8_t *put8(uint8_t *p, uint8_t v) { *p = v; return p + 1; }
static uint8_t *put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); return p + 2; }
static uint8_t *put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); return p + 4; }
static uint8_t *put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); return p + 8; }
static uint8_t *zeros(uint8_t *p, size_t n) { memset(p, 0, n); return p + n; }

/* Closes the record whose frame header is at rec: its payload length, then
 * the CRC of header and payload (docs/FORMAT.md, "Records"). */
static uint8_t *close_record(uint8_t *rec, uint8_t *end)
{
    put32(rec + 4, (uint32_t)(end - rec - 8));
    return put32(end, crc32_of(rec, (size_t)(end - rec)));
}

static uint8_t *open_record(uint8_t *p, uint16_t type)
{
    p = put16(p, type);
    p = put16(p, 0);
    return put32(p, 0);
}

int64_t ca_encode_regulars(const struct ca_reg *files, size_t n, const uint8_t *paths,
                           const uint8_t *xattrs, size_t xattrs_len,
                           const struct ca_seg *segs, size_t nsegs,
                           const uint8_t *blob_ids, size_t nblobs,
                           uint8_t *out, size_t out_len,
                           uint64_t *entry_at, uint64_t *blob_bytes)
{
    uint8_t *p = out, *limit = out + out_len;
    for (size_t i = 0; i < n; i++) {
        const struct ca_reg *f = &files[i];
        uint64_t nseg = f->seg_end - f->seg_start, xlen = f->xa_end - f->xa_start;
        if (f->seg_end < f->seg_start || f->seg_end > nsegs || f->xa_end < f->xa_start ||
            f->xa_end > xattrs_len || f->path_len == 0 || f->path_len > 65535)
            return -EINVAL;
        /* an upper bound of what this file takes: the caller sized out */
        if ((size_t)(limit - p) < 100 + 2 + f->path_len + 6 + xlen + 28 + 60 * nseg + 80)
            return -ENOSPC;
        entry_at[i] = (uint64_t)(p - out);
        /* ENTRY (version 6: id 0) */
        uint8_t *rec = p;
        p = open_record(p, 2);
        p = put64(p, 0);
        p = put8(p, 1); /* REG */
        p = put8(p, 0);
        p = put16(p, 0);
        p = put32(p, f->mode);
        p = put32(p, f->uid);
        p = put32(p, f->gid);
        p = put64(p, (uint64_t)f->atime);
        p = put64(p, (uint64_t)f->mtime);
        p = put64(p, f->size);
        p = zeros(p, 16); /* rdev, link */
        p = put32(p, f->iflags);
        p = zeros(p, 12); /* subvol, reserved, origin */
        p = put16(p, (uint16_t)f->path_len);
        memcpy(p, paths + f->path_off, f->path_len);
        p += f->path_len;
        p = put16(p, 0); /* no target */
        uint8_t *count_at = p;
        p += 4;
        uint32_t count = 0;
        /* the cache's xattrs (u32 name length, u32 value length, name,
         * value) as ENTRY's (u8 name length, name, u32 value length, value) */
        const uint8_t *x = xattrs + f->xa_start, *xend = xattrs + f->xa_end;
        while (x < xend) {
            uint32_t nl, vl;
            if (xend - x < 8)
                return -EINVAL;
            memcpy(&nl, x, 4);
            memcpy(&vl, x + 4, 4);
            x += 8;
            if (nl == 0 || nl > 255 || (uint64_t)(xend - x) < (uint64_t)nl + vl)
                return -EINVAL;
            p = put8(p, (uint8_t)nl);
            memcpy(p, x, nl);
            p += nl;
            p = put32(p, vl);
            memcpy(p, x + nl, vl);
            p += vl;
            x += nl + vl;
            count++;
        }
        put32(count_at, count);
        p = close_record(rec, p);
        /* STAT */
        rec = p;
        p = open_record(p, 12);
        p = put64(p, f->ino);
        p = put64(p, (uint64_t)f->ctime);
        p = close_record(rec, p);
        /* BLOB, one per range */
        uint64_t bytes = 0;
        for (uint64_t s = f->seg_start; s < f->seg_end; s++) {
            const struct ca_seg *g = &segs[s];
            if (g->blob >= nblobs)
                return -EINVAL;
            rec = p;
            p = open_record(p, 11);
            p = put64(p, g->offset);
            p = put32(p, g->length);
            p = put32(p, g->blob_offset);
            memcpy(p, blob_ids + 32 * (size_t)g->blob, 32);
            p += 32;
            p = close_record(rec, p);
            bytes += g->length;
        }
        blob_bytes[i] = bytes;
        /* END (version 6: id 0): only BLOB counts */
        rec = p;
        p = open_record(p, 5);
        p = zeros(p, 56); /* id (0 in version 6) to external_bytes */
        p = put32(p, (uint32_t)nseg);
        p = put64(p, bytes);
        p = close_record(rec, p);
    }
    return (int64_t)(p - out);
}


static int small_fail(struct ca_small *s, int fd, const char *name, int step)
{
    s->err = errno;
    s->step = step;
    if (fd >= 0)
        close(fd);
    unlinkat(s->dirfd, name, 0);
    return -1;
}

/* The first clone_len bytes of a file from s->src_fd: cloned, else copied
 * (its reason in clone_err).  -1 with errno set (and step 6 if the source is
 * short). */
static int small_clone(struct ca_small *s, int fd)
{
    struct file_clone_range r;
    uint64_t done = 0;
    char *buf = NULL;

    memset(&r, 0, sizeof(r));
    r.src_fd = s->src_fd;
    r.src_offset = s->src_off;
    r.src_length = s->clone_len;
    r.dest_offset = 0;
    if (ioctl(fd, FICLONERANGE, &r) == 0)
        return 0;
    if (errno != EOPNOTSUPP && errno != ENOTTY && errno != EINVAL && errno != EXDEV &&
        errno != ENOSYS)
        return -1;
    s->clone_err = errno;
    while (done < s->clone_len) {
        loff_t so = (loff_t)(s->src_off + done), dof = (loff_t)done;
        ssize_t n = buf ? 0 : copy_file_range(s->src_fd, &so, fd, &dof,
                                              s->clone_len - done, 0);

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EXDEV && errno != EINVAL && errno != ENOSYS &&
            errno != EOPNOTSUPP) {
            free(buf);
            return -1;
        }
        if (n <= 0) {  /* read and write */
            uint64_t want = s->clone_len - done;
            ssize_t got, w;

            if (!buf && !(buf = malloc(1 << 16)))
                return -1;
            if (want > (1 << 16))
                want = 1 << 16;
            got = pread(s->src_fd, buf, want, (off_t)(s->src_off + done));
            if (got < 0 && errno == EINTR)
                continue;
            if (got <= 0) {
                if (got == 0) {
                    errno = EIO;
                    s->step = 6;
                }
                free(buf);
                return -1;
            }
            for (ssize_t off = 0; off < got; off += w) {
                w = pwrite(fd, buf + off, (size_t)(got - off), (off_t)(done + (uint64_t)off));
                if (w < 0 && errno == EINTR) {
                    w = 0;
                    continue;
                }
                if (w <= 0) {
                    if (w == 0)
                        errno = EIO;
                    free(buf);
                    return -1;
                }
            }
            n = got;
        }
        done += (uint64_t)n;
    }
    free(buf);
    return 0;
}

static int small_one(struct ca_small *s, const uint8_t *names, const uint8_t *data)
{
    const char *name = (const char *)names + s->name_off;
    const uint8_t *p = data + s->data_off;
    uint64_t done = 0;
    struct timespec ts[2];
    int fd;

    fd = openat(s->dirfd, name,
                O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NOATIME, 0600);
    if (fd < 0) {
        s->err = errno;
        s->step = 1;
        return -1;  /* nothing of ours at that name */
    }
    if (s->clone_len && small_clone(s, fd) < 0)
        return small_fail(s, fd, name, s->step ? s->step : 5);
    while (done < s->data_len) {
        ssize_t w = pwrite(fd, p + done, s->data_len - done, (off_t)(s->clone_len + done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            if (w == 0)
                errno = EIO;
            return small_fail(s, fd, name, 2);
        }
        done += (uint64_t)w;
    }
    if (s->size > s->data_len + s->clone_len && ftruncate(fd, (off_t)s->size) < 0)
        return small_fail(s, fd, name, 3);
    if ((s->flags & CA_SMALL_CHOWN) && fchown(fd, s->uid, s->gid) < 0)
        s->chown_err = errno;
    if (fchmod(fd, s->mode) < 0)  /* after fchown, which clears set-id bits */
        s->chmod_err = errno;
    ts[0].tv_sec = s->atime_sec;
    ts[0].tv_nsec = s->atime_nsec;
    ts[1].tv_sec = s->mtime_sec;
    ts[1].tv_nsec = s->mtime_nsec;
    if (futimens(fd, ts) < 0)
        s->times_err = errno;
    if (close(fd) < 0)
        return small_fail(s, -1, name, 4);
    return 0;
}

struct write_small_job {
    struct ca_small *files;
    size_t n;
    const uint8_t *names, *data;
    size_t next;   /* the next file to take, atomically */
    size_t failed; /* the lowest index that failed (n: none), atomically */
};

static void *write_small_worker(void *arg)
{
    struct write_small_job *j = arg;
    size_t i;

    while ((i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED)) < j->n) {
        struct ca_small *s = &j->files[i];
        size_t low;

        if (i > __atomic_load_n(&j->failed, __ATOMIC_RELAXED))
            break; /* after a failure: not attempted */
        s->err = s->step = 0;
        s->chown_err = s->chmod_err = s->times_err = 0;
        s->clone_err = 0;
        if (small_one(s, j->names, j->data) == 0)
            continue;
        low = __atomic_load_n(&j->failed, __ATOMIC_RELAXED);
        while (i < low && !__atomic_compare_exchange_n(&j->failed, &low, i, 0,
                                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            ;
    }
    return NULL;
}

size_t ca_write_small(struct ca_small *files, size_t n, const uint8_t *names,
                      const uint8_t *data, int threads)
{
    struct write_small_job j = {files, n, names, data, 0, n};

    for (size_t i = 0; i < n; i++)
        files[i].err = -1; /* not attempted, until a worker takes it */
    /* the kernel's work for a file (create, write, owner, mode, times,
     * close) is spread over a few threads: files of a batch are
     * independent (a clone's source is never in its own batch) */
    on_threads(write_small_worker, &j, n, threads);
    /* as if made in order: what was made after the first failure is
     * removed (its out fields say nothing) */
    for (size_t i = j.failed + 1; i < n && j.failed < n; i++) {
        struct ca_small *s = &files[i];

        if (s->err == 0 && s->step == 0)
            unlinkat(s->dirfd, (const char *)names + s->name_off, 0);
    }
    return j.failed;
}

/* ---- small files read ahead of a backup's writer ---------------------- */

static int read_small_fail(struct ca_rsmall *f, int step)
{
    f->err = errno;
    f->step = (uint32_t)step;
    return -1;
}

static int read_small_one(struct ca_rsmall *f, const uint8_t *names, uint8_t *data,
                          int what)
{
    char name[4096];
    struct stat s;
    uint8_t *buf = data + f->data_off;
    struct ca_extent *ext = NULL;
    size_t count = 0;
    int fd, rc;
    const int flags = O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK;

    if (f->name_len >= sizeof(name)) {
        errno = ENAMETOOLONG;
        return read_small_fail(f, 1);
    }
    memcpy(name, names + f->name_off, f->name_len);
    name[f->name_len] = 0;
    fd = openat(f->dirfd, name, flags | O_NOATIME);
    if (fd < 0 && errno == EPERM)
        fd = openat(f->dirfd, name, flags);
    if (fd < 0)
        return read_small_fail(f, 1);
    f->fd = fd;
    if (fstat(fd, &s) < 0)
        return read_small_fail(f, 2);
    fill_dstat(&s, &f->st);
    if (!S_ISREG(s.st_mode))
        return 0; /* the caller sees the mode: nothing read */
    if (what & CA_RSMALL_META) {
        ssize_t xl = flistxattr(fd, NULL, 0);
        uint32_t fl = 0;
        int frc;
        if (xl < 0)
            f->xattr_err = errno;
        else
            f->xattr_len = xl > (ssize_t)UINT32_MAX ? UINT32_MAX : (uint32_t)xl;
        frc = ca_getflags(fd, &fl);
        if (frc < 0)
            f->iflags_err = -frc;
        else
            f->iflags = fl;
    }
    while (f->got < f->want) {
        ssize_t r = pread(fd, buf + f->got, f->want - f->got, (off_t)f->got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return read_small_fail(f, 3);
        }
        if (r == 0)
            break; /* shorter than planned: the rest reads as zeros */
        f->got += (uint64_t)r;
    }
    memset(buf + f->got, 0, f->want - f->got);
    if (!(what & CA_RSMALL_MAP))
        return 0;
    rc = ca_fiemap(fd, &ext, &count);
    if (rc < 0) {
        errno = -rc;
        return read_small_fail(f, 4);
    }
    f->n_ext = (uint32_t)count;
    memcpy(f->ext, ext, (count < CA_RSMALL_EXT ? count : CA_RSMALL_EXT) * sizeof(*ext));
    free(ext);
    return 0;
}

struct read_small_job {
    struct ca_rsmall *files;
    size_t n;
    const uint8_t *names;
    uint8_t *data;
    int what;
    size_t next; /* the next file to take, atomically */
};

static void *read_small_worker(void *arg)
{
    struct read_small_job *j = arg;
    size_t i;

    while ((i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED)) < j->n) {
        struct ca_rsmall *f = &j->files[i];
        f->fd = -1;
        f->err = 0;
        f->step = 0;
        f->n_ext = 0;
        f->got = 0;
        f->xattr_err = f->iflags_err = 0;
        f->xattr_len = f->iflags = 0;
        read_small_one(f, j->names, j->data, j->what);
    }
    return NULL;
}

void ca_read_small(struct ca_rsmall *files, size_t n, const uint8_t *names, uint8_t *data,
                   int what, int threads)
{
    struct read_small_job j = {files, n, names, data, what, 0};

    /* the cold reads of a batch wait on the disk one after another on
     * one thread: a few threads keep several in flight */
    on_threads(read_small_worker, &j, n, threads);
}
