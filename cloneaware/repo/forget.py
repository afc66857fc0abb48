"""``forget``: which snapshots it keeps, and removing the others.  Per group
of snapshots of the same host and PATHs (or of the fields ``--group-by``
names: host, paths, tags), the union of --keep-last N (the N
newest), --keep-within DURATION (every one taken within DURATION of the
newest, restic's rule), --keep-tag T (every one tagged T), and
--keep-hourly N, --keep-daily N (the newest of each of the N newest days
that have one), --keep-weekly N (ISO weeks), --keep-monthly N and
--keep-yearly N, as restic and Borg count them.  Hours, days, weeks,
months and years are in UTC.  The policy (``keep``) is pure logic, tested
without a repository; ``forget`` applies it to one.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

from cloneaware.errors import StillRetained, UsageError
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Filter, Snapshot
from cloneaware.repo.state import SKEW_NS, ClientState
from cloneaware.source.anchors import Mounts, drop_snapshots, set_key


@dataclass(frozen=True)
class Policy:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    #: keep every snapshot within this many ns of the group's newest
    within_ns: int = 0
    hourly: int = 0
    yearly: int = 0
    #: keep every snapshot that has one of these tags
    tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly
                    or self.yearly or self.within_ns or self.tags)


def _buckets(ns: int) -> dict[str, tuple]:
    t = datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    iso = t.isocalendar()
    return {"hourly": (t.year, t.month, t.day, t.hour), "daily": (t.year, t.month, t.day),
            "weekly": (iso[0], iso[1]), "monthly": (t.year, t.month), "yearly": (t.year,)}


def keep(times: list[tuple[str, int]], policy: Policy,
         tags: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """``times``: (snapshot id, time_ns) of one group; ``tags``: each one's
    tags (for keep-tag).  Returns, for each snapshot kept, the reasons
    ("last", "daily", "tag", ...)."""
    if policy.empty():
        raise UsageError("forget needs at least one --keep-last/--keep-hourly/--keep-daily/"
                         "--keep-weekly/--keep-monthly/--keep-yearly/--keep-within/--keep-tag; "
                         "it would remove every snapshot")
    newest = sorted(times, key=lambda t: (t[1], t[0]), reverse=True)
    reasons: dict[str, list[str]] = {}
    for sid, _ in newest[:policy.last]:
        reasons.setdefault(sid, []).append("last")
    if policy.within_ns and newest:
        since = newest[0][1] - policy.within_ns
        for sid, ns in newest:
            if ns >= since:
                reasons.setdefault(sid, []).append("within")
    if policy.tags:
        for sid, _ in newest:
            if set((tags or {}).get(sid, ())) & set(policy.tags):
                reasons.setdefault(sid, []).append("tag")
    for name, n in (("hourly", policy.hourly), ("daily", policy.daily),
                    ("weekly", policy.weekly), ("monthly", policy.monthly),
                    ("yearly", policy.yearly)):
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


#: what ``--group-by`` may name, and its default (restic's)
GROUP_FIELDS = ("host", "paths", "tags")
GROUP_DEFAULT = ("host", "paths")


def group_by(text: str) -> tuple[str, ...]:
    """``--group-by host,paths,tags`` (any of them, in any order; '' puts
    every snapshot in one group)."""
    got = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in got if x not in GROUP_FIELDS]
    if bad:
        raise UsageError(f"--group-by: {bad[0]!r} is not one of {', '.join(GROUP_FIELDS)}")
    return got


def group_key(s: Snapshot, by: tuple[str, ...] = GROUP_DEFAULT) -> tuple:
    return tuple(s.hostname if f == "host" else tuple(sorted(s.paths)) if f == "paths"
                 else tuple(sorted(s.tags)) for f in by)


@dataclass
class ForgetResult:
    kept: list[tuple[Snapshot, list[str]]] = field(default_factory=list)
    removed: list[Snapshot] = field(default_factory=list)
    anchors_dropped: int = 0

    def to_json(self) -> dict:
        """``forget --json`` (without its prune): each snapshot kept, with
        the --keep rules that keep it, and each removed."""
        return {"kept": [{**s.to_json(), "reasons": why} for s, why in self.kept],
                "removed": [s.to_json() for s in self.removed]}


def untrusted_times(snaps: list[Snapshot], state: ClientState | None,
                    now_ns: int | None = None, location: str | None = None
                    ) -> dict[str, str]:
    """The snapshots whose own time a policy must not believe, and why.  A
    time is only what the writer said: anyone who can add a snapshot (an
    append-only client, the store) can date it in the future, and a policy
    that believed it would count it as the newest and push real ones out.
    Such a snapshot is kept and counts for nothing: one dated after now,
    or, of a backup set this host backs up, one newer than the last backup
    this host made of it and not that backup."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    out: dict[str, str] = {}
    mine: dict[str, tuple[str | None, int]] = {}
    if state is not None:
        for key, v in state.data["sets"].items():
            if isinstance(v, dict) and isinstance(v.get("time_ns"), int):
                mine[key] = (v.get("snapshot"), v["time_ns"])
    for s in snaps:
        if s.time_ns > now_ns + SKEW_NS:
            out[s.id] = "dated in the future: its time is not believed"
            continue
        last = mine.get(set_key(s.hostname, sorted(s.paths), location)) \
            or mine.get(set_key(s.hostname, sorted(s.paths)))  # kept by an earlier version
        if last is not None and s.time_ns > last[1] and s.id != last[0]:
            out[s.id] = ("newer than the last backup this host made of its set, which it "
                         "is not: its time is not believed")
    return out


def forget(repo: Repository, policy: Policy, dry_run: bool = False,
           host: str | None = None, state: ClientState | None = None,
           filt: Filter | None = None, named: list[str] | None = None,
           by: tuple[str, ...] = GROUP_DEFAULT) -> ForgetResult:
    """Remove the snapshots the policy does not keep, per group of the same
    ``by`` (host and PATHs unless told), among those ``filt`` (and
    ``host``) leave (and, on this host,
    their anchors).  A snapshot whose time is not believed (untrusted_times)
    is kept and not counted.  ``named``: remove exactly the snapshots these
    ids, prefixes or 'latest' name (among those the filters leave), and
    apply no policy."""
    out = ForgetResult()
    groups: dict[tuple, list[Snapshot]] = {}
    all_snaps = repo.snapshots()
    filt = filt or Filter()
    if host is not None:
        filt = Filter(host, filt.paths, filt.tags)
    if named:
        if not policy.empty():
            raise UsageError("give SNAPSHOTs to forget, or --keep options, not both")
        out.removed = repo.find_all(named, all_snaps, filt)
        return _remove(repo, out, dry_run)
    if state is None:
        state = repo.state or ClientState(repo.config.id, repo.warn, location=repo.location)
    doubtful = untrusted_times(all_snaps, state, location=repo.location)
    for s in filt.apply(all_snaps):
        if s.id in doubtful:
            out.kept.append((s, [doubtful[s.id]]))
            continue
        groups.setdefault(group_key(s, by), []).append(s)
    for snaps in groups.values():
        reasons = keep([(s.id, s.time_ns) for s in snaps], policy,
                       {s.id: list(s.tags) for s in snaps})
        for s in snaps:
            if s.id in reasons:
                out.kept.append((s, reasons[s.id]))
            else:
                out.removed.append(s)
    return _remove(repo, out, dry_run)


def _remove(repo: Repository, out: ForgetResult, dry_run: bool) -> ForgetResult:
    """Delete the snapshot objects of ``out.removed`` and drop their anchors."""
    if not dry_run:
        gone = []
        for s in out.removed:
            repo.check_lock()
            try:
                repo.delete_snapshot(s)
                gone.append(s)
            except StillRetained as e:  # Object Lock: kept, with when it may go
                until = datetime.datetime.fromtimestamp(e.until, datetime.UTC)
                out.kept.append((s, [f"retained by Object Lock until {until:%Y-%m-%d %H:%M}"]))
        out.removed = gone
        repo.backend.sync()
        out.anchors_dropped = drop_snapshots(repo.config.id, Mounts().points,
                                             {s.id for s in out.removed})
    return out
