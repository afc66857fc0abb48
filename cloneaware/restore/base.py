"""The base of a thin restore: found and checked before anything is written,
and the bytes cloned from it (or from a sparse file) hashed after the clone
(clone, then verify: a base written concurrently cannot slip wrong bytes in)."""
from __future__ import annotations

import os
import stat
from collections.abc import Callable

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.errors import BaseMismatch, UsageError
from cloneaware.safeio import open_beneath, sha256_range


def open_base(base: thin.Base, given: str | None,
              opener: Callable[[str], int] | None = None) -> dict[int, int]:
    """Descriptors of every base file the archive references, by number,
    each checked to be a regular file of the size it had at backup time.
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
        bfd = opener(given) if opener is not None else os.open(given,
                                                                os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise BaseMismatch(f"base {given}: {e.strerror} (the archive needs {need!r})") from None
    fds: dict[int, int] = {}
    try:
        is_dir = stat.S_ISDIR(os.fstat(bfd).st_mode)
        if is_dir != (base.kind == thin.BASE_DIR):
            raise BaseMismatch(f"base {given} should be a "
                               f"{'directory' if base.kind == thin.BASE_DIR else 'file'}, "
                               f"like {need!r} was at backup time")
        for bf in base.files:
            where = os.path.join(given, os.fsdecode(bf.path)) if bf.path else given
            try:
                fd = open_beneath(bfd, fmt.check_path(bf.path), os.O_RDONLY | os.O_CLOEXEC) \
                    if bf.path else os.dup(bfd)
            except OSError as e:
                raise BaseMismatch(f"base file {where} is needed: {e.strerror}") from None
            fds[bf.number] = fd
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BaseMismatch(f"base file {where} is not a regular file")
            if st.st_size != bf.size:
                raise BaseMismatch(f"base file {where} has {st.st_size} bytes; the backup "
                                   f"was made against {bf.size} bytes")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        os.close(bfd)
    return fds


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
