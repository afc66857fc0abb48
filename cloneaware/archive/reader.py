"""Read an archive front to back (a pipe is enough) as typed events
(archive/events.py).  Nothing read is trusted: the records' framing and
CRCs (archive/records.py), their structure, references and data hashes are
all checked here, with the index rules of archive/catalog.py, so that every
reader (restore, verify, ls, export, reshare, ...) shares one set of rules."""
from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.catalog import BaseRecords, IndexOfEntries
from cloneaware.archive.decode import Decoder
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
from cloneaware.archive.records import (
    Buffers,
    RecordReader,
    background_thread,
    prefetched,
)
from cloneaware.errors import ArchiveError, SharingMapGiven, TruncatedArchive


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
        self.decoder = Decoder(check_hashes)

    #: DATA records decoded ahead of the consumer, on two threads (two each:
    #: one being hashed, one waiting)
    DEPTH = 4
    #: handovers of records read and CRC-checked ahead of the structural
    #: checks (a DATA record in a reused buffer is one; smaller records come
    #: in batches of up to 512 records or 1 MiB, records.prefetched).  With
    #: DEPTH, about 12 records of up to 4 MiB are in flight: 80 MiB of peak
    #: RSS in a restore of the bench family where 16 and 8 took 138 MiB and
    #: faulted in 40,000 pages instead of 25,000, for no speed
    PREFETCH = 6
    #: DATA records of up to this many bytes are decoded on the reading
    #: thread itself (about 20 us for 16 KiB; handing one to a worker and
    #: back cost about as much, 50,000 times in a tree of small files)
    INLINE = 64 << 10

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
        recs = prefetched(recs, self.PREFETCH, cut=_in_buffer, weigh=_weight)
        cur: FileState | None = None
        bases = BaseRecords(version, self.base_files)
        index = IndexOfEntries(self.entries, version)
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
                e = fmt.Entry.decode(payload, off, version, len(self.entries))
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
                if buf is None and length <= self.INLINE:
                    # a small file's record: decoded here, where a worker's
                    # handover (a future, two lock handoffs) costs more than it
                    try:
                        data, extent = self.decoder.decode(raw, codec, length, sha, off,
                                                           cur.entry.path, foff)
                    except ArchiveError as ex:  # raised in its turn, as a worker's would be
                        failed: Future = Future()
                        failed.set_exception(ex)
                        yield _PendingData(cur, foff, failed, off, length, buf)
                        continue
                    yield DataEvent(cur, foff, data, off, length, extent)
                    continue
                fut = pool.submit(self.decoder.decode, raw, codec, length, sha, off, cur.entry.path,
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
                foff, length, src_id, soff = fmt.decode_ref(payload, off, version, cur.entry.id)
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
                end = fmt.End.decode(payload, off, version, cur.entry.id)
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
                index.add(payload, off, self.base)
            elif rtype == fmt.T_FOOTER:
                if index_start is None:
                    raise ArchiveError("FOOTER without an INDEX", off)
                footer = fmt.Footer.decode(payload, off, version)
                if footer.index_offset != index_start or footer.index_records != index_records:
                    raise ArchiveError("footer does not point at the index", off)
                index.done(footer, self.base, self.is_map, off)
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


class _PendingData(NamedTuple):
    """A DATA record being decoded on a worker."""

    file: FileState
    offset: int
    future: Future
    record: int
    length: int
    #: the Buffers buffer its payload is in, if any
    buf: bytearray | None = None


def _in_buffer(rec) -> bool:
    """A record whose payload is in a reused buffer: handed over at once."""
    return rec[3] is not None


def _weight(rec) -> int:
    p = rec[1]
    return len(p) if isinstance(p, (bytes, bytearray, memoryview)) else 0


def _resolve(ev: Event | _PendingData) -> Event:
    if isinstance(ev, _PendingData):
        data, extent = ev.future.result()
        return DataEvent(ev.file, ev.offset, data, ev.record, ev.length, extent)
    return ev


