"""The blob index in memory: which pack holds each blob, as the index
objects of a repository list it (docs/REPOSITORY.md, "Index").  Apart from
the Repository that loads it, so that what a lookup answers can be tested
without one."""
from __future__ import annotations

from cloneaware.repo import format as rf


class BlobIndex:
    """blob id -> where a copy of it is (the first one listed wins)."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, rf.IndexEntry] = {}
        self.packs: set[bytes] = set()
        self.loaded: set[str] = set()  # index object names
        self.duplicates = 0

    def add(self, pack: rf.IndexPack) -> None:
        self.packs.add(pack.id)
        for bid, t, off, stored, raw in pack.blobs:
            if bid in self.blobs:
                self.duplicates += 1
                continue
            self.blobs[bid] = rf.IndexEntry(pack.id, t, off, stored, raw)

    def get(self, bid: bytes) -> rf.IndexEntry | None:
        return self.blobs.get(bid)

    def __contains__(self, bid: bytes) -> bool:
        return bid in self.blobs
