"""Locks (docs/REPOSITORY.md, "Locks"): one object in ``locks/`` per running
command, shared or exclusive, kept fresh while the command runs; which
locks are stale; ``cloneaware unlock``.

A lock is only as good as its freshness: another host takes a lock older
than ``stale`` seconds as stale, and its prune may then delete packs this
command relies on.  So a running lock is rewritten every ``refresh``
seconds (every ``retry`` seconds after a failure), and once no write has
succeeded for ``lost_after`` = ``stale`` - 2 ``refresh`` seconds the lock
is *lost*: ``check()`` raises LockLost, and ``on_lost`` is called (from a
thread of its own, so a refresh hung in a write does not delay it), so the
command stops before anyone could take its lock as stale (restic's
internal/repository/lock.go does the same).
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cloneaware.errors import (
    CloneawareError,
    LockLost,
    RepositoryError,
    RepositoryLocked,
    UsageError,
    describe_oserror,
)
from cloneaware.repo import crypto
from cloneaware.repo import format as rf
from cloneaware.repo.backend import Backend
from cloneaware.repo.snapshots import now_rfc3339
from cloneaware.safeio import pid_alive

STALE_AFTER = 30 * 60  # seconds: a lock of another host older than this is stale
REFRESH_EVERY = 5 * 60  # seconds between the writes of a live lock
RETRY_EVERY = 30  # seconds: after a failed write, the next try comes sooner
EXIT_WAIT = 10  # seconds the end of a command waits for a lock write under way


@dataclass(frozen=True)
class Timings:
    """How often a lock is rewritten, and when it counts as stale or lost.
    ``from_env`` lets tests shorten them: CLONEAWARE_LOCK_REFRESH and
    CLONEAWARE_LOCK_STALE, in seconds."""

    refresh: float = REFRESH_EVERY
    stale: float = STALE_AFTER
    retry: float = RETRY_EVERY

    @property
    def lost_after(self) -> float:
        """No successful write for this long: stop, two refreshes before
        another host may take the lock as stale."""
        return self.stale - 2 * self.refresh

    @classmethod
    def from_env(cls) -> Timings:
        refresh = _seconds("CLONEAWARE_LOCK_REFRESH", REFRESH_EVERY)
        stale = _seconds("CLONEAWARE_LOCK_STALE", STALE_AFTER)
        t = cls(refresh, stale, min(RETRY_EVERY, refresh))
        if t.lost_after <= t.refresh:
            raise UsageError(f"CLONEAWARE_LOCK_STALE ({stale:g} s) must be more than three "
                             f"times CLONEAWARE_LOCK_REFRESH ({refresh:g} s)")
        return t


def _seconds(var: str, default: float) -> float:
    v = os.environ.get(var)
    if not v:
        return default
    try:
        s = float(v)
    except ValueError:
        s = 0.0
    if not s > 0:
        raise UsageError(f"{var}={v!r}: give a number of seconds above 0")
    return s


class LockedRepository(Protocol):
    """What a lock needs of a repository (repo/repository.py builds on this
    module, so it is not imported here)."""

    backend: Backend
    where: str

    def encode_object(self, kind: int, payload: bytes) -> bytes: ...
    def load_object(self, name: str, kind: int) -> bytes: ...


def _describe(e: Exception) -> str:
    return describe_oserror(e) if isinstance(e, OSError) else str(e)


def _stderr(msg: str) -> None:
    print(f"cloneaware: {msg}", file=sys.stderr)


class Lock:
    """A lock object, held while a command runs (a context manager).

    ``on_lost(error)``: called once, from the lock's monitor thread, when
    the lock is lost.  ``warn``: where to say that the lock could not be
    removed at the end (default: standard error).
    ``retry``: seconds to keep trying while another command holds a lock
    this one cannot share (``--retry-lock``), 0: fail at once."""

    def __init__(self, repo: LockedRepository, exclusive: bool, operation: str,
                 on_lost: Callable[[LockLost], None] | None = None,
                 warn: Callable[[str], None] | None = None, timings: Timings | None = None,
                 retry: float = 0.0):
        self.repo = repo
        self.retry = retry
        self.exclusive = exclusive
        self.operation = operation
        self.on_lost = on_lost
        self.warn = warn or _stderr
        self.timings = timings or Timings.from_env()
        self.name: str | None = None
        self.lost: str | None = None  # why, once lost
        self.last_ok = 0.0  # time.monotonic() at the start of the last successful write
        self.last_error: str | None = None  # of the last failed refresh
        self._old: list[str] = []  # earlier objects of ours that could not be deleted
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._refresher: threading.Thread | None = None

    def _payload(self) -> bytes:
        ns = time.time_ns()
        return rf.encode_json({"time": now_rfc3339(ns), "time_ns": ns,
                               "hostname": socket.gethostname(), "username": crypto.username(),
                               "pid": os.getpid(), "exclusive": self.exclusive,
                               "operation": self.operation})

    def _write(self) -> str:
        name = f"locks/{secrets.token_hex(32)}"
        self.repo.backend.write(name, self.repo.encode_object(rf.K_LOCK, self._payload()),
                                create_only=True)
        return name

    def __enter__(self) -> Lock:
        deadline = time.monotonic() + self.retry
        pause = 1.0
        while True:
            started = time.monotonic()
            try:
                self._take()
                break
            except RepositoryLocked as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if pause == 1.0:  # a note, not a warning: the command's status is not changed
                    _stderr(f"{e}; waiting up to {self.retry:.0f} s (--retry-lock)")
                time.sleep(min(pause, left))
                pause = min(pause * 2, 30.0)
        self.last_ok = started
        self._refresher = threading.Thread(target=self._refresh, daemon=True,
                                           name=f"lock of {self.operation}: refresh")
        self._refresher.start()
        threading.Thread(target=self._monitor, daemon=True,
                         name=f"lock of {self.operation}: monitor").start()
        return self

    def _take(self) -> None:
        """Write our lock, then give it up again (RepositoryLocked) if another
        live one forbids it."""
        self.name = self._write()
        try:
            for other in read_locks(self.repo, self.timings.stale):
                if other.name == self.name or other.stale:
                    continue
                if self.exclusive or other.exclusive:
                    raise RepositoryLocked(
                        f"{self.repo.where}: locked by {other.describe()}; wait for it, or, if "
                        "that process is gone, run cloneaware unlock")
        except BaseException:
            self.repo.backend.delete(self.name)
            self.name = None
            raise

    # -- while held ------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Write a new lock object, then delete the old one; sooner again
        after a failure.  Stops once the lock is released or lost."""
        wait = self.timings.refresh
        while not self._stop.wait(wait) and self.lost is None:
            started = time.monotonic()
            try:
                new = self._write()
            except Exception as e:  # noqa: BLE001 - counted: the monitor acts on it
                with self._mutex:
                    self.last_error = _describe(e)
                wait = self.timings.retry
                continue
            with self._mutex:
                released = self.name is None
                old, self.name = self.name, (None if released else new)
                if not released:
                    self.last_ok = started
                    self.last_error = None
            wait = self.timings.refresh
            if released:  # __exit__ ran meanwhile: this one is ours to remove
                self._say_left(self._delete([new]))
            else:
                self._delete([old, *self._take_old()])

    def _take_old(self) -> list[str]:
        with self._mutex:
            old, self._old = self._old, []
        return old

    def _delete(self, names: list[str | None]) -> list[tuple[str, str]]:
        """Delete our objects; those that fail are kept to try again, and returned."""
        failed = []
        for n in names:
            if n is None:
                continue
            try:
                self.repo.backend.delete(n)
            except Exception as e:  # noqa: BLE001 - tried again, and said at the end
                failed.append((n, _describe(e)))
        with self._mutex:
            self._old += [n for n, _ in failed]
        return failed

    def _monitor(self) -> None:
        """Wake when the lock would be lost, unless a refresh moved that on."""
        while True:
            with self._mutex:
                due = self.last_ok + self.timings.lost_after
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            if self._lose():
                if self.on_lost is not None:
                    self.on_lost(LockLost(self.lost or ""))
                return
            if self.lost is not None:
                return

    def _lose(self) -> bool:
        """Mark the lock lost if it is due; True if this call did."""
        with self._mutex:
            if self.lost is not None or self.name is None:
                return False
            age = time.monotonic() - self.last_ok
            if age < self.timings.lost_after:
                return False
            why = f"; the last try: {self.last_error}" if self.last_error else ""
            self.lost = (f"{self.repo.where}: the lock of {self.operation} could not be "
                         f"refreshed for {age:.0f} s{why}; stopped before another command "
                         "could take it as stale")
            return True

    def check(self) -> None:
        """Raise LockLost if the lock is lost (or due to be): called before
        anything is written or deleted that another command could be
        relying on this lock to protect."""
        self._lose()
        if self.lost is not None:
            raise LockLost(self.lost)

    # -- the end ---------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._refresher is not None:  # a write under way ends first, not killed at exit
            self._refresher.join(EXIT_WAIT)
        with self._mutex:
            name, self.name = self.name, None
        self._say_left(self._delete([name, *self._take_old()]), exc)

    def _say_left(self, failed: list[tuple[str, str]], exc: BaseException | None = None
                  ) -> None:
        """A lock we could not remove goes stale; say so.  When the command
        is failing with an error it reports in one line (its cause is most
        likely the same), as a note on that error, so that it stays one."""
        if not failed:
            return
        if isinstance(exc, (CloneawareError, OSError, KeyboardInterrupt)):
            exc.add_note("its lock was left behind (cloneaware unlock removes it once stale)")
            return
        for n, why in failed:
            self.warn(f"could not remove the lock {self.repo.where}/{n} ({why}); it goes "
                      "stale (cloneaware unlock removes it then)")


@dataclass
class LockInfo:
    name: str
    data: dict
    stale: bool

    @property
    def exclusive(self) -> bool:
        return bool(self.data.get("exclusive"))

    def describe(self) -> str:
        age = max(0, (time.time_ns() - int(self.data.get("time_ns", 0))) // 1_000_000_000)
        kind = "an exclusive" if self.exclusive else "a"
        return (f"{kind} lock of {self.data.get('operation')} by {self.data.get('username')}@"
                f"{self.data.get('hostname')} pid {self.data.get('pid')}, {age} s old")


def read_locks(repo: LockedRepository, stale_after: float | None = None) -> list[LockInfo]:
    """Every lock, each marked stale or live (docs/REPOSITORY.md, "Locks"):
    on this host, by its pid; of another host, by its age."""
    stale_ns = (Timings.from_env().stale if stale_after is None else stale_after) * 1e9
    out = []
    host = socket.gethostname()
    now = time.time_ns()
    for obj in repo.backend.listing("locks"):
        what = f"{repo.where}: {obj.name}"
        try:
            d = rf.check_lock(rf.decode_json(repo.load_object(obj.name, rf.K_LOCK), what), what)
        except RepositoryError:
            if repo.backend.exists(obj.name):
                raise
            continue  # removed while we listed
        if d["hostname"] == host:
            stale = not pid_alive(d["pid"])
        else:
            stale = _stale_elsewhere(d["time_ns"], obj.mtime, now, stale_ns)
        out.append(LockInfo(obj.name, d, stale))
    return out


def _stale_elsewhere(time_ns: int, mtime: float, now: int, stale_ns: float) -> bool:
    """Whether another host's lock is stale: its own time, by the writer's
    clock, and the time the store says it was written (a file's mtime,
    S3's LastModified: the store's clock), both older than the stale age.
    A writer whose clock is behind cannot make its live lock look stale (a
    prune would delete what its backup is writing); one whose clock is far
    ahead (its time beyond the stale age in the future) is judged by the
    store alone."""
    by_store = mtime > 0 and now - mtime * 1e9 > stale_ns
    if time_ns - now > stale_ns:
        return by_store
    return now - time_ns > stale_ns and (by_store or mtime <= 0)


@dataclass
class Unlocked:
    removed: list[LockInfo] = field(default_factory=list)
    kept: list[LockInfo] = field(default_factory=list)


def unlock(repo: LockedRepository, remove_all: bool = False) -> Unlocked:
    """``cloneaware unlock``: remove the stale locks (every lock with
    ``remove_all``); the live ones are kept, and returned to be named."""
    out = Unlocked()
    for lk in read_locks(repo):
        if lk.stale or remove_all:
            repo.backend.delete(lk.name)
            out.removed.append(lk)
        else:
            out.kept.append(lk)
    return out
