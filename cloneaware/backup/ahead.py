"""Small files read ahead of the writer, in batches, off its thread (issue 36).

A small file that the plan stores whole, in one chunk, used to be opened,
read, compressed and checked by the writer's thread itself when its turn
came (ops.INLINE): handing one file to a worker costs more than the work.
So one core did everything while the other waited.  Here the next small
files are read in batches by a helper thread, which holds the GIL only
between batches: one native call (native.read_small) opens each file,
takes its fstat, the size of its xattr list and its inode flags, reads
it and, for a live backup, maps it again just after the read (the live
check of files.py); then one call
compresses the batch (zstandard's multi_compress_to_buffer).  The writer
takes each file at its turn: its descriptor, its stat before the read, its
bytes, compressed, and its map after; the writer's own fstat, after it has
read the xattrs too, ends the check as for any file.  A thread per file
was tried first and was slower (night 1 1.5x): each file took the GIL a
dozen times.

Only where reading ahead changes nothing but the time: the sink's chunk
of a file is made by the sink from the bytes read (Sink.read_ahead), and
the sink takes no file unread; the file is opened and its stat taken
before its read, as the writer does; the writer uses the bytes only if the
op it plans at the file's turn is the one read, else it reads as it would
have (a file changed since the walk, a clone for its point in time).
"""
from __future__ import annotations

import array
import collections
import os
import stat
import struct
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import zstandard

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.archive.records import background_thread
from cloneaware.backup.meta import read_iflags, read_xattrs
from cloneaware.backup.sinks import Sink
from cloneaware.backup.workers import Chunk, Workers
from cloneaware.index.plan import CHECK_HASHED, CHECK_NONE, Plan
from cloneaware.source.flags import EXTENT_DTYPE
from cloneaware.source.mapping import NO_FIEMAP, any_encoded
from cloneaware.source.walk import _listed

#: the input fields of a ``struct ca_rsmall``
_IN = struct.Struct("<iI3Qi")  # and fd -1: not opened (yet)
_EXT_AT = native.READ_SMALL.size


def available(level: int) -> bool:
    """Reading ahead at zstd ``level`` (0: none) can be done: zstandard's
    batch compression is there (its C backend; the CFFI one raises
    NotImplementedError)."""
    return not level or "multi_compress_to_buffer" in getattr(zstandard, "backend_features",
                                                              ())


class Early:
    """A file opened and read ahead of its turn: ``fd`` (the taker's to
    close), its fstat ``st`` taken before the read, and its first
    ``length`` bytes."""

    __slots__ = ("fd", "st", "length", "ext", "meta", "_got", "_data", "_z", "_make")

    def __init__(self, fd: int, st: os.stat_result, length: int, got: int, data: memoryview,
                 z: bytes | None, ext: np.ndarray | None, make,
                 meta: tuple[list[tuple[bytes, bytes]], int] | None):
        self.fd, self.st, self.length = fd, st, length
        #: its xattrs and inode flags, read before its bytes (None: not read)
        self.meta = meta
        #: its map just after the read (a live backup), or None where it
        #: must be taken the usual way (more extents than were kept, or
        #: encoded ones that the usual way refines)
        self.ext = ext
        self._got, self._data, self._z = got, data, z
        self._make = make

    def chunk(self) -> Chunk:
        """The sink's chunk of the bytes read."""
        return self._make(self._data, self._got, self._z)


class _Batch:
    __slots__ = ("places", "recs", "names", "data", "offs", "wants", "dups", "future")

    def __init__(self) -> None:
        self.places: list[int] = []
        self.recs = bytearray()
        self.names = bytearray()
        self.data = bytearray()
        self.offs: list[int] = []
        self.wants: list[int] = []
        #: its directories' descriptors, dup'ed: the walk's own may be
        #: closed by the writer (Dirs keeps a few) while the helper reads
        self.dups: list[int] = []
        self.future: Future | None = None


class ReadAhead:
    """Reads the small files of ``items`` in batches ahead of take(n)."""

    #: files and bytes a batch; two batches are read ahead
    BATCH_FILES = 32
    BATCH_BYTES = 4 << 20

    def __init__(self, items: list, walked: Any, plan: Plan, sink: Sink, workers: Workers,
                 limit: int, live: bool):
        """``walked``: the class of the items that are files to write;
        ``limit``: the largest file read ahead; ``live``: not read from a
        snapshot (the check after the read is made)."""
        self.items = items
        self.walked = walked
        self.live = live
        self.level = sink.small_level(workers)
        self.make = lambda data, got, z: sink.small_chunk(workers, data, got, z)
        self.lengths = _one_piece(plan, limit)
        self.pool = ThreadPoolExecutor(max_workers=1, initializer=background_thread)
        self.queued: collections.deque[_Batch] = collections.deque()
        self.where: dict[int, _Batch] = {}  # place -> its batch, not yet taken
        self.ready: dict[int, Early] = {}
        self.next = 0  # the next place to look at

    def take(self, n: int) -> Early | None:
        """Place ``n``'s file if it was read ahead (the caller owns its
        descriptor); starts the next batches."""
        self._fill(n)
        b = self.where.pop(n, None)
        if b is not None and b.future is not None:
            self._settle(b, n)
        return self.ready.pop(n, None)

    def _fill(self, n: int) -> None:
        self.next = max(self.next, n)
        while len(self.where) < 2 * self.BATCH_FILES and self.next < len(self.items):
            b = self._batch()
            self.queued.append(b)  # first: close() finds it whatever happens next
            if b.places:
                b.future = self.pool.submit(self._read, b)

    def _batch(self) -> _Batch:
        """The next batch of files, from place ``self.next`` on."""
        b = _Batch()
        dups: dict[bytes, int] = {}
        items, lengths, walked = self.items, self.lengths, self.walked
        size = 0
        try:
            while self.next < len(items) and len(b.places) < self.BATCH_FILES \
                    and size < self.BATCH_BYTES:
                k = self.next
                self.next += 1
                item = items[k]
                if type(item) is not walked or item.fileno < 0 or item.digest is None:
                    continue
                want = lengths[item.fileno]
                node = item.node
                if not want or node.dirs is None or node.st.st_size > want:
                    continue
                dfd = dups.get(node.parent)
                if dfd is None:
                    try:
                        dfd = dups[node.parent] = os.dup(node.dir_fd())
                    except OSError:
                        continue  # the writer meets it and says why
                b.recs += bytes(native.READ_SMALL_SIZE)
                _IN.pack_into(b.recs, len(b.places) * native.READ_SMALL_SIZE, dfd,
                              len(node.leaf), len(b.names), size, want, -1)
                b.names += node.leaf
                b.places.append(k)
                b.offs.append(size)
                b.wants.append(want)
                size += want
                self.where[k] = b
        except BaseException:
            for fd in dups.values():
                os.close(fd)
            raise
        b.data = bytearray(size)
        b.names = b.names or bytearray(1)
        b.dups = list(dups.values())
        return b

    def _read(self, b: _Batch) -> Any:
        """On the helper thread: read the batch, then compress it."""
        try:
            native.read_small(b.recs, len(b.places), b.names, b.data, native.READ_SMALL_META
                              | (native.READ_SMALL_MAP if self.live else 0))
        finally:
            for fd in b.dups:
                os.close(fd)
            b.dups = []
        if not self.level:
            return None
        mv = memoryview(b.data)
        c = zstandard.ZstdCompressor(level=self.level)
        return c.multi_compress_to_buffer([mv[o:o + w] for o, w in zip(b.offs, b.wants)],
                                          threads=0)

    def _settle(self, b: _Batch, n: int) -> None:
        """Wait for ``b`` and make its files ready (those behind ``n``,
        never taken, closed).  A batch leaves ``queued`` only once its call
        has returned: until then close() waits for it."""
        while self.queued:
            q = self.queued[0]
            zs = q.future.result() if q.future is not None else None
            self.queued.popleft()
            q.future = None
            self._parse(q, zs, n)
            if q is b:
                return

    def _parse(self, b: _Batch, zs, n: int) -> None:
        mv = memoryview(b.data)
        size = native.READ_SMALL_SIZE
        done = 0
        try:
            for i, k in enumerate(b.places):
                done = i
                rec = native.READ_SMALL.unpack_from(b.recs, i * size)
                fd, err, step, n_ext, got = rec[5:10]
                if fd < 0:
                    continue
                st = _listed(rec[14:27])
                no_map = err in NO_FIEMAP and step == 4  # the writer maps it its way
                if (err and not no_map) or k < n or not stat.S_ISREG(st.st_mode) \
                        or st.st_size != self.items[k].node.st.st_size:
                    os.close(fd)  # read again by the writer, which says why
                    self.where.pop(k, None)
                    continue
                ext = None
                if self.live and not no_map and n_ext <= native.READ_SMALL_EXT:
                    ext = np.frombuffer(b.recs, dtype=EXTENT_DTYPE, count=n_ext,
                                        offset=i * size + _EXT_AT).copy()
                    if any_encoded(ext):
                        ext = None
                try:
                    meta: tuple[list[tuple[bytes, bytes]], int] | None = _meta(fd, *rec[10:14])
                except OSError:
                    meta = None  # read again by the writer, at the file's turn, naming it
                o, w = b.offs[i], b.wants[i]
                self.ready[k] = Early(fd, st, w, got, mv[o:o + w],
                                      zs[i].tobytes() if zs is not None else None, ext,
                                      self.make, meta)
            done = len(b.places)
        finally:
            if done < len(b.places):  # interrupted: the rest is closed, not leaked
                for i in range(done, len(b.places)):
                    k = b.places[i]
                    self.where.pop(k, None)
                    self.ready.pop(k, None)
                    fd = native.READ_SMALL.unpack_from(b.recs, i * size)[5]
                    if fd >= 0:
                        os.close(fd)

    def _close_batch(self, b: _Batch) -> None:
        """Close what a batch opened, once no call uses it."""
        fut = b.future
        if fut is not None and not fut.cancel():
            while not fut.done():  # the call is running: its descriptors are in use
                try:
                    wait([fut])
                except KeyboardInterrupt:  # a batch takes milliseconds: see it end
                    continue
        else:  # never submitted, or never ran: its directories are still ours
            for fd in b.dups:
                os.close(fd)
            b.dups = []
        size = native.READ_SMALL_SIZE
        for i, k in enumerate(b.places):
            self.where.pop(k, None)
            fd = native.READ_SMALL.unpack_from(b.recs, i * size)[5]
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        """Close every file read ahead and not taken; stop the helper."""
        try:
            while self.queued:
                self._close_batch(self.queued.popleft())
            for e in self.ready.values():
                os.close(e.fd)
            self.ready.clear()
        finally:
            self.pool.shutdown(wait=True)


def _one_piece(plan: Plan, limit: int) -> array.array:
    """Per file number, the length of its one stored piece from offset 0
    (0 for a file whose plan is anything else, or longer than ``limit``)."""
    p, start = plan.pieces, plan.file_start
    nfiles = len(start) - 1
    out = np.zeros(nfiles, dtype=np.int64)
    if len(p) and nfiles:
        first = np.minimum(start[:-1], len(p) - 1)
        q = p[first]
        ok = (np.diff(start) == 1) & (q["ref_file"] < 0) & (q["logical"] == 0) \
            & ((q["check"] == CHECK_NONE) | (q["check"] == CHECK_HASHED)) \
            & (q["length"] > 0) & (q["length"] <= limit)
        out[ok] = q["length"][ok]
    return array.array("q", out.tobytes())


def _meta(fd: int, xattr_err: int, iflags_err: int, xattr_len: int, iflags: int
          ) -> tuple[list[tuple[bytes, bytes]], int]:
    """A file's xattrs and stored inode flags from what the native call
    found: no call where it found no xattr, and the calls of meta.py
    (their errors theirs) where it found some or failed."""
    xattrs = read_xattrs(fd) if xattr_err or xattr_len else []
    return xattrs, iflags & fmt.IFLAGS_STORED if not iflags_err else read_iflags(fd)

