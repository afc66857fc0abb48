"""What a restore that fails leaves, and how a retry goes on over it
(issue 21, defect 5).

A restore that fails (a damaged or truncated archive, a full disk, a wrong
base, SIGINT or SIGTERM) keeps the files it had completed under their names
(restore/durable.py, restore/fresh.py), and its directories without their
final metadata; one killed outright (SIGKILL) keeps what it had named by its
last batch, and its new directories not yet named are removed by the next
run.  While it runs, ``DEST/.cloneaware-partial`` lists the
top-level entries it has made; it is removed when the restore finishes.  A
later restore into the same DEST goes on over the entries listed there as
``--force`` would (merging into the directories, replacing the files); any
other existing entry is still refused without ``--force``.

The list's space is allocated when it is made, before anything else is
written, so that it can still be updated when the disk has filled up: it is
JSON padded with spaces to that size."""
from __future__ import annotations

import base64
import json
import os

NAME = b".cloneaware-partial"
SIZE = 64 << 10  # allocated at the start; the list grows past it if it must
LIMIT = 16 << 20


def read(root_fd: int | None = None, dest: str | None = None) -> set[bytes]:
    """The top-level names a failed restore into DEST left (by DEST's
    descriptor, or its path); empty if none, or if the list is unreadable."""
    try:
        if root_fd is not None:
            fd = os.open(NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        else:
            assert dest is not None
            fd = os.open(os.path.join(os.fsencode(dest), NAME),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return set()
    try:
        with os.fdopen(fd, "rb") as f:
            d = json.loads(f.read(LIMIT))
        return {base64.b64decode(n) for n in d["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


class Partial:
    """The list of a running restore (best effort throughout: it only lets a
    plain retry go on)."""

    def __init__(self, root_fd: int, names: set[bytes]):
        self.root = root_fd
        self.names = set(names)
        self.fd: int | None = None
        try:
            self.fd = os.open(NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=root_fd)
            os.posix_fallocate(self.fd, 0, SIZE)
        except OSError:
            pass
        self._write()

    def _write(self) -> None:
        if self.fd is None:
            return
        body = json.dumps({"cloneaware_partial": 1, "entries": sorted(
            base64.b64encode(n).decode() for n in self.names)}).encode()
        try:
            size = os.fstat(self.fd).st_size
            os.pwrite(self.fd, body.ljust(size, b" "), 0)
            if len(body) < size:
                os.ftruncate(self.fd, max(len(body), SIZE))
        except OSError:
            pass

    def add(self, name: bytes) -> None:
        if name not in self.names:
            self.names.add(name)
            self._write()

    def keep(self, names: set[bytes]) -> None:
        """The run ended (failed: what exists of what it made; finished: the
        leftovers it did not go over): only these stay listed."""
        self.names = set(names)
        if self.names:
            self._write()
            self.close()
            return
        self.close()
        try:
            os.unlink(NAME, dir_fd=self.root)
        except OSError:
            pass

    done = keep

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
