"""The event protocol between an archive reader and its consumers.

The reader (archive/reader.py) has checked everything an event says before
it yields it (docs/FORMAT.md).  Every consumer is a ``Handler``: one method
per event type, as ``btrfs receive`` and ``receive --dump`` are two
implementations of one send-stream ops table.  Restore into a directory and
its dry run, verify, ls, diff, export, import, reshare, the fetch planner of
a repository restore, check and prune are all handlers, fed by ``dispatch``
(events one at a time, or in batches)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cloneaware.archive import format as fmt
from cloneaware.archive import thin


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
    """DATA: ``length`` bytes at ``offset``; ``data``: those bytes
    (decompressed, their SHA-256 checked), or None where the reader was
    asked not to decode them (``Stream(decode=False)``: readers that need
    only the layout); ``extent``: for a CODEC_BTRFS record, the compressed
    extent it came from, to write as it is where the destination is Btrfs."""

    file: FileState
    offset: int
    data: Any  # bytes, a memoryview of a reused buffer, or None
    record: int
    length: int
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
    base_file: thin.BaseFile
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


Batch = list[Event]


class Handler:
    """A consumer of the event stream: one method per event type.  Each
    does nothing by default, so a handler writes only those it needs.
    ``on_batch`` takes a run of events in archive order; by default it
    hands each to its method (a handler that gains from seeing many
    records at once overrides it)."""

    def on_entry(self, ev: EntryEvent) -> None:
        pass

    def on_data(self, ev: DataEvent) -> None:
        pass

    def on_ref(self, ev: RefEvent) -> None:
        pass

    def on_baseref(self, ev: BaseRefEvent) -> None:
        pass

    def on_external(self, ev: ExternalEvent) -> None:
        pass

    def on_blob(self, ev: BlobEvent) -> None:
        pass

    def on_stat(self, ev: StatEvent) -> None:
        pass

    def on_end(self, ev: EndEvent) -> None:
        pass

    def on_footer(self, ev: FooterEvent) -> None:
        pass

    def on_batch(self, events: Batch) -> None:
        table = methods(self)
        for ev in events:
            table[type(ev)](ev)


def methods(h: Handler) -> dict[type, Callable[[Any], None]]:
    """The handler's method for each event type."""
    return {EntryEvent: h.on_entry, DataEvent: h.on_data, RefEvent: h.on_ref,
            BaseRefEvent: h.on_baseref, ExternalEvent: h.on_external,
            BlobEvent: h.on_blob, StatEvent: h.on_stat, EndEvent: h.on_end,
            FooterEvent: h.on_footer}


def dispatch(handler: Handler, events: Iterable[Event | Batch]) -> None:
    """Feed ``events`` to ``handler``: each event to its method, each batch
    (a list of events) to ``on_batch``."""
    table = methods(handler)
    for ev in events:
        if isinstance(ev, list):
            handler.on_batch(ev)
        else:
            table[type(ev)](ev)
