"""The records of thin backups (archive format version 2, docs/FORMAT.md):
BASE names the base a thin archive needs at restore and each of its files
that is referenced; BASEREF says that a range is the base's, with its
SHA-256; EXTERNAL that a range is at the same offset of a sparse thin
backup's own file."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cloneaware.archive.format import (
    CHUNK_MAX,
    LIMITS,
    PATH_MAX,
    SIZE_MAX,
    T_BASE,
    U16,
    WRITE_VERSION,
    Cursor,
    check_path,
    path_max,
)

_BASE_HEAD = struct.Struct("<B")
_BASE_ITEM = struct.Struct("<IQ")
_BASEREF = struct.Struct("<QIIQ32s")
_EXTERNAL = struct.Struct("<QI32s")

BASE_FILE, BASE_DIR = 1, 2


@dataclass
class BaseFile:
    number: int
    size: int
    path: bytes  # relative to the base directory; empty when the base is a file


@dataclass
class Base:
    """What a thin archive needs at restore: the base as the user named it at
    backup time, and each base file it references with its size."""

    path: bytes
    kind: int
    files: list[BaseFile] = field(default_factory=list)

    def encode_records(self, limit: int = LIMITS[T_BASE]) -> list[bytes]:
        head = U16.pack(len(self.path)) + self.path + _BASE_HEAD.pack(self.kind)
        out, cur = [], [head]
        size = len(head)
        for f in self.files:
            item = _BASE_ITEM.pack(f.number, f.size) + U16.pack(len(f.path)) + f.path
            if size + len(item) > limit:
                out.append(b"".join(cur))
                cur, size = [head], len(head)
            cur.append(item)
            size += len(item)
        out.append(b"".join(cur))
        return out

    @classmethod
    def decode(cls, buf, offset: int, version: int = WRITE_VERSION) -> Base:
        c = Cursor(buf, offset, "BASE")
        path = c.bytes16(PATH_MAX)
        if not path or b"\0" in path:
            c.fail("empty base path or NUL in it")
        (kind,) = c.unpack(_BASE_HEAD)
        if kind not in (BASE_FILE, BASE_DIR):
            c.fail(f"unknown base kind {kind}")
        b = cls(path, kind)
        while c.pos < len(buf):
            number, size = c.unpack(_BASE_ITEM)
            rel = c.bytes16(path_max(version))
            if kind == BASE_DIR:
                check_path(rel, offset, version)
            elif rel:
                c.fail("a file base has no relative paths")
            if size > SIZE_MAX:
                c.fail("base file size out of range")
            b.files.append(BaseFile(number, size, rel))
        return b


def encode_baseref(offset: int, length: int, number: int, base_offset: int,
                   sha: bytes) -> bytes:
    return _BASEREF.pack(offset, length, number, base_offset, sha)


def decode_baseref(buf, offset: int) -> tuple[int, int, int, int, bytes]:
    c = Cursor(buf, offset, "BASEREF")
    off, length, number, boff, sha = c.unpack(_BASEREF)
    c.done()
    if not 0 < length <= CHUNK_MAX:
        c.fail(f"range length {length} outside 1..{CHUNK_MAX}")
    if off > SIZE_MAX or boff > SIZE_MAX:
        c.fail("range out of bounds")
    return off, length, number, boff, sha


def encode_external(offset: int, length: int, sha: bytes) -> bytes:
    return _EXTERNAL.pack(offset, length, sha)


def decode_external(buf, offset: int) -> tuple[int, int, bytes]:
    c = Cursor(buf, offset, "EXTERNAL")
    off, length, sha = c.unpack(_EXTERNAL)
    c.done()
    if not 0 < length <= CHUNK_MAX:
        c.fail(f"range length {length} outside 1..{CHUNK_MAX}")
    if off > SIZE_MAX:
        c.fail("range out of bounds")
    return off, length, sha
