"""Records of an archive, as bytes: the magic, each record's frame and
CRC checked (docs/FORMAT.md, "Framing"), large DATA payloads read into
reused buffers, and a thread that reads ahead.  archive/reader.py checks
what the records say; archive/catalog.py reads the index and footer."""
from __future__ import annotations

import io
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cloneaware.archive import format as fmt
from cloneaware.errors import ArchiveError, TruncatedArchive, UsageError


def background_thread() -> None:
    """Make the calling thread SCHED_BATCH: one that does not preempt
    others when it wakes.  For the helper threads of restore and backup
    (reading ahead, hashing, compressing, starting writeback), so that the
    thread that writes the output in order, which the whole run waits on,
    keeps its core: in a restore on 2 cores it was preempted about 2,000
    times by its own helpers (perf sched_switch).  Unprivileged; where
    refused, nothing changes."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):
        pass


class Buffers:
    """Reused buffers for the payloads of large DATA records.  A 4 MiB read
    into a new bytes object faults in 1,024 fresh pages (kernel zeroing
    them, then copying over them): half the page faults of a restore.  A
    buffer comes back (``put``) once its event has been handled; the free
    ones are kept by size, a few per size."""

    #: payloads smaller than this are read as bytes, as before
    MIN = 64 << 10
    #: buffer sizes are multiples of this
    STEP = 64 << 10
    #: free buffers kept per size (the most in flight is about PREFETCH +
    #: DEPTH + 2)
    KEEP = 32

    def __init__(self, keep_bytes: int | None = None) -> None:
        """``keep_bytes``: the free buffers kept, at most, in all sizes
        (None: KEEP a size, however many sizes)."""
        self.free: dict[int, list[bytearray]] = {}
        self.lock = threading.Lock()
        self.keep_bytes = keep_bytes
        self.free_bytes = 0

    def get(self, n: int) -> bytearray:
        size = -(-n // self.STEP) * self.STEP
        with self.lock:
            got = self.free.get(size)
            if got:
                self.free_bytes -= size
                return got.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        with self.lock:
            got = self.free.setdefault(len(buf), [])
            if len(got) < self.KEEP and (self.keep_bytes is None
                                         or self.free_bytes + len(buf) <= self.keep_bytes):
                got.append(buf)
                self.free_bytes += len(buf)


class RecordReader:
    """Frames and CRCs.  Yields (type, payload, offset of the record), and
    with ``buffers`` a fourth item: the buffer that a large DATA payload (a
    memoryview) was read into, or None, for the consumer to give back."""

    def __init__(self, f, buffers: Buffers | None = None, skip_data: bool = False):
        self.f = f
        self.offset = 0
        self.version = fmt.WRITE_VERSION
        self.is_map = False  # the magic said: a sharing map
        self.buffers = buffers if getattr(f, "readinto", None) is not None else None
        #: DATA payloads are not read (nor CRC-checked) past their head:
        #: the file is sought over them (readers that need only the layout)
        self.skip_data = skip_data and seekable(f)

    def _read_into(self, buf: bytearray, n: int, what: str) -> memoryview:
        mv = memoryview(buf)[:n]
        got = 0
        while got < n:
            k = self.f.readinto(mv[got:])
            if not k:
                raise TruncatedArchive(f"archive is truncated: {what} cut short",
                                       self.offset + got)
            got += k
        self.offset += n
        return mv

    def _read(self, n: int, what: str) -> bytes:
        b = self.f.read(n)
        if b is None:
            b = b""
        if len(b) < n:
            if self.offset == 0 and not b:
                raise ArchiveError("empty file: not a cloneaware archive")
            raise TruncatedArchive(f"archive is truncated: {what} cut short",
                                   self.offset + len(b))
        self.offset += n
        return b

    def _skip(self, length: int, what: str) -> fmt.SkippedPayload:
        """The head of a DATA payload; the rest and the CRC sought over
        (a cut inside them is found by the seek past the end)."""
        head = self._read(fmt.DATA_HEAD, what)
        end = self.offset + length - fmt.DATA_HEAD + fmt.CRC.size
        if self.f.seek(end) != end or self.f.seek(0, io.SEEK_END) < end:
            raise TruncatedArchive(f"archive is truncated: {what} cut short", self.offset)
        self.f.seek(end)
        self.offset = end
        return fmt.SkippedPayload(head, length)

    def magic(self) -> None:
        """An archive's magic, or a sharing map's (then ``is_map``)."""
        b = self.f.read(len(fmt.MAGIC)) or b""
        if not b:
            raise ArchiveError("empty file: not a cloneaware archive")
        if b not in (fmt.MAGIC, fmt.MAP_MAGIC):
            if fmt.MAGIC.startswith(b) or fmt.MAP_MAGIC.startswith(b):
                raise TruncatedArchive("archive is truncated inside the magic", len(b))
            raise ArchiveError("not a cloneaware archive (wrong magic)", 0)
        self.is_map = b == fmt.MAP_MAGIC
        self.offset = len(b)

    def records(self) -> Iterator[tuple[int, bytes, int]]:
        for rtype, payload, start, _ in self.records_in():
            yield rtype, payload, start

    def records_in(self) -> Iterator[tuple[int, Any, int, bytearray | None]]:
        """The records, a large DATA payload in a buffer of ``buffers``."""
        pool = self.buffers
        while True:
            start = self.offset
            head = self.f.read(fmt.FRAME.size) or b""
            if not head:
                return
            if len(head) < fmt.FRAME.size:
                raise TruncatedArchive("archive is truncated inside a record header", start)
            self.offset += len(head)
            rtype, length = fmt.check_frame_header(head, start, self.version)
            what = f"{fmt.TYPE_NAMES.get(rtype, 'record')} payload"
            buf = None
            if self.skip_data and rtype == fmt.T_DATA and length > fmt.DATA_HEAD:
                yield rtype, self._skip(length, what), start, None
                continue
            if pool is not None and rtype == fmt.T_DATA and length >= pool.MIN:
                buf = pool.get(length)
                payload: Any = self._read_into(buf, length, what)
            else:
                payload = self._read(length, what)
            crc = self._read(fmt.CRC.size, "record CRC")
            fmt.check_crc(head, payload, crc, start)
            if rtype & fmt.ANCILLARY:
                continue
            yield rtype, payload, start, buf


_DONE = object()


#: items a producer hands over at once, at most, and the bytes they may
#: weigh together (prefetched)
BATCH = 512
BATCH_BYTES = 1 << 20


def prefetched(it: Iterator, depth: int, cut: Callable[[Any], bool] | None = None,
               weigh: Callable[[Any], int] | None = None) -> Iterator:
    """The items of ``it``, produced by a thread of their own up to ``depth``
    handovers ahead; an exception it raises comes out in its place, in
    order.  Closing the returned generator stops the thread.

    Items are handed over in batches (issue 36: one queue operation per
    record cost a restore or a manifest read of 400,000 records 7 s): a
    batch ends after BATCH items or BATCH_BYTES by ``weigh``, after an
    item ``cut`` says must not wait (a DATA payload in a reused buffer),
    or whenever the consumer is waiting for one, so that nothing waits
    behind a slow source for a batch to fill."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        background_thread()
        batch: list = []
        weight = 0
        try:
            for item in it:
                batch.append(item)
                if weigh is not None:
                    weight += weigh(item)
                if len(batch) >= BATCH or weight >= BATCH_BYTES or q.empty() or \
                        (cut is not None and cut(item)):
                    if not put(batch):
                        return
                    batch, weight = [], 0
            tail: Any = _DONE
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            tail = e
        if batch and not put(batch):
            return
        put(tail)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            got = q.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            yield from got
    finally:
        stop.set()
        # not forever: a read it is blocked in (a stalled pipe) ends with the
        # process; the thread is a daemon
        t.join(timeout=2)


def seekable(f) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def open_archive(path: str):
    """A binary file object for ARCHIVE ('-' is standard input)."""
    if path == "-":
        return sys.stdin.buffer
    if not path:
        raise UsageError("an empty path was given as the archive")
    try:
        return open(path, "rb", buffering=1 << 20)
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not an archive") from None
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{path}: no such archive") from None
