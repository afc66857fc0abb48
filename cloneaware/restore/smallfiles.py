"""Small files made in batches (issue 36): a regular file of up to
``SMALL_MAX`` bytes, or of any size whose bytes are clones of one range of
one earlier file that was seen to clone (a reflinked copy: its pieces, an
extent or a blob each, follow each other), then up to ``SMALL_MAX`` bytes
after them, with nothing about it that needs a decision on the way
(no xattrs, no inode flags, not cloned from, not --reshare-existing
or --share-with) is held in memory from its ENTRY to its END and then made
with many others in one native call (``native.write_small``: open under its
temporary name, or its final one below a new directory: restore/fresh.py;
write, trailing hole, owner, mode, times, close), instead
of a dozen Python calls each.  The call runs on a helper thread while the
restore goes on (the kernel's work on one core, the decoding on the other):
batches are made in order (up to ``Holder.DEPTH`` queued) while the next is
held, and whatever needs a file of one (a link, a clone, a checkpoint, the
end) waits for it, and those before it, first.  The
durability rule is the Placer's, as for every other file
(restore/durable.py): the files get their final names in its batches,
after a syncfs.

The output decides (restore/directory.py): what is held here, and when
something needs a held file on disk (a hard link to it, a clone from it,
the end of the run) it flushes first.  Anything a held file's bytes cannot
take as they come (a range not at its end, a clone that does not follow
the clones before it or comes after bytes, an encoded extent, more than
``SMALL_MAX`` bytes) turns it into an ordinary open file (``unhold``)."""
from __future__ import annotations

import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.archive.records import background_thread
from cloneaware.errors import ArchiveError
from cloneaware.restore.tree import temp_name

#: files of up to this many bytes may be held for their bytes (a bigger one
#: only for clones, from a source seen to clone)
SMALL_MAX = 64 << 10
_ST = struct.Struct(native.SMALL_FORMAT)
_OUT = struct.Struct("<iiiiii")


@dataclass(slots=True)
class Held:
    """A file made in a batch: its first ``cloned`` bytes cloned (if any),
    then its bytes in memory, in order, after them."""

    entry: fmt.Entry
    parent: bytes
    name: bytes
    data: bytearray
    #: made under its final name, below a new directory (restore/fresh.py)
    fresh: bool = False
    #: cloned instead, from byte 0: from a descriptor (a copy, owned
    #: here), at an offset, of a source of a size, by a Cloner channel
    clone: tuple[int, int, int, str] | None = None
    #: the bytes cloned so far (from byte 0 on, one range of the source
    #: in pieces that follow each other), and which file they come from
    cloned: int = 0
    source: tuple | None = None
    #: after it was made: the errno with which the clone was copied, or 0
    clone_err: int = 0

    def close(self) -> None:
        if self.clone is not None:
            os.close(self.clone[0])
            self.clone = None


class SmallFiles:
    """A batch of held files.  ``made(held, tmp, written, failures)`` is called
    for each file made, in order, with the name it was made under, its bytes written
    and the metadata calls that failed ((what, errno) pairs)."""

    #: a batch ends after this many files or bytes held, or descriptors
    #: held (one a directory, one a clone's source; one more at most, as a
    #: file may bring both): three batches (Holder.DEPTH queued or being
    #: made, one held) within the 1,024 a process may have open by default,
    #: with the restore's other caches (about 330, and a local repository's
    #: 257 directories of packs: about 300 left)
    BATCH_FILES = 2048
    BATCH_BYTES = 16 << 20
    BATCH_FDS = 96

    def __init__(self, chown: bool):
        self.chown = chown
        self.files: list[tuple[Held, bytes]] = []  # with the name it is made under
        self.ids: set[int] = set()
        self.bytes = 0
        self.clones = 0
        #: parent path -> a descriptor of it, owned here until the flush
        self.dirs: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.files)

    def full(self) -> bool:
        return len(self.files) >= self.BATCH_FILES or self.bytes >= self.BATCH_BYTES \
            or len(self.dirs) + self.clones >= self.BATCH_FDS

    def add(self, held: Held, pfd: int, tmp: bytes) -> None:
        if held.parent not in self.dirs:
            self.dirs[held.parent] = os.dup(pfd)
        self.files.append((held, tmp))
        self.ids.add(held.entry.id)
        self.bytes += len(held.data) + held.cloned  # the work a batch holds up
        self.clones += held.clone is not None

    def drop(self) -> None:
        """Forget every held file (none was made)."""
        for h, _ in self.files:
            h.close()
        self.files, self.ids, self.bytes, self.clones = [], set(), 0, 0
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs = {}

    def take(self, into: list[Made] | None = None) -> Made:
        """Every held file, packed for ``native.write_small`` (Made.run); the
        batch is empty again.  ``into``: where the batch goes, put there
        before this returns: a signal the moment after (its handler raises
        once a call returns) finds it there, not in a variable never set,
        its descriptors open until the process ends."""
        job = Made(self.files, self.dirs, self.ids)
        self.files, self.ids, self.dirs = [], set(), {}
        self.bytes = self.clones = 0
        try:
            job.packed, job.names, job.data = self._pack(job.files, job.dirs)
        except BaseException:
            job.close()
            raise
        if into is not None:
            into.append(job)
        return job

    def flush(self, where: Callable[[bytes], str],
              made: Callable[[Held, bytes, list[tuple[str, int]]], None]) -> None:
        """Make every held file here; an OSError naming the file
        (``where(path)``) if one cannot be made (those before it are made and
        handed to ``made``, those after it dropped)."""
        if self.files:
            job = self.take()
            job.run()
            job.finish(where, made)

    def _pack(self, files: list[tuple[Held, bytes]], dirs: dict[bytes, int]
              ) -> tuple[bytearray, bytearray, bytearray]:
        packed = bytearray(len(files) * _ST.size)
        names = bytearray()
        data = bytearray()
        flags = native.SMALL_CHOWN if self.chown else 0
        for i, (h, tmp) in enumerate(files):
            e = h.entry
            asec, ans = divmod(e.atime_ns, 1_000_000_000)
            msec, mns = divmod(e.mtime_ns, 1_000_000_000)
            sfd, soff, clen = (h.clone[0], h.clone[1], h.cloned) if h.clone else (-1, 0, 0)
            _ST.pack_into(packed, i * _ST.size, dirs[h.parent], e.mode, e.uid, e.gid, flags,
                          len(tmp), len(names), len(data), len(h.data), e.size,
                          asec, ans, msec, mns, sfd, 0, soff, clen, 0, 0, 0, 0, 0, 0)
            names += tmp
            names += b"\0"
            data += h.data
        return packed, names, data


@dataclass(slots=True)
class Made:
    """A batch for ``native.write_small``, with the descriptors it holds
    (its directories' and its clones' sources) until it is finished or
    abandoned."""

    files: list[tuple[Held, bytes]]
    dirs: dict[bytes, int]
    ids: set[int]
    packed: bytearray = field(default_factory=bytearray)
    names: bytearray | None = None
    data: bytearray | None = None
    #: handed to the helper's queue (set after the put returned)
    queued: bool = False
    #: set once run() has returned: done (or error) is its answer
    ended: threading.Event = field(default_factory=threading.Event)
    #: the files made before the first that failed (all of them: len(files))
    done: int = -1
    error: BaseException | None = None
    #: its answer taken (finish): what it made is the caller's now
    handed: bool = False

    def run(self) -> None:
        """Make the files (on the helper thread, the GIL let go in the call)."""
        try:
            self.done = native.write_small(self.packed, len(self.files), self.names,
                                           self.data)
        except BaseException as ex:  # noqa: BLE001 - raised by finish, on the main thread
            self.error = ex
        finally:
            self.names = self.data = None
            self.ended.set()

    def finish(self, where: Callable[[bytes], str],
               made: Callable[[Held, bytes, list[tuple[str, int]]], None]) -> None:
        """After run(): hand each file made to ``made`` in order; an OSError
        naming the first that failed, if one did.  The batch's descriptors
        closed."""
        if self.handed:
            return
        self.handed = True
        try:
            if self.error is not None:
                raise self.error
            self._hand_on(where, made)
        finally:
            self.close()

    def _hand_on(self, where: Callable[[bytes], str],
                 made: Callable[[Held, bytes, list[tuple[str, int]]], None]) -> None:
        files, done, n = self.files, self.done, len(self.files)
        i = 0
        try:
            for i in range(min(done + 1, n)):
                h, tmp = files[i]
                err, step, chown_err, chmod_err, times_err, h.clone_err = _OUT.unpack_from(
                    self.packed, i * _ST.size + native.SMALL_OUT)
                if i == done:
                    if step == 6:
                        raise ArchiveError("reference reads past the end of its source for "
                                           f"{where(h.entry.path)}")
                    raise OSError(err, os.strerror(err), where(h.entry.path))
                failures = [(what, code) for what, code in
                            (("owner", chown_err), ("mode", chmod_err), ("times", times_err))
                            if code]
                made(h, tmp, failures)
        except BaseException:
            # made on disk, not handed on (``made`` failed: a sync, a rename):
            # no temporary file left behind
            self._unlink(files[i + 1:done])
            raise

    def abandon(self) -> None:
        """The run is over with this batch not handed on, and run() returned
        or never will: no temporary name it made is left."""
        try:
            if not self.handed and self.ended.is_set():
                self.handed = True
                self._unlink(self.files[:max(self.done, 0)])
        finally:
            self.close()

    def _unlink(self, files: list[tuple[Held, bytes]]) -> None:
        # below a new directory too: fail() names it whole, with what was
        # handed on (a batch after one that failed may have been made)
        for h, tmp in files:
            try:
                os.unlink(tmp, dir_fd=self.dirs[h.parent])
            except OSError:
                pass

    def close(self) -> None:
        dirs, self.dirs = self.dirs, {}
        for fd in dirs.values():
            os.close(fd)
        for h, _ in self.files:
            h.close()


def _serve(q: queue.SimpleQueue) -> None:
    """The helper thread: runs the batches queued, in order, until None."""
    background_thread()
    while (job := q.get()) is not None:
        job.run()


class Holder:
    """The small files of ``out`` (a DirectoryOutput: its tree, placer,
    entries, data and metadata): the one whose bytes are coming, and the
    batch of those complete and not yet made."""

    #: batches queued for the helper or being made, at most, while the next
    #: is held: the restore's thread waits on the helper only where it has
    #: got that far ahead (a run of tiny files the kernel makes slower
    #: than they are read), not at each batch
    DEPTH = 2

    def __init__(self, out: Any):
        self.out = out
        self.held: Held | None = None
        self.batch = SmallFiles(chown=out.meta.root)
        #: the batches made on the helper thread, in order, while the next is held
        self.pending: list[Made] = []
        self.queue: queue.SimpleQueue | None = None
        self.helper: threading.Thread | None = None

    def holdable(self, e: fmt.Entry) -> bool:
        """Whether ``e`` may be held for a batch (a big one only for clones:
        ``take`` and ``clone`` say): nothing about it that needs a call of
        its own (flags, xattrs, clones from it, an old copy or --share-with
        files to clone from, subvolume snapshots)."""
        out = self.out
        return not e.xattrs and not e.iflags \
            and not e.eflags & fmt.EF_REFERENCED and not out.data.reshare_existing \
            and out.data.share is None and out.bookends is None \
            and not out.subvols.snapshots \
            and e.path.rpartition(b"/")[0] not in out.made_here.dir_first

    def hold(self, e: fmt.Entry, pfd: int, name: bytes) -> None:
        """Entries.make's maker for a held file: nothing on disk yet."""
        if e.size > SMALL_MAX and all(job.ended.is_set() for job in self.pending):
            # as before any big file, whatever its bytes are: the small ones
            # before it start being made now, if the helper has nothing to do
            # (a run of big reflinked copies is not cut into batches of one)
            self.submit()
        self.out.meta.owners_noted()
        self.held = Held(e, e.path.rpartition(b"/")[0], name, bytearray())

    def holds(self, eid: int) -> bool:
        return eid in self.batch.ids or any(eid in job.ids for job in self.pending)

    def take(self, offset: int, data, extent) -> bool:
        """Stored bytes for the current file: kept if it is held and they
        follow its bytes so far (an encoded extent only where DEST takes
        none); else it becomes an ordinary open file and False."""
        h = self.held
        if h is None:
            return False
        if offset == h.cloned + len(h.data) and len(h.data) + len(data) <= SMALL_MAX and \
                (extent is None or self.out.data.no_encoded is not None):
            h.data += data  # after the clones, if any (a reflinked copy's unaligned tail)
            self.out.counts.written_bytes += len(data)
            return True
        self.unhold()
        return False

    def clone(self, sfd: int, src_offset: int, length: int, offset: int, src_size: int,
              channel: str, source: tuple) -> bool:
        """A clone into the current file: kept if it is held, and the
        clones so far are one aligned range of one file (``source``) from
        byte 0 on, however many pieces it comes in (an extent each); the
        batch clones that range, or copies it where the kernel will not (a
        failed ioctl costs less than a file made alone), and leaves a hole
        after it up to the file's size.  Else False (the caller unholds it)."""
        h = self.held
        if h is None or h.data or not length or offset + length > h.entry.size:
            return False
        cloner = self.out.data.cloner
        if h.entry.size > SMALL_MAX and (channel not in cloner.reflinks
                                         or channel in cloner.no_reflink):
            return False  # never a big copy in a batch: made alone, counted as written
        bs = cloner.block
        if src_offset % bs or (length % bs and src_offset + length != src_size):
            return False
        if h.clone is None:
            if offset:
                return False
            h.clone = (os.dup(sfd), src_offset, src_size, channel)
            h.source = source
        elif source != h.source or offset != h.cloned or src_offset != h.clone[1] + offset:
            return False
        h.cloned += length
        return True

    def unhold(self) -> None:
        """The held file, if any, becomes an ordinary open file, its bytes so
        far written: something is to be done to it that a batch does not do."""
        h, self.held = self.held, None
        if h is None:
            return
        out = self.out
        try:
            out.made_here.open_file(h.entry, out.tree.dir(h.parent), h.name)
        except OSError as ex:
            raise out.named(ex, h.entry.path) from None
        cur = out.cur
        if h.clone is not None:
            sfd, soff, ssize, channel = h.clone
            try:
                out.data.clone(cur, sfd, soff, h.cloned, 0, ssize, channel)
            finally:
                h.close()
        if h.data:  # counted as written when they came
            out.data.cloner.pwrite(cur.fd, h.data, h.cloned, cur.where)

    def end(self) -> bool:
        """The current file's END: a held one joins the batch (True)."""
        h, self.held = self.held, None
        if h is None:
            return False
        out = self.out
        if h.entry.id in out.damaged_ids:  # never made
            h.close()
            return True
        pfd = out.tree.dir(h.parent)
        if h.parent not in self.batch.dirs:
            out.placer.note_fs(pfd)
        h.fresh = out.fresh_below(h.entry.path)
        if h.fresh:  # counted now, for the checkpoint its batch comes before
            out.fresh.count(len(h.data))
        self.batch.add(h, pfd, h.name if h.fresh else temp_name(h.entry.id))
        if self.batch.full():
            self.submit()
        return True

    def on_disk(self, eid: int) -> None:
        """Entry ``eid`` is needed on disk (linked to, cloned from)."""
        if eid in self.batch.ids:
            self.flush()
            return
        for k, job in enumerate(self.pending):
            if eid in job.ids:
                self._finish(k + 1)
                return

    def submit(self) -> None:
        """The batch held so far is queued for the helper thread, once no
        more than DEPTH - 1 before it are still to be handed on: batches
        are made in order, one at a time, while the restore goes on."""
        if len(self.batch):
            if len(self.pending) >= self.DEPTH:
                self._finish(len(self.pending) - self.DEPTH + 1)
            # pending first: a signal before the put leaves a job that wait()
            # or drop() finds never queued; SimpleQueue.put is one C call
            job = self.batch.take(into=self.pending)
            self._queue().put(job)
            job.queued = True

    def _queue(self) -> queue.SimpleQueue:
        if self.queue is None:
            self.queue = queue.SimpleQueue()
            self.helper = threading.Thread(target=_serve, args=(self.queue,),
                                           name="small files", daemon=True)
            self.helper.start()
        return self.queue

    def wait(self) -> None:
        """Every batch queued made and handed on (an OSError naming the
        file that failed, if one did)."""
        self._finish(len(self.pending))

    def _finish(self, n: int) -> None:
        """The first ``n`` batches queued made and handed on, in order.
        One that fails stays pending, handed on, for drop()."""
        for _ in range(n):
            job = self.pending[0]
            if job.queued:
                job.ended.wait()  # interrupted: still pending, for drop
            else:  # a signal came between (the last queued): whatever was queued has run
                self._stop()
                if not job.ended.is_set():
                    job.run()
            job.finish(self.out.tree.where, self._made)
            self.pending.pop(0)

    def _stop(self) -> None:
        """The helper stopped, once it has run every batch queued (its C
        call uses their descriptors: waited for through signals too)."""
        if self.helper is None:
            return
        assert self.queue is not None
        told = False
        while True:
            try:
                if not told:
                    self.queue.put(None)  # twice, if a signal comes after it: harmless
                    told = True
                self.helper.join()
                break
            except BaseException:  # noqa: BLE001 - a signal: the call is bounded, wait on
                continue
        self.helper = self.queue = None

    def flush(self) -> None:
        """Every held file made and handed on."""
        self.submit()
        self.wait()

    def salvage(self) -> None:
        """The run failed: the complete files are made and get their names
        as other complete files do (restore/durable.py ``salvage``)."""
        if self.held is not None:
            self.held.close()
        self.held = None
        try:
            self.flush()
        except BaseException:  # noqa: BLE001 - the first error is the one to report
            self.drop()

    def drop(self) -> None:
        """Forget what is held; the helper stopped once its batch is made,
        and what that made removed (not handed on: it has no name)."""
        held, self.held = self.held, None
        try:
            if held is not None:
                held.close()
            self._stop()
        finally:
            jobs, self.pending = self.pending, []
            try:
                for job in jobs:
                    job.abandon()  # its unlinks may fail; its descriptors are closed
            finally:
                self.batch.drop()

    def _made(self, h: Held, tmp: bytes, failures: list[tuple[str, int]]) -> None:
        e = h.entry
        if h.clone is not None:  # counted as Cloner.clone_or_copy counts
            cloner = self.out.data.cloner
            if h.clone_err:
                cloner.copied(h.cloned, cloner.refused(h.clone_err, h.clone[3]))
            else:
                self.out.counts.reflinked_bytes += h.cloned
                cloner.reflinks.add(h.clone[3])
        for what, code in failures:
            self.out.not_exact(e, f"{what} not restored: {os.strerror(code)}")
        if h.fresh:
            self.out.placer.placed[e.id] = (h.parent, h.name)
        else:
            copied = h.cloned if h.clone_err else 0  # bytes the next sync writes
            self.out.placer.defer(h.parent, tmp, h.name, e.path, e.id, len(h.data) + copied)
