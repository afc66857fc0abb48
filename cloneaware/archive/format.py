"""The archive format (docs/FORMAT.md): constants, record framing, and
encoding/decoding of each record payload.  The only module that knows
the bytes.  Decoders never trust their input: every length is bounded before
use and a payload must be consumed exactly.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from cloneaware.errors import ArchiveError

MAGIC = b"\x89CLONEAW"
#: A sharing map (``scan --save-map``): archive records that hold no data
MAP_MAGIC = b"\x89CLONEAM"
WRITE_VERSION = 7
READ_VERSIONS = (1, 2, 3, 4, 5, 6, 7)
#: from this version on, references between entries are relative and ids are
#: implicit (docs/FORMAT.md, "Relative references"), so that one entry
#: added or removed changes no other entry's bytes
RELATIVE = 6
#: from this version on, an ENTRY may be a Unix socket (K_SOCK)
SOCKETS = 7
HASH_SHA256 = 1

T_HEADER, T_ENTRY, T_DATA, T_REF, T_END, T_INDEX, T_FOOTER = 1, 2, 3, 4, 5, 6, 7
T_BASE, T_BASEREF, T_EXTERNAL = 8, 9, 10  # version 2
T_BLOB, T_STAT = 11, 12  # version 3: repository manifests
ANCILLARY = 0x8000
#: Record types a sharing map may not hold: it holds no data and has no base
NOT_IN_MAP = (T_DATA, T_BASE, T_BASEREF, T_EXTERNAL, T_BLOB, T_STAT)
TYPE_NAMES = {T_HEADER: "HEADER", T_ENTRY: "ENTRY", T_DATA: "DATA", T_REF: "REF",
              T_END: "END", T_INDEX: "INDEX", T_FOOTER: "FOOTER", T_BASE: "BASE",
              T_BASEREF: "BASEREF", T_EXTERNAL: "EXTERNAL", T_BLOB: "BLOB", T_STAT: "STAT"}

CHUNK_MAX = 4 << 20
LIMITS = {
    T_HEADER: 64 << 10,
    T_ENTRY: 1 << 20,
    T_DATA: 48 + CHUNK_MAX,
    T_REF: 32,
    T_END: 68,
    T_INDEX: 16 << 20,
    T_FOOTER: 56,
    T_BASE: 16 << 20,
    T_BASEREF: 56,
    T_EXTERNAL: 44,
    T_BLOB: 48,
    T_STAT: 16,
}
#: Limits that differ in older versions.
LIMITS_V1 = {T_END: 36, T_FOOTER: 48}
LIMITS_V2 = {T_END: 56}
V2_TYPES = (T_BASE, T_BASEREF, T_EXTERNAL)
V3_TYPES = (T_BLOB, T_STAT)
#: The largest blob of a repository (docs/REPOSITORY.md)
BLOB_MAX = 4 << 20
ANCILLARY_LIMIT = 16 << 20
#: the writer ends an INDEX record after an item whose path's CRC-32 is a
#: multiple of this (about 64 items a record), so that an entry added or
#: removed changes one INDEX record, not every one after it
INDEX_CUT = 64

FRAME = struct.Struct("<HHI")
CRC = struct.Struct("<I")
FRAME_OVERHEAD = FRAME.size + CRC.size
FOOTER_SIZE = FRAME_OVERHEAD + LIMITS[T_FOOTER]
FOOTER_SIZES = {v: FOOTER_SIZE for v in READ_VERSIONS} | {1: FRAME_OVERHEAD
                                                          + LIMITS_V1[T_FOOTER]}

K_REG, K_DIR, K_SYMLINK, K_HARDLINK, K_FIFO, K_CHR, K_BLK = 1, 2, 3, 4, 5, 6, 7
K_SOCK = 8  # version 7
KIND_NAMES = {K_REG: "file", K_DIR: "dir", K_SYMLINK: "symlink", K_HARDLINK: "hardlink",
              K_FIFO: "fifo", K_CHR: "chardev", K_BLK: "blockdev", K_SOCK: "socket"}

EF_REFERENCED = 1

#: version 5: the inode flags an ENTRY may carry (FS_IOC_GETFLAGS, <linux/fs.h>),
#: with chattr's letter for each.  Flags a filesystem keeps for itself
#: (extents, encryption, verity, inline data, casefold, ...) are not stored.
IFLAG_LETTERS = {
    0x00000001: "s", 0x00000002: "u", 0x00000004: "c", 0x00000008: "S", 0x00000010: "i",
    0x00000020: "a", 0x00000040: "d", 0x00000080: "A", 0x00000400: "m", 0x00004000: "j",
    0x00008000: "t", 0x00010000: "D", 0x00020000: "T", 0x00800000: "C", 0x02000000: "x",
    0x20000000: "P",
}
IFLAGS_STORED = sum(IFLAG_LETTERS)
FS_COMPR_FL, FS_IMMUTABLE_FL, FS_APPEND_FL = 0x4, 0x10, 0x20
FS_NOCOMP_FL, FS_NOCOW_FL, FS_DAX_FL = 0x400, 0x00800000, 0x02000000
#: set before the file holds data (Btrfs takes C only on an empty file) ...
IFLAGS_FIRST = FS_NOCOW_FL | FS_COMPR_FL | FS_NOCOMP_FL | FS_DAX_FL
#: ... and after everything else (nothing can be written, renamed or linked then)
IFLAGS_LAST = FS_IMMUTABLE_FL | FS_APPEND_FL


def iflag_letters(flags: int) -> str:
    """chattr's letters for inode flags, in chattr's order of the table."""
    return "".join(ch for bit, ch in IFLAG_LETTERS.items() if flags & bit)


#: version 5: what a DIR entry says of a Btrfs subvolume
SV_SUBVOLUME, SV_READONLY, SV_SNAPSHOT = 1, 2, 4
CODEC_NONE, CODEC_ZSTD = 0, 1
#: version 4: one Btrfs compressed extent as it is on disk (docs/FORMAT.md)
CODEC_BTRFS = 2
#: BTRFS_ENCODED_IO_COMPRESSION_* (<linux/btrfs.h>) an encoded DATA record
#: may name: 1 zlib, 2 zstd, 3 to 7 lzo with 4 KiB to 64 KiB sectors
BTRFS_ZLIB, BTRFS_ZSTD, BTRFS_LZO_4K, BTRFS_LZO_64K = 1, 2, 3, 7
#: the most file data, and the most encoded bytes, of one extent
BTRFS_EXTENT_MAX = 128 << 10

#: the longest path in an archive: 65535 bytes from version 5 on (a tree may
#: be deeper than the kernel's PATH_MAX; it is walked and restored by
#: directory descriptor), 4096 before
PATH_MAX = 65535
PATH_MAX_V4 = 4096
NAME_MAX = 255
XATTR_VALUE_MAX = 64 << 10
SIZE_MAX = (1 << 63) - 1

_HEADER = struct.Struct("<IB3xq")
_ENTRY_V4 = struct.Struct("<QBBHIIIqqQQQ")
_ENTRY = struct.Struct("<QBBHIIIqqQQQIB3xQ")
_DATA = struct.Struct("<QIB3x32s")
#: the fixed fields at the start of a DATA payload
DATA_HEAD = _DATA.size
_ENCODED = struct.Struct("<IIB3x")
_REF = struct.Struct("<QQQQ")
_END_V1 = struct.Struct("<QIIQQ4x")
_END_V2 = struct.Struct("<QIIQQIQIQ")
_END = struct.Struct("<QIIQQIQIQIQ")
_INDEX_ITEM_V1 = struct.Struct("<QBQQQQ")
_INDEX_ITEM = struct.Struct("<QBQQQQQ")
_FOOTER_V1 = struct.Struct("<QQQQQQ")
_FOOTER = struct.Struct("<QQQQQQQ")
_BLOB = struct.Struct("<QII32s")
_STAT = struct.Struct("<Qq")
U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def frame(rtype: int, payload: bytes | memoryview) -> bytes:
    """A whole record: header, payload, CRC."""
    head = FRAME.pack(rtype, 0, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, payload, CRC.pack(crc)))


def frame_parts(rtype: int, head_payload: bytes, data: bytes | memoryview) -> list:
    """A record whose payload is head_payload + data, without joining data."""
    head = FRAME.pack(rtype, 0, len(head_payload) + len(data))
    crc = zlib.crc32(data, zlib.crc32(head_payload, zlib.crc32(head)))
    return [head, head_payload, data, CRC.pack(crc)]


def check_frame_header(head: bytes, offset: int, version: int = WRITE_VERSION
                       ) -> tuple[int, int]:
    rtype, flags, length = FRAME.unpack(head)
    limit = LIMITS.get(rtype)
    if version < 3 and rtype in V3_TYPES:
        limit = None
    if version == 2:
        limit = LIMITS_V2.get(rtype, limit)
    if version == 1:
        if rtype in V2_TYPES:
            limit = None
        limit = LIMITS_V1.get(rtype, limit)
    if limit is None:
        if not rtype & ANCILLARY:
            raise ArchiveError(f"unknown record type {rtype}", offset)
        limit = ANCILLARY_LIMIT
    name = TYPE_NAMES.get(rtype, f"ancillary record type {rtype:#x}")
    if flags != 0:
        raise ArchiveError(f"record flags {flags:#x} are not defined in version {version}",
                           offset)
    if length > limit:
        raise ArchiveError(f"{name} record of {length} bytes exceeds the limit of {limit}",
                           offset)
    return rtype, length


def check_crc(head: bytes, payload, crc_bytes: bytes, offset: int) -> None:
    (want,) = CRC.unpack(crc_bytes)
    got = zlib.crc32(payload, zlib.crc32(head))
    if got != want:
        rtype = FRAME.unpack(head)[0]
        raise ArchiveError(f"CRC mismatch in {TYPE_NAMES.get(rtype, rtype)} record", offset)


class Cursor:
    """Reads fields from a payload; any overrun is an ArchiveError."""

    __slots__ = ("buf", "pos", "offset", "what")

    def __init__(self, buf, offset: int, what: str):
        self.buf = buf
        self.pos = 0
        self.offset = offset
        self.what = what

    def fail(self, msg: str):
        raise ArchiveError(f"{self.what}: {msg}", self.offset)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail("record too short for its fields")
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def unpack(self, st: struct.Struct) -> tuple:
        if self.pos + st.size > len(self.buf):
            self.fail("record too short for its fields")
        v = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def bytes16(self, limit: int) -> bytes:
        (n,) = self.unpack(U16)
        if n > limit:
            self.fail(f"a field of {n} bytes exceeds its limit of {limit}")
        return self.take(n)

    def done(self) -> None:
        if self.pos != len(self.buf):
            self.fail(f"{len(self.buf) - self.pos} unexpected bytes at the end of the record")


# --- HEADER ---------------------------------------------------------------

@dataclass
class Header:
    version: int = WRITE_VERSION
    hash: int = HASH_SHA256
    created_ns: int = 0
    tool: str = ""

    def encode(self) -> bytes:
        t = self.tool.encode()[:1024]
        return _HEADER.pack(self.version, self.hash, self.created_ns) + U16.pack(len(t)) + t

    @classmethod
    def decode(cls, buf, offset: int) -> Header:
        c = Cursor(buf, offset, "HEADER")
        version, h, created = c.unpack(_HEADER)
        if version not in READ_VERSIONS:
            if version > max(READ_VERSIONS):
                raise ArchiveError(
                    f"archive format version {version} is newer than this cloneaware "
                    f"reads (up to {max(READ_VERSIONS)}); upgrade cloneaware", offset)
            raise ArchiveError(f"unknown archive format version {version}", offset)
        if h != HASH_SHA256:
            c.fail(f"unknown hash algorithm {h}")
        tool = c.bytes16(1024).decode("utf-8", "replace")
        c.done()
        return cls(version, h, created, tool)


# --- ENTRY ----------------------------------------------------------------

@dataclass
class Entry:
    id: int
    kind: int
    path: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    link: int = 0
    target: bytes = b""
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    eflags: int = 0
    #: version 5: inode flags (IFLAGS_STORED bits), REG and DIR only
    iflags: int = 0
    #: version 5: SV_* bits of a DIR that is a Btrfs subvolume, and with
    #: SV_SNAPSHOT the id of the earlier subvolume entry it is a snapshot of
    subvol: int = 0
    origin: int = 0

    def encode(self, version: int = WRITE_VERSION) -> bytes:
        eid, link, origin = self.id, self.link, self.origin
        if version >= RELATIVE:  # ids implicit, references as distances back
            eid, link = 0, self.id - link if self.kind == K_HARDLINK else 0
            origin = self.id - origin if self.subvol & SV_SNAPSHOT else 0
        fixed = (eid, self.kind, self.eflags, 0, self.mode, self.uid, self.gid,
                 self.atime_ns, self.mtime_ns, self.size, self.rdev, link)
        parts = [
            _ENTRY.pack(*fixed, self.iflags, self.subvol, origin) if version >= 5
            else _ENTRY_V4.pack(*fixed),
            U16.pack(len(self.path)), self.path,
            U16.pack(len(self.target)), self.target,
            _U32.pack(len(self.xattrs)),
        ]
        for name, value in self.xattrs:
            parts += [bytes((len(name),)), name, _U32.pack(len(value)), value]
        return b"".join(parts)

    @classmethod
    def decode(cls, buf, offset: int, version: int = WRITE_VERSION, at: int = 0) -> Entry:
        """``at``: the entry's position in the archive (its id from version 6
        on, where the record holds none)."""
        c = Cursor(buf, offset, "ENTRY")
        iflags = subvol = origin = 0
        if version >= 5:
            (eid, kind, eflags, _r, mode, uid, gid, atime, mtime, size, rdev,
             link, iflags, subvol, origin) = c.unpack(_ENTRY)
        else:
            (eid, kind, eflags, _r, mode, uid, gid, atime, mtime, size, rdev,
             link) = c.unpack(_ENTRY_V4)
        if version >= RELATIVE:
            if eid:
                c.fail("id field is not 0 (ids are implicit from version 6 on)")
            eid = at
            if kind == K_HARDLINK:
                if not 0 < link <= at:
                    c.fail(f"link {link} entries back, before the first entry")
                link = at - link
            elif link:
                c.fail("only hard links have a link")
            if subvol & SV_SNAPSHOT:
                if not 0 < origin <= at:
                    c.fail(f"a snapshot of the entry {origin} back, which does not come "
                           "before it")
                origin = at - origin
            elif origin:
                c.fail("an origin without the snapshot bit")
        if iflags & ~IFLAGS_STORED:
            c.fail(f"inode flags {iflags & ~IFLAGS_STORED:#x} are not defined")
        if iflags and kind not in (K_REG, K_DIR):
            c.fail("only regular files and directories have inode flags")
        if subvol:
            if kind != K_DIR or subvol & ~(SV_SUBVOLUME | SV_READONLY | SV_SNAPSHOT) \
                    or not subvol & SV_SUBVOLUME:
                c.fail(f"subvolume bits {subvol:#x} are not those of a subvolume directory")
            if subvol & SV_SNAPSHOT and origin >= eid:
                c.fail(f"a snapshot of entry {origin}, which does not come before it")
        if origin and not subvol & SV_SNAPSHOT:
            c.fail("an origin without the snapshot bit")
        if kind not in KIND_NAMES or kind == K_SOCK and version < SOCKETS:
            c.fail(f"unknown entry kind {kind}" + (f" in version {version}" if kind in KIND_NAMES
                                                   else ""))
        if mode > 0o7777:
            c.fail(f"mode {mode:#o} has bits beyond 0o7777")
        if size > SIZE_MAX:
            c.fail(f"size {size} is too large")
        if kind != K_REG and size:
            c.fail("only regular files have a size")
        path = c.bytes16(path_max(version))
        path_ok(path, offset, version)
        target = c.bytes16(PATH_MAX_V4)
        if kind == K_SYMLINK and (not target or b"\0" in target):
            c.fail("symlink target is empty or holds NUL")
        if kind != K_SYMLINK and target:
            c.fail("only symlinks have a target")
        (count,) = c.unpack(_U32)
        # Each xattr takes at least 5 bytes: bound the count before looping.
        if count * 5 > len(buf) - c.pos:
            c.fail(f"xattr count {count} does not fit in the record")
        xattrs = []
        for _ in range(count):
            n = c.take(1)[0]
            name = c.take(n)
            if not name or b"\0" in name:
                c.fail("empty xattr name or NUL in it")
            (vlen,) = c.unpack(_U32)
            if vlen > XATTR_VALUE_MAX:
                c.fail(f"xattr value of {vlen} bytes exceeds {XATTR_VALUE_MAX}")
            xattrs.append((name, c.take(vlen)))
        c.done()
        return cls(eid, kind, path, mode, uid, gid, atime, mtime, size, rdev, link,
                   target, xattrs, eflags, iflags, subvol, origin)


def path_max(version: int) -> int:
    """The longest path an archive of this version holds."""
    return PATH_MAX if version >= 5 else PATH_MAX_V4


def path_ok(path: bytes, offset: int | None = None, version: int = WRITE_VERSION) -> None:
    """check_path without the components, for the readers' every entry and
    index item: a short path with none of the marks of a bad one passes at
    once (an empty or absolute one has "//" framed), any other is checked
    in full."""
    framed = b"/" + path + b"/"
    if len(path) > NAME_MAX or b"\0" in path or b"//" in framed or b"/./" in framed \
            or b"/../" in framed:
        check_path(path, offset, version)


def check_path(path: bytes, offset: int | None = None, version: int = WRITE_VERSION
               ) -> list[bytes]:
    """Components of an archive path, or ArchiveError if it is not a clean
    relative path (absolute, '..', '.', empty components, NUL, too long for
    the archive's version)."""
    if not path:
        raise ArchiveError("empty path", offset)
    if len(path) > path_max(version):
        raise ArchiveError("path too long", offset)
    if b"\0" in path:
        raise ArchiveError(f"path {path!r} contains NUL", offset)
    if path.startswith(b"/"):
        raise ArchiveError(f"absolute path {path!r}", offset)
    parts = path.split(b"/")
    # (substring tests, not a loop over the components: this runs for every
    # entry and every index item a reader reads)
    framed = b"/" + path + b"/"
    if b"//" in framed or b"/./" in framed or b"/../" in framed:
        raise ArchiveError(f"path {path!r} has an empty, '.' or '..' component", offset)
    if len(path) > NAME_MAX and max(map(len, parts)) > NAME_MAX:
        raise ArchiveError(f"path {path!r} has a component over {NAME_MAX} bytes", offset)
    return parts


# --- DATA, REF, END -------------------------------------------------------

def encode_data_head(offset: int, length: int, codec: int, sha: bytes) -> bytes:
    return _DATA.pack(offset, length, codec, sha)


class SkippedPayload(NamedTuple):
    """A DATA payload the reader did not read: its head (DATA_HEAD bytes)
    and its whole length (archive/reader.py, ``skip_data``)."""

    head: bytes
    length: int


def decode_data_head(buf, offset: int, version: int = WRITE_VERSION
                     ) -> tuple[int, int, int, bytes, int]:
    """(file offset, length, codec, sha256, start of coded bytes in buf);
    ``buf`` may be a SkippedPayload (the head only is decoded)."""
    total = len(buf) if not isinstance(buf, SkippedPayload) else buf.length
    if isinstance(buf, SkippedPayload):
        buf = buf.head
    c = Cursor(buf, offset, "DATA")
    off, length, codec, sha = c.unpack(_DATA)
    if not 0 < length <= CHUNK_MAX:
        c.fail(f"chunk length {length} outside 1..{CHUNK_MAX}")
    if codec not in (CODEC_NONE, CODEC_ZSTD) and not (codec == CODEC_BTRFS and version >= 4):
        c.fail(f"unknown codec {codec}")
    if codec == CODEC_NONE and total - c.pos != length:
        c.fail("stored chunk size differs from its length")
    if off > SIZE_MAX or off + length > SIZE_MAX:
        c.fail("offset out of range")
    return off, length, codec, sha, c.pos


@dataclass(frozen=True)
class BtrfsExtent:
    """The coded bytes of a CODEC_BTRFS DATA record: one compressed extent
    as Btrfs stores it, and where the record's bytes lie in it."""

    unencoded_len: int  # decompressed size of the extent
    unencoded_offset: int  # where the record's bytes start in it
    compression: int  # BTRFS_ZLIB, BTRFS_ZSTD or an LZO value
    data: bytes  # the encoded bytes (one zstd frame, one zlib stream, ...)


def encode_btrfs_extent(x: BtrfsExtent) -> bytes:
    return _ENCODED.pack(x.unencoded_len, x.unencoded_offset, x.compression) + x.data


def decode_btrfs_extent(coded, length: int, offset: int) -> BtrfsExtent:
    """The coded bytes of a CODEC_BTRFS DATA record of ``length`` bytes,
    checked against the limits of BTRFS_IOC_ENCODED_WRITE."""
    c = Cursor(coded, offset, "DATA (Btrfs extent)")
    ulen, uoff, comp = c.unpack(_ENCODED)
    data = bytes(coded[c.pos:])
    if not 0 < ulen <= BTRFS_EXTENT_MAX or uoff + length > ulen:
        c.fail(f"{length} bytes at {uoff} outside an extent of {ulen} bytes "
               f"(at most {BTRFS_EXTENT_MAX})")
    if uoff % 4096:
        c.fail(f"extent offset {uoff} is not sector-aligned")
    if not BTRFS_ZLIB <= comp <= BTRFS_LZO_64K:
        c.fail(f"unknown Btrfs compression {comp}")
    if not 0 < len(data) < ulen:
        c.fail(f"{len(data)} encoded bytes for an extent of {ulen}")
    return BtrfsExtent(ulen, uoff, comp, data)


def encode_ref(offset: int, length: int, src_id: int, src_offset: int,
               version: int = WRITE_VERSION, at: int = 0) -> bytes:
    """``at``: the id of the current entry (version 6 on, where ``src_id``
    is written as the distance back to the source: 0 for the file itself)."""
    return _REF.pack(offset, length, at - src_id if version >= RELATIVE else src_id,
                     src_offset)


def decode_ref(buf, offset: int, version: int = WRITE_VERSION, at: int = 0
               ) -> tuple[int, int, int, int]:
    """(offset, length, source id, source offset); ``at`` as for encode_ref."""
    c = Cursor(buf, offset, "REF")
    off, length, src, soff = c.unpack(_REF)
    c.done()
    if length == 0 or off > SIZE_MAX or length > SIZE_MAX or soff > SIZE_MAX:
        c.fail("range out of bounds")
    if version >= RELATIVE:
        if src > at:
            c.fail(f"source {src} entries back, before the first entry")
        src = at - src
    return off, length, src, soff


@dataclass
class End:
    id: int
    data_records: int = 0
    ref_records: int = 0
    stored_bytes: int = 0
    ref_bytes: int = 0
    base_ref_records: int = 0
    base_ref_bytes: int = 0
    external_records: int = 0
    external_bytes: int = 0
    blob_records: int = 0
    blob_bytes: int = 0

    #: positions in counts()
    DATA, REF, BASEREF, EXTERNAL, BLOB = 0, 1, 2, 3, 4

    def counts(self) -> list[int]:
        """Records per kind (DATA, REF, BASEREF, EXTERNAL, BLOB), then bytes per kind."""
        return [self.data_records, self.ref_records, self.base_ref_records,
                self.external_records, self.blob_records, self.stored_bytes,
                self.ref_bytes, self.base_ref_bytes, self.external_bytes, self.blob_bytes]

    def encode(self, version: int = WRITE_VERSION) -> bytes:
        return _END.pack(0 if version >= RELATIVE else self.id, self.data_records, self.ref_records,
                         self.stored_bytes, self.ref_bytes, self.base_ref_records,
                         self.base_ref_bytes, self.external_records, self.external_bytes,
                         self.blob_records, self.blob_bytes)

    @classmethod
    def decode(cls, buf, offset: int, version: int = WRITE_VERSION, at: int = 0) -> End:
        """``at``: the id of the entry it closes (version 6 on, where the
        record's id is 0)."""
        c = Cursor(buf, offset, "END")
        v = c.unpack({1: _END_V1, 2: _END_V2}.get(version, _END))
        c.done()
        if version >= RELATIVE:
            if v[0]:
                c.fail("id field is not 0 (ids are implicit from version 6 on)")
            v = (at, *v[1:])
        return cls(*v)


# --- INDEX, FOOTER --------------------------------------------------------

@dataclass
class IndexItem:
    id: int
    kind: int
    size: int
    stored_bytes: int
    ref_bytes: int
    base_ref_bytes: int
    offset: int
    path: bytes

    def encode(self, version: int = WRITE_VERSION, prev_offset: int = 0) -> bytes:
        """``prev_offset``: the previous item's offset (version 6 on, where
        the id is implicit and the offset is the distance from it)."""
        i, off = self.id, self.offset
        if version >= RELATIVE:
            i, off = 0, off - prev_offset
        return (_INDEX_ITEM.pack(i, self.kind, self.size, self.stored_bytes,
                                 self.ref_bytes, self.base_ref_bytes, off)
                + U16.pack(len(self.path)) + self.path)


def iter_index(buf, offset: int, version: int = WRITE_VERSION) -> Iterator[tuple[tuple, bytes]]:
    """Each item of an INDEX record, framed and its kind known: its fixed
    fields as packed (six in version 1, seven after) and its path, which
    the caller checks.  One loop with no call per field: an index holds an
    item per entry, and a restore of a seekable archive reads it twice (its
    top-level names before anything is written, all of it against the
    entries at the end)."""
    fixed = _INDEX_ITEM_V1 if version == 1 else _INDEX_ITEM
    head = fixed.size + U16.size
    unpack, u16 = fixed.unpack_from, U16.unpack_from
    limit = path_max(version)
    kinds = KIND_NAMES
    end = len(buf)
    pos = 0
    while pos < end:
        if pos + head > end:
            raise ArchiveError("INDEX: record too short for its fields", offset)
        v = unpack(buf, pos)
        (n,) = u16(buf, pos + fixed.size)
        pos += head
        if n > limit:
            raise ArchiveError(f"INDEX: a field of {n} bytes exceeds its limit of {limit}",
                               offset)
        if pos + n > end:
            raise ArchiveError("INDEX: record too short for its fields", offset)
        if v[1] not in kinds:
            raise ArchiveError(f"INDEX: unknown entry kind {v[1]}", offset)
        yield v, bytes(buf[pos:pos + n])
        pos += n


def decode_index(buf, offset: int, version: int = WRITE_VERSION) -> list[IndexItem]:
    """The items of an INDEX record (their paths are checked by the caller)."""
    if version == 1:
        return [IndexItem(v[0], v[1], v[2], v[3], v[4], 0, v[5], path)
                for v, path in iter_index(buf, offset, version)]
    return [IndexItem(v[0], v[1], v[2], v[3], v[4], v[5], v[6], path)
            for v, path in iter_index(buf, offset, version)]


def resolve_index(items: list[IndexItem], version: int, offset: int) -> None:
    """Version 6 on: the ids and offsets of all of an archive's INDEX items
    (decoded as written: id 0, offset as the distance from the previous
    item's) made absolute, in place."""
    if version < RELATIVE:
        return
    prev = 0
    for n, it in enumerate(items):
        if it.id:
            raise ArchiveError("INDEX: id field is not 0 (ids are implicit from version 6 on)",
                               offset)
        it.id = n
        prev = it.offset = prev + it.offset


@dataclass
class Footer:
    index_offset: int
    index_records: int
    entries: int
    stored_bytes: int
    ref_bytes: int
    base_ref_bytes: int
    footer_offset: int

    def encode(self) -> bytes:
        return _FOOTER.pack(self.index_offset, self.index_records, self.entries,
                            self.stored_bytes, self.ref_bytes, self.base_ref_bytes,
                            self.footer_offset)

    @classmethod
    def decode(cls, buf, offset: int, version: int = WRITE_VERSION) -> Footer:
        c = Cursor(buf, offset, "FOOTER")
        if version == 1:
            io_, ir, en, st, rb, fo = c.unpack(_FOOTER_V1)
            v = (io_, ir, en, st, rb, 0, fo)
        else:
            v = c.unpack(_FOOTER)
        c.done()
        f = cls(*v)
        if f.footer_offset != offset:
            c.fail(f"footer says it is at {f.footer_offset}")
        if f.index_offset >= offset:
            c.fail("index offset after the footer")
        return f


# --- version 3: repository manifests ---------------------------------------------

def encode_blob(offset: int, length: int, blob_offset: int, blob_id: bytes) -> bytes:
    return _BLOB.pack(offset, length, blob_offset, blob_id)


def decode_blob(buf, offset: int) -> tuple[int, int, int, bytes]:
    """(file offset, length, offset in the blob, blob id)."""
    c = Cursor(buf, offset, "BLOB")
    off, length, boff, bid = c.unpack(_BLOB)
    c.done()
    if not 0 < length <= BLOB_MAX or boff + length > BLOB_MAX:
        c.fail(f"range of {length} bytes at {boff} outside a blob of at most {BLOB_MAX}")
    if off > SIZE_MAX or off + length > SIZE_MAX:
        c.fail("range out of bounds")
    return off, length, boff, bid


def encode_stat(ino: int, ctime_ns: int) -> bytes:
    return _STAT.pack(ino, ctime_ns)


def decode_stat(buf, offset: int) -> tuple[int, int]:
    """(inode number, ctime in ns) of the source file."""
    c = Cursor(buf, offset, "STAT")
    v = c.unpack(_STAT)
    c.done()
    return v
