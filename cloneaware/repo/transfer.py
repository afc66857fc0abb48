"""Between the two forms: ``export`` writes a snapshot as an archive file
(docs/FORMAT.md), the portable form; ``import_archive`` (``backup -r REPO
--from-archive FILE``) makes a snapshot of an archive.  Sharing survives
both ways: a blob range that was already written becomes a REF, and a REF
becomes the blob ranges of the place it names."""
from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from collections.abc import Callable

import zstandard

from cloneaware import __version__
from cloneaware.archive import format as fmt
from cloneaware.archive.events import (
    BaseRefEvent,
    BlobEvent,
    DataEvent,
    EndEvent,
    EntryEvent,
    ExternalEvent,
    RefEvent,
)
from cloneaware.archive.reader import Stream
from cloneaware.archive.writer import Writer
from cloneaware.errors import UsageError
from cloneaware.repo import crypto
from cloneaware.repo import format as rf
from cloneaware.repo.packer import Packer
from cloneaware.repo.repository import Repository
from cloneaware.repo.restore import BlobCache, Coverage, Place
from cloneaware.repo.sink import ManifestOut, Segments
from cloneaware.repo.snapshots import Snapshot, now_rfc3339


def _referenced(manifest: bytes) -> set[int]:
    """Entries a later range of the export will name in a REF."""
    cov = Coverage()
    out: set[int] = set()
    entry = -1
    for ev in Stream(io.BytesIO(manifest), check_hashes=False).events():
        if isinstance(ev, EntryEvent):
            entry = ev.entry.id
        elif isinstance(ev, BlobEvent):
            for lo, hi, p in cov.split(ev.blob_id, ev.blob_offset, ev.length):
                if p is None:
                    cov.add(ev.blob_id, Place(0, entry, ev.offset - ev.blob_offset, lo, hi))
                else:
                    out.add(p.entry)
    return out


def export(repo: Repository, snap: Snapshot, out, name: str, level: int = 3,
           progress=None) -> dict:
    """Write ``snap`` as an archive to ``out`` (an Output of backup/sinks.py)."""
    repo.load_index()
    manifest = repo.manifest(snap)
    referenced = _referenced(manifest)
    w = Writer(out, None, name)
    cov = Coverage()
    cache = BlobCache()
    z = zstandard.ZstdCompressor(level=level) if level else None
    counts = {"entries": 0, "stored_bytes": 0, "referenced_bytes": 0}
    for ev in Stream(io.BytesIO(manifest)).events():
        if isinstance(ev, EntryEvent):
            e = ev.entry
            if e.id in referenced:
                e.eflags |= fmt.EF_REFERENCED
            w.entry(e)
            counts["entries"] += 1
        elif isinstance(ev, BlobEvent):
            cur = ev.file.entry.id
            base = ev.offset - ev.blob_offset
            for lo, hi, p in cov.split(ev.blob_id, ev.blob_offset, ev.length):
                if p is not None:  # written earlier (a place is always before us)
                    w.ref(base + lo, hi - lo, p.entry, p.base + lo)
                    counts["referenced_bytes"] += hi - lo
                    continue
                data = cache.get(ev.blob_id)
                if not isinstance(data, bytes):
                    data = repo.read_blob(ev.blob_id)
                    cache.put(ev.blob_id, data)
                if hi > len(data):
                    raise UsageError(f"snapshot {snap.short_id}: a range beyond its blob")
                piece = data[lo:hi]
                codec, payload = fmt.CODEC_NONE, piece
                if z is not None:
                    c = z.compress(piece)
                    if len(c) < len(piece):
                        codec, payload = fmt.CODEC_ZSTD, c
                w.data(base + lo, hi - lo, codec, hashlib.sha256(piece).digest(), payload)
                cov.add(ev.blob_id, Place(0, cur, base, lo, hi))
                counts["stored_bytes"] += hi - lo
                if progress:
                    progress.advance(hi - lo)
        elif isinstance(ev, EndEvent):
            w.end()
    w.finish()
    counts["archive_bytes"] = w.offset
    return counts


def import_archive(repo: Repository, f, name: str, host: str | None = None,
                   tags: list[str] | None = None, level: int = 3, connections: int = 2,
                   warn: Callable[[str], None] | None = None) -> tuple[Snapshot, dict]:
    """A snapshot of the archive read from ``f``."""
    repo.load_index()
    packer = Packer(repo, connections)
    mout = ManifestOut(repo, packer)
    w = Writer(mout, None, f"{repo.where} (manifest)")
    z = zstandard.ZstdCompressor(level=level) if level else None
    grid = repo.config.grid
    segments: dict[int, Segments] = {}
    counts = {"files": 0, "logical_bytes": 0, "stored_bytes": 0, "referenced_bytes": 0,
              "added_bytes": 0}
    started = time.time_ns()
    cur: Segments | None = None
    cur_entry: fmt.Entry | None = None
    run_start = 0
    run = bytearray()

    def blob(offset: int, length: int, bid: bytes, boff: int) -> None:
        assert cur is not None
        w.blob(offset, length, boff, bid)
        cur.add(offset, length, bid, boff)

    def emit(start: int, data_run) -> None:
        """Cut a run of stored bytes on the grid into blobs."""
        pos = start
        view = memoryview(data_run)
        while view:
            n = min(grid - pos % grid, len(view))
            data = bytes(view[:n])
            bid = repo.crypto.blob_id(data)
            if not packer.known(bid):
                packer.add(bid, rf.T_DATA, n, repo.encode_blob(rf.T_DATA, bid, data, z))
                counts["added_bytes"] += n
            blob(pos, n, bid, 0)
            counts["stored_bytes"] += n
            pos += n
            view = view[n:]

    def flush_run() -> None:
        nonlocal run
        emit(run_start, run)
        run = bytearray()

    try:
        stream = Stream(f)
        for ev in stream.events():
            if isinstance(ev, EntryEvent):
                if stream.base is not None:
                    raise UsageError(f"{name} is a thin backup: restore it next to its base and "
                                     "back up the result instead")
                w.entry(ev.entry)
                if ev.entry.kind == fmt.K_REG:
                    cur, cur_entry, run = Segments(), ev.entry, bytearray()
                    counts["files"] += 1
                    counts["logical_bytes"] += ev.entry.size
            elif isinstance(ev, DataEvent):
                if run and ev.offset != run_start + len(run):
                    flush_run()
                if not run:
                    run_start = ev.offset
                run += ev.data
                cut = (run_start + len(run)) // grid * grid  # the last grid line in the run
                if cut - run_start >= 4 * grid:  # emit whole cells, keep memory bounded
                    emit(run_start, run[:cut - run_start])
                    del run[:cut - run_start]
                    run_start = cut
            elif isinstance(ev, RefEvent):
                flush_run()
                assert cur is not None and cur_entry is not None
                segs = cur if ev.source.id == cur_entry.id else segments[ev.source.id]
                for pos, n, bid, boff in segs.resolve(ev.source_offset, ev.length):
                    blob(ev.offset + pos, n, bid, boff)
                counts["referenced_bytes"] += ev.length
            elif isinstance(ev, (BaseRefEvent, ExternalEvent)):
                raise UsageError(f"{name} is a thin backup: restore it next to its base and "
                                 "back up the result instead")
            elif isinstance(ev, EndEvent):
                flush_run()
                assert cur is not None and cur_entry is not None
                w.end()
                segments[cur_entry.id] = cur  # any later REF may name it
                cur = cur_entry = None
        w.finish()
        mout.finish()
        packer.flush()
    finally:
        packer.close()
    data = {
        "time": now_rfc3339(started), "time_ns": started,
        "hostname": host or socket.gethostname(), "username": crypto.username(),
        "paths": [f"archive:{os.path.basename(name)}"], "tags": sorted(set(tags or [])),
        "manifest": [b.hex() for b in mout.ids], "manifest_bytes": mout.total,
        "parent": None, "program": f"cloneaware {__version__}", "summary": dict(counts),
    }
    if warn and counts["files"] == 0:
        warn(f"{name}: no regular file in the archive")
    return repo.save_snapshot(data), counts
