"""What a filesystem is and what it can do: identity, type, block size, and a
real trial reflink (as xfstests' common/reflink does) instead of guessing.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from cloneaware import native

BTRFS_MAGIC = 0x9123683E
XFS_MAGIC = 0x58465342
EXT4_MAGIC = 0xEF53
FS_NAMES = {
    BTRFS_MAGIC: "btrfs",
    XFS_MAGIC: "xfs",
    EXT4_MAGIC: "ext4",
    0x01021994: "tmpfs",
    0x2FC12FC1: "zfs",
    0x6969: "nfs",
    0xF2F52010: "f2fs",
    0x794C7630: "overlayfs",
    0x65735546: "fuse",
    0x9FA0: "proc",
}


def fs_type_name(magic: int) -> str:
    return FS_NAMES.get(magic, hex(magic))


@dataclass(frozen=True)
class FsInfo:
    """Identity of a filesystem: physical addresses are only comparable
    between files with the same ``key`` (docs/KERNEL.md: on Btrfs, subvolumes
    and snapshots have different st_dev but one address space, so the key is
    the fsid; elsewhere st_dev is the filesystem)."""

    key: str
    type: str
    block_size: int


_cache: dict[int, FsInfo] = {}


def forget() -> None:
    """Drop the cached identities.  An st_dev number is only unique while its
    filesystem is mounted: the kernel hands it to the next mount (Btrfs and
    tmpfs use anonymous device numbers, lowest free first), so a cache that
    outlives a mount would give a new filesystem an old one's key."""
    _cache.clear()


def fs_info(fd: int, st_dev: int, path=None) -> FsInfo:
    """FsInfo for the filesystem an open fd lives on (cached by st_dev)."""
    got = _cache.get(st_dev)
    if got is not None:
        return got
    magic, bsize = native.fstatfs(fd, path)
    if magic == BTRFS_MAGIC:
        key = "btrfs:" + native.btrfs_fsid(fd, path).hex()
    else:
        key = f"dev:{os.major(st_dev)}:{os.minor(st_dev)}"
    info = FsInfo(key=key, type=fs_type_name(magic), block_size=int(bsize))
    _cache[st_dev] = info
    return info


def dedupe_support(fd: int, size: int, block_size: int = 4096) -> bool | None:
    """Whether the filesystem of the regular file ``fd`` (``size`` bytes) can
    dedupe, asked without changing anything: FIDEDUPERANGE of the file's first
    block onto itself.  A filesystem that can dedupe refuses that overlap
    (EINVAL); one that cannot answers EOPNOTSUPP (docs/KERNEL.md D9).  None
    for an empty file, which cannot be asked."""
    n = min(size, block_size)
    if n <= 0:
        return None
    try:
        (got,) = native.fideduperange_once(fd, 0, n, [(fd, 0)])
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
            return False
        raise
    return -got.status not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS)


def errno_reason(err: int) -> str:
    if err == errno.EXDEV:
        return "different filesystems"
    if err in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
        return "filesystem cannot reflink"
    if err == errno.EINVAL:
        return "range not clonable (alignment)"
    return os.strerror(err)
