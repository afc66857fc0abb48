"""``dump``: one entry of a snapshot to a stream, without restoring it: a
file's bytes as they are, anything else (a directory and what is below it,
a symlink, a device) as a POSIX tar stream (pax: modes, numeric owners,
times to the nanosecond, symlinks, hard links, devices, FIFOs, and xattrs
as ``SCHILY.xattr.*``, which GNU tar restores with ``--xattrs``).

A repository manifest names a file's bytes by BLOB ranges (the sink
resolves references to them, repo/sink.py) or holds them in DATA records
(small files), so each file is written front to back from its ranges, the
gaps between them as zeros.  The blobs are
read ahead in the order the output needs them (the restore's Planner and
Fetcher, repo/restore.py), each once while it is cached.  Holes are
written as zeros, not as sparse tar members; sockets, which tar cannot
hold, are left out and said."""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from cloneaware.archive import format as fmt
from cloneaware.archive.events import BlobEvent, DataEvent, EntryEvent, Handler, dispatch
from cloneaware.archive.reader import Stream
from cloneaware.errors import ArchiveError, UsageError
from cloneaware.repo.repository import Repository
from cloneaware.repo.restore import Fetcher, Planner
from cloneaware.repo.snapshots import Snapshot

#: offset in the file, length, blob id, offset in the blob; or for bytes the
#: manifest holds itself (a small file's DATA), the bytes and -1
Range = tuple[int, int, bytes, int]
ZEROS = bytes(1 << 20)


class _Pick(Handler):
    """The entries at or below ``path``, and each file's BLOB ranges."""

    def __init__(self, path: bytes, also: set[int] | None = None):
        self.path = path
        self.also = also or set()  # files outside it whose ranges are wanted (hard links)
        self.entries: list[fmt.Entry] = []
        self.by_id: dict[int, fmt.Entry] = {}
        self.ranges: dict[int, list[Range]] = {}
        self.cur: list[Range] | None = None

    def on_entry(self, ev: EntryEvent) -> None:
        e = ev.entry
        self.by_id[e.id] = e  # hard links name their file by id
        self.cur = None
        if e.path == self.path or e.path.startswith(self.path + b"/"):
            self.entries.append(e)
            if e.kind == fmt.K_REG:
                self.cur = self.ranges[e.id] = []
        elif e.id in self.also:
            self.cur = self.ranges[e.id] = []

    def on_blob(self, ev: BlobEvent) -> None:
        if self.cur is not None:
            self.cur.append((ev.offset, ev.length, ev.blob_id, ev.blob_offset))

    def on_data(self, ev: DataEvent) -> None:
        if self.cur is not None and ev.length:
            self.cur.append((ev.offset, ev.length, bytes(ev.data), -1))


class _FileBytes(io.RawIOBase):
    """A file's bytes from its ranges (sorted by offset), gaps as zeros,
    ``size`` bytes in all; read as tarfile and a copy loop read."""

    def __init__(self, size: int, ranges: list[Range], fetch: Callable[[bytes], bytes]):
        self.size = size
        self.ranges = ranges
        self.fetch = fetch
        self.pos = 0
        self.i = 0
        self.piece: bytes | memoryview = b""  # what is left of the current range's bytes

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
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

    def read1(self, n: int = -1) -> bytes:
        if self.pos >= self.size:
            return b""
        n = min(n if n >= 0 else 1 << 20, 1 << 20, self.size - self.pos)
        if self.piece:
            out, self.piece = self.piece[:n], self.piece[n:]
            self.pos += len(out)
            return bytes(out)
        if self.i < len(self.ranges):
            off, length, bid, boff = self.ranges[self.i]
            if off < self.pos:
                raise ArchiveError(f"ranges overlap at byte {off} of a file (damaged manifest)")
            if off == self.pos:
                self.i += 1
                blob = bid if boff < 0 else self.fetch(bid)  # the bytes themselves, or a blob
                boff = max(boff, 0)
                if boff + length > len(blob):
                    raise ArchiveError("a range beyond the end of its blob (damaged manifest)")
                self.piece = memoryview(blob)[boff:boff + length]
                return self.read1(n)
            n = min(n, off - self.pos)
        self.pos += n
        return ZEROS[:n]


@dataclass
class DumpResult:
    entries: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


def dump(repo: Repository, snap: Snapshot, path: str, out: BinaryIO,
         warn: Callable[[str], None] | None = None) -> DumpResult:
    """Write entry ``path`` (as ``ls`` shows it) of ``snap`` to ``out``: a
    file's bytes, anything else as a tar stream."""
    want = path.strip("/").encode()
    if not want:
        raise UsageError("give the PATH of an entry as ls shows it (its first component is "
                         "the name of the PATH backed up)")
    manifest = repo.manifest(snap)
    pick = _Pick(want)
    dispatch(pick, Stream(io.BytesIO(manifest), check_hashes=False).events())
    if not pick.entries:
        raise UsageError(f"{path}: no such entry in snapshot {snap.short_id}")
    outside = {e.link for e in pick.entries if e.kind == fmt.K_HARDLINK} - set(pick.ranges)
    if outside:  # hard links to files outside PATH: their bytes too (a second pass)
        pick = _Pick(want, outside)
        dispatch(pick, Stream(io.BytesIO(manifest), check_hashes=False).events())
    for rs in pick.ranges.values():
        rs.sort()
    repo.load_index(check_packs=True)
    planner = Planner(repo)
    for fid in _data_order(pick):
        for r in pick.ranges[fid]:
            if r[3] >= 0:
                planner.get(r[2])
    fetcher = Fetcher(repo, planner.order)
    res = DumpResult()
    try:
        top = pick.entries[0]
        if top.kind == fmt.K_HARDLINK and top.link in pick.by_id:
            top = pick.by_id[top.link]  # a file's other name: its bytes
        if top.kind == fmt.K_REG:
            src = _FileBytes(top.size, pick.ranges[top.id], fetcher.get)
            while chunk := src.read1(1 << 20):
                out.write(chunk)
            res.entries, res.bytes = 1, top.size
        else:
            _tar(pick, out, fetcher.get, res, warn)
    finally:
        fetcher.close()
    return res


def _members(pick: _Pick) -> list[tuple[fmt.Entry, int | None, bytes | None]]:
    """The tar members in depth-first order, as tar writes them (GNU tar sets
    a directory's times when it leaves it: a member of it after one outside
    would move them again), each with the file whose bytes it carries, or
    the earlier name it is a hard link to."""
    out: list[tuple[fmt.Entry, int | None, bytes | None]] = []
    first: dict[int, bytes] = {}  # file id -> the member that carries its bytes
    for e in sorted(pick.entries, key=lambda e: e.path.split(b"/")):
        fid = e.id if e.kind == fmt.K_REG else e.link if e.kind == fmt.K_HARDLINK else None
        if fid is None or fid not in pick.ranges:
            out.append((e, None, None))
        elif fid in first:
            out.append((e, None, first[fid]))
        else:
            first[fid] = e.path
            out.append((e, fid, None))
    return out


def _data_order(pick: _Pick) -> list[int]:
    """The files whose bytes the output carries, in its order."""
    return [fid for _, fid, _ in _members(pick) if fid is not None]


def _tar(pick: _Pick, out: BinaryIO, fetch: Callable[[bytes], bytes], res: DumpResult,
         warn: Callable[[str], None] | None) -> None:
    # a file's bytes copied a MiB a read (tarfile's default: 16 KiB, a Python
    # call each through _FileBytes)
    t = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                     errors="surrogateescape")
    t.copybufsize = 1 << 20  # type: ignore[attr-defined]  # (typeshed lacks it)
    for e, fid, link in _members(pick):
        name = e.path.decode("utf-8", "surrogateescape")
        ti = tarfile.TarInfo(name)
        ti.mode, ti.uid, ti.gid = e.mode, e.uid, e.gid
        ti.mtime = e.mtime_ns / 1e9
        ti.uname = ti.gname = ""
        ti.pax_headers = {"SCHILY.xattr." + n.decode("utf-8", "surrogateescape"):
                          v.decode("utf-8", "surrogateescape") for n, v in e.xattrs}
        sec, ns = divmod(e.mtime_ns, 1_000_000_000)
        ti.pax_headers["mtime"] = f"{sec}.{ns:09d}"  # exact: tarfile's own is a float's
        data: _FileBytes | None = None
        kind = e.kind
        if fid is not None:
            f = pick.by_id[fid]
            ti.type, ti.size = tarfile.REGTYPE, f.size
            data = _FileBytes(f.size, pick.ranges[fid], fetch)
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
