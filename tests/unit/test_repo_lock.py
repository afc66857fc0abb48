"""Locks (repo/lock.py) on a repository in a temporary directory: shared
and exclusive locks against each other, stale locks (by pid on this host,
by age from another), and ``unlock``."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from cloneaware.errors import RepositoryLocked
from cloneaware.repo import format as rf
from cloneaware.repo.backend import LocalBackend
from cloneaware.repo.lock import read_locks, unlock
from cloneaware.repo.repository import Repository


@pytest.fixture
def repo(tmp_path):
    r = Repository.init(LocalBackend(str(tmp_path / "repo")))
    yield r
    r.close()


def locks(repo: Repository) -> list[str]:
    return sorted(o.name for o in repo.backend.listing("locks"))


def put_lock(repo: Repository, name: str, host: str, pid: int, age_s: float,
             exclusive: bool = True) -> None:
    """A lock object as another command would have written it."""
    ns = time.time_ns() - int(age_s * 1e9)
    repo.backend.write(name, repo.encode_object(rf.K_LOCK, json.dumps({
        "time": "x", "time_ns": ns, "hostname": host, "username": "u", "pid": pid,
        "exclusive": exclusive, "operation": "prune"}).encode()))


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
    with pytest.raises(RepositoryLocked, match="exclusive lock of prune by u@elsewhere"):
        with repo.lock(False, "backup"):
            pass
    res = unlock(repo)
    assert sorted(lk.name[6:7] for lk in res.removed) == ["a", "b"]
    assert sorted(lk.name[6:7] for lk in res.kept) == ["c", "d"]
    assert locks(repo) == [f"locks/{'c' * 64}", f"locks/{'d' * 64}"]
    res = unlock(repo, remove_all=True)
    assert len(res.removed) == 2 and res.kept == [] and locks(repo) == []
