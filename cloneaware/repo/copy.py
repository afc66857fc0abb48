"""``copy``: snapshots of one repository into another (the off-site copy
of the 3-2-1 rule).  Each snapshot travels as its archive form: the source
exports it (repo/transfer.py) into a pipe that the destination imports
from, as ``backup --from-archive`` would, on another thread.  So the
bytes are cut on the destination's grid and stored under its keys (plain
to encrypted and back), only the blobs the destination lacks are stored,
whatever grid the source used, and sharing survives (a range written
earlier in the snapshot travels as a REF).  The copy keeps the snapshot's
time, host, user, PATHs and tags, and names the source snapshot as its
``original``: a snapshot already copied is not copied again, so a copy
that was stopped is run again to finish."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware.repo.repository import Repository
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
    for s in snaps:
        if s.id in done or s.data.get("original") in done:
            res.skipped.append(s.id)
            continue
        if dry_run:
            res.copied.append((s.id, ""))
            continue
        new, counts = _one(src, dst, s, level, connections, warn)
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
