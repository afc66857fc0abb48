"""Read an archive, front to back (a pipe is enough) or, for listing, from
the footer.  Nothing read is trusted: framing, CRCs, structure, references
and data hashes are all checked here, so restore and verify share one set of
rules."""
from __future__ import annotations

import collections
import hashlib
import io
import os
import queue
import sys
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import zstandard

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.events import (
    BaseRefEvent,
    BlobEvent,
    DataEvent,
    EndEvent,
    EntryEvent,
    Event,
    ExternalEvent,
    FileState,
    FooterEvent,
    RefEvent,
    StatEvent,
)
from cloneaware.errors import ArchiveError, SharingMapGiven, TruncatedArchive, UsageError


def background_thread() -> None:
    """Make the calling thread SCHED_BATCH: one that does not preempt
    others when it wakes.  For the helper threads of restore and backup
    (reading ahead, hashing, compressing), so that the thread that writes
    the output in order, which the whole run waits on, keeps its core: in a
    restore on 2 cores it was preempted about 2,000 times by its own
    helpers (perf sched_switch).  Unprivileged; where refused, nothing
    changes."""
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

    def __init__(self) -> None:
        self.free: dict[int, list[bytearray]] = {}
        self.lock = threading.Lock()

    def get(self, n: int) -> bytearray:
        size = -(-n // self.STEP) * self.STEP
        with self.lock:
            got = self.free.get(size)
            if got:
                return got.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        with self.lock:
            got = self.free.setdefault(len(buf), [])
            if len(got) < self.KEEP:
                got.append(buf)


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
        self.skip_data = skip_data and _seekable(f)

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


class Stream:
    """Structural checks over the records; yields the typed events of
    cloneaware.archive.events, in archive order, each checked before it is
    yielded (DATA decompressed and hash-checked).  A thin archive's BASE is
    known (``self.base``) before the first EntryEvent.

    ``maps``: also read a sharing map (docs/FORMAT.md; ``self.is_map`` says
    which it was); otherwise a map is refused before any event with
    SharingMapGiven.  ``decode=False``: DATA records are framed, CRC- and
    range-checked but not decompressed nor hashed: their events carry no
    bytes (for readers that need only the layout); with ``skip_data`` too,
    a seekable file is sought over their payloads, which are then not even
    read.  ``reuse_buffers``: a DataEvent's
    ``data`` may be a view of a buffer that is read into again once the
    next event is asked for: for a consumer that writes the bytes out and
    keeps no reference to them (restore)."""

    def __init__(self, f, check_hashes: bool = True, maps: bool = False,
                 decode: bool = True, reuse_buffers: bool = False, skip_data: bool = False):
        self.r = RecordReader(f, Buffers() if reuse_buffers else None,
                              skip_data=skip_data and not decode)
        self.check_hashes = check_hashes
        self.maps = maps
        self.decode = decode
        self.is_map = False
        self.header: fmt.Header | None = None
        self.entries: list[fmt.Entry] = []
        self.by_path: dict[bytes, int] = {}
        self.complete: set[int] = set()  # REG entries whose END was read
        self.base: thin.Base | None = None
        self.base_files: dict[int, thin.BaseFile] = {}
        self._local = threading.local()

    def _decompress(self, data, length: int, offset: int) -> bytes:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            params = zstandard.get_frame_parameters(data)
            if params.content_size not in (length, zstandard.CONTENTSIZE_UNKNOWN):
                raise ArchiveError(f"zstd frame claims {params.content_size} bytes, "
                                   f"the record {length}", offset)
            out = dctx.decompress(data, max_output_size=length)
        except zstandard.ZstdError as e:
            raise ArchiveError(f"bad zstd data: {e}", offset) from None
        if len(out) != length:
            raise ArchiveError(f"zstd data gave {len(out)} bytes, expected {length}", offset)
        return out

    def _btrfs_extent(self, raw, length: int, off: int) -> tuple[bytes, fmt.BtrfsExtent]:
        """The file's bytes of a CODEC_BTRFS record, decompressed here as
        Btrfs would, with the extent to write as it is where DEST is Btrfs."""
        x = fmt.decode_btrfs_extent(raw, length, off)
        try:
            if x.compression == fmt.BTRFS_ZSTD:
                params = zstandard.get_frame_parameters(x.data)
                # Btrfs decompresses frames of windowLog <= 17 only (<linux/btrfs.h>)
                if params.window_size > fmt.BTRFS_EXTENT_MAX or \
                        params.content_size not in range(x.unencoded_len + 1) and \
                        params.content_size != zstandard.CONTENTSIZE_UNKNOWN:
                    raise ArchiveError("zstd frame of a Btrfs extent exceeds its limits", off)
                dctx = getattr(self._local, "dctx", None)
                if dctx is None:
                    dctx = self._local.dctx = zstandard.ZstdDecompressor()
                out = dctx.decompress(x.data, max_output_size=x.unencoded_len,
                                      allow_extra_data=False)
            elif x.compression == fmt.BTRFS_ZLIB:
                d = zlib.decompressobj()
                out = d.decompress(x.data, x.unencoded_len)
                if not d.eof or d.unused_data or d.unconsumed_tail:
                    raise ArchiveError("zlib stream of a Btrfs extent is not one whole "
                                       "stream within its size", off)
            else:
                raise ArchiveError(f"Btrfs compression {x.compression} (lzo) cannot be "
                                   "checked by this cloneaware", off)
        except (zstandard.ZstdError, zlib.error) as e:
            raise ArchiveError(f"bad compressed Btrfs extent: {e}", off) from None
        # shorter than the extent: Btrfs reads zeros after it (ENCODED_WRITE)
        out = out.ljust(x.unencoded_offset + length, b"\0")
        return out[x.unencoded_offset:x.unencoded_offset + length], x

    def _decode(self, raw, codec: int, length: int, sha: bytes, off: int, path: bytes,
                foff: int):
        """Decompress and hash-check one DATA record (on a worker thread):
        its bytes, and for CODEC_BTRFS the extent as stored."""
        extent = None
        if codec == fmt.CODEC_ZSTD:
            data = self._decompress(raw, length, off)
        elif codec == fmt.CODEC_BTRFS:
            data, extent = self._btrfs_extent(raw, length, off)
        else:
            data = raw
        if self.check_hashes and hashlib.sha256(data).digest() != sha:
            raise ArchiveError(f"SHA-256 mismatch in data of {os.fsdecode(path)} "
                               f"at file offset {foff}", off)
        return data, extent

    #: DATA records decoded ahead of the consumer, on two threads (two each:
    #: one being hashed, one waiting)
    DEPTH = 4
    #: records read and CRC-checked ahead of the structural checks.  With
    #: DEPTH, about 12 records of up to 4 MiB are in flight: 80 MiB of peak
    #: RSS in a restore of the bench family where 16 and 8 took 138 MiB and
    #: faulted in 40,000 pages instead of 25,000, for no speed
    PREFETCH = 6

    def events(self) -> Iterator[Event]:
        """The events, in archive order.  DATA records are decompressed and
        hash-checked on worker threads, up to DEPTH records ahead."""
        pool = ThreadPoolExecutor(max_workers=2, initializer=background_thread)
        q: collections.deque[Event | _PendingData] = collections.deque()
        try:
            for ev in self._events(pool):
                q.append(ev)
                while q and (not isinstance(q[0], _PendingData) or len(q) > self.DEPTH):
                    item = q.popleft()
                    yield _resolve(item)
                    self._give_back(item)
            while q:
                item = q.popleft()
                yield _resolve(item)
                self._give_back(item)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _give_back(self, item: Event | _PendingData) -> None:
        """The consumer has handled ``item``'s event: its buffer may be
        read into again."""
        if isinstance(item, _PendingData) and item.buf is not None:
            assert self.r.buffers is not None
            self.r.buffers.put(item.buf)

    def _events(self, pool: ThreadPoolExecutor) -> Iterator[Event | _PendingData]:
        r = self.r
        r.magic()
        self.is_map = r.is_map
        if self.is_map and not self.maps:
            raise SharingMapGiven()
        recs = r.records_in()
        first = next(recs, None)
        if first is None:
            raise TruncatedArchive("archive is truncated after the magic", r.offset)
        if first[0] != fmt.T_HEADER:
            raise ArchiveError("first record is not a HEADER", first[2])
        self.header = fmt.Header.decode(first[1], first[2])
        version = r.version = self.header.version
        # The rest is read and CRC-checked on a thread of its own, ahead of
        # the checks here: the archive's reads (disk or pipe) overlap the
        # restore's writes and clones.
        recs = _prefetched(recs, self.PREFETCH)
        cur: FileState | None = None
        bases = BaseRecords(version, self.base_files)
        index_items: list[fmt.IndexItem] = []
        index_start = None
        index_records = 0
        footer = None
        for rtype, payload, off, buf in recs:
            if footer is not None:
                raise ArchiveError("data after the FOOTER", off)
            if index_start is not None and rtype not in (fmt.T_INDEX, fmt.T_FOOTER):
                raise ArchiveError(f"{fmt.TYPE_NAMES.get(rtype)} record after the INDEX", off)
            if self.is_map and rtype in fmt.NOT_IN_MAP:
                raise ArchiveError(f"{fmt.TYPE_NAMES[rtype]} record in a sharing map, which "
                                   "holds no data", off)
            if rtype == fmt.T_BASE:
                if self.entries or index_start is not None:
                    raise ArchiveError("BASE record after the first entry", off)
                self.base = bases.add(payload, off)
            elif rtype == fmt.T_ENTRY:
                if cur is not None:
                    raise ArchiveError("ENTRY before the END of the previous file", off)
                e = fmt.Entry.decode(payload, off, version)
                self._check_entry(e, off)
                self.entries.append(e)
                self.by_path[e.path] = e.id
                if e.kind == fmt.K_REG:
                    cur = FileState(e, off)
                yield EntryEvent(e, off)
            elif rtype == fmt.T_DATA:
                if cur is None:
                    raise ArchiveError("DATA outside a regular file", off)
                foff, length, codec, sha, start = fmt.decode_data_head(payload, off, version)
                self._check_range(cur, foff, length, off)
                cur.pos = foff + length
                cur.count(fmt.End.DATA, length)
                if not self.decode:
                    if buf is not None:
                        r.buffers.put(buf)  # type: ignore[union-attr]
                    yield DataEvent(cur, foff, None, off, length)
                    continue
                raw = memoryview(payload)[start:]
                fut = pool.submit(self._decode, raw, codec, length, sha, off, cur.entry.path,
                                  foff)
                yield _PendingData(cur, foff, fut, off, length, buf)
            elif rtype == fmt.T_BASEREF:
                if cur is None:
                    raise ArchiveError("BASEREF outside a regular file", off)
                foff, length, number, boff, sha = thin.decode_baseref(payload, off)
                self._check_range(cur, foff, length, off)
                used = self.base_files.get(number)
                if used is None:
                    raise ArchiveError(f"reference to base file {number}, which the BASE "
                                       "does not list", off)
                if boff + length > used.size:
                    raise ArchiveError("reference beyond the end of its base file", off)
                cur.pos = foff + length
                cur.count(fmt.End.BASEREF, length)
                cur.base_ranges.append((foff, length, sha))
                yield BaseRefEvent(cur, foff, length, used, boff, sha, off)
            elif rtype == fmt.T_EXTERNAL:
                if cur is None:
                    raise ArchiveError("EXTERNAL outside a regular file", off)
                foff, length, sha = thin.decode_external(payload, off)
                self._check_range(cur, foff, length, off)
                cur.pos = foff + length
                cur.count(fmt.End.EXTERNAL, length)
                cur.external_ranges.append((foff, length, sha))
                yield ExternalEvent(cur, foff, length, sha, off)
            elif rtype == fmt.T_REF:
                if cur is None:
                    raise ArchiveError("REF outside a regular file", off)
                foff, length, src_id, soff = fmt.decode_ref(payload, off)
                self._check_range(cur, foff, length, off)
                src = self._check_ref_source(cur, foff, length, src_id, soff, off)
                cur.pos = foff + length
                cur.count(fmt.End.REF, length)
                yield RefEvent(cur, foff, length, src, soff, off)
            elif rtype == fmt.T_BLOB:
                if cur is None:
                    raise ArchiveError("BLOB outside a regular file", off)
                foff, length, boff, bid = fmt.decode_blob(payload, off)
                self._check_range(cur, foff, length, off)
                cur.pos = foff + length
                cur.count(fmt.End.BLOB, length)
                yield BlobEvent(cur, foff, length, bid, boff, off)
            elif rtype == fmt.T_STAT:
                if cur is None or cur.stat is not None or any(cur.counts):
                    raise ArchiveError("STAT not right after the ENTRY of a regular file", off)
                cur.stat = fmt.decode_stat(payload, off)
                yield StatEvent(cur, cur.stat[0], cur.stat[1], off)
            elif rtype == fmt.T_END:
                if cur is None:
                    raise ArchiveError("END outside a regular file", off)
                end = fmt.End.decode(payload, off, version)
                if end.id != cur.entry.id or cur.counts != end.counts():
                    raise ArchiveError(
                        f"END of {os.fsdecode(cur.entry.path)} does not match its records "
                        "(a record is missing)", off)
                cur.end = end
                self.complete.add(cur.entry.id)
                yield EndEvent(cur, end, off)
                cur = None
            elif rtype == fmt.T_INDEX:
                if cur is not None:
                    raise ArchiveError("INDEX before the END of the last file", off)
                if index_start is None:
                    index_start = off
                index_records += 1
                index_items.extend(fmt.decode_index(payload, off, version))
            elif rtype == fmt.T_FOOTER:
                if index_start is None:
                    raise ArchiveError("FOOTER without an INDEX", off)
                footer = fmt.Footer.decode(payload, off, version)
                if footer.index_offset != index_start or footer.index_records != index_records:
                    raise ArchiveError("footer does not point at the index", off)
                check_index(index_items, footer, self.base, self.is_map, off, version)
                self._check_index_entries(index_items, off)
                yield FooterEvent(footer, off)
            else:
                raise ArchiveError(f"unexpected {fmt.TYPE_NAMES.get(rtype, rtype)} record", off)
        if footer is None:
            raise TruncatedArchive("archive is truncated: no footer", r.offset)

    def _check_entry(self, e: fmt.Entry, off: int) -> None:
        if e.id != len(self.entries):
            raise ArchiveError(f"entry id {e.id} out of sequence (expected {len(self.entries)})",
                               off)
        if e.path in self.by_path:
            raise ArchiveError(f"duplicate entry {os.fsdecode(e.path)!r}", off)
        parent, _, _ = e.path.rpartition(b"/")
        if parent:
            pid = self.by_path.get(parent)
            if pid is None or self.entries[pid].kind != fmt.K_DIR:
                raise ArchiveError(f"parent of {os.fsdecode(e.path)!r} is not a directory "
                                   "earlier in the archive", off)
        if e.subvol & fmt.SV_SNAPSHOT and not self.entries[e.origin].subvol & fmt.SV_SUBVOLUME:
            raise ArchiveError(f"{os.fsdecode(e.path)!r} is a snapshot of entry {e.origin}, "
                               "which is not a subvolume", off)
        if e.kind == fmt.K_HARDLINK:
            if e.link >= e.id or self.entries[e.link].kind != fmt.K_REG \
                    or e.link not in self.complete:
                raise ArchiveError(f"hard link {os.fsdecode(e.path)!r} does not point to an "
                                   "earlier regular file", off)

    def _check_range(self, cur: FileState, foff: int, length: int, off: int) -> None:
        if foff < cur.pos:
            raise ArchiveError(f"ranges of {os.fsdecode(cur.entry.path)} overlap or go "
                               "backwards", off)
        if foff + length > cur.entry.size:
            raise ArchiveError(f"range beyond the end of {os.fsdecode(cur.entry.path)}", off)

    def _check_ref_source(self, cur, foff, length, src_id, soff, off) -> fmt.Entry:
        if src_id == cur.entry.id:
            if soff + length > foff:
                raise ArchiveError("reference to a part of the same file not yet restored", off)
            return cur.entry
        if src_id >= cur.entry.id:
            raise ArchiveError(f"reference forwards to entry {src_id}", off)
        src = self.entries[src_id]
        if src.kind != fmt.K_REG:
            raise ArchiveError(f"reference to {os.fsdecode(src.path)!r}, not a regular file", off)
        if soff + length > src.size:
            raise ArchiveError(f"reference beyond the end of {os.fsdecode(src.path)!r}", off)
        if src_id not in self.complete:
            raise ArchiveError("reference to an incomplete file", off)
        return src

    def _check_index_entries(self, items: list[fmt.IndexItem], off: int) -> None:
        """The index describes the entries read, byte counts included."""
        if len(items) != len(self.entries):
            raise ArchiveError("index and footer do not match the entries", off)
        for it, e in zip(items, self.entries):
            if it.id != e.id or it.path != e.path or it.kind != e.kind or it.size != e.size:
                raise ArchiveError(f"index item {it.id} does not match its entry", off)


_DONE = object()


def _prefetched(it: Iterator, depth: int) -> Iterator:
    """The items of ``it``, produced by a thread of their own up to ``depth``
    ahead; an exception it raises comes out in its place, in order.  Closing
    the returned generator stops the thread."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        background_thread()
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            item = _DONE
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            item = e
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # not forever: a read it is blocked in (a stalled pipe) ends with the
        # process; the thread is a daemon
        t.join(timeout=2)


class _PendingData(NamedTuple):
    """A DATA record being decoded on a worker."""

    file: FileState
    offset: int
    future: Future
    record: int
    length: int
    #: the Buffers buffer its payload is in, if any
    buf: bytearray | None = None


def _resolve(ev: Event | _PendingData) -> Event:
    if isinstance(ev, _PendingData):
        data, extent = ev.future.result()
        return DataEvent(ev.file, ev.offset, data, ev.record, ev.length, extent)
    return ev


def _seekable(f) -> bool:
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


class BaseRecords:
    """The BASE records of a thin archive, as every reader checks them:
    each repeats the same base path and kind, and no base file number is
    listed twice (docs/FORMAT.md)."""

    def __init__(self, version: int, files: dict[int, thin.BaseFile] | None = None):
        self.version = version
        self.base: thin.Base | None = None
        #: base file number -> the file
        self.files = files if files is not None else {}

    def add(self, payload, off: int) -> thin.Base:
        b = thin.Base.decode(payload, off, self.version)
        if self.base is None:
            self.base = thin.Base(b.path, b.kind)
        elif (b.path, b.kind) != (self.base.path, self.base.kind):
            raise ArchiveError("BASE records disagree on the base", off)
        for bf in b.files:
            if bf.number in self.files:
                raise ArchiveError(f"base file {bf.number} listed twice", off)
            self.files[bf.number] = bf
            self.base.files.append(bf)
        return self.base


def read_index(f) -> Listing:
    """Header, index and footer of a seekable archive, reading no file data.
    The rules are those the full read applies to the same records
    (BaseRecords, check_index), so nothing is listed that a restore refuses."""
    f.seek(0)
    rr = RecordReader(f)
    rr.magic()
    recs = rr.records()
    first = next(recs, None)
    if first is None or first[0] != fmt.T_HEADER:
        raise ArchiveError("no HEADER after the magic", len(fmt.MAGIC))
    header = fmt.Header.decode(first[1], first[2])
    version = header.version
    is_map = rr.is_map
    rr.version = version
    bases = BaseRecords(version)
    for rtype, payload, off in recs:  # BASE records, if any, follow the header
        if rtype == fmt.T_HEADER:
            raise ArchiveError("a second HEADER record", off)
        if rtype != fmt.T_BASE:
            break
        bases.add(payload, off)
    base = bases.base
    size = f.seek(0, io.SEEK_END)
    foff = size - fmt.FOOTER_SIZES[version]
    if foff < rr.offset:
        raise TruncatedArchive("archive is truncated: no footer", size)
    f.seek(foff)
    rr2 = RecordReader(f)
    rr2.offset = foff
    rr2.version = version
    it = rr2.records()
    try:
        rtype, payload, off = next(it)
    except ArchiveError as e:
        # one offset in the message: the footer's (issue 21, defect 17)
        raise TruncatedArchive(f"archive is truncated or damaged: no valid footer "
                               f"({e.reason})", size) from None
    except StopIteration:
        raise TruncatedArchive("archive is truncated: no footer", size) from None
    if rtype != fmt.T_FOOTER:
        raise TruncatedArchive("archive is truncated: no footer", size)
    footer = fmt.Footer.decode(payload, off, version)
    f.seek(footer.index_offset)
    rr3 = RecordReader(f)
    rr3.offset = footer.index_offset
    rr3.version = version
    items: list[fmt.IndexItem] = []
    it = rr3.records()
    for _ in range(footer.index_records):
        rec = next(it, None)
        if rec is None or rec[0] != fmt.T_INDEX:
            raise ArchiveError("footer does not point at the index", footer.index_offset)
        items.extend(fmt.decode_index(rec[1], rec[2], version))
    check_index(items, footer, base, is_map, footer.index_offset, version)
    return Listing(header, items, footer, base, is_map)


def check_index(items: list[fmt.IndexItem], footer: fmt.Footer, base: thin.Base | None,
                is_map: bool, offset: int, version: int = fmt.WRITE_VERSION) -> None:
    """The rules an archive's INDEX and FOOTER obey, checked by every reader
    (the full read, and ``ls`` from the index): one item per entry, ids in
    sequence, clean and unique paths, parents that are directories earlier,
    sizes in range, no more bytes stored and referenced than a file holds,
    bytes from a base only where there is one, totals that add up."""
    if len(items) != footer.entries:
        raise ArchiveError("index and footer disagree on the number of entries", offset)
    kinds: dict[bytes, int] = {}
    stored = ref = base_ref = 0
    for n, it in enumerate(items):
        if it.id != n:
            raise ArchiveError(f"index item {it.id} out of sequence (expected {n})", offset)
        fmt.check_path(it.path, offset, version)
        if it.path in kinds:
            raise ArchiveError(f"duplicate entry {os.fsdecode(it.path)!r} in the index", offset)
        parent = it.path.rpartition(b"/")[0]
        if parent and kinds.get(parent) != fmt.K_DIR:
            raise ArchiveError(f"parent of {os.fsdecode(it.path)!r} is not a directory "
                               "earlier in the index", offset)
        if it.kind != fmt.K_REG and (it.size or it.stored_bytes or it.ref_bytes
                                     or it.base_ref_bytes):
            raise ArchiveError(f"index item {it.id} has data but is not a regular file",
                               offset)
        if it.size > fmt.SIZE_MAX:
            raise ArchiveError(f"index item {it.id}: size {it.size} beyond the largest a "
                               "file can have", offset)
        if it.stored_bytes + it.ref_bytes + it.base_ref_bytes > it.size:
            raise ArchiveError(f"index item {it.id}: more bytes stored and referenced "
                               f"than {os.fsdecode(it.path)!r} holds", offset)
        if it.base_ref_bytes and base is None:
            raise ArchiveError(f"index item {it.id}: bytes from a base, but the archive "
                               "names no base", offset)
        kinds[it.path] = it.kind
        stored += it.stored_bytes
        ref += it.ref_bytes
        base_ref += it.base_ref_bytes
    if (stored, ref, base_ref) != (footer.stored_bytes, footer.ref_bytes,
                                   footer.base_ref_bytes):
        raise ArchiveError("the footer's byte counts are not those of the index", offset)
    if is_map and (base is not None or footer.stored_bytes or footer.base_ref_bytes):
        raise ArchiveError("a sharing map that says it holds data", offset)


@dataclass
class Listing:
    header: fmt.Header
    items: list[fmt.IndexItem]
    footer: fmt.Footer
    base: thin.Base | None
    is_map: bool = False  # a sharing map: entries and references, no data
