"""The base of a thin restore: found and checked before anything is written,
and the bytes cloned from it (or from a sparse file) hashed after the clone
(clone, then verify: a base written concurrently cannot slip wrong bytes in)."""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.errors import BaseMismatch, UsageError
from cloneaware.restore.tree import FdCache
from cloneaware.safeio import open_beneath, sha256_range

#: errors opening a base file that say nothing about the base
_NOT_THE_BASE = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO}


class BaseFiles:
    """The base files of a thin archive, each checked once to be a regular
    file of the size it had at backup time, then opened as the restore
    clones from them: the last used kept open (KEEP), the others opened
    again beneath the base, and refused if they are no longer the file
    checked (its device, inode and ctime: a base file renamed, deleted or
    written during the restore fails the files that need it then).  Opened
    all at once and kept, a base directory of more than ~1,000 files
    stopped the restore at the descriptors a process may hold (said as a
    base file missing)."""

    KEEP = 64

    def __init__(self, base: thin.Base, given: str, root: int):
        self.given = given
        self.root = root  # the base given (a directory, or the one base file)
        self.files = {bf.number: bf for bf in base.files}
        #: number -> (st_dev, st_ino, st_ctime_ns) when checked
        self.ids: dict[int, tuple[int, int, int]] = {}
        self.open = FdCache(self.KEEP)

    def _where(self, bf: thin.BaseFile) -> str:
        return os.path.join(self.given, os.fsdecode(bf.path)) if bf.path else self.given

    def _open(self, bf: thin.BaseFile) -> int:
        try:
            # O_NONBLOCK: a FIFO put in a base file's place is refused, not waited on
            fd = open_beneath(self.root, fmt.check_path(bf.path),
                              os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK) \
                if bf.path else os.dup(self.root)
        except OSError as e:
            if e.errno in _NOT_THE_BASE:  # this process's trouble, not the base's: exit 4
                raise OSError(e.errno, e.strerror, self._where(bf)) from None
            raise BaseMismatch(f"base file {self._where(bf)} is needed: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BaseMismatch(f"base file {self._where(bf)} is not a regular file")
            if st.st_size != bf.size:
                raise BaseMismatch(f"base file {self._where(bf)} has {st.st_size} bytes; the "
                                   f"backup was made against {bf.size} bytes")
            now = (st.st_dev, st.st_ino, st.st_ctime_ns)
            if self.ids.setdefault(bf.number, now) != now:  # (ctime: an inode number reused)
                raise BaseMismatch(f"base file {self._where(bf)} was changed or replaced "
                                   "during the restore")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check(self) -> None:
        """Every base file there, regular, of its size (once, before
        anything is written)."""
        for bf in self.files.values():
            self.open.put(bf.number, self._open(bf))

    def fd(self, number: int) -> int:
        """A descriptor of base file ``number``, for the caller's use now."""
        fd = self.open.get(number)
        if fd is None:
            fd = self._open(self.files[number])
            self.open.put(number, fd)
        return fd

    def close(self) -> None:
        try:
            self.open.close()
        finally:
            if self.root >= 0:
                os.close(self.root)
                self.root = -1


def open_base(base: thin.Base, given: str | None,
              opener: Callable[[str], int] | None = None) -> BaseFiles:
    """The base files the archive references (BaseFiles), each checked.
    ``given``: where the user says the base is (--base); ``opener``: how to
    open it (``cloneaware serve`` opens it beneath its allowed root without
    following symlinks); the files below a directory base are opened
    beneath it the same way."""
    need = os.fsdecode(base.path)
    if given is None:
        raise BaseMismatch(f"this is a thin backup made against the base {need!r}; "
                           "restore it with --base PATH")
    if not given:
        raise UsageError("an empty path was given as --base")
    try:
        bfd = opener(given) if opener is not None else \
            os.open(given, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO: not waited on
    except OSError as e:
        raise BaseMismatch(f"base {given}: {e.strerror} (the archive needs {need!r})") from None
    files = BaseFiles(base, given, bfd)
    try:
        is_dir = stat.S_ISDIR(os.fstat(bfd).st_mode)
        if is_dir != (base.kind == thin.BASE_DIR):
            raise BaseMismatch(f"base {given} should be a "
                               f"{'directory' if base.kind == thin.BASE_DIR else 'file'}, "
                               f"like {need!r} was at backup time")
        files.check()
    except BaseException:
        files.close()
        raise
    return files


def verify_ranges(fd: int, ranges: list[tuple[int, int, bytes]], where: str) -> int:
    """Hash each (offset, length, sha256) range now in fd; BaseMismatch on the
    first that differs.  Returns the bytes verified."""
    n = 0
    for off, length, sha in ranges:
        n += length
        if sha256_range(fd, off, length) != sha:
            raise BaseMismatch(
                f"{where}: bytes {off}-{off + length} differ from the backup "
                "(the base or the sparse file changed since); the file was not restored")
    return n
