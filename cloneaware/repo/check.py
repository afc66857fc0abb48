"""``check``: is every object sound, does every snapshot find every blob;
with ``--read-data``, every pack read whole against its trailer and the
index, and every snapshot's manifest decoded whole.  Problems are
collected, named by the object they are in, never repaired.

Without ``--read-data`` a snapshot's manifest is walked piece by piece
(repo/pieces.py), each distinct piece once: sixty nights of the same tree
cost about what one does.  A snapshot the walk cannot follow, or in which
it finds a range the index lacks, is decoded whole, which names the
entry.

With ``--read-data`` the packs are read first, every blob of each against
its id, so that the whole decode of each snapshot can name the files whose
bytes are in a blob no sound copy is left of (issue 31: which snapshots and
files a damaged pack holds), one line a file with how many of its bytes."""
from __future__ import annotations

import io
import math
import random
import re
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
    #: packs read whole (--read-data; a subset's share of them)
    read_packs: int = 0
    #: manifest pieces walked (each distinct piece once, repo/pieces.py)
    pieces: int = 0
    #: each file with bytes that cannot be had: {snapshot, path, bytes, why}
    damaged: list[dict] = field(default_factory=list)


#: files named one a line for each snapshot; the rest are counted (--json
#: lists every one)
NAMED_FILES = 50


def parse_subset(spec: str) -> tuple[int, int] | float:
    """``n/t`` (part n of t, 1 <= n <= t) or ``x%`` (0 < x <= 100), restic's
    --read-data-subset; ValueError otherwise."""
    t = spec.strip()
    m = re.fullmatch(r"(\d+)/(\d+)", t)
    if m:
        n, total = int(m.group(1)), int(m.group(2))
        if not 1 <= n <= total or total > 256:
            raise ValueError(f"{spec!r}: part n of t needs 1 <= n <= t <= 256")
        return n, total
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", t)
    if m and 0 < float(m.group(1)) <= 100:
        return float(m.group(1)) / 100
    raise ValueError(f"{spec!r} is not a subset (like 1/7 or 10%)")


def in_subset(names: list[str], subset: tuple[int, int] | float | None) -> list[str]:
    """The packs (hex names) a subset reads.  Part n of t: those whose first
    byte is n-1 modulo t, so that parts 1 to t read every pack once and a
    pack stays in its part as others come and go; x%: that share of them,
    at random, at least one."""
    if subset is None:
        return names
    if isinstance(subset, tuple):
        n, t = subset
        return [x for x in names if int(x[:2], 16) % t == n - 1]
    k = min(len(names), max(1, math.ceil(len(names) * subset))) if names else 0
    return sorted(random.sample(names, k))


def check(repo: Repository, read_data: bool = False,
          subset: tuple[int, int] | float | None = None) -> CheckResult:
    """Every problem found, named by the object it is in.  ``subset``: with
    ``read_data``, read only those packs (parse_subset)."""
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
    # and, of a pack whose trailer cannot be read (cut short, say), what the
    # index says it holds: a restore reads those blobs, and --read-data
    # finds which still decode
    for pid in sv.unreadable:
        for r in sv.claims.get(pid, ()):
            repo.index.add_location(r[0], rf.IndexEntry(pid, r[1], r[2], r[3], r[4]))
    repo.index.loaded.update(sv.index_objects)
    repo._index_loaded = True
    res.blobs = len(repo.index)
    res.packs = len(sv.listed)
    problems: list[str] = []
    snaps = repo.snapshots(problems)
    for msg in problems:
        error(msg)
    res.snapshots = len(snaps)
    lost: dict[bytes, str] = {}  # blob id -> the pack its only copies are damaged in
    bad: set[tuple[bytes, bytes]] = set()  # (pack, blob) that does not decode
    if read_data:
        chosen = in_subset(sorted(sv.listed), subset)
        res.read_packs = len(chosen)
        for name in chosen:
            o = sv.listed[name]
            res.read_bytes += o.size
            claims = sv.claims.get(bytes.fromhex(name))
            msgs, broken = check_pack(repo, name, sorted(claims) if claims is not None else None)
            for msg in msgs:
                error(msg)
            bad.update((bytes.fromhex(name), b) for b in broken)
        for pid, bid in bad:
            locs = repo.index.locations(bid)
            if locs and all((e.pack, bid) in bad for e in locs):
                lost[bid] = pid.hex()
    missing = 0
    walk = PieceWalk(repo)
    for s in snaps:
        if not read_data and _sound(repo, walk, s):  # every piece walked, every range found
            continue
        found = _BlobsFound(repo, s, lost, error)  # a whole decode names what is wrong
        try:
            dispatch(found, Stream(io.BytesIO(repo.manifest(s)), check_hashes=False).events())
        except (RepositoryError, ArchiveError) as e:
            error(f"snapshot {s.short_id}: {e}")
            missing += 1
        missing += found.missing
        found.report(res)
    res.pieces = walk.walked
    if read_data and bad:
        packs = sorted({pid.hex() for pid, _ in bad})
        res.warnings.append(
            f"{len(packs)} packs hold blobs that do not decode: cloneaware repair packs "
            f"{' '.join(p[:16] for p in packs)} salvages the rest of them; then a backup of "
            "the same sources stores again what was lost")
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


def check_pack(repo: Repository, pid: str, indexed: list | None
               ) -> tuple[list[str], set[bytes]]:
    """Read a whole pack: its name, its trailer, every blob, against the
    index.  The problems, and the blobs that do not decode from it (each
    blob on its own: one damaged byte costs one blob, not the pack)."""
    out: list[str] = []
    what = f"pack {pid}"
    claimed = [(r[0], r[1], r[2], r[3], r[4]) for r in indexed or ()]
    try:
        data = repo.backend.read(pack_name(pid))
    except RepositoryError as e:
        return [str(e) if str(e).startswith(what) else f"{what}: {e}"], {r[0] for r in claimed}
    if rf.object_id(data) != pid:
        out.append(f"{what}: its contents do not match its name (damaged)")
    blobs: list = []
    try:
        n = rf.split_pack_tail(data[-rf.TAIL:], len(data), what)
        trailer_raw = data[len(data) - rf.TAIL - n:len(data) - rf.TAIL]
        entries = rf.decode_trailer_payload(repo.decode_object(trailer_raw, rf.K_TRAILER,
                                                               f"{what} trailer"), what)
        off = 0
        for t in entries:
            blobs.append((t.id, t.type, off, t.stored_length, t.raw_length))
            off += t.stored_length
        if off != len(data) - rf.TAIL - n:
            out.append(f"{what}: its trailer does not describe the whole pack")
    except RepositoryError as e:
        out.append(str(e) if str(e).startswith(what) else f"{what}: {e}")
        blobs = []
    if indexed is not None and blobs and sorted(indexed) != sorted(blobs):
        out.append(f"{what}: the index and the pack's trailer disagree")
    bad: set[bytes] = set()
    for bid, btype, off, stored, raw in sorted(set(blobs) | set(claimed), key=lambda r: r[2]):
        entry = rf.IndexEntry(bytes.fromhex(pid), btype, off, stored, raw)
        try:
            if off + stored > len(data):
                raise RepositoryError(f"{what}: blob {bid.hex()[:16]}: beyond the pack's end")
            repo.decode_blob(bid, entry, memoryview(data)[off:off + stored],
                             f"{what}: blob {bid.hex()[:16]}")
        except RepositoryError as e:
            bad.add(bid)
            out.append(str(e))
    return out, bad


class _BlobsFound(Handler):
    """Every BLOB range of a snapshot's manifest: its blob in the index, the
    range inside it, a sound copy of it (``lost``: blob id -> the damaged
    pack it is only in).  Files with bytes that cannot be had are gathered,
    one report a file."""

    def __init__(self, repo: Repository, snap: Snapshot, lost: dict[bytes, str],
                 error: Callable[[str], None]):
        self.repo = repo
        self.snap = snap
        self.lost = lost
        self.error = error
        self.missing = 0  # blobs in no index
        #: path -> [bytes that cannot be had, why]
        self.files: dict[bytes, tuple[list[int], set[str]]] = {}

    def on_blob(self, ev: BlobEvent) -> None:
        bid = ev.blob_id
        ie = self.repo.index.get(bid)
        if ie is None:
            self.missing += 1
            why = "in no index"
        elif ev.blob_offset + ev.length > ie.raw_length:
            self.error(f"snapshot {self.snap.short_id}: a range beyond the end of blob "
                       f"{bid.hex()}")
            return
        elif bid in self.lost:
            why = f"damaged in pack {self.lost[bid]}"
        else:
            return
        n, whys = self.files.setdefault(ev.file.entry.path, ([0], set()))
        n[0] += ev.length
        whys.add(why)

    def report(self, res: CheckResult) -> None:
        sid = self.snap.short_id
        for i, (path, (n, whys)) in enumerate(self.files.items()):
            shown = path.decode(errors="replace")
            why = "; ".join(sorted(whys))
            res.damaged.append({"snapshot": self.snap.id, "path": shown, "bytes": n[0],
                                "why": why})
            if i < NAMED_FILES:
                self.error(f"snapshot {sid}: {shown}: {n[0]} bytes cannot be had ({why})")
        if len(self.files) > NAMED_FILES:
            self.error(f"snapshot {sid}: and {len(self.files) - NAMED_FILES} more files with "
                       "bytes that cannot be had (--json lists every one)")
