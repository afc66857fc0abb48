"""The blob ranges snapshots' manifests name, found piece by piece, each
piece once (docs/REPOSITORY.md, "Manifest blobs"): what ``check`` and
``prune`` need of every snapshot, at the cost of what is distinct.

Records are framed (docs/FORMAT.md: a header with the payload's length, the
payload, a CRC), so where every record starts follows from where the first
one does.  The walk hops from record to record across a snapshot's pieces,
checks each record's CRC and reads its BLOB records, a piece at a time in
C and numpy.  What a piece yields
depends only on its bytes and where its first record starts in it, so it is
worked out once per (piece, start) and reused by every snapshot that names
that piece there: the night that changed a few entries costs its few new
pieces.  Nothing else is decoded: the order of entries, the INDEX and the
FOOTER are checked by a whole decode (``check --read-data``, ``verify``,
every restore).

A snapshot the walk cannot follow gets ``None`` and its caller decodes it
whole: a BLOB record or a record header across two pieces (cloneaware cuts
at record boundaries, but another writer need not), a bad CRC, a wrong
magic, lengths that do not end where the manifest ends.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot

#: a BLOB record's payload (docs/FORMAT.md "BLOB (11)")
_BLOB = np.dtype([("off", "<u8"), ("length", "<u4"), ("boff", "<u4"), ("id", "V32")])
assert _BLOB.itemsize == fmt.LIMITS[fmt.T_BLOB]
_ID_AT = _BLOB.itemsize - 32  # where the blob id starts in it


@dataclass
class Ranges:
    """The BLOB ranges of a piece, as arrays: the blob ids (32 bytes each,
    one after another), the offsets in the blobs, the lengths."""

    ids: bytes = b""
    boff: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))
    length: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint32))

    def __len__(self) -> int:
        return len(self.boff)

    def id_list(self) -> list[bytes]:
        return [self.ids[i:i + 32] for i in range(0, len(self.ids), 32)]

    def tuples(self) -> list[tuple[bytes, int, int]]:
        """(blob id, offset in the blob, length) of each, as the reader gives them."""
        return list(zip(self.id_list(), self.boff.tolist(), self.length.tolist()))


@dataclass
class Piece:
    """What one manifest piece yields when its first record starts at a
    given offset."""

    #: its BLOB records' ranges; emptied once PieceWalk.walk has given the
    #: piece to its ``take``
    ranges: Ranges
    #: where the first record starts in the next piece; -1 when the walk
    #: cannot go on from here
    next: int
    #: the piece's length
    size: int = 0
    #: set by check: a range not found in the index (None: not looked at)
    bad: bool | None = None


def walk_piece(data: bytes, start: int) -> Piece:
    """The records of ``data`` from ``start`` on: hopped over and their CRCs
    checked in C (native.piece_blobs), the BLOB payloads read as one array
    and held to the rules decode_blob holds each to."""
    got = native.piece_blobs(data, start, fmt.T_BLOB, _BLOB.itemsize)
    if got is None:
        return Piece(Ranges(), -1)
    offsets, nxt = got
    at = np.frombuffer(offsets, dtype=np.uint64).astype(np.intp)
    buf = np.frombuffer(data, dtype=np.uint8)
    raw = np.empty((len(at), _BLOB.itemsize), dtype=np.uint8)
    for j in range(_BLOB.itemsize):  # a column at a time: no index array 48 times as long
        raw[:, j] = buf[at + j]
    recs = raw.view(_BLOB).reshape(-1)
    length = recs["length"].astype(np.uint64)
    boff = recs["boff"].astype(np.uint64)
    if ((length == 0) | (length > fmt.BLOB_MAX) | (boff + length > fmt.BLOB_MAX)
            | (recs["off"] > np.uint64(fmt.SIZE_MAX) - length)).any():
        return Piece(Ranges(), -1)  # the whole decode says which and where
    ids = np.ascontiguousarray(raw[:, _ID_AT:]).tobytes()
    return Piece(Ranges(ids, recs["boff"].copy(), recs["length"].copy()), nxt, len(data))


class PieceWalk:
    """Snapshots' pieces, walked once each (see the module's text)."""

    def __init__(self, repo: Repository):
        self.repo = repo
        self.memo: dict[tuple[bytes, int], Piece] = {}
        self.seen: set[bytes] = set()  # the pieces of the memo's keys
        #: distinct (piece, start) walked, and pieces read
        self.walked = 0
        self.read = 0

    def walk(self, snap: Snapshot, take: Callable[[Piece], None] | None = None
             ) -> list[Piece] | None:
        """The pieces of ``snap``'s manifest, in order, or None if the walk
        cannot follow them (decode the manifest whole).  ``take`` is given
        each piece as it is first walked, with its ranges, which are then
        dropped (the memo keeps what a piece yields, not its ranges: a
        million-file tree's would be hundreds of MiB).  Raises what reading
        the pieces raises (RepositoryError)."""
        ids = self.repo.manifest_ids(snap)
        fresh = list(dict.fromkeys(b for b in ids if b not in self.seen))
        data = dict(zip(fresh, self.repo.read_blobs(fresh))) if fresh else {}
        self.read += len(fresh)
        out: list[Piece] = []
        start = -len(fmt.MAGIC)  # the first piece: the magic, then records
        for bid in ids:
            p = self.memo.get((bid, start))
            if p is None:
                raw = data.pop(bid, None)
                if raw is None:  # a piece met again at another start
                    raw = self.repo.read_blobs([bid])[0]
                    self.read += 1
                if start < 0:
                    p = walk_piece(raw, -start) if raw[:-start] == fmt.MAGIC else \
                        Piece(Ranges(), -1)
                else:
                    p = walk_piece(raw, start)
                self.memo[(bid, start)] = p
                self.seen.add(bid)
                self.walked += 1
                if take is not None:
                    take(p)
                p.ranges = Ranges()
            out.append(p)
            if p.next < 0:
                return None
            start = p.next
        if not ids or start != 0 or sum(p.size for p in out) != snap.data["manifest_bytes"]:
            return None
        return out
