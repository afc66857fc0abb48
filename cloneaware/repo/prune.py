"""``prune``: drop what no snapshot needs, repack the rest.  The order of
its writes keeps every snapshot restorable if it is killed at any moment
(docs/REPOSITORY.md, "Crash safety and concurrency"), and nothing is
deleted once its lock is lost (another command may then be writing)."""
from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cloneaware.archive.events import BlobEvent, Handler, dispatch
from cloneaware.archive.reader import Stream
from cloneaware.errors import RepositoryError, StillRetained
from cloneaware.repo import format as rf
from cloneaware.repo import objectlock
from cloneaware.repo.backend import pack_name
from cloneaware.repo.packer import Packer
from cloneaware.repo.pieces import PieceWalk
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot
from cloneaware.repo.survey import Record, survey

ORPHAN_GRACE = 3600  # seconds: packs no index lists are kept this long


def used_blobs(repo: Repository, snaps: list[Snapshot]) -> set[bytes]:
    """Every blob some snapshot needs: its manifest's, and those it names
    (each distinct manifest piece walked once, repo/pieces.py; a snapshot
    the walk cannot follow decoded whole)."""
    used = _UsedBlobs()
    walk = PieceWalk(repo)
    for s in snaps:
        used.ids.update(s.manifest_list)
        used.ids.update(repo.manifest_ids(s))
        # a walk that stops part way has named real blobs of the pieces it
        # walked: kept, and the whole decode adds the rest
        if walk.walk(s, lambda p: used.ids.update(p.ranges.id_list())) is None:
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
    #: objects S3 Object Lock still retains: kept, and said
    retained: int = 0
    #: Object Lock: the retention extended (objectlock.Extended.to_json), or None
    object_lock: dict | None = None


def prune(repo: Repository, dry_run: bool = False, connections: int = 2,
          say: Callable[[str], None] | None = None) -> PruneResult:
    """Delete packs no snapshot needs, repack those partly needed (or holding
    a blob twice), write one index for what is kept.

    Nothing is decided on an index record alone (repo/survey.py): a record
    counts only where its pack's trailer agrees, a blob held twice keeps the
    copy that was read back and found to be the blob, and every blob copied
    into a new pack is read and checked first.  A pack an index names whose
    trailer cannot be read is never deleted."""
    say = say or (lambda m: None)
    res = PruneResult()
    snaps = repo.snapshots()
    sv = survey(repo)
    for msg in sv.problems:
        say(msg)
    used = used_blobs(repo, snaps)
    res.packs_before = len(sv.listed)
    res.bytes_before = sum(o.size for o in sv.listed.values())
    missing = used - set(sv.locations)
    if missing:
        raise RepositoryError(f"{repo.where}: {len(missing)} blobs that snapshots need are in no "
                              "pack that holds them; run cloneaware check (prune stops: it "
                              "would lose data)")
    keep = {bid: _copy_to_keep(repo, bid, sv.locations[bid], say) for bid in used}
    keep_whole: list[rf.IndexPack] = []
    lock_now = datetime.now(UTC)

    def retained(pid: bytes) -> bool:
        """Whether Object Lock keeps the pack (then it is kept whole, and said)."""
        if not repo.config.lock_days or not hasattr(repo.backend, "retention"):
            return False
        end = repo.backend.retention(pack_name(pid.hex()))
        if end is not None and end > lock_now:
            res.retained += 1
            return True
        return False

    repack: list[tuple[bytes, list[Record]]] = []
    delete: list[bytes] = []
    for pid in sorted(sv.indexed()):
        held = sv.trailers.get(pid)
        if pid.hex() not in sv.listed or held is None:
            continue  # gone, or unreadable: nothing to decide on, nothing deleted
        # a used blob no copy of which read back as itself keeps every copy
        wanted = [r for r in held if r[0] in used and (keep[r[0]] is None
                                                       or _kept(keep[r[0]], pid, r))]
        for r in held:
            if r[0] in used and r not in wanted:
                res.duplicates_removed += 1
            elif r[0] not in used:
                res.blobs_removed += 1
        if len(wanted) == len(held) or retained(pid):  # (Object Lock: it cannot go yet)
            keep_whole.append(rf.IndexPack(pid, list(held)))
        elif wanted:
            repack.append((pid, wanted))
        else:
            delete.append(pid)
    now = time.time()
    indexed = {p.hex() for p in sv.indexed()}
    orphans = [o for n, o in sv.listed.items() if n not in indexed]
    old_orphans = [o for o in orphans if now - o.mtime > ORPHAN_GRACE]
    res.orphans_kept = len(orphans) - len(old_orphans)
    res.packs_deleted = len(delete)
    res.packs_repacked = len(repack)
    if dry_run:  # what would go: the packs no snapshot needs and the old orphans
        res.orphans_deleted = len(old_orphans)
        res.bytes_after = res.bytes_before - sum(sv.listed[p.hex()].size for p in delete) \
            - sum(o.size for o in old_orphans)
        return res
    # 1. new packs for the blobs of partly used packs, each read and checked first
    repo.index.clear()
    packer = Packer(repo, connections)
    try:
        for pid, wanted in repack:
            for bid, t, off, stored, raw in wanted:
                entry = rf.IndexEntry(pid, t, off, stored, raw)
                data = repo.backend.read(pack_name(pid.hex()), off, stored)
                repo.decode_blob(bid, entry, data, f"{repo.where}: blob {bid.hex()[:16]} in "
                                 f"pack {pid.hex()[:16]}")
                packer.add(bid, t, raw, data)
        written = packer.finish_packs()
    finally:
        packer.close()
    res.packs_written = packer.packs_written
    # 2. one index for everything kept, durable before anything is deleted
    new_names = repo.write_index(keep_whole + written)
    # 3. the old index objects, then the packs no longer needed
    for name in sv.index_objects + sv.bad_index:
        if name not in new_names:
            _delete(repo, name, res)
    repo.backend.sync()
    for pid in delete + [p for p, _ in repack]:
        _delete(repo, pack_name(pid.hex()), res)
    for o in old_orphans:
        _delete(repo, o.name, res)
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
    ext = objectlock.extend(repo, say)  # what stays is retained again
    res.object_lock = ext.to_json() if ext is not None else None
    res.bytes_after = sum(o.size for o in repo.backend.listing("data"))
    if res.orphans_kept:
        say(f"{res.orphans_kept} packs that no index lists were kept: younger than an hour, "
            "they may belong to a backup still running; a later prune removes them")
    return res


def _kept(entry: rf.IndexEntry | None, pid: bytes, r: Record) -> bool:
    return entry is not None and entry == rf.IndexEntry(pid, r[1], r[2], r[3], r[4])


def _copy_to_keep(repo: Repository, bid: bytes, locs: list[rf.IndexEntry],
                  say: Callable[[str], None]) -> rf.IndexEntry | None:
    """The location of ``bid`` to keep.  With one, that one (nothing else is
    deleted for it).  With several, the first whose bytes are read back and
    are the blob: only then are the others dropped.  None (keep them all)
    if none is."""
    if len(locs) == 1:
        return locs[0]
    for e in locs:
        what = f"{repo.where}: blob {bid.hex()[:16]} in pack {e.pack.hex()[:16]}"
        try:
            repo.decode_blob(bid, e, repo.backend.read(pack_name(e.pack.hex()), e.offset,
                                                       e.stored_length), what)
            return e
        except RepositoryError as err:
            say(f"{err}; another copy is kept")
    say(f"{repo.where}: no copy of blob {bid.hex()[:16]} reads back as the blob; all "
        f"{len(locs)} are kept (run cloneaware check --read-data)")
    return None


def _delete(repo: Repository, name: str, res: PruneResult | None = None) -> bool:
    """Delete ``name``; False (counted in ``res.retained``) if Object Lock
    still retains it."""
    repo.check_lock()
    try:
        repo.backend.delete(name)
    except StillRetained:
        if res is not None:
            res.retained += 1
        return False
    return True
