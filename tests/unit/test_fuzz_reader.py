"""Fuzz the archive reader (issue 6): whatever the bytes, reading them ends
in an ArchiveError (TruncatedArchive included) or in success, never another
exception, never unbounded memory.

Seeds are small valid archives written by cloneaware.archive.writer.Writer
(a plain one with every entry kind, DATA stored and zstd, REF to another
file and to itself, a hard link; and a thin one with BASE and BASEREF).
Hypothesis mutates them two ways:

- raw bytes: flip bits, set bytes, cut, insert, delete, splice, overwrite
  with boundary integers (most of these stop at a CRC: that is the point of
  CRCs, and it checks the framing code);
- record-aware: mutate one record's payload and re-frame it with a correct
  length and CRC, or drop, duplicate, swap records, so that the structural
  checks behind the CRC are exercised too.

Each mutated archive is read to the end with Stream(...).events() and with
read_index().  The number of examples per test is CLONEAWARE_FUZZ_EXAMPLES
(default 300); run longer by hand with e.g.

    CLONEAWARE_FUZZ_EXAMPLES=20000 python -P -m pytest tests/unit/test_fuzz_reader.py
"""
from __future__ import annotations

import hashlib
import io
import os
import struct

import pytest
from helpers.archivecraft import records, reframe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.catalog import read_index
from cloneaware.archive.reader import Stream
from cloneaware.archive.writer import Writer
from cloneaware.errors import ArchiveError

EXAMPLES = int(os.environ.get("CLONEAWARE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def _data(w: Writer, off: int, b: bytes, zstd: bool = False) -> None:
    if zstd:
        import zstandard

        z = zstandard.ZstdCompressor(level=3).compress(b)
        w.data(off, len(b), fmt.CODEC_ZSTD, _sha(b), z)
    else:
        w.data(off, len(b), fmt.CODEC_NONE, _sha(b), b)


def _plain_seed() -> bytes:
    f = io.BytesIO()
    w = Writer(f)
    E = fmt.Entry
    w.entry(E(0, fmt.K_DIR, b"top", mode=0o755, mtime_ns=10))
    a = bytes(range(256)) * 24  # 6 KiB
    w.entry(E(0, fmt.K_REG, b"top/a", size=len(a) + 4096, eflags=fmt.EF_REFERENCED,
              xattrs=[(b"user.k", b"v" * 10)]))
    _data(w, 0, a[:4096])
    _data(w, 4096, a[4096:], zstd=True)
    _data(w, len(a), b"\0" * 4096, zstd=True)
    w.end()
    w.entry(E(0, fmt.K_REG, b"top/b", size=12288))
    w.ref(0, 4096, 1, 0)
    _data(w, 4096, b"x" * 4096)
    w.ref(8192, 4096, 2, 4096)  # a range of itself, written above
    w.end()
    w.entry(E(0, fmt.K_HARDLINK, b"top/h", link=1))
    w.entry(E(0, fmt.K_SYMLINK, b"top/s", target=b"../elsewhere"))
    w.entry(E(0, fmt.K_FIFO, b"top/p", mode=0o600))
    w.entry(E(0, fmt.K_REG, b"top/empty", size=0))
    w.end()
    w.entry(E(0, fmt.K_DIR, b"top/d", mode=0o700))
    w.entry(E(0, fmt.K_REG, b"top/d/sparse", size=1 << 20))
    _data(w, 1 << 19, b"y" * 100)
    w.end()
    w.finish()
    return f.getvalue()


def _thin_seed() -> bytes:
    f = io.BytesIO()
    base = thin.Base(b"/srv/base", thin.BASE_DIR,
                    [thin.BaseFile(0, 8192, b"img/base.img"), thin.BaseFile(3, 4096, b"x")])
    w = Writer(f, base)
    E = fmt.Entry
    w.entry(E(0, fmt.K_DIR, b"clone"))
    w.entry(E(0, fmt.K_REG, b"clone/c.img", size=8192))
    w.baseref(0, 4096, 0, 0, _sha(b"b" * 4096))
    _data(w, 4096, b"c" * 4096)
    w.end()
    w.entry(E(0, fmt.K_REG, b"clone/d.img", size=4096))
    w.baseref(0, 4096, 3, 0, _sha(b"d" * 4096))
    w.end()
    w.finish()
    return f.getvalue()


SEEDS = {"plain": _plain_seed(), "thin": _thin_seed()}


def _drive(data: bytes) -> str:
    """Read ``data`` to the end both ways; only ArchiveError may escape."""
    outcome = []
    try:
        for _ev in Stream(io.BytesIO(data)).events():
            pass
        outcome.append("ok")
    except ArchiveError as e:
        assert str(e)
        outcome.append("error")
    try:
        read_index(io.BytesIO(data))
        outcome.append("ok")
    except ArchiveError as e:
        assert str(e)
        outcome.append("error")
    return "/".join(outcome)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seeds_are_valid(name):
    data = SEEDS[name]
    kinds = [r.type for r in records(data)]
    assert fmt.T_REF in kinds or fmt.T_BASEREF in kinds
    assert _drive(data) == "ok/ok"
    # and every cut is refused by both: at every byte of the records that
    # hold structure, every 61st byte of DATA records
    cuts = set(range(len(fmt.MAGIC)))
    for r in records(data):
        step = 61 if r.type == fmt.T_DATA else 1
        cuts.update(range(r.offset, r.end, step))
        cuts.update((r.end - 4, r.end - 1))
    cuts.discard(len(data))
    for cut in sorted(cuts):
        assert _drive(data[:cut]) == "error/error", cut


# --- mutations ------------------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF,
               1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 4096, 4 << 20, (4 << 20) + 1]


@st.composite
def byte_op(draw, n: int):
    """One mutation of a buffer of length n, as a function."""
    kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice",
                                 "int"]))
    pos = draw(st.integers(0, max(n - 1, 0)))
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return lambda b: b[:pos] + bytes([b[pos] ^ (1 << bit)]) + b[pos + 1:] if pos < len(
            b) else b
    if kind == "set":
        v = draw(st.integers(0, 255))
        return lambda b: b[:pos] + bytes([v]) + b[pos + 1:]
    if kind == "cut":
        return lambda b: b[:pos]
    if kind == "insert":
        ins = draw(st.binary(min_size=1, max_size=16))
        return lambda b: b[:pos] + ins + b[pos:]
    if kind == "delete":
        k = draw(st.integers(1, 64))
        return lambda b: b[:pos] + b[pos + k:]
    if kind == "splice":
        src = draw(st.integers(0, max(n - 1, 0)))
        k = draw(st.integers(1, 256))
        return lambda b: b[:pos] + b[src:src + k] + b[pos + k:]
    width = draw(st.sampled_from([2, 4, 8]))
    v = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1)
    packed = v.to_bytes(width, "little")
    return lambda b: b[:pos] + packed + b[pos + width:]


@pytest.mark.parametrize("name", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_fuzz_raw_bytes(name, data):
    buf = SEEDS[name]
    ops = data.draw(st.lists(byte_op(len(buf)), min_size=1, max_size=4))
    for op in ops:
        buf = op(buf)
    _drive(buf)


@pytest.mark.parametrize("name", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_fuzz_records_past_the_crc(name, data):
    """Mutations that keep every CRC right, so the structural checks behind
    it are what must hold."""
    buf = SEEDS[name]
    for _ in range(data.draw(st.integers(1, 3))):
        recs = records(buf)
        kind = data.draw(st.sampled_from(["payload", "payload", "payload", "drop", "dup",
                                          "swap", "truncate-payload"]))
        i = data.draw(st.integers(0, len(recs) - 1))
        r = recs[i]
        payload = buf[r.payload_offset:r.payload_offset + r.length]
        if kind == "payload":
            for op in data.draw(st.lists(byte_op(max(len(payload), 1)), min_size=1,
                                         max_size=3)):
                payload = op(payload)
            buf = reframe(buf, r, payload[:fmt.LIMITS.get(r.type, 1 << 16)])
        elif kind == "truncate-payload":
            buf = reframe(buf, r, payload[:data.draw(st.integers(0, len(payload)))])
        elif kind == "drop":
            buf = buf[:r.offset] + buf[r.end:]
        elif kind == "dup":
            buf = buf[:r.end] + buf[r.offset:r.end] + buf[r.end:]
        else:
            j = data.draw(st.integers(0, len(recs) - 1))
            a, b = sorted((i, j))
            if a != b:
                ra, rb = recs[a], recs[b]
                buf = (buf[:ra.offset] + buf[rb.offset:rb.end] + buf[ra.end:rb.offset]
                       + buf[ra.offset:ra.end] + buf[rb.end:])
        try:
            records(buf)
        except (AssertionError, struct.error):
            break  # no longer splits into records: mutate no further
    _drive(buf)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_garbage_after_the_header(tail):
    head = SEEDS["plain"][:records(SEEDS["plain"])[1].offset]  # magic + HEADER
    _drive(head + tail)
