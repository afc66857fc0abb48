"""``copy``: snapshots of one repository into another (the off-site copy
of the 3-2-1 rule), in one of two ways:

- *blob by blob*, where both name a blob by the same id (both plain, or
  sealed with the same id key) and cut on the same grid: the manifest is
  stored again as it is, and of the blobs it names those the destination
  lacks are read, sealed under its keys and stored.  A copy then adds what
  the backup added to the source, no more.
- *re-cut*, otherwise (plain to encrypted and back, other keys, another
  grid): the source exports the snapshot (repo/transfer.py) into a pipe
  that the destination imports from, as ``backup --from-archive`` would,
  on another thread.  The bytes are cut on the destination's grid and
  named by its ids, so what it already holds is not stored again, and
  sharing survives (a range written earlier in the snapshot travels as a
  REF); a range rewritten inside a grid cell costs the cell.
  The copy keeps the snapshot's
time, host, user, PATHs and tags, and names the source snapshot as its
``original``: a snapshot already copied is not copied again, so a copy
that was stopped is run again to finish."""
from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import zstandard

from cloneaware import __version__
from cloneaware.archive import format as fmt
from cloneaware.archive.events import BlobEvent, EntryEvent, Handler, dispatch
from cloneaware.archive.reader import Stream
from cloneaware.errors import RepositoryError
from cloneaware.repo.packer import Packer
from cloneaware.repo.repository import Repository
from cloneaware.repo.sink import ManifestOut
from cloneaware.repo.snapshots import Snapshot
from cloneaware.repo.transfer import export, import_archive


class _PipeOut:
    """The Output (backup/sinks.py) the export writes: a pipe's write end."""

    def __init__(self, fd: int):
        self.f = os.fdopen(fd, "wb", buffering=1 << 20)

    def write(self, b) -> int:
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def commit(self) -> None:
        self.f.close()

    def abort(self) -> None:
        self.f.close()


@dataclass
class CopyResult:
    copied: list[tuple[str, str]] = field(default_factory=list)  # (source id, new id)
    skipped: list[str] = field(default_factory=list)  # copied before
    added_bytes: int = 0
    logical_bytes: int = 0
    how: str = ""  # "blob by blob" or "re-cut"


def copied_before(dst: Repository) -> dict[str, str]:
    """Source snapshot id -> the destination's copy of it."""
    out = {}
    for s in dst.snapshots():
        o = s.data.get("original")
        if isinstance(o, str):
            out[o] = s.id
    return out


def copy(src: Repository, dst: Repository, snaps: list[Snapshot], dry_run: bool = False,
         level: int = 3, connections: int = 2, warn: Callable[[str], None] | None = None,
         say: Callable[[str], None] | None = None) -> CopyResult:
    res = CopyResult()
    done = copied_before(dst)
    src.load_index()
    probe = b"cloneaware copy: the same ids?"
    by_blob = src.crypto.blob_id(probe) == dst.crypto.blob_id(probe) and \
        src.config.grid == dst.config.grid
    res.how = "blob by blob" if by_blob else "re-cut"
    for s in snaps:
        if s.id in done or s.data.get("original") in done:
            res.skipped.append(s.id)
            continue
        if dry_run:
            res.copied.append((s.id, ""))
            continue
        new, counts = (_by_blob if by_blob else _one)(src, dst, s, level, connections, warn)
        res.copied.append((s.id, new.id))
        res.added_bytes += counts["added_bytes"]
        res.logical_bytes += counts["logical_bytes"]
        if say is not None:
            say(f"copied {s.short_id} -> {new.short_id}: {counts['files']} files, "
                f"{counts['added_bytes']} bytes added")
    return res


def _one(src: Repository, dst: Repository, s: Snapshot, level: int, connections: int,
         warn: Callable[[str], None] | None) -> tuple[Snapshot, dict]:
    r, w = os.pipe()
    failed: list[BaseException] = []

    def produce() -> None:
        out = _PipeOut(w)
        try:
            export(src, s, out, f"snapshot-{s.short_id}", level=0)
        except BaseException as e:  # said by the importer's side below
            failed.append(e)
        finally:
            try:
                out.f.close()  # the end of the archive, or of a broken one
            except OSError:
                pass

    t = threading.Thread(target=produce, name=f"export {s.short_id}", daemon=True)
    t.start()
    try:
        with os.fdopen(r, "rb", buffering=1 << 20) as f:
            try:
                return import_archive(dst, f, f"snapshot-{s.short_id}", level=level,
                                      connections=connections, warn=warn, copy_of=s)
            except BaseException:
                if failed and not isinstance(failed[0], BrokenPipeError):
                    raise failed[0] from None  # the source's error says more
                raise
    finally:
        t.join()


class _Names(Handler):
    """The distinct blobs a manifest names, and its counts."""

    def __init__(self) -> None:
        self.ids: dict[bytes, None] = {}
        self.files = 0
        self.logical = 0

    def on_entry(self, ev: EntryEvent) -> None:
        if ev.entry.kind == fmt.K_REG:
            self.files += 1
            self.logical += ev.entry.size

    def on_blob(self, ev: BlobEvent) -> None:
        self.ids[ev.blob_id] = None


def _by_blob(src: Repository, dst: Repository, s: Snapshot, level: int, connections: int,
             warn: Callable[[str], None] | None) -> tuple[Snapshot, dict]:
    """The manifest as it is, and the blobs it names that ``dst`` lacks."""
    manifest = src.manifest(s)
    names = _Names()
    dispatch(names, Stream(io.BytesIO(manifest), check_hashes=False).events())
    dst.load_index(check_packs=True)
    packer = Packer(dst, connections)
    z = zstandard.ZstdCompressor(level=level) if level else None
    added = 0
    try:
        todo = [b for b in names.ids if not packer.known(b)]
        for i in range(0, len(todo), 64):
            batch = todo[i:i + 64]
            for bid, data in zip(batch, src.read_blobs(batch)):
                e = src.index.get(bid)
                if e is None:
                    raise RepositoryError(f"{src.where}: blob {bid.hex()} is in no index")
                if packer.add(bid, e.type, len(data), dst.encode_blob(e.type, bid, data, z)):
                    added += len(data)
        out = ManifestOut(dst, packer)
        out.write(manifest)
        out.finish()
        packer.flush()  # every blob indexed and durable before the snapshot names them
        o = s.data
        snap = dst.save_snapshot({
            **{k: o[k] for k in ("time", "time_ns", "hostname", "username", "paths", "tags")},
            **out.names(), "parent": None, "original": s.id,
            "program": f"cloneaware {__version__}",
            "summary": {"files": names.files, "logical_bytes": names.logical,
                        "added_bytes": added}})
    finally:
        packer.close()
    return snap, {"files": names.files, "logical_bytes": names.logical, "added_bytes": added}
