"""restore/tree.py FdCache: the LRU of descriptors every bounded holder of
a restore uses (docs/DESIGN.md, "descriptors").  Real descriptors; no root."""
from __future__ import annotations

import errno
import fcntl
import os

import pytest

from cloneaware.restore.tree import FdCache


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


@pytest.fixture
def new_fd():
    """Descriptors of /dev/null at high numbers (the lowest free from 900:
    never one in use, which dup2 would close) that no other open reuses
    while a test looks; those left open closed after it."""
    made: list[int] = []

    def make() -> int:
        lo = os.open(os.devnull, os.O_RDONLY)
        try:
            made.append(fcntl.fcntl(lo, fcntl.F_DUPFD_CLOEXEC, 900))
        finally:
            os.close(lo)
        return made[-1]

    yield make
    for fd in made:
        if _is_open(fd):
            os.close(fd)


def test_the_least_recently_used_is_closed_past_the_cap(new_fd):
    c = FdCache(2)
    a, b, d = new_fd(), new_fd(), new_fd()
    c.put("a", a)
    c.put("b", b)
    assert c.get("a") == a  # now the most recent
    c.put("d", d)
    assert not _is_open(b) and c.get("b") is None
    assert _is_open(a) and _is_open(d)
    c.close()
    assert not _is_open(a) and not _is_open(d)


def test_a_key_put_again_closes_the_descriptor_it_had(new_fd):
    c = FdCache(4)
    old, new = new_fd(), new_fd()
    c.put("k", old)
    c.put("k", new)
    assert not _is_open(old), "the first descriptor would be lost open"
    assert c.get("k") == new and _is_open(new)
    c.put("k", new)  # the same one again: kept
    assert _is_open(new)
    c.close()
