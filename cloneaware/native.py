"""The only importer of the compiled extension (cloneaware._native).

Each function calls one system call or ioctl (or one batched loop of it, in
C) and turns a negative errno into ``OSError(errno, strerror, path)``.  No
policy lives here, and nothing heavier than cffi is imported: restore and
``cloneaware serve`` load this module, and numpy would double their start-up.
Extent maps cross as packed bytes; ``cloneaware.source.mapping`` views them
as numpy arrays.
"""
from __future__ import annotations

import array
import errno as _errno
import os
import struct
import time
from typing import NamedTuple

from cloneaware._version import __version__

try:
    from cloneaware._native import ffi, lib
except ImportError as e:  # pragma: no cover - build problem
    raise ImportError(
        f"cloneaware's native extension is missing or broken ({e}); "
        "reinstall with 'pip install .'"
    ) from e

_built_for = ffi.string(lib.ca_version()).decode()
if _built_for != __version__:  # pragma: no cover - stale build
    raise ImportError(
        f"cloneaware._native was built for version {_built_for} but the Python "
        f"code is {__version__}; rebuild with 'pip install .'"
    )

RENAME_NOREPLACE = lib.RENAME_NOREPLACE

#: Bytes per extent in what fiemap() returns: ``struct ca_extent``
#: (u64 logical, u64 physical, u64 length, u32 flags, u32 reserved).
EXTENT_SIZE = ffi.sizeof("struct ca_extent")

#: Bytes per item in what btrfs_file_extents() returns: ``struct
#: ca_file_extent`` (logical, disk_bytenr, disk_num_bytes, offset, num_bytes,
#: ram_bytes, generation as u64; compression, type, encryption, 0 as u8; u32 0).
FILE_EXTENT_SIZE = ffi.sizeof("struct ca_file_extent")

#: The largest encoded extent BTRFS_IOC_ENCODED_READ returns (128 KiB of
#: compressed data; docs/KERNEL.md).
ENCODED_MAX = 128 << 10

DEDUPE_SAME = 0
DEDUPE_DIFFERS = 1

#: errnos with which a filesystem or a range says "cannot clone or dedupe
#: this" (xfstests' common/reflink treats them alike).
NOT_SUPPORTED = frozenset({_errno.EOPNOTSUPP, _errno.ENOTTY, _errno.EINVAL,
                           _errno.EXDEV, _errno.ENOSYS})


def _fd(f) -> int:
    return f if isinstance(f, int) else f.fileno()


def _raise(neg: int, path) -> None:
    err = -neg
    raise OSError(err, os.strerror(err), path)


def fiemap(fd, path=None) -> bytes:
    """Call FS_IOC_FIEMAP (with FIEMAP_FLAG_SYNC) for the whole file.

    Returns the extents in logical order, packed, EXTENT_SIZE bytes each.
    """
    out = ffi.new("struct ca_extent **")
    count = ffi.new("size_t *")
    rc = lib.ca_fiemap(_fd(fd), out, count)
    if rc < 0:
        _raise(rc, path)
    try:
        n = count[0]
        return bytes(ffi.buffer(out[0], n * EXTENT_SIZE)) if n else b""
    finally:
        lib.ca_free(out[0])


#: ``struct ca_dstat`` (mode, uid, gid, err as u32/i32; ino, dev, nlink,
#: size as u64; atime, mtime, ctime in ns as i64; rdev, blocks as u64).
LIST_STAT = struct.Struct("<3Ii4Q3q2Q")
assert LIST_STAT.size == ffi.sizeof("struct ca_dstat")


def list_dirs(dirs: list[tuple[int, bytes | None]], threads: int
              ) -> list[tuple[int, int, bytes, bytes]]:
    """List and lstat directories at once on up to ``threads`` threads, in
    one call that holds no GIL: for each (parent descriptor, leaf) -- the
    directory ``leaf`` beneath it, opened O_NOFOLLOW, or None for the parent
    itself -- (its new descriptor, which the caller closes, or -1; the errno
    of opening or listing it, or 0; its names NUL-terminated one after
    another; their ``LIST_STAT`` records in the same order, ``err`` the errno
    of an entry's lstat, else 0)."""
    n = len(dirs)
    arr = ffi.new("struct ca_dirlist[]", n)
    keep = []
    for i, (pfd, leaf) in enumerate(dirs):
        arr[i].parent_fd = pfd
        if leaf is not None:
            c = ffi.new("char[]", leaf)
            keep.append(c)
            arr[i].leaf = c
    rc = lib.ca_list_dirs(arr, n, threads)
    if rc < 0:
        _raise(rc, None)
    out = []
    for i in range(n):
        d = arr[i]
        try:
            out.append((d.fd, d.err,
                        bytes(ffi.buffer(d.names, d.names_len)) if d.names_len else b"",
                        bytes(ffi.buffer(d.st, d.count * LIST_STAT.size))
                        if d.count and not d.err else b""))
        finally:
            lib.ca_free(d.names)
            lib.ca_free(d.st)
    return out


def arena_max(n: int) -> None:
    """At most ``n`` malloc arenas for the threads made from now on (see
    ``ca_arena_max``); called once, before any thread, by the command line."""
    rc = lib.ca_arena_max(n)
    if rc < 0:
        _raise(rc, None)


def trim() -> None:
    """Give malloc's free memory back to the kernel (``ca_trim``): after a
    step whose temporaries are gone, so that they do not count in the
    process's peak beside what comes next."""
    lib.ca_trim()


def trim_every(seconds: float) -> None:
    """From now on, give malloc's free memory back every ``seconds`` (on a
    daemon thread; ``ca_trim``).  A backup's and a restore's buffers come
    and go in sizes that glibc keeps in its heaps once freed: a restore of
    116,645 entries held 30 to 75 MiB more than it used, all along."""
    import threading  # here: ``cloneaware serve`` loads this module and no more

    def run() -> None:
        while True:
            time.sleep(seconds)
            lib.ca_trim()

    threading.Thread(target=run, name="trim", daemon=True).start()


def ficlonerange(dst_fd, src_fd, src_offset: int, length: int, dst_offset: int,
                 path=None) -> None:
    """Call the FICLONERANGE ioctl on dst_fd.  ``path`` names dst in errors."""
    rc = lib.ca_ficlonerange(_fd(dst_fd), _fd(src_fd), src_offset, length, dst_offset)
    if rc < 0:
        _raise(rc, path)


def ficlone(dst_fd, src_fd, path=None) -> None:
    """Call the FICLONE ioctl: dst becomes a clone of the whole of src."""
    rc = lib.ca_ficlone(_fd(dst_fd), _fd(src_fd))
    if rc < 0:
        _raise(rc, path)


class DedupeResult(NamedTuple):
    bytes_deduped: int
    status: int  # DEDUPE_SAME, DEDUPE_DIFFERS or -errno


def fideduperange_once(src_fd, src_offset: int, length: int,
                       dests: list[tuple[int, int]], path=None) -> list[DedupeResult]:
    """Call the FIDEDUPERANGE ioctl once on src_fd against (fd, offset) dests."""
    n = len(dests)
    if not 0 < n < 65536:
        raise ValueError("between 1 and 65535 destinations")
    fds = ffi.new("int[]", [_fd(d) for d, _ in dests])
    offs = ffi.new("uint64_t[]", [o for _, o in dests])
    done = ffi.new("uint64_t[]", n)
    status = ffi.new("int32_t[]", n)
    rc = lib.ca_fideduperange(_fd(src_fd), src_offset, length, fds, offs, n, done, status)
    if rc < 0:
        _raise(rc, path)
    return [DedupeResult(done[i], status[i]) for i in range(n)]


def fideduperange(src_fd, src_offset: int, length: int,
                  dests: list[tuple[int, int]], path=None) -> list[DedupeResult]:
    """FIDEDUPERANGE, looping while the kernel dedupes fewer bytes than asked.

    Returns per destination the total bytes deduped and the last status.
    The whole range was deduped only when the status is SAME *and*
    bytes_deduped == length: a kernel that stops making progress leaves a
    SAME with a shorter count.  A destination that answers DIFFERS or an
    error is not retried.  (Linux 6.18 dedupes 40 MiB in one call and
    reports an unaligned length as deduped while sharing only whole blocks:
    docs/KERNEL.md.)
    """
    results = [DedupeResult(0, DEDUPE_SAME) for _ in dests]
    pending = list(range(len(dests)))
    pos = 0
    while pending and pos < length:
        batch = [(dests[i][0], dests[i][1] + pos) for i in pending]
        answers = fideduperange_once(src_fd, src_offset + pos, length - pos, batch, path)
        step = None
        still = []
        for i, a in zip(pending, answers):
            total = results[i].bytes_deduped + a.bytes_deduped
            results[i] = DedupeResult(total, a.status)
            if a.status != DEDUPE_SAME:
                continue
            if a.bytes_deduped == 0:
                # No progress: the kernel will not go further (e.g. EOF).
                continue
            still.append(i)
            step = a.bytes_deduped if step is None else min(step, a.bytes_deduped)
        if not still or step is None:
            break
        # Destinations advance together; any that got ahead is re-asked from
        # the common position, which the kernel answers idempotently.
        for i in still:
            results[i] = DedupeResult(pos + step, DEDUPE_SAME)
        pending = still
        pos += step
    return results


def btrfs_fsid(fd, path=None) -> bytes:
    """Call BTRFS_IOC_FS_INFO and return the filesystem's fsid."""
    buf = ffi.new("uint8_t[16]")
    rc = lib.ca_btrfs_fsid(_fd(fd), buf)
    if rc < 0:
        _raise(rc, path)
    return bytes(ffi.buffer(buf, rc))


def btrfs_snapshot(src_fd, dst_dir_fd, name: bytes, readonly: bool = True, path=None) -> None:
    """Call BTRFS_IOC_SNAP_CREATE_V2: snapshot the subvolume src_fd as ``name``
    in the directory dst_dir_fd (read-only by default)."""
    rc = lib.ca_btrfs_snapshot(_fd(src_fd), _fd(dst_dir_fd), name, 1 if readonly else 0)
    if rc < 0:
        _raise(rc, path)


def btrfs_snap_destroy(dir_fd, name: bytes, path=None) -> None:
    """Call BTRFS_IOC_SNAP_DESTROY: delete the subvolume ``name`` in dir_fd."""
    rc = lib.ca_btrfs_snap_destroy(_fd(dir_fd), name)
    if rc < 0:
        _raise(rc, path)


def getflags(fd, path=None) -> int:
    """Call FS_IOC_GETFLAGS: the inode flags of fd."""
    out = ffi.new("uint32_t *")
    rc = lib.ca_getflags(_fd(fd), out)
    if rc < 0:
        _raise(rc, path)
    return int(out[0])


def setflags(fd, flags: int, path=None) -> None:
    """Call FS_IOC_SETFLAGS: set the inode flags of fd (all of them)."""
    rc = lib.ca_setflags(_fd(fd), flags)
    if rc < 0:
        _raise(rc, path)


#: the read-only flag as SUBVOL_SETFLAGS takes it (1 << 1) ...
BTRFS_SUBVOL_RDONLY = lib.BTRFS_SUBVOL_RDONLY
#: ... and as GET_SUBVOL_INFO reports it: the root item's flags (1 << 0)
BTRFS_ROOT_SUBVOL_RDONLY = lib.BTRFS_ROOT_SUBVOL_RDONLY


class SubvolInfo(NamedTuple):
    uuid: bytes
    parent_uuid: bytes  # zeros: not a snapshot
    flags: int  # the root item's: BTRFS_ROOT_SUBVOL_RDONLY
    tree_id: int  # the subvolume's tree (the root btrfs_logical_ino names)


def btrfs_subvol_create(dir_fd, name: bytes, path=None) -> None:
    """Call BTRFS_IOC_SUBVOL_CREATE_V2: a new subvolume ``name`` in dir_fd."""
    rc = lib.ca_btrfs_subvol_create(_fd(dir_fd), name)
    if rc < 0:
        _raise(rc, path)


def btrfs_subvol_info(fd, path=None) -> SubvolInfo:
    """Call BTRFS_IOC_GET_SUBVOL_INFO on a file of a subvolume."""
    u = ffi.new("uint8_t[16]")
    pu = ffi.new("uint8_t[16]")
    fl = ffi.new("uint64_t *")
    tid = ffi.new("uint64_t *")
    rc = lib.ca_btrfs_subvol_info(_fd(fd), u, pu, fl, tid)
    if rc < 0:
        _raise(rc, path)
    return SubvolInfo(bytes(ffi.buffer(u, 16)), bytes(ffi.buffer(pu, 16)), int(fl[0]),
                      int(tid[0]))


def btrfs_subvol_setflags(fd, flags: int, path=None) -> None:
    """Call BTRFS_IOC_SUBVOL_SETFLAGS on a subvolume's root directory."""
    rc = lib.ca_btrfs_subvol_setflags(_fd(fd), flags)
    if rc < 0:
        _raise(rc, path)


def btrfs_file_extents(fd, ino: int, path=None, tree_id: int = 0) -> bytes:
    """Call BTRFS_IOC_TREE_SEARCH_V2 (looping) for the EXTENT_DATA items of
    inode ``ino`` in subvolume tree ``tree_id`` (0: the one fd is in).
    Returns them in file order, packed, FILE_EXTENT_SIZE bytes each.  Needs
    CAP_SYS_ADMIN (EPERM otherwise)."""
    out = ffi.new("struct ca_file_extent **")
    count = ffi.new("size_t *")
    rc = lib.ca_btrfs_file_extents(_fd(fd), tree_id, ino, out, count)
    if rc < 0:
        _raise(rc, path)
    try:
        n = count[0]
        return bytes(ffi.buffer(out[0], n * FILE_EXTENT_SIZE)) if n else b""
    finally:
        lib.ca_free(out[0])


def btrfs_logical_ino(fd, logical: int, path=None) -> list[tuple[int, int, int]]:
    """Call BTRFS_IOC_LOGICAL_INO_V2 (ignoring offsets) on the filesystem of
    fd: every file extent item that refers to the extent at disk address
    ``logical``, as (inode, offset, root) triples.  Needs CAP_SYS_ADMIN."""
    out = ffi.new("uint64_t **")
    count = ffi.new("size_t *")
    rc = lib.ca_btrfs_logical_ino(_fd(fd), logical, out, count)
    if rc < 0:
        _raise(rc, path)
    try:
        v = ffi.unpack(out[0], count[0] * 3) if count[0] else []
        return [(v[i], v[i + 1], v[i + 2]) for i in range(0, len(v), 3)]
    finally:
        lib.ca_free(out[0])


class Encoded(NamedTuple):
    """One extent as BTRFS_IOC_ENCODED_READ returns it (or as written)."""

    data: bytes  # the bytes as stored (compressed), or plain
    len: int  # bytes of the file they stand for
    unencoded_len: int  # decompressed size of the whole extent
    unencoded_offset: int  # where the file's bytes start in it
    compression: int  # BTRFS_ENCODED_IO_COMPRESSION_*: 0 none, 1 zlib, 2 zstd, 3.. lzo
    encryption: int


def btrfs_encoded_read(fd, offset: int, buflen: int = ENCODED_MAX, path=None) -> Encoded:
    """Call BTRFS_IOC_ENCODED_READ once at ``offset``: one extent, as stored.
    Needs CAP_SYS_ADMIN."""
    buf = ffi.new("uint8_t[]", buflen)
    meta = ffi.new("struct ca_encoded *")
    rc = lib.ca_btrfs_encoded_read(_fd(fd), offset, buf, buflen, meta)
    if rc < 0:
        _raise(rc, path)
    return Encoded(bytes(ffi.buffer(buf, rc)), meta.len, meta.unencoded_len,
                   meta.unencoded_offset, meta.compression, meta.encryption)


def btrfs_encoded_write(fd, offset: int, data, length: int, unencoded_len: int,
                        unencoded_offset: int, compression: int, path=None) -> int:
    """Call BTRFS_IOC_ENCODED_WRITE once: ``data`` (compressed as
    ``compression`` says) becomes ``length`` bytes of the file at ``offset``.
    Returns the bytes written.  Needs CAP_SYS_ADMIN."""
    meta = ffi.new("struct ca_encoded *")
    meta.len, meta.unencoded_len, meta.unencoded_offset = length, unencoded_len, \
        unencoded_offset
    meta.compression, meta.encryption = compression, 0
    buf = ffi.from_buffer(data)
    rc = lib.ca_btrfs_encoded_write(_fd(fd), offset, buf, len(buf), meta)
    if rc < 0:
        _raise(rc, path)
    return rc


def fstatfs(fd, path=None) -> tuple[int, int]:
    """Call fstatfs(2); return (filesystem magic, block size)."""
    t = ffi.new("uint64_t *")
    b = ffi.new("uint64_t *")
    rc = lib.ca_fstatfs(_fd(fd), t, b)
    if rc < 0:
        _raise(rc, path)
    return t[0], b[0]


def renameat2(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes,
              noreplace: bool = True, path=None) -> None:
    """Call renameat2(2); with noreplace, EEXIST if dst exists.  ``path``
    names dst in errors (default: dst itself)."""
    rc = lib.ca_renameat2(src_dir_fd, src, dst_dir_fd, dst,
                          RENAME_NOREPLACE if noreplace else 0)
    if rc < 0:
        _raise(rc, dst if path is None else path)


def syncfs(fd, path=None) -> None:
    """Call syncfs(2): write out the filesystem fd is on.  It reports a
    writeback error seen since fd was opened, once, and errors of the
    filesystem's own sync to the first caller (docs/KERNEL.md, W4)."""
    rc = lib.ca_syncfs(_fd(fd))
    if rc < 0:
        _raise(rc, path)


def sync_file_range_write(fd, offset: int, length: int, path=None) -> None:
    """Call sync_file_range(SYNC_FILE_RANGE_WRITE): queue the range for
    writeback without waiting for it."""
    rc = lib.ca_sync_file_range(_fd(fd), offset, length)
    if rc < 0:
        _raise(rc, path)


def manifest_cut(buf, first: int, min_len: int, max_len: int, bits: int, final: bool
                 ) -> tuple[int, int]:
    """The length of the first manifest piece of ``buf``, cut on content at a
    record boundary (docs/REPOSITORY.md, "Manifest blobs"), and where the first
    record starts in the bytes after it; ``first``: where the first record
    starts in ``buf``.  (0, 0) if ``buf`` is too short to decide and not
    ``final``."""
    nxt = ffi.new("uint64_t *")
    n = lib.ca_manifest_cut(ffi.from_buffer(buf), len(buf), first, min_len, max_len, bits,
                            int(final), nxt)
    return int(n), int(nxt[0])


def piece_blobs(buf, start: int, blob_type: int, blob_payload: int
                ) -> tuple[array.array, int] | None:
    """The payload offsets (u64) of the BLOB records of a manifest piece
    whose first record starts at ``start``, every record's CRC checked, and
    where the first record starts in the next piece; None when the walk
    cannot follow (repo/pieces.py)."""
    cap = len(buf) // (12 + blob_payload) + 1  # a BLOB record takes 12 bytes and its payload
    offsets = array.array("Q", bytes(8 * cap))
    n = ffi.new("size_t *")
    nxt = ffi.new("uint64_t *")
    rc = lib.ca_piece_blobs(ffi.from_buffer(buf), len(buf), start, blob_type, blob_payload,
                            ffi.from_buffer("uint64_t[]", offsets), cap, n, nxt)
    if rc < 0:
        return None
    del offsets[n[0]:]
    return offsets, int(nxt[0])


#: bytes of one ``struct ca_reg`` and one ``struct ca_seg``
REG_SIZE = ffi.sizeof("struct ca_reg")
SEG_SIZE = ffi.sizeof("struct ca_seg")


def encode_regulars(files, n: int, paths, xattrs, segs, blob_ids, out_size: int
                    ) -> tuple[bytearray, array.array, array.array]:
    """The version 6 ENTRY, STAT, BLOB and END records of ``n`` regular
    files taken from the files cache (``files``: n ``struct ca_reg``;
    ``segs``: ``struct ca_seg`` ranges, ``blob_ids`` 32 bytes each, as the
    cache holds them) in one call: (their bytes, each file's ENTRY offset
    in them, each file's bytes in blobs).  ``out_size`` bounds the bytes."""
    out = bytearray(out_size)
    at = array.array("Q", bytes(8 * n))
    bb = array.array("Q", bytes(8 * n))
    rc = lib.ca_encode_regulars(
        ffi.from_buffer("struct ca_reg[]", files), n, ffi.from_buffer("uint8_t[]", paths),
        ffi.from_buffer("uint8_t[]", xattrs), len(xattrs),
        ffi.from_buffer("struct ca_seg[]", segs), len(segs) // SEG_SIZE,
        ffi.from_buffer("uint8_t[]", blob_ids), len(blob_ids) // 32,
        ffi.from_buffer("uint8_t[]", out), out_size, ffi.from_buffer("uint64_t[]", at),
        ffi.from_buffer("uint64_t[]", bb))
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc), "files cache records")
    del out[rc:]
    return out, at, bb


#: ``struct ca_small`` packed as ``SMALL_FORMAT`` (struct module), set up
#: by the caller (restore/smallfiles.py); the last six fields are its out
SMALL_FORMAT = "<iIIIIIQQQQqqqqiiQQiiiiii"
SMALL_SIZE = ffi.sizeof("struct ca_small")
SMALL_CHOWN = lib.CA_SMALL_CHOWN
#: where ``err`` begins in a packed ``struct ca_small``
SMALL_OUT = SMALL_SIZE - 24


def write_small(files: bytearray, n: int, names, data, threads: int = 2) -> int:
    """Make ``n`` small files (``files``: n packed ``struct ca_small``), each
    opened new, written, its owner, mode and times set, closed, on up to
    ``threads`` threads, as if in order; the number made before the first
    that failed (whose out fields say how; none after it is left made)."""
    cfiles = ffi.from_buffer("struct ca_small[]", files, require_writable=True)
    return int(lib.ca_write_small(cfiles, n, ffi.from_buffer("uint8_t[]", names),
                                  ffi.from_buffer("uint8_t[]", data), threads))


#: ``struct ca_rsmall`` (read_small): in dirfd, name_len, name_off,
#: data_off, want; out fd, err, step, n_ext, got, xattr_err, iflags_err,
#: xattr_len, iflags, the stat before the read (LIST_STAT), then
#: CA_RSMALL_EXT extents (EXTENT_SIZE each)
READ_SMALL = struct.Struct("<iI3QiiIIQiiII" + LIST_STAT.format[1:])
#: what read_small does besides opening, stat'ing and reading: map each
#: file after its read; read its xattr list's size and inode flags
READ_SMALL_MAP, READ_SMALL_META = lib.CA_RSMALL_MAP, lib.CA_RSMALL_META
READ_SMALL_EXT = lib.CA_RSMALL_EXT
READ_SMALL_SIZE = ffi.sizeof("struct ca_rsmall")
assert READ_SMALL.size == ffi.offsetof("struct ca_rsmall", "ext")
assert READ_SMALL_SIZE == READ_SMALL.size + READ_SMALL_EXT * EXTENT_SIZE


def read_small(files: bytearray, n: int, names, data: bytearray, what: int,
               threads: int = 4) -> None:
    """Open, fstat and read ``n`` small files (``files``: n packed
    ``struct ca_rsmall``; ``data``: where their bytes go) in one call
    without the GIL, doing also ``what`` says (READ_SMALL_MAP,
    READ_SMALL_META), on up to ``threads`` threads; each one's out fields
    say what was done and what failed.  The descriptors opened are the
    caller's to close."""
    lib.ca_read_small(ffi.from_buffer("struct ca_rsmall[]", files, require_writable=True), n,
                      ffi.from_buffer("uint8_t[]", names),
                      ffi.from_buffer("uint8_t[]", data, require_writable=True), what,
                      threads)
