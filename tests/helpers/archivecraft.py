"""Build malformed and hostile archives for tests, and describe trees.

``Craft`` writes an archive record by record with cloneaware.archive.format
(frame(), Entry(...).encode(), encode_data_head, encode_ref, End(...).encode(),
IndexItem, Footer, MAGIC, Header), keeping the bookkeeping a valid archive
needs (entry ids, END counts, the INDEX and the FOOTER) so that a test can
break exactly one rule and nothing else::

    c = Craft()
    d = c.dir(b"d")
    c.symlink(b"d/link", b"/etc")
    c.file(b"d/link/x", b"pwned")
    data = c.finish()

Every method takes overrides for the fields a hostile archive lies about
(ids, counts, lengths, CRCs, flags).  ``records()`` splits an archive into
its records (for truncating at record boundaries or re-framing a mutated
payload with a correct CRC).

(The fast way to run the CLI on hundreds of such archives, ``CliServer``,
is in helpers/cli.py with every other way of running it.)

Also: ``tree_state`` (an independent description of a tree: types, modes,
owners, times, content hashes, link targets, hard-link groups, xattrs) and
``sandbox_state`` (what a hostile restore must not have changed).
"""
from __future__ import annotations

import hashlib
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.format import (
    MAGIC,
    End,
    Entry,
    Footer,
    Header,
    IndexItem,
    encode_data_head,
    encode_ref,
    frame,
)

__all__ = ["Craft", "records", "reframe", "tree_state", "diff_states", "sandbox_state",
           "temp_files", "MAGIC"]


def _frame_raw(rtype: int, payload: bytes, flags: int = 0, length: int | None = None,
               crc: int | None = None) -> bytes:
    """A record whose header may lie (flags, length) and whose CRC may be
    wrong; with no overrides this is exactly format.frame()."""
    if flags == 0 and length is None and crc is None:
        return frame(rtype, payload)
    head = fmt.FRAME.pack(rtype, flags, len(payload) if length is None else length)
    if crc is None:
        crc = zlib.crc32(payload, zlib.crc32(head))
    return head + payload + fmt.CRC.pack(crc & 0xFFFFFFFF)


def entry_payload(e: Entry, path_len: int | None = None, target_len: int | None = None,
                  xattr_count: int | None = None, version: int = fmt.WRITE_VERSION) -> bytes:
    """Entry.encode(version), with the length fields optionally lying."""
    b = bytearray(e.encode(version))
    pos = (fmt._ENTRY if version >= 5 else fmt._ENTRY_V4).size
    if path_len is not None:
        struct.pack_into("<H", b, pos, path_len)
    pos += 2 + len(e.path)
    if target_len is not None:
        struct.pack_into("<H", b, pos, target_len)
    pos += 2 + len(e.target)
    if xattr_count is not None:
        struct.pack_into("<I", b, pos, xattr_count)
    return bytes(b)


class Craft:
    """An archive under construction.  Bytes accumulate in ``self.buf``."""

    def __init__(self, version: int = fmt.WRITE_VERSION, magic: bytes = MAGIC,
                 header: bool = True, tool: str = "archivecraft"):
        self.version = version
        self.buf = bytearray(magic)
        self.items: list[IndexItem] = []
        self.next_id = 0
        self.cur: End | None = None
        self.cur_item: IndexItem | None = None
        self.stored = self.refd = self.based = 0
        if header:
            self.record(fmt.T_HEADER, Header(version=version, created_ns=1,
                                             tool=tool).encode())

    # -- raw -------------------------------------------------------------------

    @property
    def offset(self) -> int:
        return len(self.buf)

    def raw(self, b: bytes) -> Craft:
        self.buf += b
        return self

    def record(self, rtype: int, payload: bytes, **lie) -> int:
        """Append one record; returns its offset."""
        off = self.offset
        self.buf += _frame_raw(rtype, payload, **lie)
        return off

    # -- entries ---------------------------------------------------------------

    def entry(self, kind: int, path: bytes, *, id: int | None = None, size: int = 0,
              link: int = 0, target: bytes = b"", mode: int | None = None,
              xattrs=(), eflags: int = 0, uid: int = 0, gid: int = 0, mtime_ns: int = 0,
              rdev: int = 0, payload: bytes | None = None, index: bool = True,
              **lie) -> int:
        """An ENTRY; REG entries open a file that end() closes.  ``payload``
        replaces the encoded payload (for lying length fields)."""
        eid = self.next_id if id is None else id
        self.next_id += 1
        if mode is None:
            mode = 0o755 if kind == fmt.K_DIR else 0o644
        e = Entry(eid, kind, path, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns,
                  atime_ns=mtime_ns, size=size, rdev=rdev, link=link, target=target,
                  xattrs=list(xattrs), eflags=eflags)
        off = self.offset
        if payload is None:
            payload = self._entry_bytes(e, id is not None)
        self.record(fmt.T_ENTRY, payload, **lie)
        item = IndexItem(eid, kind, size, 0, 0, 0, off, path)
        if index:
            self.items.append(item)
        if kind == fmt.K_REG:
            self.cur = End(eid)
            self.cur_item = item
        return eid

    def _entry_bytes(self, e: Entry, lying_id: bool) -> bytes:
        """e.encode(version); from version 6 on (ids implicit, references
        relative) with a lying id and links or origins forward kept as the
        bytes a hostile writer would put there."""
        if self.version < fmt.RELATIVE:
            return e.encode(self.version)
        at = self.next_id - 1  # the position the reader gives this entry
        link, origin = e.link, e.origin
        e.link = e.origin = 0
        b = bytearray(e.encode(self.version))
        e.link, e.origin = link, origin
        if lying_id:
            struct.pack_into("<Q", b, 0, e.id)
        if e.kind == fmt.K_HARDLINK or link:
            struct.pack_into("<Q", b, 56, (at - link) % (1 << 64))
        if origin:
            struct.pack_into("<Q", b, 72, (at - origin) % (1 << 64))
        return bytes(b)

    def dir(self, path: bytes, **kw) -> int:
        return self.entry(fmt.K_DIR, path, **kw)

    def symlink(self, path: bytes, target: bytes, **kw) -> int:
        return self.entry(fmt.K_SYMLINK, path, target=target, **kw)

    def hardlink(self, path: bytes, link: int, **kw) -> int:
        return self.entry(fmt.K_HARDLINK, path, link=link, **kw)

    def fifo(self, path: bytes, **kw) -> int:
        return self.entry(fmt.K_FIFO, path, **kw)

    def reg(self, path: bytes, size: int, **kw) -> int:
        return self.entry(fmt.K_REG, path, size=size, **kw)

    def file(self, path: bytes, content: bytes, codec: int = fmt.CODEC_NONE, **kw) -> int:
        """A whole regular file: ENTRY, DATA (one per 4 MiB), END."""
        eid = self.reg(path, len(content), **kw)
        for off in range(0, len(content), fmt.CHUNK_MAX):
            self.data(off, content[off:off + fmt.CHUNK_MAX], codec=codec)
        self.end()
        return eid

    # -- file contents -----------------------------------------------------------

    def data(self, offset: int, data: bytes, codec: int = fmt.CODEC_NONE,
             length: int | None = None, sha: bytes | None = None,
             coded: bytes | None = None, count: bool = True, **lie) -> int:
        """A DATA record for ``data`` at ``offset``.  ``length`` and ``sha``
        may lie; ``coded`` replaces the coded bytes (e.g. a zstd bomb)."""
        n = len(data) if length is None else length
        if coded is None:
            if codec == fmt.CODEC_ZSTD:
                import zstandard

                coded = zstandard.ZstdCompressor(level=3).compress(data)
            else:
                coded = data
        head = encode_data_head(offset, n, codec,
                                hashlib.sha256(data).digest() if sha is None else sha)
        if count and self.cur is not None:
            self.cur.data_records += 1
            self.cur.stored_bytes += n
        return self.record(fmt.T_DATA, head + coded, **lie)

    def ref(self, offset: int, length: int, src_id: int, src_offset: int,
            count: bool = True, **lie) -> int:
        if count and self.cur is not None:
            self.cur.ref_records += 1
            self.cur.ref_bytes += length
        if self.version >= fmt.RELATIVE:  # the distance back (a forward one wraps)
            src_id = (self.next_id - 1 - src_id) % (1 << 64)
        return self.record(fmt.T_REF, encode_ref(offset, length, src_id, src_offset,
                                                 version=5), **lie)

    def baseref(self, offset: int, length: int, number: int, base_offset: int,
                sha: bytes = b"\0" * 32, count: bool = True, **lie) -> int:
        if count and self.cur is not None:
            self.cur.base_ref_records += 1
            self.cur.base_ref_bytes += length
        return self.record(fmt.T_BASEREF,
                           thin.encode_baseref(offset, length, number, base_offset, sha), **lie)

    def external(self, offset: int, length: int, sha: bytes = b"\0" * 32,
                 count: bool = True, **lie) -> int:
        if count and self.cur is not None:
            self.cur.external_records += 1
            self.cur.external_bytes += length
        return self.record(fmt.T_EXTERNAL, thin.encode_external(offset, length, sha), **lie)

    def base(self, path: bytes, kind: int, files=(), **lie) -> int:
        """A BASE record; ``files`` are (number, size, rel) tuples."""
        b = thin.Base(path, kind, [thin.BaseFile(n, s, r) for n, s, r in files])
        return self.record(fmt.T_BASE, b.encode_records()[0], **lie)

    def end(self, **override) -> int:
        """END of the current file, with correct counts unless overridden."""
        end = self.cur if self.cur is not None else End(0)
        for k, v in override.items():
            setattr(end, k, v)
        if self.cur_item is not None:
            self.cur_item.stored_bytes = end.stored_bytes + end.external_bytes
            self.cur_item.ref_bytes = end.ref_bytes
            self.cur_item.base_ref_bytes = end.base_ref_bytes
        self.stored += end.stored_bytes + end.external_bytes
        self.refd += end.ref_bytes
        self.based += end.base_ref_bytes
        self.cur = self.cur_item = None
        if self.version >= fmt.RELATIVE and "id" not in override:
            return self.record(fmt.T_END, end.encode(self.version))
        return self.record(fmt.T_END, end.encode(5))  # the id as given

    # -- index and footer -----------------------------------------------------------

    def finish(self, index: bool = True, footer: bool = True, entries: int | None = None,
               index_offset: int | None = None) -> bytes:
        """INDEX and FOOTER; the archive's bytes."""
        start = self.offset
        records = 0
        if index:
            self.record(fmt.T_INDEX, self.index_payload())
            records = 1
        if footer:
            f = Footer(start if index_offset is None else index_offset, records,
                       len(self.items) if entries is None else entries,
                       self.stored, self.refd, self.based, self.offset)
            self.record(fmt.T_FOOTER, f.encode())
        return bytes(self.buf)

    def index_payload(self) -> bytes:
        if self.version < fmt.RELATIVE:
            return b"".join(it.encode(self.version) for it in self.items)
        parts, prev = [], 0
        for n, it in enumerate(self.items):
            b = it.encode(self.version, prev)
            if it.id != n:  # a lying id: where version 6 has 0
                b = struct.pack("<Q", it.id) + b[8:]
            parts.append(b)
            prev = it.offset
        return b"".join(parts)

    def bytes(self) -> bytes:
        return bytes(self.buf)


# --- taking archives apart ------------------------------------------------------

@dataclass
class Rec:
    offset: int
    type: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + fmt.FRAME_OVERHEAD + self.length

    @property
    def payload_offset(self) -> int:
        return self.offset + fmt.FRAME.size


def records(data: bytes) -> list[Rec]:
    """The records of a well-formed archive (magic not included)."""
    assert data[:len(MAGIC)] == MAGIC
    out = []
    pos = len(MAGIC)
    while pos < len(data):
        rtype, _flags, length = fmt.FRAME.unpack_from(data, pos)
        out.append(Rec(pos, rtype, length))
        pos += fmt.FRAME_OVERHEAD + length
    assert pos == len(data), "archive does not end on a record boundary"
    return out


def reframe(data: bytes, rec: Rec, payload: bytes) -> bytes:
    """``data`` with record ``rec`` replaced by ``payload`` under a correct
    header length and CRC (to get a mutation past the CRC check)."""
    return data[:rec.offset] + frame(rec.type, payload) + data[rec.end:]


# --- describing trees -----------------------------------------------------------

XATTR_IGNORE = {b"trusted.SGI_ACL_FILE", b"trusted.SGI_ACL_DEFAULT"}


def _xattrs(path: bytes) -> tuple:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        bn = os.fsencode(n)
        if bn in XATTR_IGNORE:
            continue
        try:
            out.append((bn, os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            pass
    return tuple(out)


def file_sha(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def tree_state(root, *, owners: bool = True, xattrs: bool = True, times: bool = True,
               root_meta: bool = True) -> dict[bytes, tuple]:
    """{relative path: description} of the tree under ``root`` (iterative,
    never following symlinks).  Hard links: each name lists the other names
    of its inode."""
    root = os.fsencode(root)
    out: dict[bytes, dict] = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        m = st.st_mode
        d = {"type": stat.S_IFMT(m), "mode": stat.S_IMODE(m)}
        if owners:
            d["owner"] = (st.st_uid, st.st_gid)
        if times and not stat.S_ISLNK(m) and (rel or root_meta):
            d["mtime"] = st.st_mtime_ns
        if xattrs:
            d["xattrs"] = _xattrs(full)
        if stat.S_ISREG(m):
            d["size"] = st.st_size
            d["sha"] = file_sha(full)
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        elif stat.S_ISLNK(m):
            d["target"] = os.readlink(full)
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            d["rdev"] = st.st_rdev
        elif stat.S_ISDIR(m):
            for name in sorted(os.listdir(full)):
                stack.append(os.path.join(rel, name) if rel else name)
        if not rel and not root_meta:
            d = {"type": d["type"]}
        out[rel] = d
    for names in inodes.values():
        for n in names:
            out[n]["links"] = tuple(sorted(names))
    return {k: tuple(sorted(v.items())) for k, v in out.items()}


def diff_states(a: dict, b: dict, limit: int = 20) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in b:
            out.append(f"missing: {k!r}")
        elif k not in a:
            out.append(f"extra: {k!r}")
        elif a[k] != b[k]:
            da, db = dict(a[k]), dict(b[k])
            fields = [f for f in sorted(set(da) | set(db)) if da.get(f) != db.get(f)]
            out.append(f"differs: {k!r}: " + ", ".join(
                f"{f}: {da.get(f)!r} != {db.get(f)!r}" for f in fields))
        if len(out) >= limit:
            out.append("...")
            break
    return out


def temp_files(root) -> list[bytes]:
    """Restore's temporary files (.cloneaware-*) anywhere under root (not
    the list of what a failed restore made, .cloneaware-partial)."""
    root = os.fsencode(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            if n.startswith(b".cloneaware-") and n != b".cloneaware-partial":
                found.append(os.path.join(dirpath, n))
    return found


def sandbox_state(sandbox, exclude) -> dict[bytes, tuple]:
    """Everything under ``sandbox`` except the ``exclude`` subtree: type,
    mode, size, mtime, content hash, link target.  (The sandbox itself is
    left out: creating DEST in it changes its mtime.)"""
    sandbox = os.fsencode(sandbox)
    exclude = os.fsencode(os.path.abspath(exclude))
    out = {}
    for dirpath, dirnames, filenames in os.walk(sandbox):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != exclude]
        for n in dirnames + filenames:
            full = os.path.join(dirpath, n)
            if full == exclude:
                continue
            st = os.lstat(full)
            rec = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                   st.st_size)
            if stat.S_ISREG(st.st_mode):
                rec += (file_sha(full),)
            elif stat.S_ISLNK(st.st_mode):
                rec += (os.readlink(full),)
            out[os.path.relpath(full, sandbox)] = rec
    return out


def find_name(top, name: bytes, exclude=None) -> list[bytes]:
    """Every path under ``top`` (not following symlinks, staying on its
    filesystem) whose last component is ``name``, outside ``exclude``."""
    top = os.fsencode(top)
    ex = os.fsencode(os.path.abspath(exclude)) if exclude is not None else None
    dev = os.lstat(top).st_dev
    hits = []
    for dirpath, dirnames, filenames in os.walk(top):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if full == ex:
                continue
            try:
                if os.lstat(full).st_dev != dev:
                    continue
            except OSError:
                continue
            keep.append(d)
        dirnames[:] = keep
        for n in keep + filenames:
            if n == name:
                hits.append(os.path.join(dirpath, n))
    return hits


def path_parents(p) -> list[Path]:
    p = Path(os.path.abspath(p))
    return [p, *p.parents]
