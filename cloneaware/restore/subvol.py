"""Btrfs subvolumes of a restore (docs/FORMAT.md, "Btrfs subvolumes"): on a
Btrfs destination a subvolume entry becomes a subvolume again, a snapshot a
snapshot of the restored subvolume it was taken of (when that one was
restored earlier in this run), made equal to the archive's tree, and a
read-only one is made read-only once everything in it is in place;
elsewhere it is a plain directory, and the restore says so.

A snapshot starts as a copy of its origin as restored so far (with the
origin's files still under their temporary names): the entries the archive
has for it replace what is there, and at the end whatever the archive does
not have for it is removed, so its tree is exactly the archive's."""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.fsinfo import BTRFS_MAGIC
from cloneaware.restore.tree import Tree
from cloneaware.safeio import remove_tree

#: the inode number of the stub a nested subvolume leaves in a snapshot
EMPTY_SUBVOL_INO = 2

_REFUSED = (errno.EPERM, errno.EACCES, errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL,
            errno.EXDEV, errno.ENOSYS)


def describe(e: fmt.Entry, paths: Callable[[int], bytes]) -> str:
    """A subvolume entry as messages name it (``paths``: entry id -> path)."""
    what = "a read-only Btrfs subvolume" if e.subvol & fmt.SV_READONLY \
        else "a Btrfs subvolume"
    if e.subvol & fmt.SV_SNAPSHOT:
        what += f" (a snapshot of {os.fsdecode(paths(e.origin))})"
    return what


class Subvolumes:
    def __init__(self, tree: Tree, not_exact: Callable[[fmt.Entry, str], None]):
        self.tree = tree
        self.not_exact = not_exact
        self.made: dict[int, bytes] = {}  # entry id -> path of a subvolume made here
        #: path of a subvolume made as a snapshot -> the archive's paths inside it
        self.snapshots: dict[bytes, set[bytes]] = {}
        self.readonly: list[fmt.Entry] = []
        self._btrfs: dict[int, bool] = {}  # st_dev -> is Btrfs
        self.count = 0

    def _is_btrfs(self, pfd: int) -> bool:
        dev = os.fstat(pfd).st_dev
        got = self._btrfs.get(dev)
        if got is None:
            got = self._btrfs[dev] = native.fstatfs(pfd)[0] == BTRFS_MAGIC
        return got

    def inside_snapshot(self, path: bytes) -> bytes | None:
        """The snapshot made here that holds ``path``, if any."""
        p = path
        while p:
            p = p.rpartition(b"/")[0]
            if p in self.snapshots:
                return p
        return None

    def note(self, path: bytes) -> None:
        """An entry of the archive: kept by the snapshots that hold it."""
        if not self.snapshots:  # nearly always: no ancestor walk per entry
            return
        p = path
        while p:
            p = p.rpartition(b"/")[0]
            kept = self.snapshots.get(p)
            if kept is not None:
                kept.add(path)

    def make(self, e: fmt.Entry, pfd: int, name: bytes, paths: Callable[[int], bytes]) -> bool:
        """Make the subvolume entry ``e`` as ``name`` in ``pfd``: True if it is
        a subvolume now; False if the caller is to make a directory (said as
        not exact).  FileExistsError when something is there."""
        what = describe(e, paths)
        if not self._is_btrfs(pfd):
            self.not_exact(e, f"{what}: restored as a plain directory (the destination is "
                           "not Btrfs)")
            return False
        origin = self.made.get(e.origin) if e.subvol & fmt.SV_SNAPSHOT else None
        try:
            if origin is not None:
                native.btrfs_snapshot(self.tree.dir(origin), pfd, name, readonly=False,
                                      path=self.tree.where(e.path))
                self.snapshots[e.path] = set()
            else:
                native.btrfs_subvol_create(pfd, name, self.tree.where(e.path))
        except FileExistsError:
            raise
        except OSError as ex:
            if ex.errno not in _REFUSED:
                raise
            self.not_exact(e, f"{what}: restored as a plain directory ({ex.strerror})")
            return False
        if e.subvol & fmt.SV_SNAPSHOT and origin is None:
            self.not_exact(e, f"{what}: restored as a subvolume of its own, not as a "
                           "snapshot (its origin was not restored before it)")
        self.made[e.id] = e.path
        if e.subvol & fmt.SV_READONLY:
            self.readonly.append(e)
        self.count += 1
        return True

    def clear_for(self, pfd: int, name: bytes, kind: int) -> None:
        """Inside a snapshot: take away what the origin left where an entry
        of another kind (or a subvolume's stub) is to go."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        if kind == fmt.K_DIR and is_dir and st.st_ino != EMPTY_SUBVOL_INO:
            return  # a directory to merge into
        if kind != fmt.K_DIR and not is_dir:
            return  # renamed over
        remove_tree(pfd, name)

    def prune(self) -> None:
        """Remove from each snapshot what the archive does not have in it."""
        for top, kept in self.snapshots.items():
            stack = [top]
            while stack:
                d = stack.pop()
                dfd = self.tree.dir(d)
                for n in sorted(os.listdir(dfd)):
                    name = os.fsencode(n)
                    p = d + b"/" + name
                    if p not in kept:
                        remove_tree(self.tree.dir(d), name)
                    elif stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                        stack.append(p)

    def make_readonly(self) -> None:
        for e in self.readonly:
            try:
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.tree.dir(e.path))
                try:
                    native.btrfs_subvol_setflags(fd, native.BTRFS_SUBVOL_RDONLY,
                                                 self.tree.where(e.path))
                finally:
                    os.close(fd)
            except OSError as ex:
                self.not_exact(e, f"not made read-only: {ex.strerror}")
