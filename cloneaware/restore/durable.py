"""Names only for data on disk: complete, verified files wait under their
temporary names and get their final names in batches, after a syncfs of
every filesystem written to, so that even a crash or a failing disk leaves
no final name on data that never reached the disk."""
from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cloneaware import fsinfo, native
from cloneaware.archive.records import background_thread
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


class EarlyWriteback:
    """Writeback started while the restore goes on.  Nothing restored is
    named before a syncfs, and the kernel starts writing dirty pages back
    only after 30 s or a tenth of memory: a restore of a gigabyte of small
    files paid all of its writeback in the syncfs at the end, with the
    disk idle before it (1.8 s of a 14 s restore).  Here a thread calls
    syncfs on each filesystem written to once ``STEP`` more bytes were
    written (``dirty()``), so the disk works while the restore's thread
    does.  It names nothing: the Placer's own syncfs still decides.

    Its descriptors are opened anew, not dup'ed: syncfs reports an error
    kept per superblock once to each open file, so those it sees are
    reported to the Placer's too (docs/KERNEL.md, W4).  An error it is
    told of is kept (``error``) and fails the Placer's next sync all the
    same: syncfs also reports errors that are not kept per open file (a
    filesystem's own sync, its block device's pages), to whichever call
    comes first.  Only on the filesystems where it was measured to pay
    (``KINDS``): on Btrfs every syncfs commits a transaction (0.99x), and
    on a network or FUSE filesystem it costs round trips."""

    STEP = 64 << 20
    #: how often the thread looks at the count
    POLL = 0.2
    #: filesystem magic numbers (statfs) it runs on: XFS (measured 0.91x
    #: on the bench's archive restore), ext4 (the same writeback)
    KINDS = (fsinfo.XFS_MAGIC, fsinfo.EXT4_MAGIC)

    def __init__(self, dirty: Callable[[], int] | None):
        self.dirty = dirty
        self.fds: dict[int, int] = {}
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        #: the first error a syncfs of the thread's gave
        self.error: OSError | None = None

    def add(self, dev: int, dfd: int) -> None:
        """A filesystem the restore writes to, by a directory on it."""
        if self.dirty is None or dev in self.fds or self.done.is_set():
            return
        try:
            if native.fstatfs(dfd)[0] not in self.KINDS:
                return
            self.fds[dev] = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                    dir_fd=dfd)
        except OSError:
            return  # it costs speed only
        if self.thread is None:
            t = threading.Thread(target=self._run, name="writeback", daemon=True)
            try:
                t.start()
            except RuntimeError:  # no thread to be had: it costs speed only
                return
            self.thread = t

    def _run(self) -> None:
        background_thread()
        assert self.dirty is not None
        last = self.dirty()
        while not self.done.wait(self.POLL):
            now = self.dirty()
            if now - last < self.STEP:
                continue
            last = now
            for fd in list(self.fds.values()):
                try:
                    native.syncfs(fd)
                except OSError as e:
                    if self.error is None:
                        self.error = e

    def stop(self) -> None:
        """The thread ended (after a syncfs it is in) and its descriptors
        closed."""
        self.done.set()
        if self.thread is not None:
            self.thread.join()  # interrupted: the descriptors stay, for the thread
            self.thread = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class Placer:
    """Batches of renames.  ``placed`` maps an entry id to where it is now:
    (parent, temporary name) while pending, then (parent, name)."""

    #: A batch ends after this many files or bytes written (not reflinked),
    #: and at the end.
    BATCH_FILES = 4096
    BATCH_BYTES = 1 << 30

    def __init__(self, tree: Tree, force: bool, dirty: Callable[[], int] | None = None):
        self.tree = tree
        self.force = force
        #: ``dirty``: the bytes written so far, to start writeback early by
        self.writeback = EarlyWriteback(dirty)
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
            self.writeback.add(dev, dfd)

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
            early = self.writeback.error
            if early is not None:  # told to the thread's syncfs, perhaps to it alone
                raise OSError(early.errno, early.strerror, "syncfs")
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
        self.writeback.stop()
        for fd in self.sync_fds.values():
            os.close(fd)
        self.sync_fds.clear()
