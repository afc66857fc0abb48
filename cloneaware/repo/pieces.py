"""The blob ranges snapshots' manifests name, found piece by piece, each
piece once (docs/REPOSITORY.md, "Manifest blobs"): what ``check`` and
``prune`` need of every snapshot, at the cost of what is distinct.

Records are framed (docs/FORMAT.md: a header with the payload's length, the
payload, a CRC), so where every record starts follows from where the first
one does.  The walk hops from record to record across a snapshot's pieces,
checks each record's CRC and reads its BLOB records.  What a piece yields
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

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from cloneaware.archive import format as fmt
from cloneaware.errors import ArchiveError
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot

_FRAME = fmt.FRAME
_CRC = fmt.CRC
_BLOB_RECORD = fmt.FRAME_OVERHEAD + fmt.LIMITS[fmt.T_BLOB]


@dataclass
class Piece:
    """What one manifest piece yields when its first record starts at a
    given offset."""

    #: (blob id, offset in the blob, length) of each BLOB record; emptied
    #: once PieceWalk.walk has given the piece to its ``take``
    ranges: list[tuple[bytes, int, int]]
    #: where the first record starts in the next piece; -1 when the walk
    #: cannot go on from here
    next: int
    #: the piece's length
    size: int = 0
    #: set by check: a range not found in the index (None: not looked at)
    bad: bool | None = None


def walk_piece(data: bytes, start: int) -> Piece:
    """The records of ``data`` from ``start`` on."""
    ranges: list[tuple[bytes, int, int]] = []
    n = len(data)
    mv = memoryview(data)
    pos = start
    while pos + _FRAME.size <= n:
        rtype, _flags, length = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length + _CRC.size
        if end > n:
            if rtype == fmt.T_BLOB:  # across pieces: the whole decode reads it
                return Piece(ranges, -1)
            return Piece(ranges, end - n, n)  # a long record, on into the next pieces
        if zlib.crc32(mv[pos:end - _CRC.size]) != _CRC.unpack_from(data, end - _CRC.size)[0]:
            return Piece(ranges, -1)
        if rtype == fmt.T_BLOB:
            if end - pos != _BLOB_RECORD:
                return Piece(ranges, -1)
            try:
                _off, blen, boff, bid = fmt.decode_blob(mv[pos + _FRAME.size:end - _CRC.size], pos)
            except ArchiveError:
                return Piece(ranges, -1)
            ranges.append((bid, boff, blen))
        pos = end
    if pos < n and pos + _FRAME.size > n:  # a header across pieces
        return Piece(ranges, -1)
    return Piece(ranges, pos - n, n)


class PieceWalk:
    """Snapshots' pieces, walked once each (see the module's text)."""

    def __init__(self, repo: Repository):
        self.repo = repo
        self.memo: dict[tuple[bytes, int], Piece] = {}
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
        known = {k[0] for k in self.memo}
        fresh = list(dict.fromkeys(b for b in ids if b not in known))
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
                    p = walk_piece(raw, -start) if raw[:-start] == fmt.MAGIC else Piece([], -1)
                else:
                    p = walk_piece(raw, start)
                self.memo[(bid, start)] = p
                self.walked += 1
                if take is not None:
                    take(p)
                p.ranges = []
            out.append(p)
            if p.next < 0:
                return None
            start = p.next
        if not ids or start != 0 or sum(p.size for p in out) != snap.data["manifest_bytes"]:
            return None
        return out
