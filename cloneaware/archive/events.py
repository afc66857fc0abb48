"""Typed events between an archive reader and its consumers (restore,
verify, export).  The reader has checked everything an event says before it
yields it (docs/FORMAT.md); a consumer dispatches on the event's type, one
method per type, as ``btrfs receive`` has one callback per command."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from cloneaware.archive import format as fmt


@dataclass
class FileState:
    """The regular file whose records are being read."""

    entry: fmt.Entry
    offset: int  # ENTRY record offset
    pos: int = 0  # next file offset allowed (ranges come in order)
    end: fmt.End | None = None
    #: records and bytes seen so far, in the order of End.counts()
    counts: list[int] = field(default_factory=lambda: [0] * 10)
    #: (inode, ctime_ns) from the STAT record, if any
    stat: tuple[int, int] | None = None
    #: BASEREF ranges to verify once the file is complete: (offset, length, sha)
    base_ranges: list[tuple[int, int, bytes]] = field(default_factory=list)
    #: EXTERNAL ranges, verified the same way
    external_ranges: list[tuple[int, int, bytes]] = field(default_factory=list)

    def count(self, kind: int, length: int) -> None:
        """One more record of ``kind`` (fmt.End.DATA, ...) of ``length`` bytes."""
        self.counts[kind] += 1
        self.counts[5 + kind] += length


class EntryEvent(NamedTuple):
    """An ENTRY record: a new entry of any kind (a REG entry's data follows)."""

    entry: fmt.Entry
    record: int  # archive offset of the record


class DataEvent(NamedTuple):
    """DATA: ``data`` (decompressed, its SHA-256 checked) at ``offset``;
    ``extent``: for a CODEC_BTRFS record, the compressed extent it came
    from, to write as it is where the destination is Btrfs."""

    file: FileState
    offset: int
    data: bytes
    record: int
    extent: fmt.BtrfsExtent | None = None


class RefEvent(NamedTuple):
    """REF: ``length`` bytes at ``offset`` are those of ``source`` at
    ``source_offset`` (an earlier, complete entry, or this one before offset)."""

    file: FileState
    offset: int
    length: int
    source: fmt.Entry
    source_offset: int
    record: int


class BaseRefEvent(NamedTuple):
    """BASEREF: bytes of the thin backup's base file, with their SHA-256."""

    file: FileState
    offset: int
    length: int
    base_file: fmt.BaseFile
    base_offset: int
    sha256: bytes
    record: int


class ExternalEvent(NamedTuple):
    """EXTERNAL: bytes at the same offset of a sparse thin file, with their SHA-256."""

    file: FileState
    offset: int
    length: int
    sha256: bytes
    record: int


class BlobEvent(NamedTuple):
    """BLOB (repository manifests): ``length`` bytes at ``offset`` are those of
    the blob ``blob_id`` from ``blob_offset``."""

    file: FileState
    offset: int
    length: int
    blob_id: bytes
    blob_offset: int
    record: int


class StatEvent(NamedTuple):
    """STAT: the source file's inode and ctime (for the next backup)."""

    file: FileState
    ino: int
    ctime_ns: int
    record: int


class EndEvent(NamedTuple):
    """END: the file's records are complete and agree with its counts."""

    file: FileState
    end: fmt.End
    record: int


class FooterEvent(NamedTuple):
    """FOOTER: the archive is whole and its index agrees with its entries."""

    footer: fmt.Footer
    record: int


Event = (EntryEvent | DataEvent | RefEvent | BaseRefEvent | ExternalEvent | BlobEvent
         | StatEvent | EndEvent | FooterEvent)
