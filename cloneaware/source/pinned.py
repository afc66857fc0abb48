"""The space a group of files holds that nothing else holds: what deleting
them all would give back, as ``df`` would show it (issue 30: what a set of
anchors pins, the same whatever path was scanned).

- **Btrfs** (with CAP_SYS_ADMIN): each extent the files refer to
  (BTRFS_IOC_TREE_SEARCH_V2, docs/KERNEL.md I10) is asked who refers to it
  (BTRFS_IOC_LOGICAL_INO_V2, I14); an extent that only the group's files
  refer to is counted whole, with its size on disk.  An extent that any
  other file refers to, even in part, stays allocated when the group goes
  (D12) and is not counted.
- **elsewhere** (XFS, or Btrfs without the capability): FIEMAP, and the
  ranges it does not flag as shared (FIEMAP_EXTENT_SHARED: no other file
  refers to those blocks).  Blocks the group's files share only with one
  another are not counted there, so the figure is a lower bound; ``exact``
  says which it is."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from cloneaware import fsinfo, native
from cloneaware.source.flags import BTRFS_FILE_EXTENT_REG, FE_SHARED
from cloneaware.source.mapping import btrfs_file_extents, fiemap


@dataclass
class Pinned:
    bytes: int = 0
    files: int = 0
    #: every file was measured by the extent tree (Btrfs); False: FIEMAP's
    #: shared flag, a lower bound
    exact: bool = True


def pinned(fds: list[int], paths: list[bytes] | None = None) -> Pinned:
    """What the open regular files ``fds`` (one filesystem) hold that no
    other file holds."""
    out = Pinned(files=len(fds))
    if not fds:
        return out
    magic, _block = native.fstatfs(fds[0])
    if magic == fsinfo.BTRFS_MAGIC:
        # the extent tree is asked: a reference dropped since the last commit
        # (a file rewritten) is still there until the delayed refs run
        native.syncfs(fds[0], paths[0] if paths else None)
        try:
            out.bytes = _btrfs(fds, paths)
            return out
        except PermissionError:
            pass  # no CAP_SYS_ADMIN: FIEMAP's view
    out.exact = False
    for i, fd in enumerate(fds):
        m = fiemap(fd, paths[i] if paths else None)
        out.bytes += int(m["length"][(m["flags"] & FE_SHARED) == 0].sum())
    return out


def _btrfs(fds: list[int], paths: list[bytes] | None) -> int:
    mine: set[tuple[int, int]] = set()  # (tree, inode) of the group's files
    extents: dict[int, int] = {}  # disk address -> size on disk
    holder: dict[int, int] = {}  # disk address -> a descriptor to ask through
    for i, fd in enumerate(fds):
        st = os.fstat(fd)
        path = paths[i] if paths else None
        tree = native.btrfs_subvol_info(fd, path).tree_id
        mine.add((tree, st.st_ino))
        try:
            items = btrfs_file_extents(fd, st.st_ino, path)
        except OSError as e:
            if e.errno == errno.EPERM:
                raise PermissionError(e.errno, e.strerror, path) from None
            raise
        reg = items[(items["type"] == BTRFS_FILE_EXTENT_REG) & (items["disk_bytenr"] != 0)]
        for bytenr, size in zip(reg["disk_bytenr"].tolist(), reg["disk_num_bytes"].tolist(),
                                strict=True):
            extents[bytenr] = size
            holder.setdefault(bytenr, fd)
    total = 0
    for bytenr, size in extents.items():
        try:
            refs = native.btrfs_logical_ino(holder[bytenr], bytenr)
        except OSError as e:
            if e.errno == errno.EPERM:
                raise PermissionError(e.errno, e.strerror) from None
            continue  # too many references to list (EOVERFLOW), or gone: not counted
        if refs and all((root, ino) in mine for ino, _off, root in refs):
            total += size
    return total


def sum_pinned(parts: list[Pinned]) -> Pinned:
    out = Pinned()
    for p in parts:
        out.bytes += p.bytes
        out.files += p.files
        out.exact = out.exact and p.exact
    return out

