"""Map files (one native FIEMAP call each) and index the sharing of a set.

``scan`` is the first thing a user runs: what a tree really occupies and how
much of it is shared.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

import numpy as np

from cloneaware import extents, ioctl, probe
from cloneaware.walk import Node, walk

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


def open_source(path: bytes) -> int:
    """Open a regular file for reading without following symlinks, without
    blocking on a FIFO swapped in by a race, and without touching atime when
    allowed."""
    try:
        return os.open(path, _OPEN_FLAGS | os.O_NOATIME)
    except PermissionError:
        return os.open(path, _OPEN_FLAGS)


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
                rows.append((pos, 0, size - pos, extents.FE_UNKNOWN, 0))
                break
            raise
        h = os.lseek(fd, d, os.SEEK_HOLE)
        rows.append((d, 0, h - d, extents.FE_UNKNOWN, 0))
        pos = h
    return np.array(rows, dtype=extents.EXTENT_DTYPE)


def extent_map(fd: int, size: int, path=None) -> np.ndarray:
    try:
        return ioctl.fiemap(fd, path)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
            return seek_map(fd, size)
        raise


@dataclass
class FsTable:
    """Small integers for filesystem keys (the index wants ints)."""

    keys: dict[str, int] = field(default_factory=dict)
    infos: list[probe.FsInfo] = field(default_factory=list)

    def number(self, info: probe.FsInfo) -> int:
        n = self.keys.get(info.key)
        if n is None:
            n = self.keys[info.key] = len(self.infos)
            self.infos.append(info)
        return n


@dataclass
class Mapped:
    node: Node
    fs: int
    ext: np.ndarray


@dataclass
class ScanResult:
    plan: extents.Plan
    files: list[Node]
    skipped: list[tuple[bytes, str]]
    filesystems: list[probe.FsInfo]

    def to_json(self, families: int = 0) -> dict:
        t = self.plan.totals.as_dict()
        phys = t["physical_bytes"]
        out = {
            "totals": t,
            "saving": (t["logical_bytes"] / phys) if phys else None,
            "skipped": [{"path": os.fsdecode(p), "reason": r} for p, r in self.skipped],
            "filesystems": [{"key": i.key, "type": i.type, "block_size": i.block_size}
                            for i in self.filesystems],
        }
        if families:
            out["families"] = [self.family_info(f) for f in self.plan.families()[:families]]
        return out

    def family_info(self, fam: np.ndarray) -> dict:
        p = self.plan.pieces
        inside = np.isin(p["file"], fam)
        own = inside & ((p["ref_file"] < 0) | (p["check"] == extents.CHECK_CANDIDATE))
        return {
            "files": len(fam),
            "logical_bytes": int(self.plan.sizes[fam].sum()),
            "stored_bytes": int(p["length"][own].sum()),
            "first": os.fsdecode(self.files[int(fam[0])].name),
        }


def map_tree(paths: list, one_file_system: bool = True, unique_names: bool = True):
    """Walk and map.  Yields ('file', Node, fs, ext), ('other', Node) and
    ('skip', path, reason) in walk order."""
    errors: list[tuple[bytes, str]] = []

    def on_error(p: bytes, reason: str) -> None:
        errors.append((p, reason))

    for node in walk(paths, on_error, one_file_system, unique_names):
        while errors:
            yield ("skip",) + errors.pop(0)
        if not stat.S_ISREG(node.st.st_mode):
            yield ("other", node)
            continue
        try:
            fd = open_source(node.src)
        except OSError as e:
            yield ("skip", node.src, e.strerror or str(e))
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                yield ("skip", node.src, "replaced while scanning")
                continue
            info = probe.fs_info(fd, st.st_dev, node.src)
            ext = extent_map(fd, st.st_size, node.src)
            node.st = st
            yield ("file", node, info, ext)
        except OSError as e:
            yield ("skip", node.src, e.strerror or str(e))
        finally:
            os.close(fd)
    while errors:
        yield ("skip",) + errors.pop(0)


def scan(paths: list, one_file_system: bool = True, progress=None) -> ScanResult:
    fstab = FsTable()
    builder = extents.IndexBuilder()
    files: list[Node] = []
    skipped: list[tuple[bytes, str]] = []
    inodes: set[tuple[int, int]] = set()
    # scan stores nothing: two PATHs may share a basename
    for item in map_tree(paths, one_file_system, unique_names=False):
        if item[0] == "file":
            _, node, info, ext = item
            if node.st.st_nlink > 1:
                # another name of a file already counted: it occupies nothing
                # more and shares nothing (backup stores it as a hard link)
                key = (node.st.st_dev, node.st.st_ino)
                if key in inodes:
                    continue
                inodes.add(key)
            builder.add(fstab.number(info), node.st.st_size, ext)
            files.append(node)
            if progress:
                progress(node.st.st_size)
        elif item[0] == "skip":
            skipped.append((item[1], item[2]))
    plan = builder.build()
    return ScanResult(plan=plan, files=files, skipped=skipped, filesystems=fstab.infos)
