"""Between the two forms: ``export`` writes a snapshot as an archive file
(docs/FORMAT.md), the portable form; ``import_archive`` (``backup -r REPO
--from-archive FILE``) makes a snapshot of an archive.  Sharing survives
both ways: a blob range that was already written becomes a REF, and a REF
becomes the blob ranges of the place it names."""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable

import zstandard

from cloneaware.archive import format as fmt
from cloneaware.archive.blobs import BlobCache, Coverage, Place
from cloneaware.archive.events import (
    BaseRefEvent,
    BlobEvent,
    DataEvent,
    EndEvent,
    EntryEvent,
    ExternalEvent,
    Handler,
    RefEvent,
    dispatch,
)
from cloneaware.archive.reader import Stream
from cloneaware.archive.writer import Writer
from cloneaware.backup.summary import Summary
from cloneaware.errors import UsageError
from cloneaware.repo.repository import Repository
from cloneaware.repo.sink import RepositorySink
from cloneaware.repo.snapshots import Snapshot


class _Referenced(Handler):
    """The entries a later range of the export will name in a REF: those
    holding bytes of a blob that a later range uses again."""

    def __init__(self) -> None:
        self.cov = Coverage()
        self.out: set[int] = set()

    def on_blob(self, ev: BlobEvent) -> None:
        entry = ev.file.entry.id
        for lo, hi, p in self.cov.split(ev.blob_id, ev.blob_offset, ev.length):
            if p is None:
                self.cov.add(ev.blob_id, Place(0, entry, ev.offset - ev.blob_offset, lo, hi))
            else:
                self.out.add(p.entry)


class _Exporter(Handler):
    """A manifest's events written as an archive: a blob range whose bytes
    were written earlier becomes a REF to that place, the others DATA."""

    def __init__(self, repo: Repository, snap: Snapshot, w: Writer, referenced: set[int],
                 level: int, progress) -> None:
        self.repo = repo
        self.snap = snap
        self.w = w
        self.referenced = referenced
        self.cov = Coverage()
        self.cache = BlobCache()
        self.z = zstandard.ZstdCompressor(level=level) if level else None
        self.progress = progress
        self.counts = {"entries": 0, "stored_bytes": 0, "referenced_bytes": 0}

    def on_entry(self, ev: EntryEvent) -> None:
        e = ev.entry
        if e.id in self.referenced:
            e.eflags |= fmt.EF_REFERENCED
        self.w.entry(e)
        self.counts["entries"] += 1

    def on_blob(self, ev: BlobEvent) -> None:
        w, counts = self.w, self.counts
        cur = ev.file.entry.id
        base = ev.offset - ev.blob_offset
        for lo, hi, p in self.cov.split(ev.blob_id, ev.blob_offset, ev.length):
            if p is not None:  # written earlier (a place is always before us)
                w.ref(base + lo, hi - lo, p.entry, p.base + lo)
                counts["referenced_bytes"] += hi - lo
                continue
            data = self.cache.get(ev.blob_id)
            if not isinstance(data, bytes):
                data = self.repo.read_blob(ev.blob_id)
                self.cache.put(ev.blob_id, data)
            if hi > len(data):
                raise UsageError(f"snapshot {self.snap.short_id}: a range beyond its blob")
            piece = data[lo:hi]
            codec, payload = fmt.CODEC_NONE, piece
            if self.z is not None:
                c = self.z.compress(piece)
                if len(c) < len(piece):
                    codec, payload = fmt.CODEC_ZSTD, c
            w.data(base + lo, hi - lo, codec, hashlib.sha256(piece).digest(), payload)
            self.cov.add(ev.blob_id, Place(0, cur, base, lo, hi))
            counts["stored_bytes"] += hi - lo
            if self.progress:
                self.progress.advance(hi - lo)

    def on_end(self, ev: EndEvent) -> None:
        self.w.end()


def export(repo: Repository, snap: Snapshot, out, name: str, level: int = 3,
           progress=None) -> dict:
    """Write ``snap`` as an archive to ``out`` (an Output of backup/sinks.py)."""
    repo.load_index()
    manifest = repo.manifest(snap)
    ref = _Referenced()
    dispatch(ref, Stream(io.BytesIO(manifest), check_hashes=False).events())
    w = Writer(out, None, name)
    ex = _Exporter(repo, snap, w, ref.out, level, progress)
    dispatch(ex, Stream(io.BytesIO(manifest)).events())
    w.finish()
    ex.counts["archive_bytes"] = w.offset
    return ex.counts


class _Importer(Handler):
    """An archive's events fed to a repository's sink, as a backup feeds it:
    entries as they are, stored bytes cut on the repository's grid into
    blobs, a REF as the blob ranges of the place it names."""

    def __init__(self, sink: RepositorySink, stream: Stream, name: str, level: int):
        self.sink = sink
        self.stream = stream
        self.name = name
        self.z = zstandard.ZstdCompressor(level=level) if level else None
        self.s = sink.summary
        self.run_start = 0
        self.run = bytearray()

    def _thin(self) -> UsageError:
        return UsageError(f"{self.name} is a thin backup: restore it next to its base and "
                          "back up the result instead")

    def on_entry(self, ev: EntryEvent) -> None:
        if self.stream.base is not None:
            raise self._thin()
        e = ev.entry
        self.sink.entry(e)
        if e.kind == fmt.K_REG:
            self.s.files += 1
            self.s.logical_bytes += e.size
        elif e.kind == fmt.K_DIR:
            self.s.dirs += 1

    def on_data(self, ev: DataEvent) -> None:
        grid = self.sink.grid
        if self.run and ev.offset != self.run_start + len(self.run):
            self._flush()
        if not self.run:
            self.run_start = ev.offset
        self.run += ev.data
        cut = (self.run_start + len(self.run)) // grid * grid  # the last grid line in the run
        if cut - self.run_start >= 4 * grid:  # emit whole cells, keep memory bounded
            n = cut - self.run_start
            self._store(self.run_start, memoryview(self.run)[:n])
            del self.run[:n]
            self.run_start = cut

    def _store(self, start: int, data) -> None:
        """Cut a run of stored bytes on the grid into blobs."""
        for pos, n in self.sink.cuts(start, len(data)):
            piece = bytes(data[pos - start:pos - start + n])
            self.sink.store(-1, pos, n, self.sink.chunk(piece, n, self.z))
            self.s.stored_bytes += n

    def _flush(self) -> None:
        if self.run:
            self._store(self.run_start, self.run)
            self.run = bytearray()

    def on_ref(self, ev: RefEvent) -> None:
        self._flush()
        self.sink.ref(ev.offset, ev.length, ev.source.id, ev.source_offset)
        self.s.referenced_bytes += ev.length

    def on_baseref(self, ev: BaseRefEvent) -> None:
        raise self._thin()

    def on_external(self, ev: ExternalEvent) -> None:
        raise self._thin()

    def on_end(self, ev: EndEvent) -> None:
        self._flush()
        self.sink.end()


def import_archive(repo: Repository, f, name: str, host: str | None = None,
                   tags: list[str] | None = None, level: int = 3, connections: int = 2,
                   warn: Callable[[str], None] | None = None,
                   copy_of: Snapshot | None = None) -> tuple[Snapshot, dict]:
    """A snapshot of the archive read from ``f``: the archive is a source
    for the repository's backup sink (repo/sink.py), as a tree is.
    ``copy_of``: the snapshot of another repository the archive is an
    export of (repo/copy.py), whose metadata the new one keeps."""
    sink = RepositorySink(repo, [f"archive:{os.path.basename(name)}"], host, tags, level,
                          connections, warn, anchors=False, parent=False, keep_all=True,
                          atime=True)
    sink.copy_of = copy_of
    s = sink.summary = Summary()
    sink.prepare()
    sink.open(0, None)
    try:
        stream = Stream(f)
        dispatch(_Importer(sink, stream, name, level), stream.events())
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    assert sink.snapshot is not None
    if warn and s.files == 0:
        warn(f"{name}: no regular file in the archive")
    counts = {k: getattr(s, k) for k in ("files", "logical_bytes", "stored_bytes",
                                         "referenced_bytes", "added_bytes")}
    return sink.snapshot, counts
