"""Locks (docs/REPOSITORY.md, "Locks"): one object in ``locks/`` per running
command, shared or exclusive, refreshed while the command runs; which locks
are stale; ``cloneaware unlock``."""
from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from cloneaware.errors import RepositoryError, RepositoryLocked
from cloneaware.repo import crypto
from cloneaware.repo import format as rf
from cloneaware.repo.backend import Backend
from cloneaware.repo.snapshots import now_rfc3339
from cloneaware.safeio import pid_alive

STALE_AFTER = 30 * 60  # seconds: a lock of another host older than this is stale
REFRESH_EVERY = 5 * 60


class LockedRepository(Protocol):
    """What a lock needs of a repository (repo/repository.py builds on this
    module, so it is not imported here)."""

    backend: Backend
    where: str

    def encode_object(self, kind: int, payload: bytes) -> bytes: ...
    def load_object(self, name: str, kind: int) -> bytes: ...


class Lock:
    """A lock object, held while a command runs (a context manager)."""

    def __init__(self, repo: LockedRepository, exclusive: bool, operation: str):
        self.repo = repo
        self.exclusive = exclusive
        self.operation = operation
        self.name: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

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
        self.name = self._write()
        try:
            for other in read_locks(self.repo):
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
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                with self._mutex:
                    if self.name is None:
                        return
                    new = self._write()
                    old, self.name = self.name, new
                self.repo.backend.delete(old)
            except Exception:  # noqa: BLE001 - a failed refresh is retried next time
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self._mutex:
            name, self.name = self.name, None
        if name is not None:
            try:
                self.repo.backend.delete(name)
            except Exception:  # noqa: BLE001 - a lock left behind goes stale
                pass


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


def read_locks(repo: LockedRepository) -> list[LockInfo]:
    """Every lock, each marked stale or live (docs/REPOSITORY.md, "Locks")."""
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
            stale = now - d["time_ns"] > STALE_AFTER * 1_000_000_000
        out.append(LockInfo(obj.name, d, stale))
    return out


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
