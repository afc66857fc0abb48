"""``cloneaware verify``: every record read and checked as a restore reads
it (framing, CRCs, structure, references, every DATA record's SHA-256), as
a handler of the event protocol that writes nothing.  A sparse thin
backup's own ranges are hashed in its sparse file too; the ranges of a
thin backup's base are checked at restore, where the base is."""
from __future__ import annotations

import os
import time

from cloneaware.archive.catalog import read_index
from cloneaware.archive.events import (
    BaseRefEvent,
    DataEvent,
    EntryEvent,
    ExternalEvent,
    Handler,
    RefEvent,
    dispatch,
)
from cloneaware.archive.reader import Stream
from cloneaware.errors import ArchiveError
from cloneaware.safeio import sha256_range


class Verifier(Handler):
    """Counts what it is given; ``sparse_fd``: the sparse file of a sparse
    thin backup, whose ranges are hashed against their EXTERNAL records."""

    def __init__(self, name: str, sparse_fd: int | None = None, progress=None):
        self.name = name
        self.sparse_fd = sparse_fd
        self.progress = progress
        self.counts: dict = {
            "entries": 0, "data_records": 0, "ref_records": 0, "stored_bytes": 0,
            "referenced_bytes": 0, "base_ref_records": 0, "base_referenced_bytes": 0}
        if sparse_fd is not None:
            self.counts.update(sparse_ranges=0, sparse_bytes=0)

    def _advance(self, n: int) -> None:
        if self.progress:
            self.progress.advance(n)

    def on_entry(self, ev: EntryEvent) -> None:
        self.counts["entries"] += 1

    def on_data(self, ev: DataEvent) -> None:
        self.counts["data_records"] += 1
        self.counts["stored_bytes"] += ev.length
        self._advance(ev.length)

    def on_ref(self, ev: RefEvent) -> None:
        self.counts["ref_records"] += 1
        self.counts["referenced_bytes"] += ev.length

    def on_baseref(self, ev: BaseRefEvent) -> None:
        self.counts["base_ref_records"] += 1
        self.counts["base_referenced_bytes"] += ev.length

    def on_external(self, ev: ExternalEvent) -> None:
        if self.sparse_fd is None:
            return  # checked where the sparse file is, at restore
        if sha256_range(self.sparse_fd, ev.offset, ev.length) != ev.sha256:
            raise ArchiveError(f"{self.name}: bytes {ev.offset}-{ev.offset + ev.length} "
                               "differ from the manifest's SHA-256")
        self.counts["sparse_ranges"] += 1
        self.counts["sparse_bytes"] += ev.length
        self._advance(ev.length)


def stored_total(f) -> int | None:
    """The stored bytes a seekable archive's footer counts (for a progress
    bar), or None; ``f`` is left at its start."""
    if not f.seekable():
        return None
    try:
        return read_index(f).footer.stored_bytes
    except (ArchiveError, OSError):
        return None  # the full read says what is wrong, with the offset
    finally:
        f.seek(0)


def verify(f, name: str, sparse_fd: int | None = None, progress=None) -> dict:
    """Check every record of the archive in ``f``; its counts (and, for a
    thin backup, its base; for a sharing map, that it is one)."""
    t0 = time.monotonic()
    stream = Stream(f, maps=True, reuse_buffers=True)
    v = Verifier(name, sparse_fd, progress)
    dispatch(v, stream.events())
    counts = v.counts
    counts["seconds"] = round(time.monotonic() - t0, 2)
    if stream.is_map:
        counts["map"] = True
    if stream.base is not None:
        counts["base"] = os.fsdecode(stream.base.path)
        counts["base_files"] = len(stream.base.files)
    return counts
