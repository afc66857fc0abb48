"""The archive format's bytes (docs/FORMAT.md), with no filesystem: the test
vectors printed in the spec, encode/decode round trips of every record,
the checks a decoder must make, path rules, and a writer-to-reader round
trip in memory."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import struct
import zlib
from pathlib import Path

import pytest
from helpers.archivecraft import Craft, records

from cloneaware.archive import format as fmt
from cloneaware.archive.catalog import read_index
from cloneaware.archive.events import (
    DataEvent,
    EndEvent,
    EntryEvent,
    FooterEvent,
    RefEvent,
)
from cloneaware.archive.reader import Stream
from cloneaware.archive.writer import Writer
from cloneaware.errors import ArchiveError, TruncatedArchive

SPEC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def make(cls, **kw):
    """An instance of a record dataclass; fields not given are 0 / empty (so
    the test does not break when a version adds counters)."""
    args = {}
    for f in dataclasses.fields(cls):
        if f.name in kw:
            args[f.name] = kw[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            args[f.name] = b"" if f.type in ("bytes", bytes) else 0
    return cls(**args)


def spec_text() -> str:
    return SPEC.read_text()


# --- the spec's test vectors ---------------------------------------------------------

def test_crc_check_value():
    assert "0xCBF43926" in spec_text()
    assert zlib.crc32(b"123456789") == 0xCBF43926
    # the framing CRC is that CRC: over header and payload
    rec = fmt.frame(0x8001, b"123456789")
    assert rec[:8] == struct.pack("<HHI", 0x8001, 0, 9)
    assert int.from_bytes(rec[-4:], "little") == zlib.crc32(rec[:-4])


#: The END record of entry 0 with no data, per format version, as FORMAT.md
#: gives it: frame header, zero payload, CRC.
END_VECTORS = {
    1: bytes.fromhex("05000000" "24000000" + "00" * 36 + "94fd92e3"),
    2: bytes.fromhex("05000000" "38000000" + "00" * 56 + "44e9b266"),
    3: bytes.fromhex("05000000" "44000000" + "00" * 68 + "b5edd3d9"),
    4: bytes.fromhex("05000000" "44000000" + "00" * 68 + "b5edd3d9"),  # END unchanged in 4
    5: bytes.fromhex("05000000" "44000000" + "00" * 68 + "b5edd3d9"),  # and in 5
    6: bytes.fromhex("05000000" "44000000" + "00" * 68 + "b5edd3d9"),  # and in 6 (its id is 0)
    7: bytes.fromhex("05000000" "44000000" + "00" * 68 + "b5edd3d9"),  # and in 7
}
END_CRCS = {1: 0xE392FD94, 2: 0x66B2E944, 3: 0xD9D3EDB5, 4: 0xD9D3EDB5, 5: 0xD9D3EDB5,
            6: 0xD9D3EDB5, 7: 0xD9D3EDB5}

#: Version 5's ENTRY as FORMAT.md gives it: the directory "d" (id 0, mode
#: 0755), a read-only Btrfs subvolume with the inode flag C (no copy on write).
ENTRY_V5_VECTOR = bytes.fromhex(
    "02000000" "59000000" "0000000000000000" "02" "00" "0000" "ed010000" + "00" * 48
    + "00008000" "03" "000000" "0000000000000000" "0100" "64" "0000" "00000000" "d0b4ef53")


def test_version_5_entry_vector():
    e = fmt.Entry(0, fmt.K_DIR, b"d", mode=0o755, iflags=fmt.FS_NOCOW_FL,
                  subvol=fmt.SV_SUBVOLUME | fmt.SV_READONLY)
    assert fmt.frame(fmt.T_ENTRY, e.encode()) == ENTRY_V5_VECTOR
    assert fmt.Entry.decode(ENTRY_V5_VECTOR[8:-4], 0, version=5) == e
    assert int.from_bytes(ENTRY_V5_VECTOR[-4:], "little") == 0x53EFB4D0
    text = spec_text().lower()
    assert "0x53efb4d0" in text and "d0 b4 ef 53" in text
    # version 4 has none of the new fields: the same entry is 16 bytes shorter
    assert len(e.encode(4)) == len(e.encode()) - 16
    assert fmt.Entry.decode(e.encode(4), 0, version=4) == dataclasses.replace(
        e, iflags=0, subvol=0)


def test_version_5_entry_fields_are_checked():
    good = fmt.Entry(3, fmt.K_DIR, b"s", subvol=fmt.SV_SUBVOLUME | fmt.SV_SNAPSHOT, origin=1)
    assert fmt.Entry.decode(good.encode(5), 0, version=5) == good
    assert fmt.Entry.decode(good.encode(), 0, at=3) == good
    bad = [
        dataclasses.replace(good, iflags=0x80000),  # e: ext4's own, not stored
        fmt.Entry(0, fmt.K_SYMLINK, b"l", target=b"x", iflags=fmt.FS_IMMUTABLE_FL),
        fmt.Entry(0, fmt.K_REG, b"f", subvol=fmt.SV_SUBVOLUME),  # only directories
        dataclasses.replace(good, subvol=fmt.SV_READONLY),  # read-only but no subvolume
        dataclasses.replace(good, subvol=8 | fmt.SV_SUBVOLUME),
        dataclasses.replace(good, origin=3),  # a snapshot of itself
        dataclasses.replace(good, origin=7),  # of a later entry
        dataclasses.replace(good, subvol=fmt.SV_SUBVOLUME),  # an origin without the bit
    ]
    for e in bad:
        with pytest.raises(ArchiveError):
            fmt.Entry.decode(e.encode(5), 0, version=5)
    assert fmt.iflag_letters(fmt.FS_NOCOW_FL | fmt.FS_IMMUTABLE_FL | 0x40) == "idC"


def test_end_record_vectors_are_self_consistent():
    for v, vec in END_VECTORS.items():
        assert int.from_bytes(vec[-4:], "little") == END_CRCS[v] == zlib.crc32(vec[:-4])
        fmt.check_crc(vec[:8], vec[8:-4], vec[-4:], 0)


def test_spec_states_the_end_vectors():
    text = spec_text().lower()
    for v in fmt.READ_VERSIONS:
        assert f"0x{END_CRCS[v]:08x}" in text, v
        assert " ".join(f"{b:02x}" for b in END_VECTORS[v][:8]) in text, v
        assert " ".join(f"{b:02x}" for b in END_VECTORS[v][-4:]) in text, v


def test_writer_produces_the_end_vector():
    vec = END_VECTORS[fmt.WRITE_VERSION]
    assert fmt.frame(fmt.T_END, fmt.End(0).encode()) == vec
    assert fmt.check_frame_header(vec[:8], 0) == (fmt.T_END, len(vec) - 12)
    assert fmt.End.decode(vec[8:-4], 0) == fmt.End(0)


@pytest.mark.parametrize("version", sorted(END_VECTORS))
def test_reader_decodes_the_end_vector(version):
    if version not in fmt.READ_VERSIONS:
        pytest.skip(f"this cloneaware does not read version {version}")
    vec = END_VECTORS[version]
    kw = {"version": version} if len(fmt.READ_VERSIONS) > 1 else {}
    assert fmt.check_frame_header(vec[:8], 0, **kw) == (fmt.T_END, len(vec) - 12)
    fmt.check_crc(vec[:8], vec[8:-4], vec[-4:], 0)
    assert fmt.End.decode(vec[8:-4], 0, **kw) == fmt.End(0)


def test_spec_and_code_agree_on_version_and_magic():
    text = spec_text()
    m = re.search(r"^# cloneaware archive format, version (\d+)", text, re.M)
    assert m and int(m.group(1)) == fmt.WRITE_VERSION, (m and m.group(0), fmt.WRITE_VERSION)
    assert fmt.MAGIC == bytes.fromhex("89434C4F4E454157") == b"\x89CLONEAW"
    assert "89 43 4C 4F 4E 45 41 57" in text
    # the footer is at a fixed distance from the end
    assert fmt.FOOTER_SIZE == len(fmt.frame(fmt.T_FOOTER, make(fmt.Footer).encode()))


# --- framing ---------------------------------------------------------------------------

def test_every_bit_flip_in_a_record_is_caught():
    rec = fmt.frame(fmt.T_REF, fmt.encode_ref(4096, 8192, 3, 0, at=5))
    for i in range(len(rec)):
        for bit in (0x01, 0x80):
            bad = bytearray(rec)
            bad[i] ^= bit
            bad = bytes(bad)
            with pytest.raises(ArchiveError):
                rtype, length = fmt.check_frame_header(bad[:8], 100)
                if length != len(bad) - 12:
                    raise ArchiveError("length changed")
                fmt.check_crc(bad[:8], bad[8:-4], bad[-4:], 100)


def test_crc_error_names_the_offset():
    rec = bytearray(fmt.frame(fmt.T_END, fmt.End(7).encode()))
    rec[10] ^= 4
    with pytest.raises(ArchiveError, match="offset 1234"):
        fmt.check_crc(bytes(rec[:8]), bytes(rec[8:-4]), bytes(rec[-4:]), 1234)


def test_frame_header_limits_and_types():
    for rtype, limit in fmt.LIMITS.items():
        assert fmt.check_frame_header(struct.pack("<HHI", rtype, 0, limit), 0) == (rtype, limit)
        with pytest.raises(ArchiveError, match="limit"):
            fmt.check_frame_header(struct.pack("<HHI", rtype, 0, limit + 1), 0)
    with pytest.raises(ArchiveError, match="unknown record type"):
        fmt.check_frame_header(struct.pack("<HHI", 0x7F00, 0, 4), 0)
    # ancillary types are accepted (and skipped by readers)
    assert fmt.check_frame_header(struct.pack("<HHI", 0x8123, 0, 4), 0) == (0x8123, 4)
    with pytest.raises(ArchiveError, match="flags"):
        fmt.check_frame_header(struct.pack("<HHI", fmt.T_REF, 1, 32), 0)
    assert fmt.LIMITS[fmt.T_DATA] == 48 + 4 * 1024 * 1024
    assert fmt.LIMITS[fmt.T_REF] == 32


# --- records ----------------------------------------------------------------------------

def test_header_round_trip_and_versions():
    h = fmt.Header(created_ns=1_700_000_000_123_456_789, tool="cloneaware 9.9")
    got = fmt.Header.decode(h.encode(), 8)
    assert got == h and got.version == fmt.WRITE_VERSION and got.hash == fmt.HASH_SHA256
    newer = dataclasses.replace(h, version=max(fmt.READ_VERSIONS) + 1).encode()
    with pytest.raises(ArchiveError, match=str(max(fmt.READ_VERSIONS) + 1)):
        fmt.Header.decode(newer, 8)
    with pytest.raises(ArchiveError):
        fmt.Header.decode(dataclasses.replace(h, version=0).encode(), 8)
    with pytest.raises(ArchiveError, match="hash"):
        fmt.Header.decode(dataclasses.replace(h, hash=9).encode(), 8)
    with pytest.raises(ArchiveError):
        fmt.Header.decode(h.encode() + b"\0", 8)


ENTRIES = [
    fmt.Entry(0, fmt.K_DIR, b"top", mode=0o1777, uid=1, gid=2, atime_ns=-1_000_000_001,
              mtime_ns=-5, xattrs=[(b"user.a", b"1"), (b"system.posix_acl_default", b"\x02" * 28)]),
    fmt.Entry(1, fmt.K_REG, b"top/bad\xff\nname -x", mode=0o4755, uid=2**32 - 2, gid=65534,
              atime_ns=2**62, mtime_ns=1_700_000_000_999_999_999, size=fmt.SIZE_MAX,
              eflags=fmt.EF_REFERENCED, xattrs=[(b"user.empty", b""),
                                                (b"user.big", bytes(range(256)) * 256)]),
    fmt.Entry(2, fmt.K_SYMLINK, b"top/l", mode=0o777, target=b"/abs/\xfe/target"),
    fmt.Entry(3, fmt.K_HARDLINK, b"top/h", link=1),
    fmt.Entry(4, fmt.K_FIFO, b"top/fifo", mode=0o640),
    fmt.Entry(5, fmt.K_CHR, b"top/null", rdev=(1 << 8) | 3),
    fmt.Entry(6, fmt.K_BLK, b"top/" + b"n" * 255, rdev=2**64 - 1),
]


@pytest.mark.parametrize("e", ENTRIES, ids=[fmt.KIND_NAMES[e.kind] for e in ENTRIES])
def test_entry_round_trip(e):
    buf = e.encode()
    assert fmt.Entry.decode(buf, 0, at=e.id) == e
    assert fmt.Entry.decode(memoryview(buf), 0, at=e.id) == e
    assert fmt.Entry.decode(e.encode(5), 0, version=5) == e
    with pytest.raises(ArchiveError):
        fmt.Entry.decode(buf + b"\0", 0, at=e.id)  # bytes left over
    with pytest.raises(ArchiveError):
        fmt.Entry.decode(buf[:-1], 0, at=e.id)  # bytes missing


def test_socket_entry_is_version_7():
    e = fmt.Entry(0, fmt.K_SOCK, b"run.sock", mode=0o755, uid=3, xattrs=[(b"user.a", b"1")])
    assert fmt.Entry.decode(e.encode(), 0) == e
    for v in (5, 6):  # kind 8 did not exist: refused, as any unknown kind
        with pytest.raises(ArchiveError, match=f"unknown entry kind 8 in version {v}"):
            fmt.Entry.decode(e.encode(v), 0, version=v)


def test_version_6_references_are_relative():
    """An entry's bytes do not depend on where it is, only on the distance
    to what it links to: one entry added changes no other entry's bytes
    (what lets a repository's manifests dedup across snapshots)."""
    a = fmt.Entry(7, fmt.K_HARDLINK, b"top/h", link=5)
    b = fmt.Entry(8, fmt.K_HARDLINK, b"top/h", link=6)
    assert a.encode() == b.encode() and a.encode(5) != b.encode(5)
    assert fmt.Entry.decode(b.encode(), 0, at=8) == b
    assert fmt.Entry.decode(fmt.Entry(3, fmt.K_DIR, b"d").encode(), 0, at=3).id == 3
    with pytest.raises(ArchiveError, match="before the first entry"):
        fmt.Entry.decode(a.encode(), 0, at=1)  # a link 2 back from entry 1
    with pytest.raises(ArchiveError, match="id field is not 0"):
        fmt.Entry.decode(a.encode(5), 0, at=7)
    # REF: the distance back to the source; 0 is the file itself
    assert fmt.encode_ref(0, 4096, 5, 0, at=7) == fmt.encode_ref(0, 4096, 6, 0, at=8)
    assert fmt.decode_ref(fmt.encode_ref(0, 4096, 5, 0, at=7), 0, at=7) == (0, 4096, 5, 0)
    assert fmt.decode_ref(fmt.encode_ref(8192, 4096, 7, 0, at=7), 0, at=7)[2] == 7
    with pytest.raises(ArchiveError, match="before the first entry"):
        fmt.decode_ref(fmt.encode_ref(0, 4096, 5, 0, at=7), 0, at=1)
    # END: id 0, the reader knows which file it closes
    assert fmt.End(9).encode() == fmt.End(0).encode()
    assert fmt.End.decode(fmt.End(9).encode(), 0, at=9) == fmt.End(9)
    with pytest.raises(ArchiveError, match="id field is not 0"):
        fmt.End.decode(fmt.End(9).encode(5), 0, at=9)
    # INDEX: implicit ids, offsets as distances from the previous item's
    items = [fmt.IndexItem(i, fmt.K_DIR, 0, 0, 0, 0, 100 + 50 * i, b"d%d" % i)
             for i in range(3)]
    raw, prev = b"", 0
    for it in items:
        raw += it.encode(prev_offset=prev)
        prev = it.offset
    assert raw.count(struct.pack("<Q", 50)) == 2
    got = fmt.decode_index(raw, 0)
    fmt.resolve_index(got, fmt.WRITE_VERSION, 0)
    assert got == items


def test_entry_decode_refuses_bad_fields():
    good = fmt.Entry(0, fmt.K_REG, b"a", size=5)
    bad = [
        dataclasses.replace(good, kind=9),
        dataclasses.replace(good, mode=0o17777),
        dataclasses.replace(good, kind=fmt.K_DIR),  # a directory with a size
        dataclasses.replace(good, path=b"../a"),
        dataclasses.replace(good, path=b"/etc/passwd"),
        dataclasses.replace(good, target=b"x"),  # only symlinks have targets
        fmt.Entry(0, fmt.K_SYMLINK, b"l", target=b""),
        fmt.Entry(0, fmt.K_SYMLINK, b"l", target=b"a\0b"),
        dataclasses.replace(good, xattrs=[(b"", b"v")]),
        dataclasses.replace(good, xattrs=[(b"user.x", b"v" * (fmt.XATTR_VALUE_MAX + 1))]),
    ]
    for e in bad:
        with pytest.raises(ArchiveError):
            fmt.Entry.decode(e.encode(5), 0, version=5)
    # an xattr count that cannot fit is refused before any loop runs
    buf = bytearray(fmt.Entry(0, fmt.K_REG, b"a").encode())
    buf[-4:] = struct.pack("<I", 2**32 - 1)
    with pytest.raises(ArchiveError, match="xattr count"):
        fmt.Entry.decode(bytes(buf), 0)


def test_data_head_round_trip_and_checks():
    sha = hashlib.sha256(b"x" * 100).digest()
    head = fmt.encode_data_head(8192, 100, fmt.CODEC_NONE, sha)
    assert len(head) == 48
    payload = head + b"x" * 100
    assert fmt.decode_data_head(payload, 0) == (8192, 100, fmt.CODEC_NONE, sha, 48)
    z = fmt.encode_data_head(0, 4 << 20, fmt.CODEC_ZSTD, sha) + b"frame"
    assert fmt.decode_data_head(z, 0)[:3] == (0, 4 << 20, fmt.CODEC_ZSTD)
    for bad in [
        head + b"x" * 99,  # stored chunk shorter than its length
        head + b"x" * 101,
        fmt.encode_data_head(0, 0, fmt.CODEC_NONE, sha),
        fmt.encode_data_head(0, (4 << 20) + 1, fmt.CODEC_ZSTD, sha) + b"z",
        fmt.encode_data_head(0, 100, 7, sha) + b"x" * 100,
        fmt.encode_data_head(2**63 - 50, 100, fmt.CODEC_NONE, sha) + b"x" * 100,
        head[:40],
    ]:
        with pytest.raises(ArchiveError):
            fmt.decode_data_head(bad, 0)


def test_ref_round_trip_and_checks():
    buf = fmt.encode_ref(1 << 20, 3 << 20, 5, 4096, at=6)
    assert len(buf) == 32
    assert fmt.decode_ref(buf, 0, at=6) == (1 << 20, 3 << 20, 5, 4096)
    assert fmt.decode_ref(fmt.encode_ref(0, 8, 5, 0, version=5), 0, version=5) == (0, 8, 5, 0)
    for bad in [fmt.encode_ref(0, 0, 1, 0, at=1), buf + b"\0", buf[:-1],
                fmt.encode_ref(0, 2**63, 1, 0, at=1)]:
        with pytest.raises(ArchiveError):
            fmt.decode_ref(bad, 0, at=6)


def test_end_round_trip():
    e = make(fmt.End, id=9, data_records=3, ref_records=4, stored_bytes=10 << 20,
             ref_bytes=1 << 40)
    assert fmt.End.decode(e.encode(), 0, at=9) == e
    assert fmt.End.decode(e.encode(5), 0, version=5) == e
    with pytest.raises(ArchiveError):
        fmt.End.decode(e.encode() + b"\0", 0, at=9)
    with pytest.raises(ArchiveError):
        fmt.End.decode(e.encode()[:-1], 0, at=9)


def test_index_round_trip():
    items = [make(fmt.IndexItem, id=i, kind=k, size=s, stored_bytes=st, ref_bytes=rb,
                  offset=o, path=p)
             for i, (k, s, st, rb, o, p) in enumerate([
                 (fmt.K_DIR, 0, 0, 0, 70, b"d"),
                 (fmt.K_REG, 1 << 40, 1 << 20, 5 << 20, 200, b"d/\xff f"),
                 (fmt.K_HARDLINK, 0, 0, 0, 4_000_000, b"d/h"),
             ])]
    buf = b"".join(it.encode(5) for it in items)
    assert fmt.decode_index(buf, 0, version=5) == items
    buf6 = b"".join(it.encode(prev_offset=p) for it, p in zip(items, [0, 70, 200]))
    got = fmt.decode_index(buf6, 0)
    fmt.resolve_index(got, 6, 0)
    assert got == items
    assert fmt.decode_index(b"", 0) == []
    with pytest.raises(ArchiveError):
        fmt.decode_index(buf[:-1], 0)
    bad = bytearray(items[0].encode())
    bad[8] = 99  # kind
    with pytest.raises(ArchiveError, match="kind"):
        fmt.decode_index(bytes(bad), 0)


def test_footer_round_trip_and_self_offset():
    f = make(fmt.Footer, index_offset=1000, index_records=1, entries=12, stored_bytes=5,
             ref_bytes=6, footer_offset=2000)
    assert fmt.Footer.decode(f.encode(), 2000) == f
    with pytest.raises(ArchiveError):
        fmt.Footer.decode(f.encode(), 2001)  # the footer is not where it says
    g = dataclasses.replace(f, index_offset=3000)
    with pytest.raises(ArchiveError):
        fmt.Footer.decode(g.encode(), 2000)  # index after the footer
    with pytest.raises(ArchiveError):
        fmt.Footer.decode(f.encode()[:-1], 2000)


# --- paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    b"a", b"a/b/c", b"-leading-dash", b"with space/new\nline", b"bad\xff\xfe",
    b"n" * 255, b"/".join([b"d" * 200] * 20)[:4096].rstrip(b"/"), b"...", b".hidden", b"a..b",
])
def test_check_path_accepts(path):
    assert len(path) <= 4096
    assert fmt.check_path(path) == path.split(b"/")


@pytest.mark.parametrize("path", [
    b"", b"/", b"/abs", b"/a/b", b"..", b"a/..", b"../a", b"a/../b", b".", b"./a", b"a/.",
    b"a//b", b"a/", b"a\0b", b"\0", b"n" * 256, b"a/" + b"n" * 256, b"a/" * 32768 + b"a",
    b"d/" * 2048,
])
def test_check_path_refuses(path):
    with pytest.raises(ArchiveError):
        fmt.check_path(path, 77)


def test_path_ok_passes_and_refuses_what_check_path_does():
    """The readers' quick check (path_ok) against the full one, on every
    path above and on random paths built from the pieces that matter."""
    import random
    rng = random.Random(4)
    pieces = [b"a", b"bc", b".", b"..", b"", b"\0", b"n" * 120, b"..x", b".h"]
    paths = [*test_check_path_accepts.pytestmark[0].args[1],
             *test_check_path_refuses.pytestmark[0].args[1]]
    paths += [(b"/" if rng.random() < 0.1 else b"") +
              b"/".join(rng.choice(pieces) for _ in range(rng.randrange(1, 5)))
              for _ in range(3000)]
    refused = 0
    for v in (4, 5):
        for p in paths:
            try:
                fmt.check_path(p, 3, v)
                want = None
            except ArchiveError as e:
                want = str(e)
            try:
                fmt.path_ok(p, 3, v)
                got = None
            except ArchiveError as e:
                got = str(e)
            assert got == want, (p, v)
            refused += want is not None
    assert 1000 < refused < 2 * len(paths) - 1000, refused  # both kinds seen


def test_paths_deeper_than_path_max_from_version_5_on():
    """60 directories of 100 bytes (issue 21, defect 4): 6059 bytes, refused
    in versions 1 to 4, a path like any other in 5; 65535 bytes at most."""
    deep = b"/".join([b"%02d" % i + b"x" * 98 for i in range(60)])
    assert len(deep) == 6059
    assert fmt.check_path(deep, 0, 5) == deep.split(b"/")
    for v in (1, 2, 3, 4):
        with pytest.raises(ArchiveError, match="too long"):
            fmt.check_path(deep, 0, v)
    longest = b"/".join([b"n" * 255] * 256)[:65535].rstrip(b"/")
    assert len(fmt.check_path(longest, 0, 5)) == 256
    with pytest.raises(ArchiveError, match="too long"):
        fmt.check_path(longest + b"/x" * 300, 0, 5)
    e = fmt.Entry(0, fmt.K_REG, deep)
    assert fmt.Entry.decode(e.encode(), 0, version=5) == e
    with pytest.raises(ArchiveError):
        fmt.Entry.decode(e.encode(4), 0, version=4)


# --- writer and reader together, in memory --------------------------------------------------

def _sample_archive(ancillary: bool = False) -> bytes:
    buf = io.BytesIO()
    w = Writer(buf)
    w.entry(fmt.Entry(0, fmt.K_DIR, b"top", mode=0o755))
    data = bytes(range(256)) * 32  # 8 KiB
    w.entry(fmt.Entry(0, fmt.K_REG, b"top/a", size=3 * 8192, eflags=fmt.EF_REFERENCED))
    w.data(0, 8192, fmt.CODEC_NONE, hashlib.sha256(data).digest(), data)
    w.ref(8192, 8192, 1, 0)  # shares with itself
    w.end()
    if ancillary:
        w._write(fmt.frame(0x8042, b"an ancillary record a reader must skip"))
    w.entry(fmt.Entry(0, fmt.K_REG, b"top/b", size=8192))
    w.ref(0, 8192, 1, 0)
    w.end()
    w.entry(fmt.Entry(0, fmt.K_HARDLINK, b"top/c", link=2))
    w.entry(fmt.Entry(0, fmt.K_SYMLINK, b"top/s", mode=0o777, target=b"a"))
    w.finish()
    return buf.getvalue()


@pytest.mark.parametrize("ancillary", [False, True])
def test_writer_reader_round_trip(ancillary):
    raw = _sample_archive(ancillary)
    assert raw.startswith(fmt.MAGIC)
    events = list(Stream(io.BytesIO(raw)).events())
    kinds = [type(ev) for ev in events]
    assert kinds == [EntryEvent, EntryEvent, DataEvent, RefEvent, EndEvent, EntryEvent,
                     RefEvent, EndEvent, EntryEvent, EntryEvent, FooterEvent]
    assert events[1].entry.path == b"top/a" and events[1].entry.size == 3 * 8192
    assert events[2].data == bytes(range(256)) * 32
    assert (events[3].offset, events[3].source_offset) == (8192, 0)
    assert events[3].source.path == b"top/a"
    assert events[6].source.path == b"top/a"
    header, items, footer = _index(raw)
    assert [i.path for i in items] == [b"top", b"top/a", b"top/b", b"top/c", b"top/s"]
    assert [(i.stored_bytes, i.ref_bytes) for i in items[1:3]] == [(8192, 8192), (0, 8192)]
    assert footer.entries == 5 and footer.stored_bytes == 8192 and footer.ref_bytes == 16384
    assert footer.footer_offset == len(raw) - fmt.FOOTER_SIZE


def _index(raw: bytes):
    r = read_index(io.BytesIO(raw))
    if isinstance(r, tuple):
        return r
    return r.header, r.items, r.footer


def test_reader_refuses_truncation_at_every_record_boundary():
    raw = _sample_archive()
    for n in list(range(0, 40)) + list(range(40, len(raw), 7)) + [len(raw) - 1]:
        with pytest.raises(ArchiveError) as ei:
            list(Stream(io.BytesIO(raw[:n])).events())
        if n >= len(fmt.MAGIC):
            assert isinstance(ei.value, TruncatedArchive), (n, ei.value)


def test_reader_refuses_every_single_byte_change():
    raw = _sample_archive()
    for i in range(0, len(raw), 3):
        bad = bytearray(raw)
        bad[i] ^= 0x40
        with pytest.raises(ArchiveError):
            list(Stream(io.BytesIO(bytes(bad))).events())


@pytest.mark.parametrize("version,says", [(5, "forward"), (6, "before the first entry")])
def test_reader_refuses_a_forward_reference(version, says):
    c = Craft(version=version)
    c.reg(b"a", 4096)
    c.ref(0, 4096, 1, 0)  # entry 1 comes later (version 6: a distance back that wraps)
    c.end()
    c.reg(b"b", 4096)
    c.end()
    with pytest.raises(ArchiveError, match=says):
        list(Stream(io.BytesIO(c.finish())).events())


# --- version 4: DATA records holding a Btrfs compressed extent as it is on disk -----

def _extent_bytes(n: int = 128 << 10) -> bytes:
    return b"".join(b"line %d of a compressed extent\n" % i for i in range(n // 20))[:n]


def _btrfs_archive(window: tuple[int, int] = (0, 128 << 10), version: int = 4,
                   comp: int = fmt.BTRFS_ZSTD, frame: bytes | None = None,
                   ulen: int = 128 << 10, sha: bytes | None = None) -> bytes:
    import zstandard

    ext = _extent_bytes(ulen)
    if frame is None:
        frame = zstandard.ZstdCompressor(level=1).compress(ext) if comp == fmt.BTRFS_ZSTD \
            else zlib.compress(ext)
    uoff, n = window
    c = Craft(version=version)
    c.reg(b"f", uoff + n)
    coded = fmt.encode_btrfs_extent(fmt.BtrfsExtent(ulen, uoff, comp, frame))
    c.data(uoff, ext[uoff:uoff + n], codec=fmt.CODEC_BTRFS, coded=coded, sha=sha, length=n)
    c.end()
    return c.finish()


def _data_events(archive: bytes) -> list[DataEvent]:
    return [e for e in Stream(io.BytesIO(archive)).events() if isinstance(e, DataEvent)]


@pytest.mark.parametrize("comp", [fmt.BTRFS_ZSTD, fmt.BTRFS_ZLIB])
def test_btrfs_extent_record_gives_its_window_and_the_extent(comp):
    (ev,) = _data_events(_btrfs_archive((64 << 10, 32 << 10), comp=comp))
    ext = _extent_bytes()
    assert ev.offset == 64 << 10 and ev.data == ext[64 << 10:96 << 10]
    x = ev.extent
    assert x is not None and (x.unencoded_len, x.unencoded_offset, x.compression) == \
        (128 << 10, 64 << 10, comp)


def test_btrfs_extent_records_are_refused_when_they_lie():
    import zstandard

    good = zstandard.ZstdCompressor(level=1).compress(_extent_bytes())
    wide = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
        window_log=20, write_content_size=0)).compress(_extent_bytes(1 << 20))
    for why, archive in [
        ("unknown codec 2", _btrfs_archive(version=3)),  # no such codec before 4
        ("SHA-256 mismatch", _btrfs_archive(sha=b"\1" * 32)),
        # the padding is not stored: bytes after the frame are refused
        ("bad compressed Btrfs extent", _btrfs_archive(frame=good + b"\0\0\0\0")),
        ("exceeds its limits", _btrfs_archive(frame=wide)),  # Btrfs cannot read it
        ("lzo", _btrfs_archive(comp=fmt.BTRFS_LZO_4K, frame=b"\0" * 100)),
        ("outside an extent", _btrfs_archive(window=(96 << 10, 64 << 10))),
        ("encoded bytes", _btrfs_archive(frame=b"z" * (128 << 10))),  # not smaller
        ("whole stream", _btrfs_archive(comp=fmt.BTRFS_ZLIB, frame=zlib.compress(b"x" * 100)[:-3])),
    ]:
        with pytest.raises(ArchiveError, match=why):
            _data_events(archive)


# --- reused buffers (restore, verify) -------------------------------------------------------

def _big_archive(chunks: int, size: int = 256 << 10, compress: bool = False) -> tuple[bytes, list]:
    """One file of ``chunks`` DATA records of ``size`` distinct bytes each
    (every other one zstd when ``compress``)."""
    import zstandard

    buf = io.BytesIO()
    w = Writer(buf)
    w.entry(fmt.Entry(0, fmt.K_REG, b"f", size=chunks * size))
    pieces = []
    for i in range(chunks):
        piece = hashlib.sha256(b"%d" % i).digest() * (size // 32)
        pieces.append(piece)
        if compress and i % 2:
            w.data(i * size, size, fmt.CODEC_ZSTD, hashlib.sha256(piece).digest(),
                   zstandard.ZstdCompressor().compress(piece))
        else:
            w.data(i * size, size, fmt.CODEC_NONE, hashlib.sha256(piece).digest(), piece)
    w.end()
    w.finish()
    return buf.getvalue(), pieces


def test_reused_buffers_are_read_into_again_and_hold_each_record_while_it_is_handled():
    import time

    chunks = 60
    raw, pieces = _big_archive(chunks)
    stream = Stream(io.BytesIO(raw), reuse_buffers=True)
    seen, n = set(), 0
    for ev in stream.events():
        if isinstance(ev, DataEvent):
            assert isinstance(ev.data, memoryview)
            seen.add(id(ev.data.obj))
            time.sleep(0.002)  # the reader and the workers run on meanwhile
            # intact until the next event is asked for: not yet read into again
            assert ev.data == pieces[n], n
            n += 1
    assert n == chunks
    # the buffers in flight, not one per record
    assert len(seen) <= Stream.PREFETCH + Stream.DEPTH + 3 < chunks
    # without reuse_buffers every record is its own object, kept as long as wanted
    kept = [ev.data for ev in Stream(io.BytesIO(raw)).events() if isinstance(ev, DataEvent)]
    assert [bytes(d) for d in kept] == pieces


def test_reused_buffers_with_compressed_records_and_a_small_one():
    raw, pieces = _big_archive(12, compress=True)
    got = [bytes(ev.data) for ev in Stream(io.BytesIO(raw), reuse_buffers=True).events()
           if isinstance(ev, DataEvent)]
    assert got == pieces
    raw, pieces = _big_archive(3, size=4096)  # below Buffers.MIN: read as bytes
    got = [ev.data for ev in Stream(io.BytesIO(raw), reuse_buffers=True).events()
           if isinstance(ev, DataEvent)]
    assert [bytes(d) for d in got] == pieces
    assert not any(isinstance(getattr(d, "obj", d), bytearray) for d in got)


def test_truncation_inside_a_reused_buffer_is_reported_as_without_one():
    raw, _ = _big_archive(3)
    for cut in (len(raw) // 2, len(raw) // 3 + 5):
        errs = []
        for reuse in (False, True):
            with pytest.raises(TruncatedArchive) as ei:
                for _ in Stream(io.BytesIO(raw[:cut]), reuse_buffers=reuse).events():
                    pass
            errs.append((str(ei.value), ei.value.offset))
        assert errs[0] == errs[1] and "DATA payload cut short" in errs[0][0], errs


def _batch_threads() -> set[str]:
    """The threads of this process that are SCHED_BATCH (the policy is
    field 41 of /proc/PID/task/TID/stat)."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended meanwhile
            continue
        if int(fields[38]) == os.SCHED_BATCH:
            out.add(tid)
    return out


def test_the_reader_and_hash_threads_yield_to_the_consumer():
    """The thread that reads ahead and the ones that hash are SCHED_BATCH,
    so that they do not preempt the consumer (which writes the restore and
    which the whole run waits on); the consumer's own policy is untouched."""
    raw, _ = _big_archive(8)
    before = _batch_threads()  # threads of earlier tests, if any still end
    during = None
    for ev in Stream(io.BytesIO(raw), reuse_buffers=True).events():
        if isinstance(ev, DataEvent) and during is None:
            during = _batch_threads() - before
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert during is not None and len(during) >= 2  # the reader and a hash worker


def test_the_index_is_what_index_item_encodes_cut_where_the_rules_say(monkeypatch):
    """The writer makes its INDEX items from columns (Writer._index_heads):
    the bytes of each record must be fmt.IndexItem's encoding of the items
    the index lists, records ending where a path's CRC says or where the
    next item would pass the record limit (made small here, so that both
    cuts happen), and the items those of the entries written."""
    import random

    monkeypatch.setitem(fmt.LIMITS, fmt.T_INDEX, 700)
    rng = random.Random(9)
    buf = io.BytesIO()
    w = Writer(buf)
    w.entry(fmt.Entry(0, fmt.K_DIR, b"top", mode=0o755))
    want = [(fmt.K_DIR, b"top", 0)]
    for i in range(400):
        path = b"top/%d-" % i + rng.randbytes(rng.randrange(0, 40)).hex().encode()
        if rng.random() < 0.5:
            w.entry(fmt.Entry(0, fmt.K_REG, path, mode=0o644, size=4096))
            w.data(0, 4096, fmt.CODEC_NONE, hashlib.sha256(bytes(4096)).digest(), bytes(4096))
            w.end()
            want.append((fmt.K_REG, path, 4096))
        else:
            w.entry(fmt.Entry(0, fmt.K_SYMLINK, path, mode=0o777, target=b"x"))
            want.append((fmt.K_SYMLINK, path, 0))
    w.finish()
    data = buf.getvalue()
    buf.seek(0)
    items = read_index(buf).items
    assert [(it.kind, it.path, it.size) for it in items] == want
    assert [it.offset for it in items] == [r.offset for r in records(data)
                                           if r.type == fmt.T_ENTRY]
    got = [data[r.offset + fmt.FRAME.size:r.end - 4] for r in records(data)
           if r.type == fmt.T_INDEX]
    expect, cur, prev = [], b"", 0
    for it in items:  # the rules of docs/FORMAT.md, "Index", item by item
        b = it.encode(prev_offset=prev)
        prev = it.offset
        if len(cur) + len(b) > 700:
            expect.append(cur)
            cur = b""
        cur += b
        if zlib.crc32(it.path) % fmt.INDEX_CUT == 0:
            expect.append(cur)
            cur = b""
    if cur or not expect:
        expect.append(cur)
    assert got == expect
    assert len(got) > 10 and max(len(g) for g in got) <= 700
