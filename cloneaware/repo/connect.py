"""Open a repository from its URL: a directory, ssh://... (through
``cloneaware serve``) or s3://... (boto3).  ``open_backend`` is apart from
repo/backend.py so that the local backend, which the ssh and S3 backends
build on, does not import them back; ``opened`` is what every command on a
repository does around its work (open, lock, close), written once as
Borg's ``with_repository`` is; ``create`` is ``cloneaware init``."""
from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cloneaware.errors import LockLost, UsageError
from cloneaware.repo import crypto
from cloneaware.repo import format as rf
from cloneaware.repo.backend import Backend, LocalBackend
from cloneaware.repo.keys import Password
from cloneaware.repo.repository import Repository

LOCKS = (None, "shared", "exclusive")


def open_backend(url: str, rsh: str | None = None, s3: dict | None = None,
                 create: bool = False) -> Backend:
    """The backend for a repository URL: a path, ssh://..., or s3://..."""
    if not url:
        raise UsageError("no repository given: use -r REPO or set CLONEAWARE_REPOSITORY")
    if url.startswith("ssh://"):
        from cloneaware.repo.sshbackend import SshBackend  # only for ssh:// repositories

        return SshBackend(url, rsh, create=create)
    if url.startswith("s3://"):
        from cloneaware.repo.s3backend import S3Backend  # only for s3://: boto3 is optional

        return S3Backend(url, **(s3 or {}))
    if not create:
        try:
            st = os.stat(url)
        except FileNotFoundError:
            raise UsageError(f"{url}: no such repository (make one with cloneaware init)") \
                from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{url} is not a repository directory")
    return LocalBackend(url)


def create(url: str, password: bytes | None = None, rsh: str | None = None,
           s3_endpoint: str | None = None, grid: int = rf.GRID_DEFAULT,
           pack_size: int = rf.PACK_SIZE_DEFAULT, kdf_n: int = crypto.KDF_N,
           lock: tuple[int, str] | None = None) -> rf.Config:
    """Make a new, empty repository at ``url`` (its directory or bucket prefix
    must be empty), encrypted when a ``password`` is given, and close it
    again: its config (``.id`` names it)."""
    backend = open_backend(url, rsh=rsh, s3={"endpoint": s3_endpoint}, create=True)
    try:
        return Repository.init(backend, password, grid=grid, pack_size=pack_size,
                               kdf_n=kdf_n, lock=lock).config
    finally:
        backend.close()


@contextmanager
def opened(url: str | None, password_file: str | None = None, rsh: str | None = None,
           s3_endpoint: str | None = None, connections: int = 4, lock: str | None = None,
           operation: str = "", on_lost: Callable[[LockLost], None] | None = None,
           warn: Callable[[str], None] | None = None,
           retry_lock: float = 0.0) -> Iterator[Repository]:
    """The repository at ``url``, opened with the password from
    ``password_file`` (keys.Password), held under a ``lock`` ("shared",
    "exclusive" or None) for ``operation``, and closed at the end whatever
    happens.  ``on_lost``, ``warn`` and ``retry_lock`` (seconds to wait for a
    lock another command holds) go to the lock (lock.Lock)."""
    if lock not in LOCKS:
        raise ValueError(f"lock={lock!r}: one of {LOCKS}")
    if not url:
        raise UsageError("no repository: give -r REPO or set CLONEAWARE_REPOSITORY")
    backend = open_backend(url, rsh=rsh, s3={"endpoint": s3_endpoint,
                                             "connections": connections})
    try:
        repo = Repository.open(backend, Password(password_file), warn)
    except BaseException:
        backend.close()
        raise
    if warn is not None:
        repo.warn = warn
    try:
        if lock is None:
            yield repo
        else:
            with repo.lock(lock == "exclusive", operation, on_lost, warn, retry=retry_lock):
                yield repo
    finally:
        repo.close()
