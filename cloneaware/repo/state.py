"""What this host remembers of each repository it has used, so that the
store cannot make it trust what it did not write (docs/REPOSITORY.md,
"Threat model", "Client state"):

- for each backup set (host and PATHs), the snapshot this host wrote last:
  the next backup takes its parent from there, never from whatever is the
  newest snapshot the store shows (which anyone with append-only access
  can write);
- whether the repository was encrypted: a config that says it is not is
  then refused (a downgrade);
- the newest snapshot this host has seen, to notice a store that went back.

A file per repository id, JSON, written atomically, in
``$CLONEAWARE_STATE_DIR``, else ``$XDG_STATE_HOME/cloneaware``, else
``~/.local/state/cloneaware``.  Losing it costs speed (the next backup reads
everything once), never correctness; a state file that does not parse is
set aside and said.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from cloneaware.safeio import AtomicFile

VERSION = 1
SIZE_MAX = 1 << 20
#: a snapshot dated later than now by more than this has a time that is not
#: believed (clocks of hosts differ by less)
SKEW_NS = 5 * 60 * 1_000_000_000


def state_dir() -> str:
    d = os.environ.get("CLONEAWARE_STATE_DIR")
    if d:
        return d
    xdg = os.environ.get("XDG_STATE_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"),
                                                                ".local", "state")
    return os.path.join(base, "cloneaware")


class ClientState:
    """The state of repository ``repo_id`` on this host.  ``warn`` says what
    could not be read or written (it is never fatal)."""

    def __init__(self, repo_id: str, warn: Callable[[str], None] | None = None,
                 directory: str | None = None, location: str | None = None):
        self.repo_id = repo_id
        #: the repository's location (repo/backend.py): the newest snapshot
        #: seen is remembered per location, since a copy of a repository
        #: (the same id) is behind or ahead of the original by design
        self.location = location
        self.warn = warn or (lambda msg: None)
        self.dir = directory or state_dir()
        self.path = os.path.join(self.dir, f"{repo_id}.json")
        self.data: dict = {"version": VERSION, "repository": repo_id, "sets": {}}
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(SIZE_MAX + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            self.warn(f"{self.path}: {e.strerror}; this host's memory of the repository is "
                      "not used")
            return
        try:
            d = json.loads(raw, parse_constant=_no_constant)
            if len(raw) > SIZE_MAX or not isinstance(d, dict) or d.get("version") != VERSION \
                    or d.get("repository") != self.repo_id or not isinstance(d.get("sets"), dict):
                raise ValueError
        except (ValueError, RecursionError):
            self.warn(f"{self.path}: not a state file of this repository; set aside")
            try:
                os.replace(self.path, self.path + ".bad")
            except OSError:
                pass
            return
        self.data = d

    def save(self) -> None:
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            with AtomicFile(self.path, replace=True) as f:
                f.write(json.dumps(self.data, sort_keys=True).encode())
                f.commit(0o600)
        except OSError as e:
            self.warn(f"{self.path}: {e.strerror}; this host's memory of the repository was "
                      "not updated (the next backup may read more)")

    # -- what is remembered ---------------------------------------------------------

    @property
    def encrypted(self) -> bool | None:
        v = self.data.get("encrypted")
        return v if isinstance(v, bool) else None

    def parent(self, set_key: str) -> str | None:
        """The snapshot this host wrote last for the backup set."""
        got = self.data["sets"].get(set_key)
        return got.get("snapshot") if isinstance(got, dict) and \
            isinstance(got.get("snapshot"), str) else None

    def adopt(self, old_key: str, new_key: str) -> None:
        """A set remembered under the key an earlier version gave it (before
        the repository's location was part of it) goes on under the new one."""
        sets = self.data["sets"]
        if new_key not in sets and old_key in sets and old_key != new_key:
            sets[new_key] = sets.pop(old_key)

    def parent_content(self, set_key: str) -> str | None:
        """The content key (Snapshot.content_key) of the snapshot this host
        wrote last for the set: the same snapshot under another id (tag
        gives it one) is known by it."""
        got = self.data["sets"].get(set_key)
        return got.get("content") if isinstance(got, dict) and \
            isinstance(got.get("content"), str) else None

    def wrote(self, set_key: str, snapshot_id: str, time_ns: int,
              content: str | None = None) -> None:
        self.data["sets"][set_key] = {"snapshot": snapshot_id, "time_ns": time_ns,
                                      **({"content": content} if content else {})}
        self._seen(snapshot_id, time_ns)

    def newest_written(self) -> int | None:
        """The time of the newest snapshot this host wrote (any set)."""
        times = [v["time_ns"] for v in self.data["sets"].values()
                 if isinstance(v, dict) and isinstance(v.get("time_ns"), int)]
        return max(times) if times else None

    def _newest_key(self) -> str:
        return "newest" if self.location is None else f"newest at {self.location}"

    def newest_seen(self) -> tuple[str, int] | None:
        n = self.data.get(self._newest_key())
        if self.location is not None:
            # remembered by an earlier version for whichever location: not
            # given to one (a copy behind the original would look rolled back)
            self.data.pop("newest", None)
        if isinstance(n, dict) and isinstance(n.get("id"), str) \
                and isinstance(n.get("time_ns"), int):
            return n["id"], n["time_ns"]
        return None

    def _seen(self, snapshot_id: str, time_ns: int) -> None:
        n = self.newest_seen()
        if n is None or time_ns > n[1]:
            self.data[self._newest_key()] = {"id": snapshot_id, "time_ns": time_ns}

    def seen(self, snapshot_id: str, time_ns: int) -> None:
        """The newest snapshot the repository holds now."""
        self.data[self._newest_key()] = {"id": snapshot_id, "time_ns": time_ns}

    def forget_seen(self) -> None:
        self.data.pop(self._newest_key(), None)

    def note_encryption(self, encrypted: bool) -> None:
        self.data["encrypted"] = encrypted


    def went_back(self, snaps: list, where: str, warn: Callable[[str], None]) -> None:
        """Say so when the newest snapshot this host has seen is gone and
        nothing as new is there: a store serving an older state of the
        repository (or that snapshot forgotten elsewhere).  Then remember
        the newest one now (not one dated in the future)."""
        seen = self.newest_seen()
        ids = {s.id for s in snaps}
        if seen is not None and seen[0] not in ids and \
                not any(s.time_ns >= seen[1] for s in snaps):
            warn(f"{where}: snapshot {seen[0][:8]}, the newest this host had seen, is gone and "
                 "nothing as new is there: the repository may have been rolled back to an "
                 "older state (or the snapshot was forgotten elsewhere)")
            self.forget_seen()
        limit = time.time_ns() + SKEW_NS
        ok = [s for s in snaps if s.time_ns <= limit]
        if ok and (seen is None or seen[0] not in ids or ok[-1].time_ns > seen[1]):
            self.seen(ok[-1].id, ok[-1].time_ns)
            self.save()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number here")
