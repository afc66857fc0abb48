"""What the packs of a repository hold, by their own trailers, beside what
the index objects say they hold.

An index record is only a claim: a damaged index, one replayed from before
a prune, or one a hostile store or an append-only client wrote can name a
pack for blobs it does not hold.  A pack's trailer, sealed with the
repository's key where it is encrypted, says which blobs lie where in it.
``prune`` and ``check`` read every pack's trailer and take an index record
as a location only when the trailer agrees (docs/REPOSITORY.md, "Index").
Agreeing is not yet proof of the blob's bytes (that needs the blob read
and its id checked, as prune does before it drops another copy); it stops
a record that names a pack for what is not in it."""
from __future__ import annotations

from dataclasses import dataclass, field

from cloneaware.errors import RepositoryError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import Listed, pack_name
from cloneaware.repo.repository import Repository

#: the end of a pack read at once: its tail and, mostly, its whole trailer
TAIL_READ = 64 << 10

Record = tuple[bytes, int, int, int, int]  # blob id, type, offset, stored, raw


@dataclass
class Survey:
    #: pack id (hex) -> as the store lists it
    listed: dict[str, Listed] = field(default_factory=dict)
    #: pack id -> its blobs by its trailer (None: it has no trailer that decodes)
    trailers: dict[bytes, list[Record] | None] = field(default_factory=dict)
    #: the index objects that decode, and each pack's records in them
    index_objects: list[str] = field(default_factory=list)
    claims: dict[bytes, set[Record]] = field(default_factory=dict)
    #: blob id -> the index records its pack's trailer agrees with
    locations: dict[bytes, list[rf.IndexEntry]] = field(default_factory=dict)
    #: what does not hold, named: objects that do not decode, records that
    #: disagree with their pack, packs the index names that are gone
    problems: list[str] = field(default_factory=list)
    #: index objects that do not decode (their names)
    bad_index: list[str] = field(default_factory=list)
    #: packs named by an index whose trailer cannot be read: never deleted
    unreadable: set[bytes] = field(default_factory=set)
    #: index records that name a pack for what its trailer does not hold
    disagreeing: int = 0

    def indexed(self) -> set[bytes]:
        return set(self.claims)


def read_trailer(repo: Repository, pid: str, size: int) -> list[Record]:
    """The blobs of pack ``pid`` (``size`` bytes), with their offsets, by its
    trailer; RepositoryError if it has none that decodes, or if the trailer
    does not describe the whole pack."""
    what = f"{repo.where}: pack {pid}"
    n_end = min(size, TAIL_READ)
    end = repo.backend.read(pack_name(pid), size - n_end, n_end)
    n = rf.split_pack_tail(end[-rf.TAIL:], size, what)
    if n + rf.TAIL <= len(end):
        raw = end[len(end) - rf.TAIL - n:len(end) - rf.TAIL]
    else:
        raw = repo.backend.read(pack_name(pid), size - rf.TAIL - n, n)
    entries = rf.decode_trailer_payload(
        repo.decode_object(raw, rf.K_TRAILER, f"{what} trailer"), what)
    out: list[Record] = []
    off = 0
    for e in entries:
        out.append((e.id, e.type, off, e.stored_length, e.raw_length))
        off += e.stored_length
    if off != size - rf.TAIL - n:
        raise RepositoryError(f"{what}: its trailer does not describe the whole pack")
    return out


def survey(repo: Repository) -> Survey:
    """Every index object and every pack trailer, read and compared."""
    sv = Survey()
    sv.listed = {o.name.rpartition("/")[2]: o for o in repo.backend.listing("data")}
    for obj in sorted(repo.backend.listing("index"), key=lambda o: o.name):
        try:
            payload = repo.load_object(obj.name, rf.K_INDEX)
            packs = rf.decode_index_payload(payload, f"{repo.where}: {obj.name}")
        except RepositoryError as e:
            sv.bad_index.append(obj.name)
            sv.problems.append(f"{e} (the index object is passed over; cloneaware repair "
                               "index rebuilds the index from the packs)")
            continue
        sv.index_objects.append(obj.name)
        for p in packs:
            sv.claims.setdefault(p.id, set()).update(p.blobs)
    for hexid, o in sorted(sv.listed.items()):
        pid = bytes.fromhex(hexid)
        try:
            sv.trailers[pid] = read_trailer(repo, hexid, o.size)
        except RepositoryError as e:
            sv.trailers[pid] = None
            if pid in sv.claims:
                sv.unreadable.add(pid)
                sv.problems.append(f"{e} (the pack is kept: an index names it)")
    for pid, recs in sorted(sv.claims.items()):
        if pid.hex() not in sv.listed:
            sv.problems.append(f"pack {pid.hex()}: listed in an index, but missing")
            continue
        held = sv.trailers.get(pid)
        if held is None:
            continue
        held_set = set(held)
        wrong = [r for r in recs if r not in held_set]
        if wrong:
            sv.disagreeing += len(wrong)
            sv.problems.append(f"pack {pid.hex()}: {len(wrong)} index records name blobs its "
                               "trailer does not hold there (a forged or damaged index; "
                               "those records are not used)")
        for r in sorted(recs & held_set):
            sv.locations.setdefault(r[0], []).append(rf.IndexEntry(pid, r[1], r[2], r[3], r[4]))
    return sv
