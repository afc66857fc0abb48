"""The repository's bytes (docs/REPOSITORY.md): object envelopes, packs,
index and snapshot payloads, lock payloads.  The only module that knows
them besides repo/crypto.py (sealing).  Decoders never trust their input:
every length is bounded before use and a payload must be consumed exactly.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn

import numpy as np
import zstandard

from cloneaware.errors import RepositoryError

VERSION = 1
#: the config's "cloneaware_repository": 2 is version 1 with S3 Object Lock
#: (its "object_lock"); a repository without it is written as version 1,
#: so that earlier versions read it
CONFIG_VERSION = 2
LOCK_MODES = ("compliance", "governance")
LOCK_DAYS_MIN, LOCK_DAYS_MAX = 2, 36500
OBJECT_MAGIC = b"CAWO"
PACK_MAGIC = b"CAWP"
K_INDEX, K_SNAPSHOT, K_LOCK, K_TRAILER = 1, 2, 3, 4
KIND_NAMES = {K_INDEX: "index", K_SNAPSHOT: "snapshot", K_LOCK: "lock", K_TRAILER: "pack trailer"}
T_DATA, T_TREE = 1, 2
CODEC_NONE, CODEC_ZSTD = 0, 1

BLOB_MAX = 4 << 20
#: manifest blobs are cut where a gear hash says (docs/REPOSITORY.md,
#: "Manifest blobs"): more than MIN bytes, at most MAX, and on average about
#: MIN + 2**BITS
MANIFEST_CUT_MIN = 4 << 10
MANIFEST_CUT_BITS = 13
MANIFEST_CUT_MAX = 64 << 10
#: a manifest of more pieces than this names them in a blob list
#: ("manifest_list"); a list blob ends after an id whose first byte is below
#: LIST_CUT_BYTE (one in 64), or after LIST_MAX ids
LIST_CUT_BYTE = 4
LIST_MAX = 1024
OBJECT_MAX = 64 << 20  # an object's payload, decoded
CONFIG_MAX = 64 << 10
PACK_BLOBS_MAX = 1_000_000
PACK_MAX = 4 << 30
GRID_MIN, GRID_MAX, GRID_DEFAULT = 64 << 10, 4 << 20, 1 << 20
PACK_SIZE_DEFAULT = 16 << 20

_ENVELOPE = struct.Struct("<4sBBH")
_BODY = struct.Struct("<BQ")
_TRAILER_ENTRY = struct.Struct("<32sB3xII")
_INDEX_PACK = struct.Struct("<32sI")
_INDEX_ENTRY = struct.Struct("<32sB3xIII")
_U32 = struct.Struct("<I")
ENVELOPE_SIZE = _ENVELOPE.size
TAIL = _U32.size + len(PACK_MAGIC)

KINDS = ("data", "index", "snapshots", "locks", "keys")


def object_id(data: bytes) -> str:
    """The name of an object stored as ``data``: its SHA-256, hex."""
    return hashlib.sha256(data).hexdigest()


def is_id(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def fail(what: str, msg: str) -> NoReturn:
    raise RepositoryError(f"{what}: {msg}")


# --- envelopes --------------------------------------------------------------------

def envelope_header(kind: int) -> bytes:
    return _ENVELOPE.pack(OBJECT_MAGIC, VERSION, kind, 0)


def encode_body(payload: bytes, compress: bool = True) -> bytes:
    """codec | raw_length | payload as coded (zstd only when smaller)."""
    if compress and len(payload) > 64:
        z = zstandard.ZstdCompressor(level=3).compress(payload)
        if len(z) < len(payload):
            return _BODY.pack(CODEC_ZSTD, len(payload)) + z
    return _BODY.pack(CODEC_NONE, len(payload)) + payload


def decode_body(body: bytes, what: str, limit: int = OBJECT_MAX) -> bytes:
    if len(body) < _BODY.size:
        fail(what, "too short for its header")
    codec, raw = _BODY.unpack_from(body)
    if raw > limit:
        fail(what, f"claims {raw} bytes, more than the limit of {limit}")
    data = memoryview(body)[_BODY.size:]
    return decode(codec, data, raw, what)


def decode(codec: int, data, raw: int, what: str) -> bytes:
    """Bytes as coded -> exactly ``raw`` bytes, or RepositoryError."""
    if codec == CODEC_NONE:
        if len(data) != raw:
            fail(what, f"holds {len(data)} bytes, not {raw}")
        return bytes(data)
    if codec != CODEC_ZSTD:
        fail(what, f"unknown codec {codec}")
    try:
        params = zstandard.get_frame_parameters(data)
        if params.content_size not in (raw, zstandard.CONTENTSIZE_UNKNOWN):
            fail(what, f"zstd frame claims {params.content_size} bytes, not {raw}")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw)
    except zstandard.ZstdError as e:
        fail(what, f"bad zstd data: {e}")
    if len(out) != raw:
        fail(what, f"decodes to {len(out)} bytes, not {raw}")
    return out


def check_envelope(data: bytes, kind: int, what: str) -> bytes:
    """The 8 header bytes of an object of ``kind`` (its associated data)."""
    if len(data) < ENVELOPE_SIZE:
        fail(what, "too short to be a cloneaware object")
    magic, version, k, reserved = _ENVELOPE.unpack_from(data)
    if magic != OBJECT_MAGIC:
        fail(what, "not a cloneaware repository object (wrong magic)")
    if version != VERSION:
        fail(what, f"object version {version} is not one this cloneaware reads ({VERSION})")
    if k != kind or reserved:
        fail(what, f"a {KIND_NAMES.get(k, k)} object where a {KIND_NAMES[kind]} was expected")
    return data[:ENVELOPE_SIZE]


# --- packs --------------------------------------------------------------------------

class PackEntry(NamedTuple):
    id: bytes
    type: int
    raw_length: int
    stored_length: int


def encode_trailer_payload(entries: list[PackEntry]) -> bytes:
    return b"".join(_TRAILER_ENTRY.pack(e.id, e.type, e.raw_length, e.stored_length)
                    for e in entries)


def decode_trailer_payload(payload: bytes, what: str) -> list[PackEntry]:
    n, rest = divmod(len(payload), _TRAILER_ENTRY.size)
    if rest or n > PACK_BLOBS_MAX:
        fail(what, "pack trailer of a wrong size")
    out = []
    for i in range(n):
        bid, t, raw, stored = _TRAILER_ENTRY.unpack_from(payload, i * _TRAILER_ENTRY.size)
        if t not in (T_DATA, T_TREE) or not 0 < raw <= BLOB_MAX or stored == 0:
            fail(what, f"pack trailer entry {i} is out of bounds")
        out.append(PackEntry(bid, t, raw, stored))
    return out


def pack_tail(trailer: bytes) -> bytes:
    return _U32.pack(len(trailer)) + PACK_MAGIC


def split_pack_tail(tail: bytes, pack_size: int, what: str) -> int:
    """The trailer's length, from the pack's last 8 bytes."""
    if len(tail) != TAIL or tail[4:] != PACK_MAGIC:
        fail(what, "not a cloneaware pack (no trailer magic at its end)")
    (n,) = _U32.unpack_from(tail)
    if n + TAIL > pack_size or n < ENVELOPE_SIZE + _BODY.size:
        fail(what, "pack trailer length out of bounds")
    return n


# --- index --------------------------------------------------------------------------

class IndexEntry(NamedTuple):
    pack: bytes
    type: int
    offset: int
    stored_length: int
    raw_length: int


@dataclass
class IndexPack:
    id: bytes
    blobs: list[tuple[bytes, int, int, int, int]] = field(default_factory=list)
    # (blob id, type, offset, stored_length, raw_length)


def encode_index_payload(packs: list[IndexPack]) -> bytes:
    parts = []
    for p in packs:
        parts.append(_INDEX_PACK.pack(p.id, len(p.blobs)))
        parts += [_INDEX_ENTRY.pack(*b) for b in p.blobs]
    return b"".join(parts)


#: an _INDEX_ENTRY as a numpy record: index objects are read as arrays
INDEX_ENTRY_DTYPE = np.dtype([("id", "S32"), ("type", "u1"), ("pad", "V3"), ("offset", "<u4"),
                              ("stored", "<u4"), ("raw", "<u4")])
assert INDEX_ENTRY_DTYPE.itemsize == _INDEX_ENTRY.size


def decode_index_arrays(payload: bytes, what: str
                        ) -> tuple[list[bytes], list[int], np.ndarray]:
    """An index object's packs as arrays: their ids, how many blobs each
    lists, and every blob's entry (INDEX_ENTRY_DTYPE) in order, checked
    as decode_index_payload checks them (one numpy pass, not a Python
    call a blob: a repository's index is read by every command)."""
    ids: list[bytes] = []
    counts: list[int] = []
    parts: list[np.ndarray] = []
    pos = 0
    n = len(payload)
    while pos < n:
        if pos + _INDEX_PACK.size > n:
            fail(what, "index record cut short")
        pid, count = _INDEX_PACK.unpack_from(payload, pos)
        pos += _INDEX_PACK.size
        if count > PACK_BLOBS_MAX or pos + count * _INDEX_ENTRY.size > n:
            fail(what, f"index record of pack {pid.hex()[:12]} has a wrong blob count")
        parts.append(np.frombuffer(payload, dtype=INDEX_ENTRY_DTYPE, count=count, offset=pos))
        pos += count * _INDEX_ENTRY.size
        ids.append(pid)
        counts.append(count)
    entries = np.concatenate(parts) if parts else np.empty(0, dtype=INDEX_ENTRY_DTYPE)
    t, raw, stored = entries["type"], entries["raw"], entries["stored"]
    bad = ((t != T_DATA) & (t != T_TREE)) | (raw == 0) | (raw > BLOB_MAX) | (stored == 0) \
        | (entries["offset"].astype(np.int64) + stored > PACK_MAX)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        bid = payload[_entry_at(counts, first):][:32]
        fail(what, f"index entry for blob {bid.hex()[:12]} is out of bounds")
    return ids, counts, entries


def _entry_at(counts: list[int], k: int) -> int:
    """Where entry ``k`` of an index object starts (after k's pack headers)."""
    pos = 0
    for c in counts:
        pos += _INDEX_PACK.size
        if k < c:
            return pos + k * _INDEX_ENTRY.size
        k -= c
        pos += c * _INDEX_ENTRY.size
    raise AssertionError("entry beyond the object")


def decode_index_payload(payload: bytes, what: str) -> list[IndexPack]:
    """An index object's packs, each with its blobs as tuples (for the
    survey of a damaged repository and the tests; load_into reads arrays)."""
    ids, counts, entries = decode_index_arrays(payload, what)
    rows = entries[["id", "type", "offset", "stored", "raw"]].tolist()
    out = []
    at = 0
    for pid, c in zip(ids, counts):
        out.append(IndexPack(pid, [(bytes(b).ljust(32, b"\0"), t, o, s, r)
                                   for b, t, o, s, r in rows[at:at + c]]))
        at += c
    return out


# --- config, snapshots, locks ---------------------------------------------------------

def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


#: how deep the JSON of an object may nest (ours nest 2 levels)
JSON_DEPTH = 16


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def decode_json(data: bytes, what: str) -> dict:
    """A JSON object, as strict as ours are written: no NaN or Infinity,
    nesting bounded (a deeper one would cost the parser its stack)."""
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        fail(what, "not valid JSON")
    if not isinstance(obj, dict):
        fail(what, "not a JSON object")
    if _depth(obj) > JSON_DEPTH:
        fail(what, "JSON nested too deeply")
    return obj


def _depth(obj, level: int = 0) -> int:
    if level > JSON_DEPTH:
        return level
    if isinstance(obj, dict):
        return max((_depth(v, level + 1) for v in obj.values()), default=level + 1)
    if isinstance(obj, list):
        return max((_depth(v, level + 1) for v in obj), default=level + 1)
    return level


#: times a snapshot or lock may carry: from 1970 to 2262 (the range of a
#: signed 64-bit count of nanoseconds, which dates can be made of)
TIME_NS_MAX = (1 << 63) - 1
#: the largest manifest a snapshot may claim: it is read whole into memory
MANIFEST_MAX = 4 << 30


@dataclass
class Config:
    id: str
    created: str
    grid: int = GRID_DEFAULT
    pack_size: int = PACK_SIZE_DEFAULT
    encryption: str = "none"
    #: S3 Object Lock (version 2): every object but locks put with retention
    #: of this many days, in this mode ("compliance" or "governance")
    lock_days: int = 0
    lock_mode: str = ""

    def encode(self) -> bytes:
        d = {"cloneaware_repository": CONFIG_VERSION if self.lock_days else 1, "id": self.id,
             "created": self.created, "grid": self.grid, "pack_size": self.pack_size,
             "encryption": self.encryption}
        if self.lock_days:
            d["object_lock"] = {"days": self.lock_days, "mode": self.lock_mode}
        return encode_json(d)

    @classmethod
    def decode(cls, data: bytes, where: str) -> Config:
        what = f"{where}: config"
        if len(data) > CONFIG_MAX:
            fail(what, "too large")
        d = decode_json(data, what)
        v = d.get("cloneaware_repository")
        if not isinstance(v, int):
            fail(where, "not a cloneaware repository (its config is not one)")
        if v > CONFIG_VERSION:
            raise RepositoryError(f"{where}: repository format version {v} is newer than this "
                                  f"cloneaware reads (up to {CONFIG_VERSION}); upgrade "
                                  "cloneaware")
        if v not in (1, CONFIG_VERSION):
            fail(what, f"unknown repository format version {v}")
        try:
            c = cls(id=str(d["id"]), created=str(d["created"]), grid=int(d["grid"]),
                    pack_size=int(d["pack_size"]), encryption=str(d["encryption"]))
        except (KeyError, TypeError, ValueError):
            fail(what, "a field is missing or of the wrong type")
        if not is_id(c.id):
            fail(what, "bad repository id")
        if c.grid & (c.grid - 1) or not GRID_MIN <= c.grid <= GRID_MAX:
            fail(what, f"grid {c.grid} is not a power of two from 64 KiB to 4 MiB")
        if not 1 << 20 <= c.pack_size <= 1 << 30:
            fail(what, f"pack size {c.pack_size} out of bounds")
        if c.encryption not in ("none", "aes-256-gcm"):
            fail(what, f"unknown encryption {c.encryption!r}")
        lock = d.get("object_lock")
        if (v == 2) != (lock is not None):
            fail(what, "object_lock is in a version 2 config, and only there")
        if lock is not None:
            days, mode = lock.get("days") if isinstance(lock, dict) else None, \
                lock.get("mode") if isinstance(lock, dict) else None
            if not isinstance(days, int) or not LOCK_DAYS_MIN <= days <= LOCK_DAYS_MAX or \
                    mode not in LOCK_MODES:
                fail(what, "object_lock is not {days: 2 to 36500, mode: compliance or "
                     "governance}")
            c.lock_days, c.lock_mode = days, mode
        return c


SNAPSHOT_KEYS = {"time": str, "time_ns": int, "hostname": str, "username": str,
                 "paths": list, "tags": list, "manifest": list, "manifest_bytes": int,
                 "parent": (str, type(None)), "program": str, "summary": dict}


def check_snapshot(d: dict, what: str) -> dict:
    for k, t in SNAPSHOT_KEYS.items():
        if not isinstance(d.get(k), t):  # type: ignore[arg-type]
            fail(what, f"field {k!r} is missing or of the wrong type")
    listed = d.get("manifest_list")
    if listed is not None and (not isinstance(listed, list) or not listed or d["manifest"]):
        fail(what, "manifest_list is not a list of blob ids beside an empty manifest")
    if not all(isinstance(m, str) and is_id(m) for m in d["manifest"] + (listed or [])):
        fail(what, "bad manifest blob id")
    if not all(isinstance(p, str) for p in d["paths"] + d["tags"]):
        fail(what, "paths and tags must be strings")
    if not 0 <= d["manifest_bytes"] <= MANIFEST_MAX or \
            listed is None and len(d["manifest"]) * BLOB_MAX < d["manifest_bytes"]:
        fail(what, "manifest size out of bounds")
    if not 0 <= d["time_ns"] <= TIME_NS_MAX:
        fail(what, "time out of range")
    return d


def cut_list(ids: list[bytes]) -> list[bytes]:
    """A manifest's blob ids as the blobs of its blob list
    (docs/REPOSITORY.md, "Manifest blobs"): cut after an id whose first byte
    is below LIST_CUT_BYTE, or after LIST_MAX ids."""
    out: list[bytes] = []
    start = 0
    for i, bid in enumerate(ids):
        if bid[0] < LIST_CUT_BYTE or i + 1 - start == LIST_MAX or i + 1 == len(ids):
            out.append(b"".join(ids[start:i + 1]))
            start = i + 1
    return out


def check_lock(d: dict, what: str) -> dict:
    for k, t in {"time": str, "time_ns": int, "hostname": str, "username": str, "pid": int,
                 "exclusive": bool, "operation": str}.items():
        if not isinstance(d.get(k), t):
            fail(what, f"field {k!r} is missing or of the wrong type")
    if not 0 <= d["time_ns"] <= TIME_NS_MAX or not 0 < d["pid"] < 1 << 31:
        fail(what, "time or pid out of range")
    return d
