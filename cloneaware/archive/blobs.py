"""Blob ranges: the one rule by which a manifest's BLOB records (a
repository snapshot's, docs/REPOSITORY.md) become bytes or clones.

A blob's bytes are written once, at the first place that needs them; every
later range of the same blob is a clone of (or a reference to) the place
that holds it.  The restore, its dry run, the planner of a restore's
fetches, ``export`` (a REF where a place exists) and ``reshare`` (a dedupe
from the place) all cut ranges with this ``Coverage``, so they agree on
what is written and what is shared.  The one other place that follows the
rule is repo/restore.py ``quick_plan``, which orders a restore's fetches
from the BLOB records alone (its test holds it to the receiver's order).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Place:
    """Blob bytes [lo, hi) were written in file ``entry`` of manifest number
    ``owner`` (of those restored together), the blob's byte 0 being at file
    offset ``base``."""

    owner: int
    entry: int
    base: int
    lo: int
    hi: int


class Coverage:
    """Which ranges of which blobs were written where.  A range is cut where
    the places that hold its parts begin and end; the parts some place holds
    are shared from it, the others are written (and become places)."""

    def __init__(self) -> None:
        self.places: dict[bytes, list[Place]] = {}

    def split(self, bid: bytes, boff: int, length: int) -> list[tuple[int, int, Place | None]]:
        """(lo, hi, place or None) covering [boff, boff + length) in order."""
        out: list[tuple[int, int, Place | None]] = []
        pos, end = boff, boff + length
        for p in self.places.get(bid, ()):
            if p.hi <= pos:
                continue
            if p.lo >= end:
                break
            if p.lo > pos:
                out.append((pos, p.lo, None))
                pos = p.lo
            hi = min(p.hi, end)
            out.append((pos, hi, p))
            pos = hi
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end, None))
        return out

    def drop(self, bid: bytes, owner: int, entry: int) -> None:
        """Forget the places of ``bid`` in one file (a file not restored)."""
        if bid in self.places:
            self.places[bid] = [p for p in self.places[bid]
                                if (p.owner, p.entry) != (owner, entry)]

    def add(self, bid: bytes, place: Place) -> None:
        ps = self.places.setdefault(bid, [])
        ps.append(place)
        if len(ps) > 1 and ps[-2].lo > place.lo:
            ps.sort(key=lambda p: p.lo)


class BlobCache:
    """The blobs fetched last, up to ``capacity`` bytes.  A value is the
    blob's bytes, or only its size where the cache mirrors another one
    (the fetch planner follows the restore's cache rule without the bytes)."""

    def __init__(self, capacity: int = 64 << 20):
        self.capacity = capacity
        self.d: collections.OrderedDict[bytes, bytes | int] = collections.OrderedDict()
        self.size = 0

    def get(self, bid: bytes):
        got = self.d.get(bid)
        if got is not None:
            self.d.move_to_end(bid)
        return got

    def put(self, bid: bytes, data: bytes | int) -> None:
        n = data if isinstance(data, int) else len(data)
        self.d[bid] = data
        self.size += n
        while self.size > self.capacity and len(self.d) > 1:
            _, old = self.d.popitem(last=False)
            self.size -= old if isinstance(old, int) else len(old)


class BlobSource(Protocol):
    """Where the bytes of blobs come from (a repository, repo/fetch.py);
    the restore knows nothing else of it."""

    def size(self, bid: bytes, where: str) -> int:
        """The blob's length in bytes; an error naming ``where`` if the
        blob is unknown."""

    def get(self, bid: bytes) -> bytes | None:
        """The blob's bytes, checked against its id (None: a source that
        only plans, and fetches nothing)."""
