"""The blob index in memory: which packs hold each blob, as the index
objects of a repository list it (docs/REPOSITORY.md, "Index").  Every
location listed is kept, in the order the index objects were read: the
first serves, the others are where a reader falls back to when a copy
does not decode (a damaged pack, or an index record a hostile store
forged).  Apart from the Repository that loads it, so that what a lookup
answers can be tested without one."""
from __future__ import annotations

from typing import Any

import numpy as np

from cloneaware import native
from cloneaware.errors import RepositoryError
from cloneaware.repo import format as rf

#: one location: the pack's number in BlobIndex.pack_ids, and the record
_REC = np.dtype([("pack", "<u4"), ("type", "u1"), ("offset", "<u4"), ("stored", "<u4"),
                 ("raw", "<u4")], align=False)
#: blobs added since the sorted arrays were last rebuilt, kept in a dict
#: until there are this many
RECENT_MAX = 1 << 16
#: index entries loaded into the sorted arrays at once
LOAD_BATCH = 1 << 18


class BlobIndex:
    """blob id -> where copies of it are.

    Resident memory is about 50 bytes a blob (issue 36: a dict of
    IndexEntry was 227 to 252): the first location of each blob is a row of
    two numpy arrays sorted by blob id (the 32-byte ids, and a 17-byte
    record naming the pack by its number), found by binary search; blobs
    added since the last rebuild wait in a small dict (at most RECENT_MAX),
    merged in when it fills; further locations of blobs listed more than
    once (few) are in ``more``."""

    def __init__(self) -> None:
        self._ids = np.empty(0, dtype="S32")  # sorted; all ids are 32 bytes
        self._rec = np.empty(0, dtype=_REC)
        self._recent: dict[bytes, tuple[int, int, int, int, int]] = {}
        #: further locations of blobs listed more than once
        self.more: dict[bytes, list[rf.IndexEntry]] = {}
        self.pack_ids: list[bytes] = []
        self._pack_no: dict[bytes, int] = {}
        self.packs: set[bytes] = set()
        self.loaded: set[str] = set()  # index object names
        self.duplicates = 0

    # -- adding ---------------------------------------------------------------------------

    def _number(self, pack: bytes) -> int:
        n = self._pack_no.get(pack)
        if n is None:
            n = self._pack_no[pack] = len(self.pack_ids)
            self.pack_ids.append(pack)
        return n

    def add(self, pack: rf.IndexPack) -> None:
        self.packs.add(pack.id)
        if not pack.blobs:
            return
        no = self._number(pack.id)
        found = self._find_many([b[0] for b in pack.blobs]) if len(self._ids) else None
        for i, (bid, t, off, stored, raw) in enumerate(pack.blobs):
            rec = (no, t, off, stored, raw)
            first = self._recent.get(bid)
            if first is None and found is not None and found[i] >= 0:
                r = self._rec[found[i]]
                first = (int(r["pack"]), int(r["type"]), int(r["offset"]), int(r["stored"]),
                         int(r["raw"]))
            if first is None:
                self._recent[bid] = rec
            elif rec != first:
                e = self._entry(rec)
                if e not in self.more.get(bid, ()):
                    self.duplicates += 1
                    self.more.setdefault(bid, []).append(e)
        if len(self._recent) >= RECENT_MAX:
            self._merge()

    def add_arrays(self, pack_ids: list[bytes], counts: list[int], entries: np.ndarray) -> None:
        """``add`` of each pack in order, from an index object's arrays
        (rf.decode_index_arrays): the same first locations, further ones
        and count of duplicates, found by sorting, not a Python call a
        blob (issue 36: an index of 290,000 blobs took 0.8 s to load)."""
        self._merge()
        self.packs.update(pack_ids)
        n = len(entries)
        if not n:
            return
        recs = np.empty(n, dtype=_REC)
        recs["pack"] = np.repeat(np.array([self._number(p) for p in pack_ids], dtype="<u4"),
                                 counts)
        for f in ("type", "offset", "stored", "raw"):
            recs[f] = entries[f]
        ids = entries["id"]
        # each entry's first location: one listed before (the arrays), else
        # the first of its id among these, in the order they are listed
        if len(self._ids):
            at = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
            known = self._ids[at] == ids
        else:
            at = np.zeros(n, dtype=np.intp)
            known = np.zeros(n, dtype=bool)
        order = np.argsort(ids, kind="stable")
        starts = np.ones(n, dtype=bool)
        starts[1:] = ids[order][1:] != ids[order][:-1]
        first = np.empty(n, dtype=np.intp)
        first[order] = order[starts][np.cumsum(starts) - 1]
        firsts = recs[first]
        firsts[known] = self._rec[at[known]]
        new = ~known & (first == np.arange(n))
        for i in np.flatnonzero(recs != firsts).tolist():  # further locations: few
            bid = bytes(ids[i]).ljust(32, b"\0")
            e = self._entry(recs.item(i))
            if e not in self.more.get(bid, ()):
                self.duplicates += 1
                self.more.setdefault(bid, []).append(e)
        keys, vals = ids[new], recs[new]
        o = np.argsort(keys, kind="stable")
        keys, vals = keys[o], vals[o]
        pos = np.searchsorted(self._ids, keys)
        self._ids = np.insert(self._ids, pos, keys)
        self._rec = np.insert(self._rec, pos, vals)

    def add_location(self, bid: bytes, e: rf.IndexEntry) -> None:
        """One location of a blob (a record checked elsewhere: repo/survey.py)."""
        self.add(rf.IndexPack(e.pack, [(bid, e.type, e.offset, e.stored_length,
                                        e.raw_length)]))

    def compact(self) -> None:
        """Every blob in the sorted arrays (about 50 bytes a blob)."""
        self._merge()

    def _merge(self) -> None:
        """The recent blobs into the sorted arrays."""
        if not self._recent:
            return
        keys = np.array(list(self._recent), dtype="S32")
        recs = np.array(list(self._recent.values()), dtype=_REC)
        order = np.argsort(keys, kind="stable")
        keys, recs = keys[order], recs[order]
        at = np.searchsorted(self._ids, keys)
        self._ids = np.insert(self._ids, at, keys)
        self._rec = np.insert(self._rec, at, recs)
        self._recent = {}

    # -- looking up -----------------------------------------------------------------------

    def _find_many(self, bids: list[bytes]) -> np.ndarray:
        """Row of each id in the sorted arrays, or -1."""
        keys = np.array(bids, dtype="S32")
        at = np.searchsorted(self._ids, keys)
        at[at >= len(self._ids)] = 0
        hit = self._ids[at] == keys
        return np.where(hit, at, -1)

    def _row(self, bid: bytes) -> int:
        ids = self._ids
        i = int(ids.searchsorted(bid))
        # an element comes out without its trailing zero bytes (S32): all ids
        # are 32 bytes, so equal without them is equal
        if i < len(ids) and ids[i] == bid.rstrip(b"\0"):
            return i
        return -1

    def _entry(self, rec) -> rf.IndexEntry:
        no, t, off, stored, raw = rec
        return rf.IndexEntry(self.pack_ids[no], t, off, stored, raw)

    def get(self, bid: bytes) -> rf.IndexEntry | None:
        rec: Any = self._recent.get(bid)
        if rec is None:
            i = self._row(bid)
            if i < 0:
                return None
            rec = self._rec.item(i)  # one tuple of Python ints: a field at a time cost 5x
        return self._entry(rec)

    def get_many(self, bids: list[bytes]) -> list[rf.IndexEntry | None]:
        """``get`` of each of ``bids``: one binary search for all."""
        rows = self._find_many(bids).tolist() if len(self._ids) else [-1] * len(bids)
        recs = self._rec
        out: list[rf.IndexEntry | None] = []
        for bid, i in zip(bids, rows):
            rec: Any = self._recent.get(bid)
            if rec is None and i >= 0:
                rec = recs.item(i)
            out.append(None if rec is None else self._entry(rec))
        return out

    def raw_length(self, bid: bytes) -> int:
        """The blob's raw length, -1 if it is in no index (a restore asks
        this of every range: no IndexEntry made)."""
        rec = self._recent.get(bid)
        if rec is not None:
            return rec[4]
        i = self._row(bid)
        return -1 if i < 0 else self._rec.item(i)[4]

    def locations(self, bid: bytes) -> list[rf.IndexEntry]:
        """Every listed location of the blob, the first first."""
        first = self.get(bid)
        if first is None:
            return []
        return [first, *self.more.get(bid, ())]

    def contains_many(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` (S32) is listed: one binary search for all."""
        if len(self._ids):
            at = np.searchsorted(self._ids, ids)
            at[at >= len(self._ids)] = 0
            hit = self._ids[at] == ids
        else:
            hit = np.zeros(len(ids), dtype=bool)
        if self._recent:
            recent = np.array(list(self._recent), dtype="S32")
            hit |= np.isin(ids, recent)
        return hit

    def raw_lengths(self, ids: bytes, stored: bool = False) -> np.ndarray:
        """The raw length (``stored``: the stored length) of each blob of
        ``ids`` (32 bytes each, one after another), -1 for one in no index:
        one binary search for all."""
        keys = np.frombuffer(ids, dtype="S32")
        out = np.full(len(keys), -1, dtype=np.int64)
        name, col = ("stored", 3) if stored else ("raw", 4)
        if len(self._ids) and len(keys):
            at = np.searchsorted(self._ids, keys)
            at[at >= len(self._ids)] = 0
            hit = self._ids[at] == keys
            out[hit] = self._rec[name][at[hit]]
        if self._recent:
            for i in np.flatnonzero(out < 0).tolist():
                rec = self._recent.get(ids[32 * i:32 * i + 32])
                if rec is not None:
                    out[i] = rec[col]
        return out

    def totals(self) -> tuple[int, int]:
        """(stored, raw) bytes of every blob, each counted once."""
        self._merge()
        return int(self._rec["stored"].sum(dtype=np.int64)), \
            int(self._rec["raw"].sum(dtype=np.int64))

    def __contains__(self, bid: bytes) -> bool:
        return bid in self._recent or self._row(bid) >= 0

    def __len__(self) -> int:
        return len(self._ids) + len(self._recent)

    def items(self):
        """(blob id, its first location) for every blob."""
        self._merge()
        for i in range(len(self._ids)):
            r = self._rec[i]
            yield bytes(self._ids[i]).ljust(32, b"\0"), rf.IndexEntry(
                self.pack_ids[int(r["pack"])], int(r["type"]), int(r["offset"]),
                int(r["stored"]), int(r["raw"]))

    # -- removing -------------------------------------------------------------------------

    def drop_packs(self, gone: set[bytes]) -> int:
        """Forget the locations in packs ``gone`` (missing from the store);
        a blob with no location left is no longer known.  How many
        locations went."""
        self._merge()
        n = 0
        for bid in list(self.more):  # further locations first
            keep = [e for e in self.more[bid] if e.pack not in gone]
            n += len(self.more[bid]) - len(keep)
            if keep:
                self.more[bid] = keep
            else:
                del self.more[bid]
        numbers = [self._pack_no[p] for p in gone if p in self._pack_no]
        if numbers and len(self._rec):
            lost = np.isin(self._rec["pack"], np.array(numbers, dtype="<u4"))
            rows = np.flatnonzero(lost)
            n += len(rows)
            for i in rows.tolist():  # a further location, if any, serves now
                bid = bytes(self._ids[i]).ljust(32, b"\0")
                rest = self.more.pop(bid, None)
                if rest:
                    e = rest[0]
                    self._rec[i] = (self._number(e.pack), e.type, e.offset, e.stored_length,
                                    e.raw_length)
                    lost[i] = False
                    if len(rest) > 1:
                        self.more[bid] = rest[1:]
            self._ids = self._ids[~lost]
            self._rec = self._rec[~lost]
        self.packs -= gone
        return n

    def clear(self) -> None:
        self._ids = np.empty(0, dtype="S32")
        self._rec = np.empty(0, dtype=_REC)
        self._recent = {}
        self.more.clear()
        self.packs.clear()
        self.pack_ids.clear()
        self._pack_no.clear()

    def resident_bytes(self) -> int:
        """What the sorted arrays hold (for the tests' bound)."""
        return self._ids.nbytes + self._rec.nbytes


def load_into(repo, check_packs: bool = False) -> None:
    """Into ``repo.index`` (a repository.Repository), load the index objects
    not loaded yet (all of them the first time).  One that does not decode
    is named and passed over: the others serve.  ``check_packs`` (a backup,
    which takes blobs as present on the index's word): locations in packs
    the store does not list are forgotten, so that an index replayed from
    before a prune, or forged, cannot make a new snapshot name blobs that
    are gone."""
    # objects taken in batches of about LOAD_BATCH entries: a few merges
    # into the sorted arrays, not one an object
    names: list[str] = []
    pids: list[bytes] = []
    counts: list[int] = []
    parts: list[np.ndarray] = []

    def add() -> None:
        if parts:
            repo.index.add_arrays(pids, counts, np.concatenate(parts))
        repo.index.loaded.update(names)
        for got in (names, pids, counts, parts):
            got.clear()

    for obj in sorted(repo.backend.listing("index"), key=lambda o: o.name):
        if obj.name in repo.index.loaded:
            continue
        try:
            payload = repo.load_object(obj.name, rf.K_INDEX)
            ids, n, entries = rf.decode_index_arrays(payload, f"{repo.where}: {obj.name}")
        except RepositoryError as e:
            repo.warn(f"{e}; that index object is passed over (cloneaware check names it, "
                      "cloneaware repair index rebuilds the index)")
            repo.index.loaded.add(obj.name)
            continue
        names.append(obj.name)
        pids += ids
        counts += n
        parts.append(entries)
        if sum(len(p) for p in parts) >= LOAD_BATCH:
            add()
    add()
    # into the sorted arrays: the dict of recent blobs costs about 200 bytes
    # a blob, and a backup holds the index to its end
    repo.index.compact()
    # the objects' arrays and the merges' temporaries are free now, but
    # resident: about 2.5 times the index's own arrays
    native.trim()
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
