"""What a backup records of an entry besides its data: kind, mode, owner,
times, xattrs; and the comparisons that say a file did not change."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct

import numpy as np

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.source.walk import Node

#: XFS's private copies of the POSIX ACLs that listxattr also returns as
#: system.posix_acl_* (docs/KERNEL.md): storing both would plant a stray
#: xattr on any other filesystem.
XATTR_SKIP = {b"trusted.SGI_ACL_FILE", b"trusted.SGI_ACL_DEFAULT"}


def read_xattrs(target: bytes | int, follow: bool = False) -> list[tuple[bytes, bytes]]:
    """The xattrs of a path (not following a symlink) or an open fd, sorted."""
    try:
        names = os.listxattr(target) if isinstance(target, int) \
            else os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOSYS, errno.EPERM):
            return []
        raise
    out = []
    for n in sorted(names):
        bn = n.encode("utf-8", "surrogateescape")
        if bn in XATTR_SKIP:
            continue
        try:
            v = os.getxattr(target, n) if isinstance(target, int) \
                else os.getxattr(target, n, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                continue
            raise
        out.append((bn, v))
    return out


def read_iflags(fd: int) -> int:
    """The inode flags of fd that an archive stores (docs/FORMAT.md, "Inode
    flags"); 0 where the filesystem has none (FS_IOC_GETFLAGS refused)."""
    try:
        return native.getflags(fd) & fmt.IFLAGS_STORED
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS,
                       errno.EPERM, errno.EACCES):
            return 0
        raise


def entry_for(node: Node, kind: int, st: os.stat_result) -> fmt.Entry:
    """An Entry with the metadata of ``st`` (its id is set by the writer)."""
    return fmt.Entry(
        id=0, kind=kind, path=node.name, mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
    )


def kind_of(mode: int) -> int | None:
    """The archive kind of a non-regular file, or None if it has none."""
    if stat.S_ISDIR(mode):
        return fmt.K_DIR
    if stat.S_ISLNK(mode):
        return fmt.K_SYMLINK
    if stat.S_ISFIFO(mode):
        return fmt.K_FIFO
    if stat.S_ISCHR(mode):
        return fmt.K_CHR
    if stat.S_ISBLK(mode):
        return fmt.K_BLK
    if stat.S_ISSOCK(mode):
        return fmt.K_SOCK
    return None


def same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    """Inode, size, mtime and ctime all equal: the metadata rule."""
    return (a.st_ino == b.st_ino and a.st_size == b.st_size
            and a.st_mtime_ns == b.st_mtime_ns and a.st_ctime_ns == b.st_ctime_ns)


def layout(ext: np.ndarray) -> np.ndarray:
    """(logical, physical, length) runs of a map, with extents that continue
    each other both logically and physically merged.  XFS reports a map
    split where the sharing of its blocks changes (docs/KERNEL.md F6): a
    file whose blocks become shared with a clone (ours, taken to read it)
    reports fewer, longer extents for the same blocks."""
    if len(ext) == 0:
        return np.zeros((0, 3), dtype=np.uint64)
    lg, ph, ln = ext["logical"], ext["physical"], ext["length"]
    cont = np.ones(len(ext), dtype=bool)
    cont[1:] = (lg[1:] != lg[:-1] + ln[:-1]) | (ph[1:] != ph[:-1] + ln[:-1]) | (ph[1:] == 0)
    starts = np.nonzero(cont)[0]
    out = np.empty((len(starts), 3), dtype=np.uint64)
    out[:, 0] = lg[starts]
    out[:, 1] = ph[starts]
    out[:, 2] = np.add.reduceat(ln, starts)
    return out


def map_digest(ext: np.ndarray) -> bytes:
    """16 bytes that stand for a map's layout: two maps have the same digest
    when they put the same bytes in the same physical places, flags aside
    and runs split differently by the filesystem alike (and, but for a
    2**-128 chance, only then).  A backup keeps this of each file from the walk to compare
    with the map of the file's clone (or of the file after it is read),
    instead of the map itself: 32 bytes per extent for the whole backup."""
    if len(ext) > SMALL_MAP:
        return hashlib.blake2b(np.ascontiguousarray(layout(ext)).tobytes(),
                               digest_size=16).digest()
    # A small file's map (most maps have one extent) merged the same way in
    # plain Python: the numpy calls above cost 11 us a map, twice a file read.
    runs: list[int] = []
    for lg, ph, ln, _f, _r in ext.tolist():
        if runs and lg == runs[-3] + runs[-1] and ph == runs[-2] + runs[-1] and ph != 0:
            runs[-1] += ln
        else:
            runs += (lg, ph, ln)
    return hashlib.blake2b(_RUN.pack(*runs) if len(runs) == 3 else
                           struct.pack(f"={len(runs)}Q", *runs), digest_size=16).digest()


#: maps of up to this many extents are digested without numpy
SMALL_MAP = 8
_RUN = struct.Struct("=3Q")
