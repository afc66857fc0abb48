"""An archive's catalog: its header, BASE records, index and footer, read
from a seekable file without its data (``ls``, the checks before a
restore), with the rules the full read applies to the same records
(``BaseRecords``; ``check_index``, which the full read applies as
``IndexOfEntries`` against the entries it has checked), so that nothing
is listed that a restore refuses."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.records import RecordReader
from cloneaware.errors import ArchiveError, TruncatedArchive


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
    (BaseRecords; check_index, which the full read applies as
    IndexOfEntries), so nothing is listed that a restore refuses."""
    header, base, is_map, footer = _head_and_footer(f)
    version = header.version
    items: list[fmt.IndexItem] = []
    for payload, off in _index_records(f, footer, version):
        items.extend(fmt.decode_index(payload, off, version))
    fmt.resolve_index(items, version, footer.index_offset)
    check_index(items, footer, base, is_map, footer.index_offset, version)
    return Listing(header, items, footer, base, is_map)


@dataclass
class Outline:
    """What a restore needs of a seekable archive before anything is
    written (read_outline)."""
    header: fmt.Header
    base: thin.Base | None
    is_map: bool
    footer: fmt.Footer
    #: the names the archive's top-level entries have, by its index
    tops: set[bytes]


def read_outline(f) -> Outline:
    """Header, BASE records, footer and the top-level names of the index
    of a seekable archive.  The index is not checked here beyond its
    framing, its kinds and those names: the full read checks it against
    the entries it describes (IndexOfEntries), and a restore's check before
    it writes (an existing top-level name refused without --force) needs
    the names alone, which saves a second full check of a large index."""
    header, base, is_map, footer = _head_and_footer(f)
    version = header.version
    tops: set[bytes] = set()
    for payload, off in _index_records(f, footer, version):
        for _v, path in fmt.iter_index(payload, off, version):
            if b"/" not in path:
                fmt.path_ok(path, off, version)
                tops.add(path)
    return Outline(header, base, is_map, footer, tops)


def _index_records(f, footer: fmt.Footer, version: int):
    """(payload, offset) of each INDEX record the footer points at."""
    f.seek(footer.index_offset)
    rr = RecordReader(f)
    rr.offset = footer.index_offset
    rr.version = version
    it = rr.records()
    for _ in range(footer.index_records):
        rec = next(it, None)
        if rec is None or rec[0] != fmt.T_INDEX:
            raise ArchiveError("footer does not point at the index", footer.index_offset)
        yield rec[1], rec[2]


def read_footer(f) -> fmt.Footer:
    """The footer of a seekable archive, read with its header and BASE
    records but not its index: its totals, for a progress bar (the index
    they sum is checked by the read that restores)."""
    return _head_and_footer(f)[3]


def _head_and_footer(f) -> tuple[fmt.Header, thin.Base | None, bool, fmt.Footer]:
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
    return header, base, is_map, fmt.Footer.decode(payload, off, version)


def check_index(items: list[fmt.IndexItem], footer: fmt.Footer, base: thin.Base | None,
                is_map: bool, offset: int, version: int = fmt.WRITE_VERSION) -> None:
    """The rules an archive's INDEX and FOOTER obey, checked by every reader
    of the index alone (``ls``, ``find``): one item per entry, ids in
    sequence, clean and unique paths, parents that are directories earlier,
    sizes in range, no more bytes stored and referenced than a file holds,
    bytes from a base only where there is one, totals that add up.  The
    full read checks the same against the entries it has read
    (IndexOfEntries)."""
    if len(items) != footer.entries:
        raise ArchiveError("index and footer disagree on the number of entries", offset)
    kinds: dict[bytes, int] = {}
    stored = ref = base_ref = 0
    for n, it in enumerate(items):
        if it.id != n:
            raise ArchiveError(f"index item {it.id} out of sequence (expected {n})", offset)
        fmt.path_ok(it.path, offset, version)
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


class IndexOfEntries:
    """The full read's check of an INDEX, record by record as it comes,
    against the entries it has read and checked already: each item has its
    entry's id, path, kind and size, so the rules ``check_index`` applies to
    paths (clean, unique, parents that are directories earlier) hold by
    those of the entries; the rules on byte counts and totals are applied
    here as there.  No item is kept: the index costs one pass of C-level
    unpacking, not a second copy of every entry."""

    def __init__(self, entries: list[fmt.Entry], version: int):
        self.entries = entries
        self.version = version
        self.n = 0
        self.stored = self.ref = self.base_ref = 0

    def add(self, payload, off: int, base: thin.Base | None) -> None:
        entries, relative = self.entries, self.version >= fmt.RELATIVE
        n = self.n
        stored = ref = base_ref = 0
        for v, path in fmt.iter_index(payload, off, self.version):
            if self.version == 1:
                i, kind, size, st, rb, _at = v
                bb = 0
            else:
                i, kind, size, st, rb, bb, _at = v
            if relative and i:
                raise ArchiveError("INDEX: id field is not 0 (ids are implicit from version "
                                   "6 on)", off)
            if not relative and i != n:
                raise ArchiveError(f"index item {i} out of sequence (expected {n})", off)
            if n >= len(entries):
                raise ArchiveError("index and footer do not match the entries", off)
            e = entries[n]
            if path != e.path or kind != e.kind or size != e.size:
                raise ArchiveError(_unlike(n, e, path, kind, size), off)
            if st + rb + bb > size:  # 0 for all but regular files, as their entries say
                raise ArchiveError(f"index item {n}: more bytes stored and referenced than "
                                   f"{os.fsdecode(path)!r} holds", off)
            if bb and base is None:
                raise ArchiveError(f"index item {n}: bytes from a base, but the archive "
                                   "names no base", off)
            stored += st
            ref += rb
            base_ref += bb
            n += 1
        self.n = n
        self.stored += stored
        self.ref += ref
        self.base_ref += base_ref

    def done(self, footer: fmt.Footer, base: thin.Base | None, is_map: bool, off: int) -> None:
        if self.n != footer.entries:
            raise ArchiveError("index and footer disagree on the number of entries", off)
        if self.n != len(self.entries):
            raise ArchiveError("index and footer do not match the entries", off)
        if (self.stored, self.ref, self.base_ref) != (footer.stored_bytes, footer.ref_bytes,
                                                      footer.base_ref_bytes):
            raise ArchiveError("the footer's byte counts are not those of the index", off)
        if is_map and (base is not None or footer.stored_bytes or footer.base_ref_bytes):
            raise ArchiveError("a sharing map that says it holds data", off)


def _unlike(n: int, e: fmt.Entry, path: bytes, kind: int, size: int) -> str:
    if path != e.path:
        what = f"path {os.fsdecode(path)!r}, its entry's {os.fsdecode(e.path)!r}"
    elif kind != e.kind:
        what = f"a {fmt.KIND_NAMES[kind]}, its entry a {fmt.KIND_NAMES[e.kind]}"
    else:
        what = f"size {size}, its entry's {e.size}"
    return f"index item {n} does not match its entry: {what}"


@dataclass
class Listing:
    header: fmt.Header
    items: list[fmt.IndexItem]
    footer: fmt.Footer
    base: thin.Base | None
    is_map: bool = False  # a sharing map: entries and references, no data


def entry_at(f, off: int, version: int, at: int) -> fmt.Entry:
    """The ENTRY record at ``off`` of seekable ``f`` (an index item's), its
    CRC checked; ``at``: its position (its id from version 6 on)."""
    f.seek(off)
    rr = RecordReader(f)
    rr.offset = off
    rr.version = version
    rec = next(rr.records(), None)
    if rec is None or rec[0] != fmt.T_ENTRY:
        raise ArchiveError("the index does not point at an ENTRY record", off)
    return fmt.Entry.decode(rec[1], rec[2], version, at)
