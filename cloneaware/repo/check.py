"""``check``: is every object sound, does every snapshot find every blob;
with ``--read-data``, every pack read whole against its trailer and the
index.  Problems are collected, named by the object they are in, never
repaired."""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware.archive.events import BlobEvent, Handler, dispatch
from cloneaware.archive.reader import Stream
from cloneaware.errors import ArchiveError, RepositoryError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import pack_name
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot


@dataclass
class CheckResult:
    snapshots: int = 0
    packs: int = 0
    blobs: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    read_bytes: int = 0


def check(repo: Repository, read_data: bool = False) -> CheckResult:
    """Every problem found, named by the object it is in."""
    res = CheckResult()

    def error(msg: str) -> None:
        res.errors.append(msg)

    index_objs = repo.backend.listing("index")
    packs_listed = {o.name.rpartition("/")[2]: o for o in repo.backend.listing("data")}
    per_pack: dict[bytes, list] = {}
    for obj in index_objs:
        try:
            payload = repo.load_object(obj.name, rf.K_INDEX)
            for p in rf.decode_index_payload(payload, f"{repo.where}: {obj.name}"):
                if p.id in per_pack:
                    if sorted(per_pack[p.id]) != sorted(p.blobs):
                        error(f"pack {p.id.hex()}: two indexes disagree on its blobs")
                    continue
                per_pack[p.id] = list(p.blobs)
                repo.index.add(p)
        except RepositoryError as e:
            error(str(e))
    repo._index_loaded = True
    res.blobs = len(repo.index.blobs)
    for pid, blobs in per_pack.items():
        o = packs_listed.get(pid.hex())
        if o is None:
            error(f"pack {pid.hex()}: listed in an index, but missing")
            continue
        end = max((off + stored for _, _, off, stored, _ in blobs), default=0)
        if end > o.size:
            error(f"pack {pid.hex()}: shorter ({o.size} bytes) than its index says ({end})")
    orphans = [n for n in packs_listed if bytes.fromhex(n) not in per_pack]
    if orphans:
        res.warnings.append(f"{len(orphans)} packs are in no index (left by an interrupted "
                            "backup or prune); prune removes them")
    res.packs = len(packs_listed)
    try:
        snaps = repo.snapshots()
    except RepositoryError as e:
        error(str(e))
        snaps = []
    res.snapshots = len(snaps)
    for s in snaps:
        try:
            dispatch(_BlobsFound(repo, s, error),
                     Stream(io.BytesIO(repo.manifest(s)), check_hashes=False).events())
        except (RepositoryError, ArchiveError) as e:
            error(f"snapshot {s.short_id}: {e}")
    if read_data:
        for name, o in sorted(packs_listed.items()):
            res.read_bytes += o.size
            for msg in check_pack(repo, name, per_pack.get(bytes.fromhex(name))):
                error(msg)
    return res


def check_pack(repo: Repository, pid: str, indexed: list | None) -> list[str]:
    """Read a whole pack: its name, its trailer, every blob, against the index."""
    out: list[str] = []
    what = f"pack {pid}"
    try:
        data = repo.backend.read(pack_name(pid))
        if rf.object_id(data) != pid:
            return [f"{what}: its contents do not match its name (damaged)"]
        n = rf.split_pack_tail(data[-rf.TAIL:], len(data), what)
        trailer_raw = data[len(data) - rf.TAIL - n:len(data) - rf.TAIL]
        entries = rf.decode_trailer_payload(repo.decode_object(trailer_raw, rf.K_TRAILER,
                                                               f"{what} trailer"), what)
        off = 0
        blobs = []
        for e in entries:
            entry = rf.IndexEntry(bytes.fromhex(pid), e.type, off, e.stored_length, e.raw_length)
            repo.decode_blob(e.id, entry, memoryview(data)[off:off + e.stored_length],
                             f"{what}: blob {e.id.hex()[:16]}")
            blobs.append((e.id, e.type, off, e.stored_length, e.raw_length))
            off += e.stored_length
        if off != len(data) - rf.TAIL - n:
            out.append(f"{what}: its trailer does not describe the whole pack")
        if indexed is not None and sorted(indexed) != sorted(blobs):
            out.append(f"{what}: the index and the pack's trailer disagree")
    except RepositoryError as e:
        out.append(str(e) if str(e).startswith(what) else f"{what}: {e}")
    return out


class _BlobsFound(Handler):
    """Every BLOB range of a snapshot's manifest: its blob in the index, the
    range inside it."""

    def __init__(self, repo: Repository, snap: Snapshot, error: Callable[[str], None]):
        self.repo = repo
        self.snap = snap
        self.error = error

    def on_blob(self, ev: BlobEvent) -> None:
        ie = self.repo.index.get(ev.blob_id)
        sid = self.snap.short_id
        if ie is None:
            self.error(f"snapshot {sid}: blob {ev.blob_id.hex()} of "
                       f"{ev.file.entry.path.decode(errors='replace')} is in no index")
        elif ev.blob_offset + ev.length > ie.raw_length:
            self.error(f"snapshot {sid}: a range beyond the end of blob {ev.blob_id.hex()}")
