"""The blob index in memory: which packs hold each blob, as the index
objects of a repository list it (docs/REPOSITORY.md, "Index").  Every
location listed is kept, in the order the index objects were read: the
first serves, the others are where a reader falls back to when a copy
does not decode (a damaged pack, or an index record a hostile store
forged).  Apart from the Repository that loads it, so that what a lookup
answers can be tested without one."""
from __future__ import annotations

from cloneaware.repo import format as rf


class BlobIndex:
    """blob id -> where copies of it are."""

    def __init__(self) -> None:
        #: the first location of each blob (a lookup's answer)
        self.blobs: dict[bytes, rf.IndexEntry] = {}
        #: further locations of blobs listed more than once
        self.more: dict[bytes, list[rf.IndexEntry]] = {}
        self.packs: set[bytes] = set()
        self.loaded: set[str] = set()  # index object names
        self.duplicates = 0

    def add(self, pack: rf.IndexPack) -> None:
        self.packs.add(pack.id)
        for bid, t, off, stored, raw in pack.blobs:
            e = rf.IndexEntry(pack.id, t, off, stored, raw)
            first = self.blobs.get(bid)
            if first is None:
                self.blobs[bid] = e
            elif e != first and e not in self.more.get(bid, ()):
                self.duplicates += 1
                self.more.setdefault(bid, []).append(e)

    def add_location(self, bid: bytes, e: rf.IndexEntry) -> None:
        """One location of a blob (a record checked elsewhere: repo/survey.py)."""
        self.add(rf.IndexPack(e.pack, [(bid, e.type, e.offset, e.stored_length,
                                        e.raw_length)]))

    def get(self, bid: bytes) -> rf.IndexEntry | None:
        return self.blobs.get(bid)

    def locations(self, bid: bytes) -> list[rf.IndexEntry]:
        """Every listed location of the blob, the first first."""
        first = self.blobs.get(bid)
        if first is None:
            return []
        return [first, *self.more.get(bid, ())]

    def drop_packs(self, gone: set[bytes]) -> int:
        """Forget the locations in packs ``gone`` (missing from the store);
        a blob with no location left is no longer known.  How many
        locations went."""
        n = 0
        for bid in list(self.blobs):
            locs = self.locations(bid)
            keep = [e for e in locs if e.pack not in gone]
            if len(keep) == len(locs):
                continue
            n += len(locs) - len(keep)
            if keep:
                self.blobs[bid] = keep[0]
                if len(keep) > 1:
                    self.more[bid] = keep[1:]
                else:
                    self.more.pop(bid, None)
            else:
                del self.blobs[bid]
                self.more.pop(bid, None)
        self.packs -= gone
        return n

    def clear(self) -> None:
        self.blobs.clear()
        self.more.clear()
        self.packs.clear()

    def __contains__(self, bid: bytes) -> bool:
        return bid in self.blobs
