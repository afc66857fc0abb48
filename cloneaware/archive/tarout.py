"""``dump``'s output: one entry of an archive or a snapshot (read through
archive/view.py) to a stream, without restoring it: a file's bytes as they
are, anything else (a directory and what is below it, a symlink, a device)
as a POSIX tar stream (pax: modes, numeric owners, times to the
nanosecond, symlinks, hard links, devices, FIFOs, xattrs as
``SCHILY.xattr.*``, which GNU tar restores with ``--xattrs``, and a file
with holes as a GNU sparse member of format 1.0, which GNU tar extracts
with its holes).  A file's bytes are written front to back from its
ranges; what holds them (a repository's blobs, an archive's DATA records)
comes from ``fetch``.  Sockets, which tar cannot hold, are left out and
said."""
from __future__ import annotations

import io
import os
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cloneaware.archive import format as fmt
from cloneaware.archive.view import ArchiveView, Range
from cloneaware.errors import ArchiveError, UsageError

ZEROS = bytes(1 << 20)


@dataclass
class Pick:
    """The entries at or below a path, each file's ranges (and those of
    the files outside it that its hard links name)."""

    entries: list[fmt.Entry] = field(default_factory=list)
    by_id: dict[int, fmt.Entry] = field(default_factory=dict)
    ranges: dict[int, list[Range]] = field(default_factory=dict)


def pick(view: ArchiveView, path: str, where: str) -> Pick:
    """Entry ``path`` (as ``ls`` shows it) of ``view`` and what is below it."""
    want = path.strip("/").encode()
    if not want:
        raise UsageError("give the PATH of an entry as ls shows it (its first component is "
                         "the name of the PATH backed up)")
    out = Pick()
    for i, it in enumerate(view.items):
        if it.path == want or it.path.startswith(want + b"/"):
            e = view.entry(i)
            out.entries.append(e)
            out.by_id[e.id] = e
            if e.kind == fmt.K_HARDLINK and e.link not in out.by_id:
                out.by_id[e.link] = view.entry(e.link)  # a file outside PATH, maybe
    if not out.entries:
        raise UsageError(f"{path}: no such entry in {where}")
    for e in out.entries:
        fid = e.id if e.kind == fmt.K_REG else e.link if e.kind == fmt.K_HARDLINK else None
        if fid is not None and fid not in out.ranges:
            out.ranges[fid] = view.ranges(fid)
    return out


class FileBytes(io.RawIOBase):
    """A file's bytes from its ranges (sorted by offset), gaps as zeros,
    ``size`` bytes in all; read as tarfile and a copy loop read."""

    def __init__(self, size: int, ranges: list[Range], fetch: Callable[[Any], bytes]):
        self.size = size
        self.ranges = ranges
        self.fetch = fetch
        self.pos = 0
        self.i = 0
        self.piece: bytes | memoryview = b""  # what is left of the current range's bytes

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        """``n`` bytes unless the file ends first: tarfile takes a short read
        for the end of the data (read1 stops where a range does)."""
        n = self.size - self.pos if n is None or n < 0 else n
        got = []
        while n > 0 and (c := self.read1(n)):
            got.append(c)
            n -= len(c)
        return b"".join(got)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def skip_to(self, pos: int) -> None:
        """Go on from ``pos`` (a hole's end: what is passed over is zeros)."""
        k = min(len(self.piece), pos - self.pos)
        self.piece = self.piece[k:]
        self.pos = max(self.pos + k, pos)

    def read1(self, n: int = -1) -> bytes:
        if self.pos >= self.size:
            return b""
        n = min(n if n >= 0 else 1 << 20, 1 << 20, self.size - self.pos)
        if self.piece:
            out, self.piece = self.piece[:n], self.piece[n:]
            self.pos += len(out)
            return bytes(out)
        if self.i < len(self.ranges):
            off, length, key, koff = self.ranges[self.i]
            if off < self.pos:
                raise ArchiveError(f"ranges overlap at byte {off} of a file (damaged)")
            if off == self.pos:
                self.i += 1
                blob = key if koff < 0 else self.fetch(key)  # the bytes themselves, or fetched
                koff = max(koff, 0)
                if koff + length > len(blob):
                    raise ArchiveError("a range beyond the end of what holds it (damaged)")
                self.piece = memoryview(blob)[koff:koff + length]
                return self.read1(n)
            n = min(n, off - self.pos)
        self.pos += n
        return ZEROS[:n]


def data_regions(size: int, ranges: list[Range]) -> list[tuple[int, int]]:
    """Where a file has data (its ranges, adjacent ones joined)."""
    out: list[tuple[int, int]] = []
    for off, length, _, _ in ranges:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


class _Sparse(io.RawIOBase):
    """A GNU sparse 1.0 member's data: the map (decimal numbers, one a
    line, padded to a block), then the data regions' bytes, the holes
    left out."""

    def __init__(self, src: FileBytes, regions: list[tuple[int, int]]):
        lines = [len(regions)] + [x for r in regions for x in r]
        head = "".join(f"{x}\n" for x in lines).encode()
        self.head = head + bytes(-len(head) % tarfile.BLOCKSIZE)
        self.src = src
        self.regions = regions
        self.r = 0  # the region being read
        self.left = 0  # of its bytes

    @property
    def size(self) -> int:
        return len(self.head) + sum(n for _, n in self.regions)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def read(self, n: int | None = -1) -> bytes:
        n = 1 << 20 if n is None or n < 0 else n
        out = []
        if self.head:
            out.append(self.head[:n])
            self.head = self.head[n:]
            n -= len(out[0])
        while n > 0:
            if not self.left:
                if self.r >= len(self.regions):
                    break
                off, self.left = self.regions[self.r]
                self.r += 1
                self.src.skip_to(off)
            c = self.src.read(min(n, self.left))
            if not c:
                raise ArchiveError("a file's data ended before its ranges did (damaged)")
            out.append(c)
            n -= len(c)
            self.left -= len(c)
        return b"".join(out)


@dataclass
class DumpResult:
    entries: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


def members(p: Pick) -> list[tuple[fmt.Entry, int | None, bytes | None]]:
    """The tar members in depth-first order, as tar writes them (GNU tar sets
    a directory's times when it leaves it: a member of it after one outside
    would move them again), each with the file whose bytes it carries, or
    the earlier name it is a hard link to."""
    out: list[tuple[fmt.Entry, int | None, bytes | None]] = []
    first: dict[int, bytes] = {}  # file id -> the member that carries its bytes
    for e in sorted(p.entries, key=lambda e: e.path.split(b"/")):
        fid = e.id if e.kind == fmt.K_REG else e.link if e.kind == fmt.K_HARDLINK else None
        if fid is None or fid not in p.ranges:
            out.append((e, None, None))
        elif fid in first:
            out.append((e, None, first[fid]))
        else:
            first[fid] = e.path
            out.append((e, fid, None))
    return out


def data_order(p: Pick) -> list[int]:
    """The files whose bytes the output carries, in its order."""
    return [fid for _, fid, _ in members(p) if fid is not None]


def dump_archive(path: str, entry: str, out: BinaryIO,
                 warn: Callable[[str], None] | None = None) -> DumpResult:
    """``dump ARCHIVE PATH``: from an archive file, read where needed."""
    from cloneaware.archive.view import ArchiveBytes

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = ArchiveBytes(fd)
        view = ArchiveView(data, "the archive")
        p = pick(view, entry, "the archive")
        last: dict[int, bytes] = {}  # the last DATA records read (a REF reads one again)

        def fetch(off: int) -> bytes:
            got = last.get(off)
            if got is None:
                if len(last) >= 16:
                    last.clear()
                got = last[off] = data.chunk(off, view.version)
            return got

        return write(p, out, fetch, warn)
    finally:
        os.close(fd)


def write(p: Pick, out: BinaryIO, fetch: Callable[[Any], bytes],
          warn: Callable[[str], None] | None = None) -> DumpResult:
    """The picked entry to ``out``: a file's bytes (a hard link: its
    file's), anything else as a tar stream."""
    res = DumpResult()
    top = p.entries[0]
    if top.kind == fmt.K_HARDLINK and top.link in p.by_id:
        top = p.by_id[top.link]  # a file's other name: its bytes
    if top.kind == fmt.K_REG:
        src = FileBytes(top.size, p.ranges[top.id], fetch)
        while chunk := src.read1(1 << 20):
            out.write(chunk)
        res.entries, res.bytes = 1, top.size
    else:
        _tar(p, out, fetch, res, warn)
    return res


def _tar(p: Pick, out: BinaryIO, fetch: Callable[[Any], bytes], res: DumpResult,
         warn: Callable[[str], None] | None) -> None:
    # a file's bytes copied a MiB a read (tarfile's default: 16 KiB, a Python
    # call each through FileBytes)
    t = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                     errors="surrogateescape")
    t.copybufsize = 1 << 20  # type: ignore[attr-defined]  # (typeshed lacks it)
    for e, fid, link in members(p):
        name = e.path.decode("utf-8", "surrogateescape")
        ti = tarfile.TarInfo(name)
        ti.mode, ti.uid, ti.gid = e.mode, e.uid, e.gid
        ti.mtime = e.mtime_ns / 1e9
        ti.uname = ti.gname = ""
        ti.pax_headers = {"SCHILY.xattr." + n.decode("utf-8", "surrogateescape"):
                          v.decode("utf-8", "surrogateescape") for n, v in e.xattrs}
        sec, ns = divmod(e.mtime_ns, 1_000_000_000)
        ti.pax_headers["mtime"] = f"{sec}.{ns:09d}"  # exact: tarfile's own is a float's
        data: io.RawIOBase | None = None
        kind = e.kind
        if fid is not None:
            f = p.by_id[fid]
            ranges = p.ranges[fid]
            ti.type, ti.size = tarfile.REGTYPE, f.size
            data = FileBytes(f.size, ranges, fetch)
            regions = data_regions(f.size, ranges)
            if sum(n for _, n in regions) < f.size:  # holes: a sparse member
                if not regions or regions[-1][0] + regions[-1][1] < f.size:
                    regions.append((f.size, 0))  # GNU tar's mark of a hole at the end
                data = _Sparse(data, regions)
                ti.size = data.size
                ti.pax_headers.update({
                    "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                    "GNU.sparse.name": name, "GNU.sparse.realsize": str(f.size)})
                d, b = posixpath.split(name)
                ti.name = posixpath.join(d, "GNUSparseFile.0", b)
            res.bytes += f.size
        elif link is not None:
            ti.type, ti.linkname = tarfile.LNKTYPE, link.decode("utf-8", "surrogateescape")
        elif kind == fmt.K_DIR:
            ti.type = tarfile.DIRTYPE
        elif kind == fmt.K_SYMLINK:
            ti.type, ti.linkname = tarfile.SYMTYPE, e.target.decode("utf-8", "surrogateescape")
        elif kind in (fmt.K_CHR, fmt.K_BLK):
            ti.type = tarfile.CHRTYPE if kind == fmt.K_CHR else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(e.rdev), os.minor(e.rdev)
        elif kind == fmt.K_FIFO:
            ti.type = tarfile.FIFOTYPE
        else:  # a socket (or a link to nothing): tar has no member for it
            res.skipped.append(name)
            if warn is not None:
                warn(f"{name}: a {fmt.KIND_NAMES[e.kind]}: tar cannot hold it, left out")
            continue
        t.addfile(ti, data)
        res.entries += 1
    t.close()
