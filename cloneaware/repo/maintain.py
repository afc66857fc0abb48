"""Keeping a repository: ``forget`` (drop snapshots by a policy), ``prune``
(drop what no snapshot needs, repack the rest) and ``check`` (is every
object sound, does every snapshot find every blob).  The order of prune's
writes keeps every snapshot restorable if it is killed at any moment
(docs/REPOSITORY.md, "Crash safety and concurrency")."""
from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware.archive.events import BlobEvent
from cloneaware.archive.reader import Stream
from cloneaware.errors import ArchiveError, RepositoryError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import pack_name
from cloneaware.repo.forget import Policy, keep
from cloneaware.repo.repository import Packer, Repository, Snapshot
from cloneaware.source.anchors import Mounts, drop_snapshots

ORPHAN_GRACE = 3600  # seconds: packs no index lists are kept this long


def group_key(s: Snapshot) -> tuple:
    return (s.hostname, tuple(sorted(s.paths)))


@dataclass
class ForgetResult:
    kept: list[tuple[Snapshot, list[str]]] = field(default_factory=list)
    removed: list[Snapshot] = field(default_factory=list)
    anchors_dropped: int = 0


def forget(repo: Repository, policy: Policy, dry_run: bool = False,
           host: str | None = None) -> ForgetResult:
    """Remove the snapshots the policy does not keep, per group of host and
    PATHs (and, on this host, their anchors)."""
    out = ForgetResult()
    groups: dict[tuple, list[Snapshot]] = {}
    for s in repo.snapshots():
        if host is None or s.hostname == host:
            groups.setdefault(group_key(s), []).append(s)
    for snaps in groups.values():
        reasons = keep([(s.id, s.time_ns) for s in snaps], policy)
        for s in snaps:
            if s.id in reasons:
                out.kept.append((s, reasons[s.id]))
            else:
                out.removed.append(s)
    if not dry_run:
        for s in out.removed:
            repo.delete_snapshot(s)
        repo.backend.sync()
        out.anchors_dropped = drop_snapshots(repo.config.id, Mounts().points,
                                             {s.id for s in out.removed})
    return out


def used_blobs(repo: Repository, snaps: list[Snapshot]) -> set[bytes]:
    """Every blob some snapshot needs: its manifest's, and those it names."""
    used: set[bytes] = set()
    for s in snaps:
        used.update(s.manifest)
        for ev in Stream(io.BytesIO(repo.manifest(s)), check_hashes=False).events():
            if isinstance(ev, BlobEvent):
                used.add(ev.blob_id)
    return used


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
        packer._close_pack()
        for f in packer.inflight:
            f.result()
        packer.inflight = []
    finally:
        packer.close()
    res.packs_written = packer.packs_written
    # 2. one index for everything kept, durable before anything is deleted
    new_names = repo.write_index(keep_whole + packer.done)
    # 3. the old index objects, then the packs no longer needed
    for obj in index_objs:
        if obj.name not in new_names:
            repo.backend.delete(obj.name)
    repo.backend.sync()
    for pid in delete + [p for p, _ in repack]:
        repo.backend.delete(pack_name(pid.hex()))
    for o in old_orphans:
        repo.backend.delete(o.name)
    res.orphans_deleted = len(old_orphans)
    strays = getattr(repo.backend, "strays", None)
    if strays is not None:
        for d in ("data", "index", "snapshots", "locks"):
            for o in strays(d):
                if now - o.mtime > ORPHAN_GRACE:
                    repo.backend.delete_stray(o.name)  # type: ignore[attr-defined]
                    res.strays_deleted += 1
    repo.backend.sync()
    res.bytes_after = sum(o.size for o in repo.backend.listing("data"))
    if res.orphans_kept:
        say(f"{res.orphans_kept} packs that no index lists were kept: younger than an hour, "
            "they may belong to a backup still running; a later prune removes them")
    return res


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
            for ev in Stream(io.BytesIO(repo.manifest(s)), check_hashes=False).events():
                if isinstance(ev, BlobEvent):
                    ie = repo.index.get(ev.blob_id)
                    if ie is None:
                        error(f"snapshot {s.short_id}: blob {ev.blob_id.hex()} of "
                              f"{ev.file.entry.path.decode(errors='replace')} is in no index")
                    elif ev.blob_offset + ev.length > ie.raw_length:
                        error(f"snapshot {s.short_id}: a range beyond the end of blob "
                              f"{ev.blob_id.hex()}")
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
