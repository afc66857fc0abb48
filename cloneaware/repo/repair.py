"""``repair index``: the index rebuilt from the packs' own trailers, for a
repository whose index objects were lost, damaged or left out of date (an
interrupted prune, a store restored without its ``index/``).

Every pack's trailer says which blobs lie where in it (sealed with the
repository's key where it is encrypted; repo/survey.py reads them all).
The new index lists every pack by its trailer; a pack whose trailer cannot
be read keeps the records the old index had for it, so that prune still
never deletes it; a pack that no index named and whose trailer cannot be
read is left alone and named.  The new index objects are durable before
the old ones are deleted, so a repair killed at any moment leaves an index
at least as complete as before (records listed twice are harmless).  The
blobs' bytes are not read: a restore, prune and ``check --read-data``
check each against its id as they read it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware.repo import format as rf
from cloneaware.repo.repository import Repository
from cloneaware.repo.survey import survey


@dataclass
class RepairResult:
    #: packs the new index lists, and their blobs
    packs: int = 0
    blobs: int = 0
    #: packs listed by the old index's records, their trailers unreadable
    kept_by_old_index: int = 0
    #: packs no index named whose trailer cannot be read (left alone)
    unreadable: list[str] = field(default_factory=list)
    index_written: int = 0
    index_removed: int = 0


def repair_index(repo: Repository, dry_run: bool = False,
                 say: Callable[[str], None] | None = None) -> RepairResult:
    """Write an index of every pack from its trailer, then delete the old
    index objects (``dry_run``: count, write nothing)."""
    say = say or (lambda msg: None)
    res = RepairResult()
    sv = survey(repo)
    for msg in sv.problems:
        say(msg)
    packs: list[rf.IndexPack] = []
    for pid, held in sorted(sv.trailers.items()):
        if held is not None:
            if held:
                packs.append(rf.IndexPack(pid, list(held)))
        elif pid in sv.claims:  # never dropped: prune must not take it for an orphan
            packs.append(rf.IndexPack(pid, sorted(sv.claims[pid])))
            res.kept_by_old_index += 1
        else:
            res.unreadable.append(pid.hex())
            say(f"{repo.where}: pack {pid.hex()}: no trailer that decodes and in no index; "
                "left alone (check --read-data reads it)")
    res.packs = len(packs)
    res.blobs = sum(len(p.blobs) for p in packs)
    old = sv.index_objects + sv.bad_index
    if dry_run:
        res.index_removed = len(old)
        return res
    new = repo.write_index(packs)
    res.index_written = len(new)
    for name in old:
        if name not in new:
            repo.check_lock()
            repo.backend.delete(name)
            res.index_removed += 1
    repo.backend.sync()
    return res
