"""The blob index in memory: which packs hold each blob, as the index
objects of a repository list it (docs/REPOSITORY.md, "Index").  Every
location listed is kept, in the order the index objects were read: the
first serves, the others are where a reader falls back to when a copy
does not decode (a damaged pack, or an index record a hostile store
forged).  Apart from the Repository that loads it, so that what a lookup
answers can be tested without one."""
from __future__ import annotations

from cloneaware.errors import RepositoryError
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


def load_into(repo, check_packs: bool = False) -> None:
    """Into ``repo.index`` (a repository.Repository), load the index objects
    not loaded yet (all of them the first time).  One that does not decode
    is named and passed over: the others serve.  ``check_packs`` (a backup,
    which takes blobs as present on the index's word): locations in packs
    the store does not list are forgotten, so that an index replayed from
    before a prune, or forged, cannot make a new snapshot name blobs that
    are gone."""
    for obj in sorted(repo.backend.listing("index"), key=lambda o: o.name):
        if obj.name in repo.index.loaded:
            continue
        try:
            payload = repo.load_object(obj.name, rf.K_INDEX)
            packs = rf.decode_index_payload(payload, f"{repo.where}: {obj.name}")
        except RepositoryError as e:
            repo.warn(f"{e}; that index object is passed over (cloneaware check names it, "
                      "cloneaware repair index rebuilds the index)")
            repo.index.loaded.add(obj.name)
            continue
        for pack in packs:
            repo.index.add(pack)
        repo.index.loaded.add(obj.name)
    if check_packs:
        listed = {bytes.fromhex(o.name.rpartition("/")[2])
                  for o in repo.backend.listing("data")}
        gone = repo.index.packs - listed
        if gone:
            n = repo.index.drop_packs(gone)
            repo.warn(f"{repo.where}: the index lists {len(gone)} packs that are not in the "
                      f"store ({n} blob locations): their blobs are stored again if needed "
                      "(a damaged or rolled-back repository; run cloneaware check)")


def write(repo, packs: list[rf.IndexPack]) -> list[str]:
    """Index objects in ``repo`` for ``packs`` (already durable), split so that each
    stays well under the object limit.  Returns their names."""
    names = []
    per = (rf.OBJECT_MAX // 2) // 48
    batch: list[rf.IndexPack] = []
    count = 0

    def emit() -> None:
        nonlocal batch, count
        if batch:
            oid = repo.save_object(rf.K_INDEX, rf.encode_index_payload(batch), "index")
            names.append(f"index/{oid}")
            repo.index.loaded.add(f"index/{oid}")
        batch, count = [], 0

    for p in packs:
        if count + len(p.blobs) > per:
            emit()
        batch.append(p)
        count += len(p.blobs)
    emit()
    repo.backend.sync()
    return names
