"""``backup --snapshot``: back up a Btrfs subvolume from a read-only snapshot
of it, so that the whole tree is saved as of one instant, across files.

The snapshot is made beside the subvolume (in its parent directory, when
that is on the same Btrfs and writable; inside the subvolume otherwise) as
``.cloneaware-snapshot-<pid>-<hex>``, and deleted when the backup ends,
whether it succeeds, fails or is interrupted.  A snapshot left by a backup
that was killed (its pid no longer runs) is deleted by the next
``--snapshot`` backup of that subvolume, which says so.

Btrfs snapshots are not recursive: a subvolume nested inside PATH is an
empty directory in the snapshot.  Each such directory is reported; give a
nested subvolume as a PATH of its own to back it up.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable

from cloneaware import native
from cloneaware.errors import UsageError
from cloneaware.fsinfo import BTRFS_MAGIC
from cloneaware.safeio import pid_alive

#: The inode number of a Btrfs subvolume's root directory, and of the empty
#: directory that stands for a nested subvolume inside a snapshot.
SUBVOL_ROOT_INO = 256
EMPTY_SUBVOL_INO = 2
NAME = re.compile(rb"\.cloneaware-snapshot-(\d+)-[0-9a-f]{8}\Z")


def _fsid(fd: int, path: str) -> bytes | None:
    magic, _ = native.fstatfs(fd, path)
    return native.btrfs_fsid(fd, path) if magic == BTRFS_MAGIC else None


class Snapshots:
    """Read-only snapshots of the PATHs of one backup (a context manager).
    ``redirect`` maps each PATH (absolute, bytes) to its snapshot."""

    def __init__(self, paths: list, warn: Callable[[str], None], tidy: bool = True):
        """``tidy``: delete snapshots left by killed backups (not in a dry run)."""
        self.paths = paths
        self.warn = warn
        self.tidy = tidy
        self.redirect: dict[bytes, bytes] = {}
        self._made: list[tuple[int, bytes, bytes]] = []  # (dir fd, name, path)

    def __enter__(self) -> Snapshots:
        try:
            for p in self.paths:
                self._take(os.fsencode(os.path.abspath(os.fsencode(p))), str(p))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take(self, src: bytes, shown: str) -> None:
        if src in self.redirect:
            return
        try:
            fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise UsageError(f"{shown}: --snapshot needs a Btrfs subvolume; "
                                 "this is not a directory") from None
            raise UsageError(f"{shown}: {e.strerror}") from None
        try:
            fsid = _fsid(fd, shown)
            if fsid is None:
                raise UsageError(f"{shown}: --snapshot needs a Btrfs subvolume; "
                                 "this is not on Btrfs")
            if os.fstat(fd).st_ino != SUBVOL_ROOT_INO:
                raise UsageError(f"{shown}: --snapshot needs a Btrfs subvolume; this is a "
                                 "directory inside one (btrfs subvolume list shows them)")
            where = self._place(src, fsid)
            dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if self.tidy:
                    self._remove_stale(dfd, where)
                name = b".cloneaware-snapshot-%d-%s" % (os.getpid(),
                                                          secrets.token_hex(4).encode())
                path = os.path.join(where, name)
                try:
                    native.btrfs_snapshot(fd, dfd, name, readonly=True, path=shown)
                except OSError as e:
                    if e.errno in (errno.EPERM, errno.EACCES):
                        raise UsageError(f"{shown}: may not snapshot this subvolume "
                                         f"({e.strerror}); run as root or without "
                                         "--snapshot") from None
                    raise
            except BaseException:
                os.close(dfd)
                raise
            self._made.append((dfd, name, path))
            self.redirect[src] = path
        finally:
            os.close(fd)

    def _place(self, src: bytes, fsid: bytes) -> bytes:
        """The subvolume's parent directory if it is on the same Btrfs and
        writable, else the subvolume itself."""
        parent = os.path.dirname(src)
        if parent != src and os.access(parent, os.W_OK):
            try:
                pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return src
            try:
                if _fsid(pfd, os.fsdecode(parent)) == fsid:
                    return parent
            finally:
                os.close(pfd)
        return src

    def _remove_stale(self, dfd: int, where: bytes) -> None:
        for entry in os.scandir(dfd):
            name = os.fsencode(entry.name)
            m = NAME.match(name)
            if m and not pid_alive(int(m.group(1))) and entry.is_dir(follow_symlinks=False):
                try:
                    native.btrfs_snap_destroy(dfd, name)
                except OSError as e:
                    self.warn(f"{os.fsdecode(os.path.join(where, name))}: a snapshot left by "
                              f"an interrupted backup could not be deleted: {e.strerror}")
                else:
                    self.warn(f"{os.fsdecode(os.path.join(where, name))}: deleted a snapshot "
                              "left by an interrupted backup")

    def close(self) -> None:
        while self._made:
            dfd, name, path = self._made.pop()
            try:
                native.btrfs_snap_destroy(dfd, name)
            except OSError as e:
                self.warn(f"{os.fsdecode(path)}: could not delete the backup's snapshot: "
                          f"{e.strerror}; delete it with 'btrfs subvolume delete'")
            finally:
                os.close(dfd)


def is_nested_subvolume(st: os.stat_result) -> bool:
    """A directory that stands for a subvolume nested in a snapshot (empty)."""
    return stat.S_ISDIR(st.st_mode) and st.st_ino == EMPTY_SUBVOL_INO
