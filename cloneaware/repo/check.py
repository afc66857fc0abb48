"""``check``: is every object sound, does every snapshot find every blob;
with ``--read-data``, every pack read whole against its trailer and the
index, and every snapshot's manifest decoded whole.  Problems are
collected, named by the object they are in, never repaired.

Without ``--read-data`` a snapshot's manifest is walked piece by piece
(repo/pieces.py), each distinct piece once: sixty nights of the same tree
cost about what one does.  A snapshot the walk cannot follow, or in which
it finds a range the index lacks, is decoded whole, which names the
entry."""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cloneaware.archive.events import BlobEvent, Handler, dispatch
from cloneaware.archive.reader import Stream
from cloneaware.errors import ArchiveError, RepositoryError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import pack_name
from cloneaware.repo.pieces import Piece, PieceWalk
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot
from cloneaware.repo.survey import survey


@dataclass
class CheckResult:
    snapshots: int = 0
    packs: int = 0
    blobs: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    read_bytes: int = 0
    #: manifest pieces walked (each distinct piece once, repo/pieces.py)
    pieces: int = 0


def check(repo: Repository, read_data: bool = False) -> CheckResult:
    """Every problem found, named by the object it is in."""
    res = CheckResult()

    def error(msg: str) -> None:
        res.errors.append(msg)

    sv = survey(repo)
    for msg in sv.problems:
        error(msg)
    # the index a restore would use: the records the packs' trailers agree with
    repo.index.clear()
    for bid, locs in sv.locations.items():
        for e in locs:
            repo.index.add_location(bid, e)
    repo.index.loaded.update(sv.index_objects)
    repo._index_loaded = True
    res.blobs = len(repo.index)
    res.packs = len(sv.listed)
    problems: list[str] = []
    snaps = repo.snapshots(problems)
    for msg in problems:
        error(msg)
    res.snapshots = len(snaps)
    missing = 0
    walk = PieceWalk(repo)
    for s in snaps:
        if not read_data and _sound(repo, walk, s):  # every piece walked, every range found
            continue
        found = _BlobsFound(repo, s, error)  # a whole decode names what is wrong
        try:
            dispatch(found, Stream(io.BytesIO(repo.manifest(s)), check_hashes=False).events())
        except (RepositoryError, ArchiveError) as e:
            error(f"snapshot {s.short_id}: {e}")
            missing += 1
        missing += found.missing
    res.pieces = walk.walked
    orphans = [n for n in sv.listed if bytes.fromhex(n) not in sv.claims]
    if orphans:
        if missing:
            res.warnings.append(f"{len(orphans)} packs are in no index, and snapshots miss "
                                "blobs: those packs may hold them.  Do not prune: rebuild the "
                                "index from the packs first (cloneaware repair index)")
        else:
            res.warnings.append(f"{len(orphans)} packs are in no index (left by an "
                                "interrupted backup or prune); prune removes them once they "
                                "are an hour old")
    if read_data:
        for name, o in sorted(sv.listed.items()):
            res.read_bytes += o.size
            claims = sv.claims.get(bytes.fromhex(name))
            for msg in check_pack(repo, name, sorted(claims) if claims is not None else None):
                error(msg)
    return res


def _sound(repo: Repository, walk: PieceWalk, snap: Snapshot) -> bool:
    """Whether the piece walk (repo/pieces.py) follows the snapshot's
    manifest and finds every BLOB range in the index, inside its blob."""

    def judge(p: Piece) -> None:
        r = p.ranges
        raw = repo.index.raw_lengths(r.ids)
        p.bad = bool(((raw < 0) | (r.boff.astype(np.int64) + r.length > raw)).any())

    try:
        pieces = walk.walk(snap, judge)
    except (RepositoryError, ArchiveError):
        return False
    return pieces is not None and not any(p.bad for p in pieces)


def check_pack(repo: Repository, pid: str, indexed: list | None) -> list[str]:
    """Read a whole pack: its name, its trailer, every blob, against the index."""
    out: list[str] = []
    what = f"pack {pid}"
    try:
        data = repo.backend.read(pack_name(pid))
        if rf.object_id(data) != pid:
            return [f"{what}: its contents do not match its name (damaged)"]
        n = rf.split_pack_tail(data[-rf.TAIL:], len(data), what)
        trailer_raw = data[len(data) - rf.TAIL - n:len(data) - rf.TAIL]
        entries = rf.decode_trailer_payload(repo.decode_object(trailer_raw, rf.K_TRAILER,
                                                               f"{what} trailer"), what)
        off = 0
        blobs = []
        for e in entries:
            entry = rf.IndexEntry(bytes.fromhex(pid), e.type, off, e.stored_length, e.raw_length)
            repo.decode_blob(e.id, entry, memoryview(data)[off:off + e.stored_length],
                             f"{what}: blob {e.id.hex()[:16]}")
            blobs.append((e.id, e.type, off, e.stored_length, e.raw_length))
            off += e.stored_length
        if off != len(data) - rf.TAIL - n:
            out.append(f"{what}: its trailer does not describe the whole pack")
        if indexed is not None and sorted(indexed) != sorted(blobs):
            out.append(f"{what}: the index and the pack's trailer disagree")
    except RepositoryError as e:
        out.append(str(e) if str(e).startswith(what) else f"{what}: {e}")
    return out


class _BlobsFound(Handler):
    """Every BLOB range of a snapshot's manifest: its blob in the index, the
    range inside it."""

    def __init__(self, repo: Repository, snap: Snapshot, error: Callable[[str], None]):
        self.repo = repo
        self.snap = snap
        self.error = error
        self.missing = 0  # blobs in no index

    def on_blob(self, ev: BlobEvent) -> None:
        ie = self.repo.index.get(ev.blob_id)
        sid = self.snap.short_id
        if ie is None:
            self.missing += 1
            self.error(f"snapshot {sid}: blob {ev.blob_id.hex()} of "
                       f"{ev.file.entry.path.decode(errors='replace')} is in no index")
        elif ev.blob_offset + ev.length > ie.raw_length:
            self.error(f"snapshot {sid}: a range beyond the end of blob {ev.blob_id.hex()}")
