"""The anchor sets on this host, as ``cloneaware anchors`` shows and drops
them (issue 30): each with its repository, its backup set, when a backup
last renewed it, and the space it pins (source/pinned.py: what removing it
gives back, the same whatever path was scanned)."""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

from cloneaware.errors import UsageError
from cloneaware.safeio import lexists, pid_alive, remove_tree
from cloneaware.source.anchors import (
    DIRNAME,
    INFO,
    INFO_MAX,
    SNAP,
    STAGING,
    Mounts,
    open_anchor_dir,
    open_dir,
    our_file,
)
from cloneaware.source.pinned import Pinned, pinned

#: a backup notes anchor sets that no backup has renewed for this long
STALE_NS = 30 * 86400 * 1_000_000_000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _read_info(sfd: int) -> dict:
    fd = our_file(sfd, INFO)
    if fd is None:
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            d = json.loads(f.read(INFO_MAX))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


@dataclass
class SetInfo:
    """One anchor set on this host, as ``cloneaware anchors`` lists it."""

    top: bytes  # the mount it is on
    repo_id: str
    key: str
    snapshot: str | None  # the snapshot its anchors are of (None: none kept)
    time_ns: int | None  # when a backup last renewed it
    anchors: int  # how many
    location: str | None = None  # the repository, as the backup named it
    host: str | None = None
    paths: list[str] | None = None

    @property
    def path(self) -> bytes:
        return os.path.join(self.top, DIRNAME, self.repo_id.encode(), self.key.encode())


def list_sets(tops: list[bytes]) -> list[SetInfo]:
    """The anchor sets of this user at the tops of these mounts (only
    directories that are ours, never through a symlink)."""
    out: list[SetInfo] = []
    for top in tops:
        afd, _why = open_anchor_dir(top)
        if afd is None:
            continue
        try:
            for rid in sorted(os.listdir(afd)):
                if not SNAP.match(os.fsdecode(rid)):
                    continue
                try:
                    rfd = open_dir(afd, os.fsencode(rid))
                except FileNotFoundError:
                    continue
                if rfd is None:
                    continue
                try:
                    for key in sorted(os.listdir(rfd)):
                        got = _set_info(top, rfd, os.fsdecode(rid), os.fsdecode(key))
                        if got is not None:
                            out.append(got)
                finally:
                    os.close(rfd)
        finally:
            os.close(afd)
    return out


def _set_info(top: bytes, rfd: int, rid: str, key: str) -> SetInfo | None:
    try:
        sfd = open_dir(rfd, key.encode())
    except FileNotFoundError:
        return None
    if sfd is None:
        return None
    try:
        info = _read_info(sfd)
        snaps = [n for n in map(os.fsdecode, os.listdir(sfd)) if SNAP.match(n)]
        snap = info.get("snapshot") if info.get("snapshot") in snaps else \
            (snaps[0] if snaps else None)
        count, when = 0, info.get("time_ns")
        if snap is not None:
            try:
                dfd = open_dir(sfd, snap.encode())
            except FileNotFoundError:
                dfd = None
            if dfd is not None:
                try:
                    count = sum(1 for n in os.listdir(dfd) if n.isdigit())
                    if not isinstance(when, int):
                        when = os.fstat(dfd).st_mtime_ns
                finally:
                    os.close(dfd)
        paths = info.get("paths")
        return SetInfo(top, rid, key, snap, when if isinstance(when, int) else None, count,
                       _str(info.get("location")), _str(info.get("host")),
                       [p for p in paths if isinstance(p, str)] if isinstance(paths, list)
                       else None)
    finally:
        os.close(sfd)


def _str(v) -> str | None:
    return v if isinstance(v, str) else None


def _open_chain(top: bytes, names: list[bytes]) -> int | None:
    """TOP/.cloneaware-anchors/NAMES..., each directory ours, opened one by
    one without following a symlink; None if any step is not."""
    fd, _why = open_anchor_dir(top)
    for n in names:
        if fd is None:
            return None
        try:
            nfd = open_dir(fd, n)
        except FileNotFoundError:
            nfd = None
        finally:
            os.close(fd)
        fd = nfd
    return fd


def open_set_files(s: SetInfo) -> tuple[list[int], list[bytes]]:
    """Descriptors of the set's anchors (regular files of ours, one link),
    and their paths; the caller closes them."""
    fds: list[int] = []
    paths: list[bytes] = []
    if s.snapshot is None:
        return fds, paths
    dfd = _open_chain(s.top, [s.repo_id.encode(), s.key.encode(), s.snapshot.encode()])
    if dfd is None:
        return fds, paths
    d = os.path.join(s.path, s.snapshot.encode())
    try:
        for n in sorted(os.fsencode(x) for x in os.listdir(dfd)):
            if n.isdigit():
                fd = our_file(dfd, n)
                if fd is not None:
                    fds.append(fd)
                    paths.append(os.path.join(d, n))
    finally:
        os.close(dfd)
    return fds, paths


def _in_use(rfd: int, key: bytes) -> bool:
    """Whether a running backup is making anchors in set ``key``."""
    try:
        sfd = open_dir(rfd, key)
    except FileNotFoundError:
        return False
    if sfd is None:
        return True  # not ours: not touched
    try:
        for n in os.listdir(sfd):
            m = STAGING.match(n)
            if m and pid_alive(int(m.group(1))):
                return True
    finally:
        os.close(sfd)
    return False


def drop_set(s: SetInfo) -> bool:
    """Remove the set's directory (its anchors and records)."""
    rfd = _open_chain(s.top, [s.repo_id.encode()])
    if rfd is None:
        return False
    try:
        if not lexists(rfd, s.key.encode()) or _in_use(rfd, s.key.encode()):
            return False
        remove_tree(rfd, s.key.encode())
    finally:
        os.close(rfd)
    return True


@dataclass
class Surveyed:
    set: SetInfo
    pinned: Pinned | None = None
    #: "yes", "no" or "unknown": is its repository still at its location
    #: (checked for local repositories only)
    repository: str = "unknown"

    def as_dict(self) -> dict:
        s = self.set
        return {"path": os.fsdecode(s.path), "mount": os.fsdecode(s.top),
                "repository_id": s.repo_id, "set": s.key, "location": s.location,
                "host": s.host, "paths": s.paths, "snapshot": s.snapshot,
                "renewed_ns": s.time_ns, "anchors": s.anchors,
                "pinned_bytes": None if self.pinned is None else self.pinned.bytes,
                "pinned_exact": None if self.pinned is None else self.pinned.exact,
                "repository_present": self.repository}


def tops_for(paths: list[str] | None) -> list[bytes]:
    """The mounts to look on: those of PATHs and below them, else all."""
    mounts = Mounts()
    if not paths:
        return list(reversed(mounts.points))
    out: list[bytes] = []
    for p in paths:
        d = os.path.abspath(os.fsencode(p))
        if not os.path.exists(d):
            raise UsageError(f"{p}: no such file or directory")
        d = d if os.path.isdir(d) else os.path.dirname(d)
        for t in [mounts.top(d), *mounts.under(d)]:
            if t not in out:
                out.append(t)
    return out


def survey(tops: list[bytes], measure: bool = True) -> list[Surveyed]:
    """The anchor sets on these mounts; with ``measure``, what each pins."""
    out = []
    for s in list_sets(tops):
        got = Surveyed(s, repository=repository_present(s))
        if measure:
            got.pinned = measure_set(s)
        out.append(got)
    return out


def measure_set(s: SetInfo) -> Pinned:
    fds, paths = open_set_files(s)
    try:
        return pinned(fds, paths)
    finally:
        for fd in fds:
            os.close(fd)


def repository_present(s: SetInfo) -> str:
    """Whether the set's repository is still where the backup found it: a
    local location is checked (its config, with the same id); others are
    not reached from here."""
    loc = s.location
    if loc is None or not loc.startswith("/"):
        return "unknown"
    try:
        with open(os.path.join(loc, "config"), "rb") as f:
            cfg = json.loads(f.read(64 << 10))
    except (OSError, ValueError, RecursionError):
        return "no"
    return "yes" if isinstance(cfg, dict) and cfg.get("id") == s.repo_id else "no"


def parse_age(text: str) -> int:
    """'30d', '12h', '2w', '90m', '45s' -> nanoseconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if not m:
        raise UsageError(f"{text!r}: give an age as a number and a unit: s, m, h, d or w "
                         "(30d, 12h)")
    return int(m.group(1)) * _UNITS[m.group(2)] * 1_000_000_000


def choose(sets: list[Surveyed], repo_ids: list[str], older_than_ns: int | None,
           gone: bool, every: bool, now_ns: int | None = None) -> list[Surveyed]:
    """The sets ``anchors drop`` removes: all of them (``every``), or those
    of the repositories ``repo_ids`` (ids, or unique prefixes), not renewed
    for ``older_than_ns``, or whose repository is gone, each criterion
    narrowing the choice."""
    if not (repo_ids or older_than_ns is not None or gone or every):
        raise UsageError("say which anchor sets to drop: --repository-id ID, -r REPO, "
                         "--older-than AGE, --gone or --all")
    now = time.time_ns() if now_ns is None else now_ns
    ids = _resolve_ids(repo_ids, {it.set.repo_id for it in sets})
    out = []
    for it in sets:
        s = it.set
        if repo_ids and s.repo_id not in ids:
            continue
        # a set of unknown age (a first backup still making it) is not "old"
        if older_than_ns is not None and (s.time_ns is None
                                          or now - s.time_ns < older_than_ns):
            continue
        if gone and it.repository != "no":
            continue
        out.append(it)
    return out


def _resolve_ids(prefixes: list[str], known: set[str]) -> set[str]:
    """Each id or prefix to the one repository id of the sets found that it
    names; ambiguous or empty prefixes are refused."""
    out = set()
    for p in prefixes:
        if len(p) < 4:
            raise UsageError(f"--repository-id {p!r}: give at least 4 hex digits of the id")
        got = {k for k in known if k.startswith(p)}
        if len(got) > 1:
            raise UsageError(f"--repository-id {p}: names {len(got)} repositories' anchor sets; "
                             "give more digits")
        out |= got
    return out


def drop(chosen: list[Surveyed]) -> int:
    """Remove the chosen sets (not one a running backup is making anchors
    in); how many were."""
    return sum(1 for it in chosen if drop_set(it.set))


def stale(tops: list[bytes], repo_id: str, key: str, now_ns: int | None = None
          ) -> list[SetInfo]:
    """The anchor sets on these mounts, other than ``key`` of ``repo_id``,
    that no backup has renewed for STALE_NS (said by a backup)."""
    now = time.time_ns() if now_ns is None else now_ns
    return [s for s in list_sets(tops) if (s.repo_id, s.key) != (repo_id, key)
            and s.time_ns is not None and now - s.time_ns > STALE_NS]

