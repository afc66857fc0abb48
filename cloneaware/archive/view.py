"""Random access to an archive's entries and to a file's bytes, without
reading it through: the index first (archive/catalog.py), then an ENTRY
record when it is asked for, and a file's ranges (its BLOB and DATA
records, its REF records resolved to the ranges of the earlier file they
name).  Over a repository manifest held in memory, or an archive file read
with pread.  ``mount`` (mount/tree.py) and ``dump`` read this way."""
from __future__ import annotations

import hashlib
import io
import os
from typing import Any

from cloneaware.archive import format as fmt
from cloneaware.archive.catalog import entry_at, read_index
from cloneaware.archive.decode import Decoder
from cloneaware.archive.records import RecordReader
from cloneaware.errors import ArchiveError, UsageError

#: entries decoded kept, a view
RECENT = 4096

#: offset in the file, length, what holds the bytes and where they start in
#: it: a blob id (a repository) or a DATA record's offset (an archive file),
#: fetched by whoever reads the file; or the bytes themselves and -1
Range = tuple[int, int, Any, int]


def sub_ranges(ranges: list[Range], soff: int, length: int, to: int) -> list[Range]:
    """The part [soff, soff + length) of sorted ``ranges``, moved to ``to``."""
    out: list[Range] = []
    for o, n, key, koff in ranges:
        a, b = max(o, soff), min(o + n, soff + length)
        if a < b:
            if koff < 0:
                out.append((to + a - soff, b - a, key[a - o:b - o], -1))
            else:
                out.append((to + a - soff, b - a, key, koff + a - o))
    return out


class ManifestBytes:
    """A repository manifest, held whole in memory."""

    inline = True  # DATA records are decoded when a file is opened (small files)

    def __init__(self, data: bytes):
        self.data = data

    def file(self):
        return io.BytesIO(self.data)

    def read(self, off: int, n: int) -> bytes | memoryview:
        return memoryview(self.data)[off:off + n]


class ArchiveBytes:
    """An archive file, read where needed (pread: one descriptor, any
    number of readers at once)."""

    inline = False  # a DATA record is read and decoded when a read needs it

    def __init__(self, fd: int):
        self.fd = fd
        self.decoder = Decoder(check_hashes=True)

    def file(self):
        return _At(self.fd)

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self.fd, n, off)

    def chunk(self, off: int, version: int) -> bytes:
        """The bytes of the DATA record at ``off``, decoded and checked."""
        rr = RecordReader(_At(self.fd, off))
        rr.offset, rr.version = off, version
        rec = next(rr.records(), None)
        if rec is None or rec[0] != fmt.T_DATA:
            raise ArchiveError("no DATA record where the file's range says", off)
        foff, length, codec, sha, start = fmt.decode_data_head(rec[1], off, version)
        data, _ = self.decoder.decode(memoryview(rec[1])[start:], codec, length, sha, off,
                                      b"", foff)
        return bytes(data)


class _At(io.RawIOBase):
    """A file object over a descriptor with its own position (pread)."""

    def __init__(self, fd: int, pos: int = 0):
        self.fd, self.pos = fd, pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else \
            os.fstat(self.fd).st_size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        data = os.pread(self.fd, len(b), self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)



class ArchiveView:
    """An archive's (or a repository manifest's) entries by position,
    from its index: each ENTRY decoded when asked for (the last few
    thousand kept), a file's ranges when asked for.  Thread-safe for
    readers."""

    def __init__(self, data: ManifestBytes | ArchiveBytes, what: str):
        self.data = data
        self.what = what
        self.recent: dict[int, fmt.Entry] = {}
        self.resolved: dict[int, list[Range]] = {}  # ranges of REF sources, lately
        listing = read_index(data.file())
        if listing.is_map:
            raise UsageError("a sharing map holds no data: nothing to show")
        if listing.base is not None:
            raise UsageError("a thin backup: its bytes are in its base (restore it with "
                             "the base)")
        self.version = listing.header.version
        self.index_offset = listing.footer.index_offset
        self.items = listing.items
        for i, it in enumerate(self.items):
            if it.id != i:
                raise ArchiveError(f"index item {i} has the id {it.id}")

    def entry(self, rel: int) -> fmt.Entry:
        e = self.recent.get(rel)
        if e is not None:
            return e
        it = self.items[rel]
        e = entry_at(self.data.file(), it.offset, self.version, it.id)
        if (e.kind, e.path, e.size) != (it.kind, it.path, it.size):
            raise ArchiveError(f"index item {it.id} does not match its entry", it.offset)
        if len(self.recent) >= RECENT:  # (ls -l asks for an entry three times or four)
            self.recent.clear()
        self.recent[rel] = e
        return e

    def version_key(self, rel: int) -> bytes:
        """What tells one version of an entry from another (``--versions``):
        a file's records after its ENTRY and STAT (its blob ranges, small
        data, END), a link's target, or just the kind: a file only touched,
        chmodded or read is the same version."""
        it = self.items[rel]
        if it.kind == fmt.K_SYMLINK:
            return b"l" + self.entry(rel).target
        if it.kind != fmt.K_REG:
            return bytes((it.kind,))
        pos = it.offset
        end = self.items[rel + 1].offset if rel + 1 < len(self.items) else self.index_offset
        for skip in (fmt.T_ENTRY, fmt.T_STAT):
            rtype, _, length = fmt.FRAME.unpack(self.data.read(pos, fmt.FRAME.size))
            if rtype != skip:
                break
            pos += fmt.FRAME_OVERHEAD + length
        return b"f" + hashlib.sha256(self.data.read(pos, end - pos)).digest()

    def ranges(self, rel: int) -> list[Range]:
        """A file's ranges: the BLOB and DATA records after its ENTRY, and
        its REF records resolved to the ranges of the earlier file they name."""
        got = self.resolved.get(rel)
        if got is not None:
            return got
        it = self.items[rel]
        f = self.data.file()
        f.seek(it.offset)
        rr = RecordReader(f)
        rr.offset, rr.version = it.offset, self.version
        recs = rr.records()
        next(recs)  # the ENTRY
        out: list[Range] = []
        dec = Decoder(check_hashes=True)
        for rtype, payload, off in recs:
            if rtype == fmt.T_BLOB:
                foff, length, boff, bid = fmt.decode_blob(payload, off)
                out.append((foff, length, bid, boff))
            elif rtype == fmt.T_DATA:
                foff, length, codec, sha, start = fmt.decode_data_head(payload, off,
                                                                        self.version)
                if not self.data.inline:
                    out.append((foff, length, off, 0))
                    continue
                data, _ = dec.decode(memoryview(payload)[start:], codec, length, sha, off,
                                     it.path, foff)
                out.append((foff, length, bytes(data), -1))
            elif rtype == fmt.T_REF:
                foff, length, src, soff = fmt.decode_ref(payload, off, self.version, rel)
                if src == rel:  # the file's own earlier bytes
                    part = sub_ranges(sorted(out), soff, length, foff)
                elif src < rel and self.items[src].kind == fmt.K_REG:
                    part = sub_ranges(self.ranges(src), soff, length, foff)
                else:
                    raise ArchiveError(f"a REF to entry {src}, not an earlier file", off)
                out.extend(part)
            elif rtype in (fmt.T_END, fmt.T_ENTRY, fmt.T_INDEX):
                break
            elif rtype != fmt.T_STAT:
                raise ArchiveError(f"a {fmt.TYPE_NAMES.get(rtype, rtype)} record where a "
                                   "file's data was expected", off)
        out.sort()
        if len(self.resolved) >= 64:
            self.resolved.clear()
        self.resolved[rel] = out
        return out


