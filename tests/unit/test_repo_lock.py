"""Locks (repo/lock.py) on a repository in a temporary directory: shared
and exclusive locks against each other, stale locks (by pid on this host,
by age from another), ``unlock``, and the refresh: a lock whose writes keep
failing is lost (check raises LockLost, on_lost is called) before another
host could take it as stale, and a lock whose writes succeed, or fail only
for a while, is not.  The lock's backend is wrapped so that its writes of
lock objects fail on demand: the lock's logic is what is tested."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from cloneaware.errors import LockLost, RepositoryError, RepositoryLocked, UsageError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import LocalBackend
from cloneaware.repo.lock import Lock, Timings, read_locks, unlock
from cloneaware.repo.packer import Packer
from cloneaware.repo.repository import Repository


class FlakyBackend:
    """A LocalBackend whose writes and deletes of locks/ fail (EPERM, as in
    a directory made immutable) while ``failing`` is set; counts the
    writes tried."""

    def __init__(self, inner: LocalBackend):
        self.inner = inner
        self.failing = False
        self.lock_writes = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, name: str, data, create_only: bool = False) -> None:
        if name.startswith("locks/"):
            self.lock_writes += 1
            if self.failing:
                raise OSError(errno.EPERM, os.strerror(errno.EPERM), name)
        self.inner.write(name, data, create_only)

    def delete(self, name: str) -> None:
        if name.startswith("locks/") and self.failing:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), name)
        self.inner.delete(name)


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    Repository.init(LocalBackend(path)).close()
    r = Repository.open(FlakyBackend(LocalBackend(path)))  # type: ignore[arg-type]
    yield r
    r.backend.failing = False
    r.close()


def locks(repo: Repository) -> list[str]:
    return sorted(o.name for o in repo.backend.listing("locks"))


def put_lock(repo: Repository, name: str, host: str, pid: int, age_s: float,
             exclusive: bool = True) -> None:
    """A lock object as another command would have written it ``age_s`` ago:
    its time, and the file's mtime (the store's clock: repo/lock.py)."""
    ns = time.time_ns() - int(age_s * 1e9)
    repo.backend.write(name, repo.encode_object(rf.K_LOCK, json.dumps({
        "time": "x", "time_ns": ns, "hostname": host, "username": "u", "pid": pid,
        "exclusive": exclusive, "operation": "prune"}).encode()))
    os.utime(os.path.join(repo.backend.path, name), ns=(ns, ns))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --- shared and exclusive -----------------------------------------------------------------

def test_shared_locks_go_together(repo):
    with repo.lock(False, "backup"), repo.lock(False, "restore"):
        assert len(locks(repo)) == 2
    assert locks(repo) == []


@pytest.mark.parametrize("first,second", [(True, False), (False, True), (True, True)])
def test_an_exclusive_lock_goes_with_no_other(repo, first, second):
    with repo.lock(first, "one"):
        mine = locks(repo)
        with pytest.raises(RepositoryLocked, match="locked by .* lock of one by .* pid "
                                                   f"{os.getpid()}"):
            with repo.lock(second, "two"):
                pass
        assert locks(repo) == mine  # the refused one removed its own object
    assert locks(repo) == []


def test_stale_locks_are_ignored_and_unlock_removes_only_them(repo):
    here, me = socket.gethostname(), os.getpid()
    put_lock(repo, f"locks/{'a' * 64}", here, dead_pid(), 0)  # gone from this host
    put_lock(repo, f"locks/{'b' * 64}", "elsewhere", 1, 3600)  # old, of another host
    put_lock(repo, f"locks/{'c' * 64}", "elsewhere", 1, 60)  # young, of another host
    put_lock(repo, f"locks/{'d' * 64}", here, me, 3600, exclusive=False)  # ours: live
    stale = {lk.name[6:7]: lk.stale for lk in read_locks(repo)}
    assert stale == {"a": True, "b": True, "c": False, "d": False}
    assert {lk.name[6:7]: lk.stale for lk in read_locks(repo, stale_after=30)}["c"]
    with pytest.raises(RepositoryLocked, match="exclusive lock of prune by u@elsewhere"):
        with repo.lock(False, "backup"):
            pass
    res = unlock(repo)
    assert sorted(lk.name[6:7] for lk in res.removed) == ["a", "b"]
    assert sorted(lk.name[6:7] for lk in res.kept) == ["c", "d"]
    assert locks(repo) == [f"locks/{'c' * 64}", f"locks/{'d' * 64}"]
    res = unlock(repo, remove_all=True)
    assert len(res.removed) == 2 and res.kept == [] and locks(repo) == []


# --- refresh, and a lock lost ------------------------------------------------------------

#: lost after 1 s without a write, half a second before it would be stale; a
#: write slowed by a busy machine fits in the margins of the tests below
FAST = Timings(refresh=0.25, stale=1.5, retry=0.02)
STEADY = Timings(refresh=0.05, stale=2.0, retry=0.01)  # lost after 1.9 s


def held(repo: Repository, timings: Timings = FAST, **kw) -> Lock:
    return repo.lock(False, "backup", timings=timings, **kw)


def test_a_refreshed_lock_is_rewritten_and_never_lost(repo):
    lost = []
    with held(repo, timings=STEADY, on_lost=lost.append) as lk:
        first = locks(repo)
        time.sleep(1.5 * STEADY.lost_after)
        repo.check_lock()
        assert not lost and lk.lost is None
        assert repo.backend.lock_writes >= 10  # refreshed, not merely never checked
        now = locks(repo)
        assert len(now) == 1 and now != first  # the new one written, the old one deleted
    assert locks(repo) == []


def test_a_lock_whose_writes_keep_failing_is_lost_before_it_could_go_stale(repo):
    called = threading.Event()
    got: list[LockLost] = []

    def on_lost(e: LockLost) -> None:
        got.append(e)
        called.set()

    with held(repo, on_lost=on_lost) as lk:
        repo.backend.failing = True
        failed_from = time.monotonic()
        repo.check_lock()  # within the margin: still held
        assert called.wait(10), "on_lost was not called"
        lost_at = time.monotonic()
        assert lost_at - lk.last_ok >= FAST.lost_after
        assert lost_at - failed_from < FAST.stale  # before another host could take it
        assert len(got) == 1 and "could not be refreshed" in str(got[0])
        assert "Operation not permitted" in str(got[0])
        with pytest.raises(LockLost, match=r"the lock of backup could not be refreshed for "
                                           r"\d+ s.*stopped before another command"):
            repo.check_lock()
        tries = repo.backend.lock_writes
    assert tries >= 10  # retried every `retry`, not every `refresh`
    assert len(got) == 1  # once


def test_check_raises_when_due_even_before_the_monitor_wakes(repo):
    lk = held(repo, timings=Timings(refresh=60, stale=200, retry=30))
    with lk:
        lk.last_ok -= 81  # as if no write had succeeded for 81 s: lost after 80
        with pytest.raises(LockLost):
            lk.check()


def test_failures_shorter_than_the_margin_lose_nothing(repo):
    lost = []
    with held(repo, timings=STEADY, on_lost=lost.append) as lk:
        repo.backend.failing = True
        time.sleep(0.5)
        assert lk.last_error is not None  # it did fail meanwhile
        repo.backend.failing = False
        time.sleep(STEADY.lost_after)  # past the time it would have been lost
        repo.check_lock()
        assert not lost and lk.lost is None and lk.last_error is None
        assert time.monotonic() - lk.last_ok < STEADY.lost_after


def test_nothing_is_written_once_the_lock_is_lost(repo):
    from cloneaware.repo.snapshots import now_rfc3339

    with held(repo) as lk:
        lk.last_ok -= 10
        p = Packer(repo)
        p.add(b"\x01" * 32, rf.T_DATA, 3, b"abc")
        with pytest.raises(LockLost):
            p.flush()
        p.close()
        with pytest.raises(LockLost):
            repo.write_index([])
        with pytest.raises(LockLost):
            repo.save_snapshot({"time": now_rfc3339(), "time_ns": 1, "hostname": "h",
                                "username": "u", "paths": [], "tags": [], "manifest": [],
                                "manifest_bytes": 0, "parent": None, "program": "t",
                                "summary": {}})
    assert [o.name for d in ("data", "index", "snapshots")
            for o in repo.backend.listing(d)] == []


def test_a_lock_left_behind_is_said(repo):
    said: list[str] = []
    with held(repo, warn=said.append):
        name = locks(repo)[0]
        repo.backend.failing = True
    assert len(said) == 1 and name in said[0] and "goes stale" in said[0]
    repo.backend.failing = False
    assert locks(repo) == [name]


def test_a_lock_left_behind_by_a_failing_command_is_a_note_on_its_error(repo):
    """The error is the one line a user sees: the lock is said there."""
    said: list[str] = []
    with pytest.raises(RepositoryError, match="the command failed") as failed:
        with held(repo, warn=said.append):
            repo.backend.failing = True
            raise RepositoryError("the command failed")
    assert said == []
    assert failed.value.__notes__ == ["its lock was left behind (cloneaware unlock removes "
                                      "it once stale)"]


# --- timings from the environment ------------------------------------------------------------

def test_timings_from_the_environment(monkeypatch):
    monkeypatch.delenv("CLONEAWARE_LOCK_REFRESH", raising=False)
    monkeypatch.delenv("CLONEAWARE_LOCK_STALE", raising=False)
    t = Timings.from_env()
    assert (t.refresh, t.stale, t.retry, t.lost_after) == (300, 1800, 30, 1200)
    monkeypatch.setenv("CLONEAWARE_LOCK_REFRESH", "0.5")
    monkeypatch.setenv("CLONEAWARE_LOCK_STALE", "4")
    t = Timings.from_env()
    assert (t.refresh, t.stale, t.retry, t.lost_after) == (0.5, 4, 0.5, 3)
    monkeypatch.setenv("CLONEAWARE_LOCK_STALE", "1.5")
    with pytest.raises(UsageError, match="more than three times"):
        Timings.from_env()
    monkeypatch.setenv("CLONEAWARE_LOCK_STALE", "soon")
    with pytest.raises(UsageError, match="CLONEAWARE_LOCK_STALE='soon'"):
        Timings.from_env()
