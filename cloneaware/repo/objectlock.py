"""S3 Object Lock on a repository (docs/REPOSITORY.md, "Object Lock"):
every object but locks is put with a retention of the repository's
``lock_days``; ``prune`` extends, to ``lock_days`` from now, the retention
of every object still there whose retention ends within ``lock_days / 2``
(the margin), and says when the next extension is due.  The rule that
keeps every snapshot protected: prune runs at least every ``lock_days /
2`` days, so that no object it keeps is ever left without retention."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cloneaware.repo.repository import Repository

#: what is retained: everything but locks
RETAINED = ("config", "keys", "snapshots", "index", "data")


@dataclass
class Extended:
    checked: int = 0
    extended: int = 0
    #: objects whose retention had run out before this extension (prune ran
    #: too seldom: they were unprotected for a while)
    lapsed: int = 0
    #: when the next extension is due (the earliest end of retention less the margin)
    next_due: datetime | None = None

    def to_json(self) -> dict:
        return {"checked": self.checked, "extended": self.extended, "lapsed": self.lapsed,
                "next_due": self.next_due.isoformat() if self.next_due else None}


def extend(repo: Repository, say: Callable[[str], None] | None = None,
           now: datetime | None = None) -> Extended | None:
    """Extend the retention of what is in the repository (None: it has no
    Object Lock)."""
    days = repo.config.lock_days
    backend = repo.backend
    if not days or not hasattr(backend, "extend"):
        return None
    now = now or datetime.now(UTC)
    margin = timedelta(days=days / 2)
    until = now + timedelta(days=days)
    out = Extended()
    names = ["config"] + [o.name for d in RETAINED[1:] for o in backend.listing(d)]
    earliest: datetime | None = None
    for name in names:
        repo.check_lock()
        out.checked += 1
        end = backend.retention(name)  # type: ignore[attr-defined]
        if end is None or end <= now:
            out.lapsed += 1
        if end is None or end - now < margin:
            backend.extend(name, until)
            out.extended += 1
            end = until
        earliest = end if earliest is None or end < earliest else earliest
    out.next_due = earliest - margin if earliest is not None else None
    if say is not None and out.lapsed:
        say(f"{repo.where}: the retention of {out.lapsed} objects had run out before this prune "
            f"extended it: run prune at least every {days // 2} days")
    return out
