"""``tag``: change the tags of snapshots.  A snapshot object is named by
the hash of its bytes, so a snapshot with other tags is a new object: it
is written first, then the old one deleted (a crash between leaves both,
the same snapshot twice, which ``forget`` treats as two).  The new one
keeps everything else, its time and its manifest; the host that wrote it
knows it again by its content key (repo/parent.py), so its next backup
still reads only what changed."""
from __future__ import annotations

from dataclasses import dataclass, field

from cloneaware.errors import UsageError
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot


def check_tag(tag: str) -> str:
    """A tag as ``--tag`` can choose it again: not empty, no comma (``--tag
    a,b`` means both), nothing unprintable."""
    if not tag or "," in tag or not tag.isprintable():
        raise UsageError(f"{tag!r}: a tag is a non-empty printable name without a comma")
    return tag


@dataclass
class Retagged:
    changed: list[tuple[Snapshot, Snapshot]] = field(default_factory=list)  # (old, new)
    unchanged: list[Snapshot] = field(default_factory=list)


def retag(repo: Repository, snaps: list[Snapshot], add: list[str], remove: list[str],
          set_to: list[str] | None, dry_run: bool = False) -> Retagged:
    """Give each of ``snaps`` its new tags: ``set_to`` (if given) or its
    own less ``remove``, plus ``add``; in the order first given, each once."""
    for t in [*add, *remove, *(set_to or [])]:
        check_tag(t)
    out = Retagged()
    for s in snaps:
        base = list(set_to) if set_to is not None else [t for t in s.tags if t not in remove]
        new = list(dict.fromkeys(base + add))
        if new == s.tags:
            out.unchanged.append(s)
            continue
        if dry_run:
            out.changed.append((s, Snapshot("", dict(s.data, tags=new))))
            continue
        n = repo.save_snapshot(dict(s.data, tags=new))
        repo.delete_snapshot(s)
        out.changed.append((s, n))
    return out
