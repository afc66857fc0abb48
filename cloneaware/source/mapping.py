"""Map the files of a walk: one native FIEMAP call each, turned into a numpy
extent map, yielded as typed records in walk order."""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from cloneaware import fsinfo, native
from cloneaware.index.flags import EXTENT_DTYPE, FE_UNKNOWN
from cloneaware.source.walk import Node, walk

assert EXTENT_DTYPE.itemsize == native.EXTENT_SIZE

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def open_source(path: bytes) -> int:
    """Open a regular file for reading without following symlinks, without
    blocking on a FIFO swapped in by a race, and without touching atime when
    allowed."""
    try:
        return os.open(path, _OPEN_FLAGS | os.O_NOATIME)
    except PermissionError:
        return os.open(path, _OPEN_FLAGS)


def fiemap(fd: int, path=None) -> np.ndarray:
    """The whole extent map of fd (FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC), as a
    structured array of EXTENT_DTYPE in logical order."""
    return np.frombuffer(native.fiemap(fd, path), dtype=EXTENT_DTYPE).copy()


def seek_map(fd: int, size: int) -> np.ndarray:
    """Extent map from SEEK_DATA/SEEK_HOLE, for filesystems without FIEMAP
    (tmpfs).  Flags UNKNOWN: the file's own data, never shared."""
    rows = []
    pos = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            if e.errno == errno.EINVAL:  # no SEEK_DATA: all data
                rows.append((pos, 0, size - pos, FE_UNKNOWN, 0))
                break
            raise
        h = os.lseek(fd, d, os.SEEK_HOLE)
        rows.append((d, 0, h - d, FE_UNKNOWN, 0))
        pos = h
    return np.array(rows, dtype=EXTENT_DTYPE)


def extent_map(fd: int, size: int, path=None) -> np.ndarray:
    """FIEMAP, or SEEK_DATA/SEEK_HOLE where the filesystem has no FIEMAP."""
    try:
        return fiemap(fd, path)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
            return seek_map(fd, size)
        raise


@dataclass
class FsTable:
    """Small integers for filesystem keys (the index wants ints)."""

    keys: dict[str, int] = field(default_factory=dict)
    infos: list[fsinfo.FsInfo] = field(default_factory=list)

    def number(self, info: fsinfo.FsInfo) -> int:
        n = self.keys.get(info.key)
        if n is None:
            n = self.keys[info.key] = len(self.infos)
            self.infos.append(info)
        return n


@dataclass(slots=True)
class Mapped:
    """A regular file, opened and mapped (``node.st`` is its fstat)."""

    node: Node
    fs: fsinfo.FsInfo
    ext: np.ndarray


@dataclass(slots=True)
class Other:
    """Anything that is not a regular file: directory, symlink, device, ..."""

    node: Node


@dataclass(slots=True)
class Skipped:
    """A path that could not be walked or mapped, and why."""

    path: bytes
    reason: str


Item = Mapped | Other | Skipped


def _fatal_io(e: OSError, path: bytes) -> None:
    """An I/O error on a source (a failing disk) ends the job, naming the file;
    anything else (permission, a file gone) skips it."""
    if e.errno == errno.EIO:
        raise OSError(e.errno, e.strerror, os.fsdecode(path)) from None


def map_tree(paths: list, one_file_system: bool = True, unique_names: bool = True,
             redirect: dict[bytes, bytes] | None = None) -> Iterator[Item]:
    """Walk and map, yielding Mapped, Other and Skipped records in walk order
    (``redirect``: see walk)."""
    errors: list[Skipped] = []

    def on_error(p: bytes, reason: str) -> None:
        errors.append(Skipped(p, reason))

    for node in walk(paths, on_error, one_file_system, unique_names, redirect):
        yield from errors
        errors.clear()
        if not stat.S_ISREG(node.st.st_mode):
            yield Other(node)
            continue
        try:
            fd = open_source(node.src)
        except OSError as e:
            _fatal_io(e, node.src)
            yield Skipped(node.src, e.strerror or str(e))
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                yield Skipped(node.src, "replaced while scanning")
                continue
            info = fsinfo.fs_info(fd, st.st_dev, node.src)
            ext = extent_map(fd, st.st_size, node.src)
            node.st = st
            yield Mapped(node, info, ext)
        except OSError as e:
            _fatal_io(e, node.src)
            yield Skipped(node.src, e.strerror or str(e))
        finally:
            os.close(fd)
    yield from errors
