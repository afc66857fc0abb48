"""The only importer of the compiled extension.

Each function calls one ioctl (or one batched loop of it, in C) and turns a
negative errno into ``OSError(errno, strerror, path)``.  No policy lives here.
"""
from __future__ import annotations

import errno as _errno
import os
from typing import NamedTuple

import numpy as np

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

# FIEMAP extent flags (<linux/fiemap.h>).
FE_LAST = 0x1
FE_UNKNOWN = 0x2
FE_DELALLOC = 0x4
FE_ENCODED = 0x8
FE_DATA_ENCRYPTED = 0x80
FE_NOT_ALIGNED = 0x100
FE_DATA_INLINE = 0x200
FE_DATA_TAIL = 0x400
FE_UNWRITTEN = 0x800
FE_MERGED = 0x1000
FE_SHARED = 0x2000

RENAME_NOREPLACE = lib.RENAME_NOREPLACE

#: One extent: the layout of ``struct ca_extent`` (32 bytes).
EXTENT_DTYPE = np.dtype(
    [("logical", "<u8"), ("physical", "<u8"), ("length", "<u8"),
     ("flags", "<u4"), ("reserved", "<u4")]
)
assert EXTENT_DTYPE.itemsize == ffi.sizeof("struct ca_extent")

DEDUPE_SAME = 0
DEDUPE_DIFFERS = 1


def _fd(f) -> int:
    return f if isinstance(f, int) else f.fileno()


def _raise(neg: int, path) -> None:
    err = -neg
    raise OSError(err, os.strerror(err), path)


def fiemap(fd, path=None) -> np.ndarray:
    """Call FS_IOC_FIEMAP (with FIEMAP_FLAG_SYNC) for the whole file.

    Returns a structured array of EXTENT_DTYPE, in logical order.
    """
    out = ffi.new("struct ca_extent **")
    count = ffi.new("size_t *")
    rc = lib.ca_fiemap(_fd(fd), out, count)
    if rc < 0:
        _raise(rc, path)
    try:
        n = count[0]
        if n == 0:
            return np.zeros(0, dtype=EXTENT_DTYPE)
        buf = ffi.buffer(out[0], n * EXTENT_DTYPE.itemsize)
        return np.frombuffer(buf, dtype=EXTENT_DTYPE).copy()
    finally:
        lib.ca_free(out[0])


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
    reports an unaligned length as deduped while sharing only whole blocks.)
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
        if not still:
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


def getfsuuid(fd, path=None) -> bytes:
    """Call FS_IOC_GETFSUUID and return the filesystem's UUID."""
    buf = ffi.new("uint8_t[16]")
    rc = lib.ca_getfsuuid(_fd(fd), buf)
    if rc < 0:
        _raise(rc, path)
    return bytes(ffi.buffer(buf, rc))


def fstatfs(fd, path=None) -> tuple[int, int]:
    """Call fstatfs(2); return (filesystem magic, block size)."""
    t = ffi.new("uint64_t *")
    b = ffi.new("uint64_t *")
    rc = lib.ca_fstatfs(_fd(fd), t, b)
    if rc < 0:
        _raise(rc, path)
    return t[0], b[0]


def renameat2(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes,
              noreplace: bool = True) -> None:
    """Call renameat2(2); with noreplace, EEXIST if dst exists."""
    rc = lib.ca_renameat2(src_dir_fd, src, dst_dir_fd, dst,
                          RENAME_NOREPLACE if noreplace else 0)
    if rc < 0:
        _raise(rc, dst)


NOT_SUPPORTED = frozenset({_errno.EOPNOTSUPP, _errno.ENOTTY, _errno.EINVAL,
                           _errno.EXDEV, _errno.ENOSYS})
