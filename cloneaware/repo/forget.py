"""Which snapshots ``forget`` keeps: per group of snapshots of the same host
and PATHs, the union of --keep-last N (the N newest), --keep-daily N (the
newest of each of the N newest days that have one), --keep-weekly N (ISO
weeks) and --keep-monthly N, as restic and Borg count them.  Days, weeks
and months are in UTC.  Pure logic: tested without a repository.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

from cloneaware.errors import UsageError


@dataclass(frozen=True)
class Policy:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def empty(self) -> bool:
        return not (self.last or self.daily or self.weekly or self.monthly)


def _buckets(ns: int) -> dict[str, tuple]:
    t = datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    iso = t.isocalendar()
    return {"daily": (t.year, t.month, t.day), "weekly": (iso[0], iso[1]),
            "monthly": (t.year, t.month)}


def keep(times: list[tuple[str, int]], policy: Policy) -> dict[str, list[str]]:
    """``times``: (snapshot id, time_ns) of one group.  Returns, for each
    snapshot kept, the reasons ("last", "daily", ...)."""
    if policy.empty():
        raise UsageError("forget needs at least one --keep-last/--keep-daily/--keep-weekly/"
                         "--keep-monthly; it would remove every snapshot")
    newest = sorted(times, key=lambda t: (t[1], t[0]), reverse=True)
    reasons: dict[str, list[str]] = {}
    for sid, _ in newest[:policy.last]:
        reasons.setdefault(sid, []).append("last")
    for name, n in (("daily", policy.daily), ("weekly", policy.weekly),
                    ("monthly", policy.monthly)):
        seen: set[tuple] = set()
        for sid, ns in newest:
            if len(seen) >= n:
                break
            b = _buckets(ns)[name]
            if b in seen:
                continue
            seen.add(b)
            reasons.setdefault(sid, []).append(name)
    return reasons
