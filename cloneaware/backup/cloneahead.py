"""Larger files cloned, and their first chunks read, ahead of their turn
(issue 36, night 1).

A file larger than ``Capture.small`` is cloned for its point in time, and
its stored chunks are read, hashed and compressed by the workers.  Done at
the file's turn, the pipeline drained at every such file: the writer
waited for the file's first chunks (cold reads: 4.0 s of a 25 s night on
116,645 files, 9,057 chunks), while the workers waited for the writer
through the small files between (3 s more of 64-256 KiB files read and
compressed by the writer's thread itself).  Here the writer prepares the
next such files a few places before their turn: opens each, clones it,
maps the clone and submits the chunks its plan stores, within a budget;
the workers read them while the writer writes the files between.

What is done ahead is what the turn would do, earlier; it changes nothing
but the time:
- a clone is one instant's state whatever the moment it is taken at; the
  file's stat just after it and the clone's map are taken here, and the
  turn judges them as it judges its own (files.py: a plan made from
  another map is stale, and the file is stored whole);
- a chunk read ahead is the job the turn's ops would submit (the same
  sink job, file, offset and length); one the ops do not ask for (a
  stale plan) is dropped, its buffer given back;
- anything that fails here is left to the turn, which does it again and
  says why; a clone that could not be made is the turn's answer too
  (said once, as the turn would have);
- a file's descriptors are closed only once no worker reads them (a job
  not taken is cancelled or waited for; a backup that fails closes them
  when the last job ends).
"""
from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import Future, wait
from typing import Any

import numpy as np

from cloneaware import fsinfo
from cloneaware.backup.meta import map_digest
from cloneaware.backup.ops import stored_ops
from cloneaware.backup.sinks import Sink
from cloneaware.backup.workers import Chunk, Workers
from cloneaware.index.plan import Plan
from cloneaware.source.capture import Capture
from cloneaware.source.mapping import extent_map, open_source


class Prepared:
    """A file opened (``fd``) and its clone attempted ahead of its turn:
    ``st`` its fstat before the clone; ``got`` the clone's descriptor, or
    why there is none (Capture.clone's answer); for a clone, ``st_after``
    the file's fstat just after it, ``size`` the clone's size and
    ``before`` its map (None: to be taken at the turn).  The taker owns
    it, and closes it with ``close``."""

    __slots__ = ("fd", "st", "got", "st_after", "size", "before", "jobs", "nbytes", "used",
                 "_workers")

    def __init__(self, fd: int, st: os.stat_result, workers: Workers):
        self.fd, self.st = fd, st
        self.got: int | str = "not cloned yet"
        self.st_after: os.stat_result | None = None
        self.size = 0
        self.before: np.ndarray | None = None
        #: (offset, length, encoded) -> the job submitted for that Store
        self.jobs: dict[tuple[int, int, bool], Future] = {}
        self.nbytes = 0
        #: a job read ahead was taken
        self.used = False
        self._workers = workers

    def take(self, offset: int, length: int, encoded: bool) -> Future | None:
        """The job read ahead for this Store, if one was."""
        got = self.jobs.pop((offset, length, encoded), None)
        if got is not None:
            self.used = True
        return got

    def close(self) -> None:
        """At the end of the file's turn: the jobs not taken are cancelled
        or waited for (this file's own, a few chunks; their buffers given
        back), then both descriptors closed.  Interrupted while waiting,
        the descriptors are closed when the last job ends."""
        jobs, self.jobs = list(self.jobs.values()), {}
        running = [f for f in jobs if not f.cancel()]
        try:
            wait(running)  # raises nothing but a signal handler's exception
        except BaseException:
            self._close_after(running)
            raise
        for f in running:
            if f.exception() is None and isinstance(f.result(), Chunk):
                self._workers.give_back(f.result())
        self._close_after([])

    def discard(self) -> None:
        """Never taken (the backup ends): close the descriptors once no
        worker reads them, without waiting for one that does."""
        jobs, self.jobs = list(self.jobs.values()), {}
        self._close_after([f for f in jobs if not f.cancel() and not f.done()])

    def _close_after(self, running: list[Future]) -> None:
        fds = [self.fd] + ([self.got] if isinstance(self.got, int) else [])
        running = [f for f in running if not f.done()]
        if not running:
            for fd in fds:
                os.close(fd)
            return
        left = [len(running)]
        lock = threading.Lock()

        def done(_: Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                for fd in fds:
                    os.close(fd)

        for f in running:
            f.add_done_callback(done)


class CloneAhead:
    """Prepares the files of ``items`` that will be cloned, ahead of
    take(n).  ``walked``: the class of the items that are files to write;
    ``data_job``: the sink's job for stored chunks."""

    #: files prepared and not taken, at most
    FILES = 16
    #: bytes of chunks submitted ahead and not taken, at most (at least
    #: one chunk a file)
    BYTES = 16 << 20
    #: ... and of one file (its later chunks are read at its turn, DEPTH
    #: ahead: what is read ahead here is held on top of that window)
    FILE_BYTES = 4 << 20
    #: places looked ahead of the writer, at most
    DISTANCE = 4096

    def __init__(self, items: list, walked: Any, plan: Plan, sink: Sink, workers: Workers,
                 capture: Capture, encoded: bool):
        self.items = items
        self.walked = walked
        self.plan = plan
        self.sink = sink
        self.workers = workers
        self.capture = capture
        self.encoded = encoded
        self.data_job = sink.data_job(workers)
        self.ready: dict[int, Prepared] = {}
        self.next = 0
        self.nbytes = 0

    @staticmethod
    def wanted(capture: Capture, sink: Sink, live: bool) -> bool:
        """Whether files are cloned at all and a sink's chunks may be read
        before their file's turn."""
        return live and capture.enabled and sink.chunks_ahead()

    def take(self, n: int) -> Prepared | None:
        """Place ``n``'s file if it was prepared (the caller owns it from
        here); prepares the next ones."""
        p = self.ready.pop(n, None)
        try:
            if p is not None:
                self.nbytes -= p.nbytes
            while self.ready:  # never taken (no place is skipped): not held
                k = next(iter(self.ready))
                if k > n:
                    break
                q = self.ready.pop(k)
                self.nbytes -= q.nbytes
                q.discard()
            self._fill(n + 1)
        except BaseException:  # a signal while preparing the next: this one is let go too
            if p is not None:
                p.discard()
            raise
        return p

    def _fill(self, n: int) -> None:
        self.next = max(self.next, n)
        end = min(len(self.items), n + self.DISTANCE)
        small = self.capture.small
        while self.next < end and len(self.ready) < self.FILES and self.nbytes < self.BYTES:
            k = self.next
            self.next += 1
            item = self.items[k]
            if type(item) is not self.walked or item.fileno < 0 or item.digest is None:
                continue
            node = item.node
            if node.dirs is None or node.st.st_size <= small:
                continue
            p = self._prepare(item)
            if p is not None:
                self.ready[k] = p
                self.nbytes += p.nbytes

    def _prepare(self, item: Any) -> Prepared | None:
        """What the file's turn would do up to its first reads (files.py
        FileWriter.write), or None where anything failed (the turn does it
        again and says why)."""
        node = item.node
        try:
            fd = open_source(node)
        except OSError:
            return None
        p: Prepared | None = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return None
            p = Prepared(fd, st, self.workers)
            p.got = self.capture.clone(fd, node.src, st.st_size,
                                       fsinfo.fs_info(fd, st.st_dev, node.src),
                                       dir_fd=node.dir_fd())
            if isinstance(p.got, int):
                self._map(p, item)
        except OSError:
            if p is None or not isinstance(p.got, int):
                if p is not None:
                    p.discard()
                else:
                    os.close(fd)
                return None
            # cloned, and then what failed is done again at the turn
        except BaseException:
            if p is None:
                os.close(fd)
            else:
                p.discard()
            raise
        return p

    def _map(self, p: Prepared, item: Any) -> None:
        """The clone's stat and map, and its first stored chunks submitted
        if the plan is the clone's (a map taken at the turn otherwise)."""
        cap = p.got
        assert isinstance(cap, int)
        node = item.node
        p.st_after = os.fstat(p.fd)
        p.size = os.fstat(cap).st_size
        p.before = extent_map(cap, p.size, node.src)
        if p.size != node.st.st_size or map_digest(p.before) != item.digest:
            return  # stale: stored whole at the turn, read there
        submit = self.workers.submit
        budget = max(min(self.BYTES - self.nbytes, self.FILE_BYTES), 1)
        # no readahead advised here: a large file's would be read into the
        # page cache files before its turn, and evicted again (the turn advises)
        for op in stored_ops(self.plan.file_pieces(item.fileno), self.sink, self.encoded):
            if p.nbytes >= budget:
                break
            job = self.workers.encoded_job if op.encoded else self.data_job
            p.jobs[(op.offset, op.length, op.encoded)] = submit(job, cap, op.offset, op.length)
            p.nbytes += op.length

    def close(self) -> None:
        """Close every file prepared and not taken."""
        while self.ready:
            self.ready.popitem()[1].discard()
        self.nbytes = 0

