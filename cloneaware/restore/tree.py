"""Directory descriptors of a restore: every directory below DEST is reached
from DEST's descriptor one component at a time with O_NOFOLLOW, never by
joining path strings, so neither a hostile archive nor a symlink already in
DEST can lead a restore outside DEST."""
from __future__ import annotations

import collections
import errno
import os
import re
import secrets
from collections.abc import Callable

from cloneaware.errors import ArchiveError
from cloneaware.safeio import DIR_FLAGS, pid_alive, remove_tree

#: the temporary names temp_name makes, and nothing else
TEMP_NAME = re.compile(rb"\.cloneaware-[0-9]+-[0-9a-f]{8}\.tmp\Z")
#: the temporary names of new directories (restore/fresh.py), with the
#: PID of the run that made them
TEMP_DIR = re.compile(rb"\.cloneaware-dir-(\d+)-[0-9a-f]{8}\Z")


def temp_dir_name() -> bytes:
    """The temporary name of a new directory (restore/fresh.py)."""
    return b".cloneaware-dir-%d-%s" % (os.getpid(), secrets.token_hex(4).encode())


def temp_name(eid: int) -> bytes:
    """The temporary name of entry ``eid`` while it is being restored."""
    return b".cloneaware-%d-%s.tmp" % (eid, secrets.token_hex(4).encode())


class FdCache:
    """A small LRU of open descriptors, closed on eviction."""

    def __init__(self, cap: int):
        self.cap = cap
        self.d: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        fd = self.d.get(key)
        if fd is not None:
            self.d.move_to_end(key)
        return fd

    def put(self, key, fd: int) -> None:
        old = self.d.get(key)
        if old is not None and old != fd:  # replaced: the old one would be lost open
            os.close(old)
        self.d[key] = fd
        self.d.move_to_end(key)
        while len(self.d) > self.cap:
            _, old = self.d.popitem(last=False)
            os.close(old)

    def close(self) -> None:
        while self.d:
            os.close(self.d.popitem()[1])


class Tree:
    """Descriptors of DEST's directories, by archive path of the directory."""

    def __init__(self, dest: str):
        self.dest = dest  # for messages
        self.root: int | None = None  # DEST's descriptor, once opened
        self.dirs = FdCache(64)
        #: directory path -> its name on disk while it has a temporary one
        #: (restore/fresh.py)
        self.alias: dict[bytes, bytes] = {}

    def where(self, path: bytes) -> str:
        """The user's name of an archive path below DEST."""
        return os.path.join(self.dest, os.fsdecode(path))

    def dir(self, parent: bytes) -> int:
        """A descriptor for a directory of the restore (b'' is DEST itself)."""
        assert self.root is not None
        if not parent:
            return self.root
        fd = self.dirs.get(parent)
        if fd is not None:
            return fd
        # Start from the deepest cached ancestor: a deep tree costs one open
        # per new directory, not one per component per entry.
        up, _, comps = parent.rpartition(b"/")
        rest = [comps]
        while up and self.dirs.get(up) is None:
            up, _, c = up.rpartition(b"/")
            rest.append(c)
        cur = self.dirs.get(up) if up else self.root
        # Every directory opened on the way is cached too: restoring directory
        # metadata deepest first then finds each parent among them.
        prefix = up
        for comp in reversed(rest):
            prefix = prefix + b"/" + comp if prefix else comp
            try:
                nfd = os.open(self.alias.get(prefix, comp) if self.alias else comp,
                              DIR_FLAGS, dir_fd=cur)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ArchiveError(f"{os.fsdecode(parent)}: a component is not a directory "
                                       "(symlink?); refusing to follow it") from None
                raise OSError(e.errno, e.strerror, self.where(parent)) from None
            self.dirs.put(prefix, nfd)
            cur = nfd
        return cur

    def close(self) -> None:
        self.dirs.close()


def remove_stale_temps(dfd: int, where: str, warn: Callable[[str], None]) -> None:
    """--force into an existing directory: remove the temporary files a
    restore that crashed or lost its filesystem left there (names only
    temp_name makes; none can be a user's file), and the new directories
    of a restore that is gone (temp_dir_name; restore/fresh.py), and say
    so."""
    n = 0
    for entry in os.scandir(dfd):
        name = os.fsencode(entry.name)
        if TEMP_NAME.match(name) and entry.is_file(follow_symlinks=False):
            os.unlink(name, dir_fd=dfd)
            n += 1
        elif stale_dir(name) and entry.is_dir(follow_symlinks=False):
            remove_tree(dfd, name)
            n += 1
    if n:
        warn(f"{where}: removed {n} temporary file{'s' if n > 1 else ''} "
             "left by an interrupted restore")


def stale_dir(name: bytes) -> bool:
    """Whether ``name`` is a new directory of a restore no longer running."""
    m = TEMP_DIR.match(name)
    return m is not None and not pid_alive(int(m.group(1)))
