"""The repository's bytes (docs/REPOSITORY.md) and the archive records that
manifests add (docs/FORMAT.md version 3), with no filesystem: the seal test
vector recomputed independently, envelopes, packs, indexes, config and key
objects refused when damaged, the forget policy, and the coverage rule that
plans a restore's fetches."""
from __future__ import annotations

import hashlib
import hmac
import io
import re
from pathlib import Path

import pytest

from cloneaware.archive import format as fmt
from cloneaware.archive.blobs import Coverage, Place
from cloneaware.archive.events import BlobEvent, StatEvent
from cloneaware.archive.reader import Stream
from cloneaware.archive.writer import Writer
from cloneaware.errors import ArchiveError, RepositoryError, UsageError
from cloneaware.repo import crypto
from cloneaware.repo import format as rf
from cloneaware.repo.forget import Policy, keep

SPEC = Path(__file__).resolve().parents[2] / "docs" / "REPOSITORY.md"
ENC = bytes(range(32))
SALT = bytes(range(0xA0, 0xB0))
NONCE = bytes(range(0xB0, 0xBC))
AAD = bytes.fromhex("4341574f01020000")
BODY = bytes.fromhex("00" "0300000000000000") + b"abc"
SEAL_VECTOR = bytes.fromhex("948d4f38f3b0955ec5844dfc4038dfafe7faa9163a13fa7f29f1827b")


def test_seal_vector_matches_spec_and_an_independent_computation():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    text = SPEC.read_text()
    assert " ".join(f"{b:02x}" for b in SEAL_VECTOR) in text
    assert rf.envelope_header(rf.K_SNAPSHOT) == AAD
    assert rf.encode_body(b"abc") == BODY  # too short to be worth zstd
    # HKDF-SHA256 (RFC 5869) written out, AES-GCM through the Cipher interface
    prk = hmac.new(SALT, ENC, hashlib.sha256).digest()
    okm = hmac.new(prk, crypto.SEAL_INFO + b"\x01", hashlib.sha256).digest()
    enc = Cipher(algorithms.AES(okm), modes.GCM(NONCE)).encryptor()
    enc.authenticate_additional_data(AAD)
    ct = enc.update(BODY) + enc.finalize() + enc.tag
    assert ct == SEAL_VECTOR
    got = crypto.Sealed(ENC + bytes(32)).seal(BODY, AAD, salt=SALT, nonce=NONCE)
    assert got == SALT + NONCE + SEAL_VECTOR


def test_sealed_objects_refuse_any_change():
    s = crypto.Sealed(crypto.new_master())
    sealed = s.seal(b"payload" * 10, b"aad")
    assert s.open(sealed, b"aad", "x") == b"payload" * 10
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(RepositoryError, match="authentication failed"):
            s.open(bytes(bad), b"aad", "x")
    with pytest.raises(RepositoryError, match="authentication failed"):
        s.open(sealed, b"other aad", "x")
    # every seal has its own salt and nonce
    assert s.seal(b"same", b"") != s.seal(b"same", b"")


def test_blob_ids_are_keyed_when_encrypted():
    data = b"a known file" * 100
    assert crypto.Plain().blob_id(data) == hashlib.sha256(data).digest()
    a, b = crypto.Sealed(crypto.new_master()), crypto.Sealed(crypto.new_master())
    assert a.blob_id(data) != b.blob_id(data) != hashlib.sha256(data).digest()
    assert a.blob_id(data) == a.blob_id(data)


def test_key_objects():
    master, rid = crypto.new_master(), "ab" * 32
    obj = crypto.make_key(master, rid, b"right", n=1 << 14)
    assert crypto.unwrap_key(obj, b"right", rid, "k") == master
    assert crypto.unwrap_key(obj, b"wrong", rid, "k") is None
    with pytest.raises(RepositoryError, match="another repository"):
        crypto.unwrap_key(obj, b"right", "cd" * 32, "k")
    d = rf.decode_json(obj, "k")
    assert d["kdf"] == "scrypt" and d["n"] == 1 << 14 and b"right" not in obj
    for k, v in (("n", 1 << 40), ("r", 0), ("n", 3), ("kdf", "pbkdf2")):
        bad = rf.encode_json(dict(d, **{k: v}))
        with pytest.raises(RepositoryError):
            crypto.unwrap_key(bad, b"right", rid, "k")
    with pytest.raises(UsageError):
        crypto.make_key(master, rid, b"x", n=1000)


def test_envelope_and_body_bounds():
    head = rf.envelope_header(rf.K_INDEX)
    body = rf.encode_body(b"x" * 1000)
    assert body[0] == rf.CODEC_ZSTD
    assert rf.decode_body(body, "o") == b"x" * 1000
    assert rf.check_envelope(head + body, rf.K_INDEX, "o") == head
    with pytest.raises(RepositoryError, match="wrong magic"):
        rf.check_envelope(b"XXXX" + head[4:] + body, rf.K_INDEX, "o")
    with pytest.raises(RepositoryError, match="where a index"):
        rf.check_envelope(rf.envelope_header(rf.K_LOCK) + body, rf.K_INDEX, "o")
    with pytest.raises(RepositoryError, match="version"):
        rf.check_envelope(b"CAWO\x02\x01\x00\x00", rf.K_INDEX, "o")
    with pytest.raises(RepositoryError, match="limit"):
        rf.decode_body(bytes((0,)) + (1 << 40).to_bytes(8, "little"), "o")
    with pytest.raises(RepositoryError, match="not 5"):
        rf.decode_body(bytes((0,)) + (5).to_bytes(8, "little") + b"abc", "o")
    with pytest.raises(RepositoryError, match="claims"):
        rf.decode_body(bytes((1,)) + (5).to_bytes(8, "little") + body[9:], "o")
    with pytest.raises(RepositoryError, match="codec"):
        rf.decode_body(bytes((7,)) + (3).to_bytes(8, "little") + b"abc", "o")


def test_trailer_and_index_round_trip_and_bounds():
    e = [rf.PackEntry(bytes([i]) * 32, rf.T_DATA, 100 + i, 50 + i) for i in range(3)]
    assert rf.decode_trailer_payload(rf.encode_trailer_payload(e), "t") == e
    with pytest.raises(RepositoryError):
        rf.decode_trailer_payload(rf.encode_trailer_payload(e)[:-1], "t")
    bad = rf.encode_trailer_payload([rf.PackEntry(b"z" * 32, 9, 1, 1)])
    with pytest.raises(RepositoryError):
        rf.decode_trailer_payload(bad, "t")
    p = rf.IndexPack(b"p" * 32, [(b"b" * 32, rf.T_DATA, 0, 10, 20), (b"c" * 32, rf.T_TREE,
                                                                     10, 5, 5)])
    assert rf.decode_index_payload(rf.encode_index_payload([p]), "i") == [p]
    raw = rf.encode_index_payload([p])
    with pytest.raises(RepositoryError):
        rf.decode_index_payload(raw[:-3], "i")
    huge = rf.IndexPack(b"p" * 32, [(b"b" * 32, rf.T_DATA, 0, 10, 5 << 20)])
    with pytest.raises(RepositoryError, match="out of bounds"):
        rf.decode_index_payload(rf.encode_index_payload([huge]), "i")
    assert rf.split_pack_tail(rf.pack_tail(b"x" * 20), 100, "p") == 20
    with pytest.raises(RepositoryError):
        rf.split_pack_tail(rf.pack_tail(b"x" * 200), 100, "p")


def test_config_checks():
    c = rf.Config(id="ab" * 32, created="2026-01-01T00:00:00Z")
    assert rf.Config.decode(c.encode(), "r") == c
    newer = c.encode().replace(b'"cloneaware_repository":1', b'"cloneaware_repository":9')
    with pytest.raises(RepositoryError, match="newer"):
        rf.Config.decode(newer, "r")
    for bad in (b"[]", b"{}", b"not json", c.encode().replace(b'"grid":1048576', b'"grid":1000')):
        with pytest.raises(RepositoryError):
            rf.Config.decode(bad, "r")


def test_config_object_lock_is_version_2_and_checked():
    """A repository with Object Lock is version 2 (earlier versions refuse
    it); one without stays version 1; the lock's fields are checked."""
    c = rf.Config(id="ab" * 32, created="2026-01-01T00:00:00Z", lock_days=30,
                  lock_mode="compliance")
    raw = c.encode()
    assert b'"cloneaware_repository":2' in raw and rf.Config.decode(raw, "r") == c
    assert b'"cloneaware_repository":1' in rf.Config(id="ab" * 32, created="x").encode()
    for bad in (raw.replace(b'"days":30', b'"days":1'),
                raw.replace(b'"compliance"', b'"strict"'),
                raw.replace(b'"cloneaware_repository":2', b'"cloneaware_repository":1'),
                rf.Config(id="ab" * 32, created="x").encode().replace(
                    b'"cloneaware_repository":1', b'"cloneaware_repository":2')):
        with pytest.raises(RepositoryError, match="object_lock"):
            rf.Config.decode(bad, "r")


def test_forget_policy():
    day = 86_400_000_000_000
    times = [(f"s{i}", i * day // 2) for i in range(20)]  # two a day, ten days
    assert set(keep(times, Policy(last=3))) == {"s19", "s18", "s17"}
    daily = keep(times, Policy(daily=4))
    assert set(daily) == {"s19", "s17", "s15", "s13"}  # the newest of each of 4 days
    assert set(keep(times, Policy(last=1, daily=2))) == {"s19", "s17"}
    weeks = keep(times, Policy(weekly=5))
    assert len(weeks) == 2  # ten days span two ISO weeks (1970-01-01 was a Thursday)
    with pytest.raises(UsageError):
        keep(times, Policy())
    # within: of the newest (s19, at 9.5 days), not of now; the bound is kept
    within = keep(times, Policy(within_ns=day))
    assert set(within) == {"s19", "s18", "s17"} and within["s17"] == ["within"]
    assert set(keep(times, Policy(last=1, within_ns=day // 2 - 1))) == {"s19"}
    # hourly: one an hour; yearly: 1970 only; a tag keeps whatever else says
    hour = day // 24
    hours = [(f"h{i}", i * hour // 2) for i in range(10)]  # two an hour, five hours
    assert set(keep(hours, Policy(hourly=3))) == {"h9", "h7", "h5"}
    assert set(keep(hours, Policy(yearly=5))) == {"h9"}
    tagged = keep(times, Policy(last=1, tags=("keep", "gold")), {"s3": ["gold"], "s4": ["x"]})
    assert tagged == {"s19": ["last"], "s3": ["tag"]}, tagged
    assert keep(times, Policy(tags=("none",)), {}) == {}


def test_coverage_splits_at_places():
    cov = Coverage()
    bid = b"b" * 32
    assert cov.split(bid, 0, 100) == [(0, 100, None)]
    a = Place(0, 1, 0, 0, 40)
    b = Place(0, 2, 1000, 60, 100)
    cov.add(bid, b)
    cov.add(bid, a)
    assert cov.split(bid, 0, 100) == [(0, 40, a), (40, 60, None), (60, 100, b)]
    assert cov.split(bid, 10, 20) == [(10, 30, a)]
    assert cov.split(bid, 50, 20) == [(50, 60, None), (60, 70, b)]


# --- archive format version 3: BLOB and STAT ----------------------------------------

def _manifest(records) -> bytes:
    buf = io.BytesIO()
    w = Writer(buf)
    w.entry(fmt.Entry(id=0, kind=fmt.K_REG, path=b"f", size=8192))
    for r in records:
        r(w)
    w.end()
    w.finish()
    return buf.getvalue()


def test_blob_and_stat_round_trip():
    bid = b"\x11" * 32
    raw = _manifest([lambda w: w.stat(42, 123), lambda w: w.blob(0, 4096, 100, bid),
                     lambda w: w.blob(4096, 4096, 0, bid)])
    evs = list(Stream(io.BytesIO(raw)).events())
    st = [e for e in evs if isinstance(e, StatEvent)]
    bl = [e for e in evs if isinstance(e, BlobEvent)]
    assert [(s.ino, s.ctime_ns) for s in st] == [(42, 123)]
    assert [(b.offset, b.length, b.blob_offset, b.blob_id) for b in bl] == \
        [(0, 4096, 100, bid), (4096, 4096, 0, bid)]


def test_blob_and_stat_rules():
    bid = b"\x11" * 32
    with pytest.raises(ArchiveError, match="STAT not right after"):
        list(Stream(io.BytesIO(_manifest([lambda w: w.blob(0, 10, 0, bid),
                                            lambda w: w.stat(1, 2)]))).events())
    with pytest.raises(ArchiveError, match="STAT not right after"):
        list(Stream(io.BytesIO(_manifest([lambda w: w.stat(1, 2),
                                            lambda w: w.stat(1, 2)]))).events())
    with pytest.raises(ArchiveError, match="overlap"):
        list(Stream(io.BytesIO(_manifest([lambda w: w.blob(100, 10, 0, bid),
                                            lambda w: w.blob(50, 10, 0, bid)]))).events())
    with pytest.raises(ArchiveError, match="outside a blob"):
        fmt.decode_blob(fmt.encode_blob(0, 10, fmt.BLOB_MAX - 5, bid), 0)
    with pytest.raises(ArchiveError, match="outside a blob"):
        fmt.decode_blob(fmt.encode_blob(0, 0, 0, bid), 0)


def test_blob_records_are_unknown_before_version_3():
    head = fmt.FRAME.pack(fmt.T_BLOB, 0, 48)
    for v in (1, 2):
        with pytest.raises(ArchiveError, match="unknown record type 11"):
            fmt.check_frame_header(head, 0, v)
    assert fmt.check_frame_header(head, 0, 3) == (fmt.T_BLOB, 48)


def test_spec_lists_the_version_3_records():
    text = (Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md").read_text()
    assert re.search(r"\| 11 \| BLOB \| 48 \| 3 \|", text)
    assert re.search(r"\| 12 \| STAT \| 16 \| 3 \|", text)
