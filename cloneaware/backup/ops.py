"""One file's pieces of the sharing plan, as what the sink is told, in
file order: store these bytes, these bytes are those of an earlier place,
these are the base's; and for compressed candidates, a hash check first.

``plan_ops`` decides (from the plan, what is known of earlier files, and
the sink's kind); ``OpWriter.write`` carries the ops out with the worker
threads reading ahead (a file of one small chunk is read by the writer's
thread itself: handing it over cost more than the work), and counts."""
from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from typing import NamedTuple

import numpy as np

from cloneaware.archive import format as fmt
from cloneaware.backup.ahead import Early
from cloneaware.backup.sinks import Prior, Sink
from cloneaware.backup.summary import Summary
from cloneaware.backup.workers import BaseCheck, Chunk, Workers
from cloneaware.index.plan import CHECK_CANDIDATE, CHECK_ENCODED, CHECK_HASHED


class Store(NamedTuple):
    """Read and store; ``key`` (fileno, logical): remember its hash, a
    candidate names it; ``encoded``: a whole window of a compressed extent,
    stored as it is on disk."""

    offset: int
    length: int
    key: tuple[int, int] | None = None
    encoded: bool = False


class Ref(NamedTuple):
    offset: int
    length: int
    source: int | Prior  # an entry id, or a file of the index outside this backup
    source_offset: int


class BaseRef(NamedTuple):
    offset: int
    length: int
    base: int  # base file number
    base_offset: int


class CheckRef(NamedTuple):
    """A compressed candidate: a REF only if its hash equals that stored at ``key``."""

    offset: int
    length: int
    source: int
    source_offset: int
    key: tuple[int, int]


class CheckBase(NamedTuple):
    """A compressed candidate into the base: a BASEREF only if both hash alike."""

    offset: int
    length: int
    base: int
    base_offset: int


Op = Store | Ref | BaseRef | CheckRef | CheckBase


def _chunks(offset: int, length: int):
    end = offset + length
    while offset < end:
        n = min(fmt.CHUNK_MAX, end - offset)
        yield offset, n
        offset += n


class Known(NamedTuple):
    """What the ops of a file may name: index file number -> entry id of
    files written so far; file numbers whose bytes nothing may trust
    (changed); the base's files; the sink's priors."""

    entry_of_file: dict[int, int]
    invalid: set[int]
    base_files: set[int]
    priors: dict[int, Prior]


def plan_ops(fd: int, fileno: int, pieces: np.ndarray, known: Known, sink: Sink,
             encoded: bool) -> list[Op]:
    """What each piece of the plan becomes, in file order.

    A candidate piece (a compressed range naming the same extent and length
    as an earlier place, CHECK_CANDIDATE) is hashed first and becomes a
    reference only if its hash equals the one recorded when the place it
    names was stored (or, for a base, read now).  ``encoded``: whole
    compressed extents may be stored as they are on disk."""
    ops: list[Op] = []
    for logical, length, ref_file, ref_logical, check in zip(
            pieces["logical"].tolist(), pieces["length"].tolist(),
            pieces["ref_file"].tolist(), pieces["ref_logical"].tolist(),
            pieces["check"].tolist()):
        prior = known.priors.get(ref_file)
        if prior is not None and check != CHECK_CANDIDATE:
            ops.append(Ref(logical, length, prior, ref_logical))
            continue
        if check == CHECK_CANDIDATE and not sink.content_addressed:
            if length <= fmt.CHUNK_MAX and ref_file not in known.invalid:
                if ref_file in known.base_files:
                    ops.append(CheckBase(logical, length, ref_file, ref_logical))
                    continue
                src = known.entry_of_file.get(ref_file)
                if src is not None:
                    ops.append(CheckRef(logical, length, src, ref_logical,
                                        (ref_file, ref_logical)))
                    continue
        elif ref_file in known.base_files:
            ops += [BaseRef(o, n, ref_file, ref_logical + (o - logical))
                    for o, n in _chunks(logical, length)]
            continue
        elif ref_file >= 0 and ref_file not in known.invalid \
                and known.entry_of_file.get(ref_file) is not None:
            ops.append(Ref(logical, length, known.entry_of_file[ref_file], ref_logical))
            continue
        ops += _stored(fd, fileno, logical, length, check, sink, encoded)
    return ops


def _stored(fd: int | None, fileno: int, logical: int, length: int, check: int, sink: Sink,
            encoded: bool) -> list[Store]:
    """The Stores of a piece whose bytes are stored (``fd``: the file, told
    to read ahead; None: not told)."""
    if check == CHECK_ENCODED and sink.encoded_data and encoded:
        return [Store(logical, length, encoded=True)]
    if length > INLINE and fd is not None:  # read in chunks by the workers: the kernel reads ahead
        os.posix_fadvise(fd, logical, length, os.POSIX_FADV_WILLNEED)
    if check == CHECK_HASHED and length <= fmt.CHUNK_MAX and not sink.content_addressed:
        return [Store(logical, length, (fileno, logical))]
    return [Store(o, n) for o, n in sink.cuts(logical, length)]


def stored_ops(pieces: np.ndarray, sink: Sink, encoded: bool) -> Iterator[Store]:
    """The Stores that plan_ops makes of a file's pieces that name no
    other place, whatever is known at its turn (their ``key`` left out):
    what may be read ahead of it (backup/cloneahead.py)."""
    for logical, length, ref_file, check in zip(
            pieces["logical"].tolist(), pieces["length"].tolist(),
            pieces["ref_file"].tolist(), pieces["check"].tolist()):
        if ref_file < 0:
            yield from _stored(None, -1, logical, length, check, sink, encoded)


class OpWriter:
    """Carries out ops into the sink, DEPTH chunks read ahead by the workers.
    ``open_base(n)``: a descriptor of base file ``n`` (None if it cannot be
    opened); ``progress``: advanced by the stored bytes."""

    #: chunks in flight on the workers (each up to CHUNK_MAX bytes)
    DEPTH = 8

    def __init__(self, sink: Sink, workers: Workers, summary: Summary,
                 open_base: Callable[[int], int | None], progress=None):
        self.sink = sink
        self.workers = workers
        self.s = summary
        self.open_base = open_base
        self.progress = progress
        #: (fileno, logical) -> SHA-256 of stored data that a candidate names
        self.hashes: dict[tuple[int, int], bytes] = {}

    def write(self, fd: int, ops: list[Op], path: bytes, early: Early | None = None,
              ahead: Callable[[int, int, bool], Future | None] | None = None) -> bool:
        """Write one file's ranges, in order; True on a short read.
        ``early``: ``ops`` is the one Store that was read ahead; ``ahead``:
        the job submitted before the file's turn for a Store (offset,
        length, encoded), if one was (backup/cloneahead.py)."""
        workers = self.workers
        data_job = self.sink.data_job(workers)

        def submit(op: Op):
            if isinstance(op, Store):
                if ahead is not None:
                    fut = ahead(op.offset, op.length, op.encoded)
                    if fut is not None:
                        return fut
                job = workers.encoded_job if op.encoded else data_job
                return workers.submit(job, fd, op.offset, op.length)
            if isinstance(op, (BaseRef, CheckRef)):
                return workers.submit(workers.hash_job, fd, op.offset, op.length)
            if isinstance(op, CheckBase):  # opened here: the walk's descriptors are not shared
                return workers.submit(workers.base_check_job, fd, op.offset, op.length,
                                      self.open_base(op.base), op.base_offset)
            return None

        if early is not None:
            return self._one(fd, ops[0], _Now(early.chunk), data_job, path)
        if len(ops) == 1 and isinstance(ops[0], Store) and ops[0].length <= INLINE:
            # One small chunk: read here, unless it was read ahead.  Handing
            # it to a worker and waiting costs two thread wake-ups, more
            # than the work.
            op = ops[0]
            fut: Future | _Now | None = \
                ahead(op.offset, op.length, op.encoded) if ahead is not None else None
            if fut is None:
                job = workers.encoded_job if op.encoded else data_job
                fut = _Now(job, fd, op.offset, op.length)
            return self._one(fd, op, fut, data_job, path)
        short = False
        pending: collections.deque = collections.deque()
        nxt = 0
        try:
            while nxt < len(ops) or pending:
                while nxt < len(ops) and len(pending) < self.DEPTH:
                    pending.append((ops[nxt], submit(ops[nxt])))
                    nxt += 1
                op, fut = pending.popleft()
                short |= self._one(fd, op, fut, data_job, path)
        except BaseException:
            # the caller closes ``fd`` next: no job may read it after
            futs = [f for _, f in pending if isinstance(f, Future) and not f.cancel()]
            wait(futs)
            raise
        return short

    def _one(self, fd: int, op: Op, fut, data_job, path: bytes) -> bool:
        s, sink = self.s, self.sink
        if isinstance(op, Ref):
            sink.ref(op.offset, op.length, op.source, op.source_offset)
            if isinstance(op.source, Prior):
                s.unchanged_bytes += op.length
            else:
                s.referenced_bytes += op.length
            return False
        if isinstance(op, BaseRef):
            chunk: Chunk = _result(fut, path)
            sink.baseref(op.offset, op.length, op.base, op.base_offset, chunk.sha256)
            s.base_referenced_bytes += op.length
            s.bytes_read += chunk.got
            return chunk.got < op.length
        if isinstance(op, Store):
            chunk = _result(fut, path)
            short = self._store(fd, op.offset, op.length, chunk)
            if op.key is not None:
                self.hashes[op.key] = chunk.sha256
            return short
        # a candidate: used only if the content matches
        got: Chunk | BaseCheck = _result(fut, path)
        s.bytes_read += got.got
        whole = got.got == op.length
        if whole and isinstance(op, CheckRef) and self.hashes.get(op.key) == got.sha256:
            sink.ref(op.offset, op.length, op.source, op.source_offset)
            s.referenced_bytes += op.length
            s.checked_bytes += op.length
            return False
        if whole and isinstance(got, BaseCheck) and isinstance(op, CheckBase) \
                and got.base_sha256 == got.sha256:
            sink.baseref(op.offset, op.length, op.base, op.base_offset, got.sha256)
            s.base_referenced_bytes += op.length
            s.checked_bytes += op.length
            return False
        if isinstance(got, BaseCheck) and got.base_sha256 is None:
            s.base_unreadable_bytes += op.length  # not a mismatch: the base said nothing
        else:
            s.check_mismatch_bytes += op.length
        s.bytes_read -= got.got  # read again, as data
        chunk = _result(self.workers.submit(data_job, fd, op.offset, op.length), path)
        return self._store(fd, op.offset, op.length, chunk) or got.got < op.length

    def _store(self, fd: int, offset: int, length: int, chunk: Chunk) -> bool:
        """Hand a stored chunk to the sink; True if the file was short."""
        self.sink.store(fd, offset, length, chunk)
        self.workers.give_back(chunk)  # written: its buffer is free
        s = self.s
        if chunk.encoded:
            s.encoded_stored_bytes += length
            s.encoded_extent_bytes += chunk.encoded
        s.stored_bytes += length
        s.bytes_read += chunk.got
        if self.progress:
            self.progress.advance(length)
        return chunk.got < length


#: a file of one chunk this small is read, hashed and compressed by the
#: writer's thread itself
INLINE = 256 << 10


class _Now:
    """A job run by the thread that asks for its result (as a Future's
    ``result``, errors included)."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


def _result(fut, path: bytes):
    """A worker's result; its read errors name the file read."""
    try:
        return fut.result()
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, os.fsdecode(path)) from None
        raise
