"""``prune``: drop what no snapshot needs, repack the rest.  The order of
its writes keeps every snapshot restorable if it is killed at any moment
(docs/REPOSITORY.md, "Crash safety and concurrency"), and nothing is
deleted once its lock is lost (another command may then be writing)."""
from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloneaware.archive.events import BlobEvent, Handler, dispatch
from cloneaware.archive.reader import Stream
from cloneaware.errors import RepositoryError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import pack_name
from cloneaware.repo.packer import Packer
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot

ORPHAN_GRACE = 3600  # seconds: packs no index lists are kept this long


def used_blobs(repo: Repository, snaps: list[Snapshot]) -> set[bytes]:
    """Every blob some snapshot needs: its manifest's, and those it names."""
    used = _UsedBlobs()
    for s in snaps:
        used.ids.update(s.manifest)
        dispatch(used, Stream(io.BytesIO(repo.manifest(s)), check_hashes=False).events())
    return used.ids


class _UsedBlobs(Handler):
    def __init__(self) -> None:
        self.ids: set[bytes] = set()

    def on_blob(self, ev: BlobEvent) -> None:
        self.ids.add(ev.blob_id)


@dataclass
class PruneResult:
    packs_before: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    blobs_removed: int = 0
    duplicates_removed: int = 0
    orphans_deleted: int = 0
    orphans_kept: int = 0
    strays_deleted: int = 0


def prune(repo: Repository, dry_run: bool = False, connections: int = 2,
          say: Callable[[str], None] | None = None) -> PruneResult:
    """Delete packs no snapshot needs, repack those partly needed (or holding
    a blob twice), write one index for what is kept."""
    say = say or (lambda m: None)
    res = PruneResult()
    snaps = repo.snapshots()
    index_objs = repo.backend.listing("index")
    packs_listed = {o.name.rpartition("/")[2]: o for o in repo.backend.listing("data")}
    per_pack: dict[bytes, list[tuple[bytes, int, int, int, int]]] = {}
    for obj in index_objs:
        payload = repo.load_object(obj.name, rf.K_INDEX)
        for p in rf.decode_index_payload(payload, f"{repo.where}: {obj.name}"):
            per_pack.setdefault(p.id, list(p.blobs))
    used = used_blobs(repo, snaps)
    res.packs_before = len(packs_listed)
    res.bytes_before = sum(o.size for o in packs_listed.values())
    seen: set[bytes] = set()
    keep_whole: list[rf.IndexPack] = []
    repack: list[tuple[bytes, list]] = []
    delete: list[bytes] = []
    for pid, blobs in sorted(per_pack.items()):
        if pid.hex() not in packs_listed:
            raise RepositoryError(f"{repo.where}: pack {pid.hex()} is in an index but missing; "
                                  "run cloneaware check (prune stops: it would lose data)")
        wanted = []
        for b in blobs:
            if b[0] in used and b[0] not in seen:
                wanted.append(b)
                seen.add(b[0])
            elif b[0] in used:
                res.duplicates_removed += 1
            else:
                res.blobs_removed += 1
        if len(wanted) == len(blobs):
            keep_whole.append(rf.IndexPack(pid, blobs))
        elif wanted:
            repack.append((pid, wanted))
        else:
            delete.append(pid)
    missing = used - seen
    if missing:
        raise RepositoryError(f"{repo.where}: {len(missing)} blobs that snapshots need are in "
                              "no index; run cloneaware check (prune stops: it would lose data)")
    now = time.time()
    indexed = {p.hex() for p in per_pack}
    orphans = [o for n, o in packs_listed.items() if n not in indexed]
    old_orphans = [o for o in orphans if now - o.mtime > ORPHAN_GRACE]
    res.orphans_kept = len(orphans) - len(old_orphans)
    res.packs_deleted = len(delete)
    res.packs_repacked = len(repack)
    if dry_run:
        res.bytes_after = res.bytes_before - sum(packs_listed[p.hex()].size for p in delete)
        return res
    # 1. new packs for the blobs of partly used packs
    repo.index.blobs.clear()
    packer = Packer(repo, connections)
    try:
        for pid, wanted in repack:
            for bid, t, off, stored, raw in wanted:
                data = repo.backend.read(pack_name(pid.hex()), off, stored)
                packer.add(bid, t, raw, data)
        written = packer.finish_packs()
    finally:
        packer.close()
    res.packs_written = packer.packs_written
    # 2. one index for everything kept, durable before anything is deleted
    new_names = repo.write_index(keep_whole + written)
    # 3. the old index objects, then the packs no longer needed
    for obj in index_objs:
        if obj.name not in new_names:
            _delete(repo, obj.name)
    repo.backend.sync()
    for pid in delete + [p for p, _ in repack]:
        _delete(repo, pack_name(pid.hex()))
    for o in old_orphans:
        _delete(repo, o.name)
    res.orphans_deleted = len(old_orphans)
    strays = getattr(repo.backend, "strays", None)
    if strays is not None:
        for d in ("data", "index", "snapshots", "locks"):
            for o in strays(d):
                if now - o.mtime > ORPHAN_GRACE:
                    repo.check_lock()
                    repo.backend.delete_stray(o.name)  # type: ignore[attr-defined]
                    res.strays_deleted += 1
    repo.backend.sync()
    res.bytes_after = sum(o.size for o in repo.backend.listing("data"))
    if res.orphans_kept:
        say(f"{res.orphans_kept} packs that no index lists were kept: younger than an hour, "
            "they may belong to a backup still running; a later prune removes them")
    return res


def _delete(repo: Repository, name: str) -> None:
    repo.check_lock()
    repo.backend.delete(name)
