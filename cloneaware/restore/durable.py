"""Names only for data on disk: complete, verified files wait under their
temporary names and get their final names in batches, after a syncfs of
every filesystem written to, so that even a crash or a failing disk leaves
no final name on data that never reached the disk."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from cloneaware import native
from cloneaware.errors import UsageError
from cloneaware.restore.tree import Tree
from cloneaware.safeio import remove_tree


@dataclass(slots=True)
class _Pending:
    parent: bytes
    tmp: bytes
    name: bytes
    path: bytes
    eid: int


class Placer:
    """Batches of renames.  ``placed`` maps an entry id to where it is now:
    (parent, temporary name) while pending, then (parent, name)."""

    #: A batch ends after this many files or bytes written (not reflinked),
    #: and at the end.
    BATCH_FILES = 4096
    BATCH_BYTES = 1 << 30

    def __init__(self, tree: Tree, force: bool):
        self.tree = tree
        self.force = force
        #: whether an entry may replace what is there without --force (the
        #: entries of a subvolume restored as a snapshot: restore/subvol.py)
        self.replaces: Callable[[bytes], bool] = lambda path: False
        self.placed: dict[int, tuple[bytes, bytes]] = {}
        self.pending: list[_Pending] = []
        self.pending_ids: set[int] = set()
        self.pending_bytes = 0
        #: st_dev -> a descriptor on that filesystem, opened before anything
        #: was written there (syncfs reports writeback errors seen since the
        #: descriptor was opened, once), owned here
        self.sync_fds: dict[int, int] = {}
        self.sync_failed = False

    def note_fs(self, dfd: int) -> None:
        """Remember the filesystem of a directory we are about to write in."""
        dev = os.fstat(dfd).st_dev
        if dev not in self.sync_fds:
            self.sync_fds[dev] = os.dup(dfd)

    def place(self, pfd: int, tmp: bytes, name: bytes, path: bytes) -> None:
        """Rename now (never over an existing entry unless --force)."""
        replace = self.force or self.replaces(path)
        try:
            try:
                native.renameat2(pfd, tmp, pfd, name, noreplace=not replace)
            except OSError as e:
                if not (replace and self.replaces(path)) or e.errno not in (
                        errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
                remove_tree(pfd, name)  # a directory of the snapshot's origin: not ours
                native.renameat2(pfd, tmp, pfd, name, noreplace=True)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise UsageError(f"{self.tree.where(path)} exists; "
                                 "use --force to overwrite it") from None
            raise OSError(e.errno, e.strerror, self.tree.where(path)) from None

    def defer(self, parent: bytes, tmp: bytes, name: bytes, path: bytes, eid: int,
              size: int) -> None:
        """Hand a complete file to the next batch."""
        self.pending.append(_Pending(parent, tmp, name, path, eid))
        self.pending_ids.add(eid)
        self.placed[eid] = (parent, tmp)
        self.pending_bytes += size
        if len(self.pending) >= self.BATCH_FILES or self.pending_bytes >= self.BATCH_BYTES:
            self.flush()

    def sync(self) -> None:
        """syncfs every filesystem written to; a failure is final (a retry
        would not see the writeback error again)."""
        try:
            for fd in self.sync_fds.values():
                native.syncfs(fd, "syncfs")
        except BaseException:
            self.sync_failed = True
            raise

    def _rename_pending(self, keep_going: bool = False) -> None:
        """Rename every pending file into place, in order.  keep_going: a file
        that cannot be placed loses its temporary file, the others go on."""
        while self.pending:
            p = self.pending[0]
            try:
                self.place(self.tree.dir(p.parent), p.tmp, p.name, p.path)
            except Exception:
                if not keep_going:
                    raise
                try:
                    os.unlink(p.tmp, dir_fd=self.tree.dir(p.parent))
                except OSError:
                    pass
            else:
                self.placed[p.eid] = (p.parent, p.name)
            self.pending.pop(0)
            self.pending_ids.discard(p.eid)
        self.pending_bytes = 0

    def flush(self, always: bool = False) -> None:
        """syncfs, then rename every pending file into place (``always``:
        syncfs even if none is pending)."""
        if self.pending or always:
            self.sync()
            self._rename_pending()

    def salvage(self) -> None:
        """On an error or an interrupt: files already complete and verified
        still get their names if the filesystem can make them durable (a full
        disk can); else their temporary files are removed."""
        try:
            if self.pending and not self.sync_failed:
                self.sync()
                self._rename_pending(keep_going=True)
        except BaseException:  # noqa: BLE001 - the first error is the one to report
            pass
        for p in self.pending:
            try:
                os.unlink(p.tmp, dir_fd=self.tree.dir(p.parent))
            except BaseException:  # noqa: BLE001
                pass
        self.pending = []
        self.pending_ids.clear()

    def close(self) -> None:
        for fd in self.sync_fds.values():
            os.close(fd)
        self.sync_fds.clear()
