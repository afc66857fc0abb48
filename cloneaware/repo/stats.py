"""``stats``: what a snapshot holds and what it costs, and what the
repository stores.

Of a snapshot: its entries and logical bytes (from its manifest's index);
the bytes a restore onto Btrfs or XFS writes, which is every distinct byte
range of every blob it names, counted once (the rest is cloned from where
it was written: restore/receiver.py); the stored bytes of the blobs it
names; and the stored bytes of those no other snapshot names, which are
what forgetting it would free once pruned.  Each distinct manifest piece
is walked once for all snapshots (repo/pieces.py); a snapshot the walk
cannot follow is decoded whole."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from cloneaware.archive import format as fmt
from cloneaware.archive.catalog import read_index
from cloneaware.archive.events import BlobEvent, Handler, dispatch
from cloneaware.archive.reader import Stream
from cloneaware.repo.pieces import Piece, PieceWalk, Ranges
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot

#: a blob's ranges all lie below this (BLOB_MAX): ids become disjoint spans
_SPAN = 1 << 23
assert fmt.BLOB_MAX < _SPAN


@dataclass
class SnapshotStats:
    id: str
    files: int = 0
    dirs: int = 0
    others: int = 0  # symlinks, hard links, devices, FIFOs, sockets
    logical_bytes: int = 0
    #: what a restore onto Btrfs or XFS writes (the rest it clones)
    restore_write_bytes: int = 0
    blobs: int = 0
    stored_bytes: int = 0  # of the blobs it names
    unique_blobs: int = 0
    unique_stored_bytes: int = 0  # of the blobs no other snapshot names


@dataclass
class RepoStats:
    snapshots: int = 0
    packs: int = 0
    pack_bytes: int = 0
    blobs: int = 0
    stored_bytes: int = 0
    raw_bytes: int = 0
    chosen: list[SnapshotStats] = field(default_factory=list)


class _Blobs(Handler):
    """The ranges of a manifest decoded whole."""

    def __init__(self) -> None:
        self.ids: list[bytes] = []
        self.boff: list[int] = []
        self.length: list[int] = []

    def on_blob(self, ev: BlobEvent) -> None:
        self.ids.append(ev.blob_id)
        self.boff.append(ev.blob_offset)
        self.length.append(ev.length)

    def ranges(self) -> Ranges:
        return Ranges(b"".join(self.ids), np.array(self.boff, np.uint32),
                      np.array(self.length, np.uint32))


def _ranges(repo: Repository, snap: Snapshot) -> list[Ranges]:
    """The BLOB ranges of the snapshot's manifest, piece by piece (a piece
    that comes again at the same place gives its ranges once, which adds
    nothing to their union)."""
    got: list[Ranges] = []
    if PieceWalk(repo).walk(snap, lambda p: got.append(p.ranges)) is not None:
        return got
    whole = _Blobs()
    dispatch(whole, Stream(io.BytesIO(repo.manifest(snap)), check_hashes=False).events())
    return [whole.ranges()]


def union_bytes(ids: np.ndarray, boff: np.ndarray, length: np.ndarray) -> int:
    """The bytes of the union of the ranges [boff, boff + length) of each
    blob (ids: S32, one per range)."""
    if not len(ids):
        return 0
    _, which = np.unique(ids, return_inverse=True)
    start = which.astype(np.int64) * _SPAN + boff.astype(np.int64)
    end = start + length.astype(np.int64)
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reach = np.maximum.accumulate(end)
    before = np.concatenate(([0], reach[:-1]))
    return int(np.maximum(0, end - np.maximum(start, before)).sum())


def stats(repo: Repository, chosen: list[Snapshot]) -> RepoStats:
    """The repository's totals, and those of each snapshot of ``chosen``."""
    out = RepoStats()
    repo.load_index()
    packs = repo.backend.listing("data")
    out.packs, out.pack_bytes = len(packs), sum(o.size for o in packs)
    out.blobs = len(repo.index)
    out.stored_bytes, out.raw_bytes = repo.index.totals()
    snaps = repo.snapshots()
    out.snapshots = len(snaps)
    if not chosen:
        return out
    walk = PieceWalk(repo)
    # each snapshot's distinct blob ids; a piece walked before lends its ids
    distinct: dict[str, np.ndarray] = {}

    def ids_of(rs: list[Ranges]) -> np.ndarray:
        parts = [np.frombuffer(r.ids, dtype="S32") for r in rs if len(r)]
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, "S32")

    piece_ids: dict[int, np.ndarray] = {}  # id() of a memoized piece: its distinct ids

    def take(p: Piece) -> None:
        piece_ids[id(p)] = np.unique(np.frombuffer(p.ranges.ids, dtype="S32"))

    for s in snaps:
        pieces = walk.walk(s, take)
        if pieces is None:
            distinct[s.id] = ids_of(_ranges(repo, s))
        else:
            parts = [piece_ids[id(p)] for p in pieces if id(p) in piece_ids]
            distinct[s.id] = np.unique(np.concatenate(parts)) if parts else np.empty(0, "S32")
    everyone = np.concatenate(list(distinct.values())) if distinct else np.empty(0, "S32")
    names, counts = np.unique(everyone, return_counts=True)
    once = names[counts == 1]
    for s in chosen:
        st = SnapshotStats(s.id)
        listing = read_index(io.BytesIO(repo.manifest(s)))
        for it in listing.items:
            if it.kind == fmt.K_REG:
                st.files += 1
                st.logical_bytes += it.size
            elif it.kind == fmt.K_DIR:
                st.dirs += 1
            else:
                st.others += 1
        rs = [r for r in _ranges(repo, s) if len(r)]  # walked alone: every range
        if rs:
            ids = np.concatenate([np.frombuffer(r.ids, dtype="S32") for r in rs])
            st.restore_write_bytes = union_bytes(ids, np.concatenate([r.boff for r in rs]),
                                                 np.concatenate([r.length for r in rs]))
        mine = distinct[s.id]
        st.blobs = len(mine)
        st.stored_bytes = int(np.clip(repo.index.raw_lengths(mine.tobytes(), stored=True),
                                      0, None).sum())
        only = mine[np.isin(mine, once)]
        st.unique_blobs = len(only)
        st.unique_stored_bytes = int(np.clip(repo.index.raw_lengths(only.tobytes(),
                                                                    stored=True), 0, None).sum())
        out.chosen.append(st)
    return out
