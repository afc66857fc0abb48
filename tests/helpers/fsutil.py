"""Helpers for the filesystem tests: independent views of a file's extents
(``filefrag -v``, ``xfs_io -c 'fiemap -v'``) and small file builders.
Nothing here calls cloneaware's own FIEMAP code."""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
from pathlib import Path
from typing import NamedTuple

from cloneaware import fsinfo, native
from cloneaware.source import flags as fl


class Ext(NamedTuple):
    logical: int
    physical: int
    length: int
    flags: int


# ``filefrag -v`` flag words (e2fsprogs misc/filefrag.c); "eof" is not a flag.
FILEFRAG_FLAGS = {
    "last": fl.FE_LAST, "unknown_loc": fl.FE_UNKNOWN, "unknown": fl.FE_UNKNOWN,
    "delalloc": fl.FE_DELALLOC, "encoded": fl.FE_ENCODED,
    "encrypted": fl.FE_DATA_ENCRYPTED, "not_aligned": fl.FE_NOT_ALIGNED,
    "inline": fl.FE_DATA_INLINE, "tail_packed": fl.FE_DATA_TAIL,
    "unwritten": fl.FE_UNWRITTEN, "merged": 0x1000, "shared": fl.FE_SHARED,
}

_FF_HEAD = re.compile(r"^File size of .* is (\d+) \((\d+) blocks? of (\d+) bytes\)$")
_FF_EXT = re.compile(
    r"^\s*(\d+):\s+(\d+)\.\.\s*(\d+):\s+(\d+)\.\.\s*(\d+):\s+(\d+):\s*(?:(\d+):)?\s*(\S*)\s*$")


def filefrag(path) -> tuple[int, list[Ext]]:
    """Run ``filefrag -v``; return (block size, extents in bytes).

    filefrag prints offsets and lengths in blocks of the filesystem block
    size, except for inline extents, which it prints in bytes."""
    out = subprocess.run(["filefrag", "-v", str(path)], check=True, capture_output=True,
                         text=True).stdout
    bs = None
    exts = []
    for line in out.splitlines():
        m = _FF_HEAD.match(line)
        if m:
            bs = int(m.group(3))
            continue
        m = _FF_EXT.match(line)
        if not m:
            continue
        assert bs is not None, out
        flags = 0
        for word in filter(None, m.group(8).split(",")):
            if word == "eof":
                continue
            flags |= int(word, 16) if word.startswith("0x") else FILEFRAG_FLAGS[word]
        unit = 1 if flags & fl.FE_DATA_INLINE else bs
        lstart, pstart, length = int(m.group(2)), int(m.group(4)), int(m.group(6))
        assert int(m.group(3)) == lstart + length - 1, line
        exts.append(Ext(lstart * unit, pstart * unit, length * unit, flags))
    assert bs is not None, f"no header in filefrag output:\n{out}"
    return bs, exts


_XI_EXT = re.compile(r"^\s*(\d+): \[(\d+)\.\.(\d+)\]:\s+(\d+)\.\.(\d+)\s+(\d+)\s+(0x[0-9a-f]+)\s*$")
_XI_HOLE = re.compile(r"^\s*(\d+): \[(\d+)\.\.(\d+)\]:\s+hole\s+(\d+)\s*$")


def xfs_io_fiemap(path) -> list[Ext]:
    """Run ``xfs_io -r -c 'fiemap -v'``; return extents in bytes (xfs_io prints
    512-byte sectors), holes left out."""
    out = subprocess.run(["xfs_io", "-r", "-c", "fiemap -v", str(path)], check=True,
                         capture_output=True, text=True).stdout
    exts = []
    for line in out.splitlines()[2:]:
        m = _XI_EXT.match(line)
        if m:
            l0, l1, p0, p1, n = (int(m.group(i)) for i in range(2, 7))
            assert l1 - l0 + 1 == n == p1 - p0 + 1, line
            exts.append(Ext(l0 * 512, p0 * 512, n * 512, int(m.group(7), 16)))
        else:
            assert _XI_HOLE.match(line), f"unexpected xfs_io line {line!r}"
    return exts


def as_tuples(ext) -> list[Ext]:
    return [Ext(int(r["logical"]), int(r["physical"]), int(r["length"]), int(r["flags"]))
            for r in ext]


def coverage(ranges) -> tuple[int, int]:
    """For [start, end) ranges: (length of their union, bytes of the ranges
    that lie where two or more ranges overlap)."""
    events = sorted([(s, 1) for s, e in ranges] + [(e, -1) for s, e in ranges])
    union = shared = depth = 0
    prev = None
    for pos, step in events:
        if prev is not None and depth:
            union += pos - prev
            if depth >= 2:
                shared += (pos - prev) * depth
        depth += step
        prev = pos
    return union, shared


def regular_files(root) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return out


def spread_files(top, n: int, size: int, seed: int, dirs: int = 30) -> None:
    """``n`` files of ``size`` random bytes (``seed``) under ``top``, file i
    as d<i % dirs>/f<i>: more files than a process may hold open, in a few
    directories."""
    import random

    rng = random.Random(seed)
    for i in range(n):
        p = Path(top) / f"d{i % dirs:02d}" / f"f{i:04d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(size))


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_at(path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def compressible(size: int, seed: int = 0) -> bytes:
    line = b"cloneaware %d compressible line of text, repeated over and over\n"
    out = bytearray()
    i = seed
    while len(out) < size:
        out += line % i
        i += 1
    return bytes(out[:size])


def tmpfs_takes_user_xattrs(d) -> bool:
    """Whether the tmpfs at ``d`` takes user.* xattrs (Linux 6.6 and later)."""
    import errno

    p = Path(d) / "xattr-probe"
    p.write_bytes(b"")
    try:
        os.setxattr(p, "user.probe", b"1")
        return True
    except OSError as e:
        assert e.errno == errno.EOPNOTSUPP, e
        return False
    finally:
        p.unlink()


def fs_info_path(path) -> fsinfo.FsInfo:
    """The identity, type and block size of the filesystem holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return fsinfo.fs_info(fd, os.fstat(fd).st_dev, path)
    finally:
        os.close(fd)


def reflink_support(dir_fd: int, block_size: int = 4096) -> tuple[bool, str]:
    """Try a real FICLONERANGE of one block between two temporary files made
    in the directory ``dir_fd``, as xfstests' common/reflink probes.
    Returns (supported, reason)."""
    names = [b".cloneaware-probe-" + secrets.token_hex(6).encode() for _ in range(2)]
    fds = []
    try:
        for n in names:
            fds.append(os.open(n, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o600, dir_fd=dir_fd))
        os.pwrite(fds[0], b"\xa5" * block_size, 0)
        os.fsync(fds[0])
        try:
            native.ficlonerange(fds[1], fds[0], 0, block_size, 0)
        except OSError as e:
            if e.errno in native.NOT_SUPPORTED:
                return False, os.strerror(e.errno)
            raise
        return True, "reflink"
    finally:
        for fd in fds:
            os.close(fd)
        for n in names:
            try:
                os.unlink(n, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
