"""The files cache: what the next backup of a backup set needs to know of
each regular file of the snapshot this host wrote last of it, so that a
file whose metadata proves it unchanged costs one stat: it is not opened,
mapped, cloned or read (docs/REPOSITORY.md, "Files cache").

One file per set in the client state directory (repo/state.py), written
whole and atomically after the snapshot, read whole at the start of the
next backup (columnar: a few numpy arrays, no record-by-record decoding)::

    CLONEAWARE-FILES\\n | u32 header length | header (JSON) | body

The header names the repository, the set, the snapshot the rows are of,
when its backup started, the sizes of the body's arrays and the BLAKE2b
digest of the body.  The body is the arrays in order: ROW per file, SEG per
blob range, PHYS per physical range, the blob ids (32 bytes each), and
the files' xattrs.

A row is trusted (``fast``) only when the cache is whole and of the parent
snapshot, each of its blobs is in the repository's index, and its ctime
is at least RACY_NS older than the start of the backup that recorded it
(a file written in the same clock tick as it was read would otherwise keep
its ctime: git's "racily clean" files).  A file is then unchanged when its
path, inode, size, mtime and ctime are those of the row: a write, truncate,
chmod, chown, xattr or flag change, rename onto it or utime sets its ctime
to the time of the change.  Anything else costs speed, never correctness:
a missing, truncated, foreign or stale cache is said and the files are
read."""
from __future__ import annotations

import array
import hashlib
import json
import os
import struct
from collections.abc import Callable

import numpy as np

from cloneaware.safeio import AtomicFile
from cloneaware.source.flags import EXTENT_DTYPE, NOT_CANDIDATE, PHYS

MAGIC = b"CLONEAWARE-FILES\n"
VERSION = 1
#: a row whose ctime is this close to (or after) the start of the backup that
#: recorded it is not trusted: the kernel stamps ctime from a clock that
#: ticks every 1 to 10 ms (a jiffy), so a later write in the same tick keeps
#: the ctime; ten ticks of margin.  (A source whose clock is not this host's,
#: a network filesystem, needs its clock kept in step, as restic's and
#: Borg's files caches do.)
RACY_NS = 100_000_000
HEADER_MAX = 1 << 16

ROW = np.dtype([("hash", "<u8"), ("ino", "<u8"), ("size", "<u8"), ("mtime", "<i8"),
                ("ctime", "<i8"), ("entry", "<u4"), ("iflags", "<u4"), ("seg_end", "<u8"),
                ("phys_end", "<u8"), ("xattr_end", "<u8")])
#: the bytes of a row that the metadata rule compares, as struct packs them
_STAT = struct.Struct("<QQqq")
_STAT_AT = 8  # after the hash: ino, size, mtime, ctime
assert (ROW.names or ())[1:5] == ("ino", "size", "mtime", "ctime")
SEG = np.dtype([("offset", "<u8"), ("length", "<u4"), ("blob", "<u4"), ("blob_offset", "<u4")])
_XA = struct.Struct("<II")
_ROW = struct.Struct("<QQQqqIIQQQ")
_SEG = struct.Struct("<QIII")
assert _ROW.size == ROW.itemsize and _SEG.size == SEG.itemsize


def path_hash(path: bytes) -> int:
    """The row key: 8 bytes of BLAKE2b of the archive path.  Two paths with
    the same hash cannot be mistaken for each other: the row's inode, size
    and times must match the file too."""
    return int.from_bytes(hashlib.blake2b(path, digest_size=8).digest(), "little")


def cache_path(state_dir: str, repo_id: str, set_key: str) -> str:
    name = hashlib.sha256(set_key.encode()).hexdigest()[:32]
    return os.path.join(state_dir, f"{repo_id}.files", f"{name}.cache")


def encode_xattrs(xattrs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(_XA.pack(len(n), len(v)) + n + v for n, v in xattrs)


def decode_xattrs(b: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    pos = 0
    while pos < len(b):
        nl, vl = _XA.unpack_from(b, pos)
        pos += _XA.size
        out.append((b[pos:pos + nl], b[pos + nl:pos + nl + vl]))
        pos += nl + vl
    return out


def _starts(ends: np.ndarray) -> np.ndarray:
    s = np.zeros(len(ends), dtype=np.uint64)
    s[1:] = ends[:-1]
    return s


def _gather(ends: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the items of ``rows``, in row order, and each selected
    row's new end offset) for items laid out by end offsets ``ends``."""
    starts = _starts(ends)[rows].astype(np.int64)
    counts = (ends[rows].astype(np.int64) - starts)
    new_ends = np.cumsum(counts).astype(np.uint64)
    total = int(new_ends[-1]) if len(new_ends) else 0
    idx = np.repeat(starts - (new_ends.astype(np.int64) - counts), counts) + np.arange(total)
    return idx, new_ends


class FilesCache:
    """The rows of one snapshot's regular files (columnar)."""

    def __init__(self, snapshot: str, started_ns: int, rows: np.ndarray, segs: np.ndarray,
                 phys: np.ndarray, blobs: np.ndarray, xattrs: bytes, complete: bool = True):
        #: with each file's physical ranges (a cache file; not one read from
        #: a manifest): a file may be taken unopened, since new sharing with
        #: it can be found
        self.complete = complete
        self.snapshot = snapshot
        self.started_ns = started_ns
        self.rows, self.segs, self.phys, self.blobs, self.xattrs = rows, segs, phys, blobs, xattrs
        #: the rows' bytes, for comparing a stat with a slice of them
        self._raw = np.ascontiguousarray(rows).view(np.uint8).data
        self.by_hash: dict[int, int] = dict(zip(rows["hash"].tolist(), range(len(rows))))
        #: rows that may be taken from a stat alone
        self.fast = rows["ctime"] < np.int64(started_ns - RACY_NS)
        #: rows whose every blob the repository has
        self.blobs_ok = np.ones(len(rows), dtype=bool)
        self._by_entry: dict[int, int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def check_blobs(self, known: Callable[[np.ndarray], np.ndarray]) -> int:
        """Distrust every row with a blob ``known`` (ids -> bools) says the
        repository lacks (pruned since).  -> how many rows."""
        if not len(self.blobs):
            return 0
        ok = known(self.blobs)
        bad_segs = np.nonzero(~ok[self.segs["blob"]])[0]
        if not len(bad_segs):
            return 0
        bad = np.unique(np.searchsorted(self.rows["seg_end"], bad_segs, side="right"))
        before = int(self.fast.sum())
        self.blobs_ok[bad] = False
        self.fast[bad] = False
        return before - int(self.fast.sum())

    def row(self, path: bytes) -> int:
        """The row of ``path`` (whatever its metadata), or -1."""
        return self.by_hash.get(path_hash(path), -1)

    def unchanged(self, path: bytes, st: os.stat_result) -> int:
        """The trusted row of ``path`` if ``st`` says the file is the one
        it describes, else -1."""
        r = self.by_hash.get(path_hash(path), -1)
        if r < 0 or not self.fast[r]:
            return -1
        at = r * ROW.itemsize + _STAT_AT
        if self._raw[at:at + _STAT.size] != _STAT.pack(st.st_ino, st.st_size, st.st_mtime_ns,
                                                       st.st_ctime_ns):
            return -1
        return r

    def entry_row(self, entry_id: int) -> int:
        if self._by_entry is None:
            self._by_entry = dict(zip(self.rows["entry"].tolist(), range(len(self.rows))))
        return self._by_entry.get(entry_id, -1)

    def segments(self, r: int) -> np.ndarray:
        end = int(self.rows["seg_end"][r])
        start = int(self.rows["seg_end"][r - 1]) if r else 0
        return self.segs[start:end]

    def blob_id(self, n: int) -> bytes:
        return self.blobs[n:n + 1].tobytes()  # all 32 bytes (an element drops trailing zeros)

    def row_xattrs(self, r: int) -> list[tuple[bytes, bytes]]:
        end = int(self.rows["xattr_end"][r])
        start = int(self.rows["xattr_end"][r - 1]) if r else 0
        return decode_xattrs(self.xattrs[start:end]) if end > start else []

    def sharing_with(self, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Which of ``rows`` have a physical range overlapping one of
        ``queries`` (PHYS): the unchanged files a new or changed file may
        share blocks with, to be mapped after all."""
        if not len(rows) or not len(queries):
            return np.zeros(0, dtype=np.int64)
        idx, ends = _gather(self.rows["phys_end"], rows)
        if not len(idx):
            return np.zeros(0, dtype=np.int64)
        owner = rows[np.searchsorted(ends, np.arange(len(idx)), side="right")]
        ph = self.phys[idx]
        order = np.argsort(ph["start"], kind="stable")
        s = ph["start"][order]
        e = s + ph["length"][order]
        owner = owner[order]
        reach = np.maximum.accumulate(e)  # the furthest end of any range so far
        qa = queries["start"]
        qb = qa + queries["length"]
        lo = np.searchsorted(reach, qa, side="right")
        hi = np.searchsorted(s, qb, side="left")
        found: set[int] = set()
        for i in np.nonzero(hi > lo)[0].tolist():
            a, b = int(lo[i]), int(hi[i])
            hit = e[a:b] > qa[i]
            found.update(owner[a:b][hit].tolist())
        return np.array(sorted(found), dtype=np.int64)


def load(path: str, repo_id: str, set_key: str, snapshot: str,
         warn: Callable[[str], None]) -> FilesCache | None:
    """The cache of ``snapshot``, or None (said when it is there but not
    usable)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        warn(f"{path}: {e.strerror}; every file is opened and mapped once")
        return None
    try:
        return _parse(raw, repo_id, set_key, snapshot)
    except _Stale:
        return None
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError,
            RecursionError) as e:
        warn(f"{path}: not a files cache of this backup set ({e or 'damaged'}); every file "
             "is opened and mapped once")
        return None


class _Stale(Exception):
    """A whole cache of another snapshot of the set (the one before): not said."""


def _parse(raw: bytes, repo_id: str, set_key: str, snapshot: str) -> FilesCache:
    if not raw.startswith(MAGIC):
        raise ValueError("no magic")
    at = len(MAGIC)
    (hlen,) = struct.unpack_from("<I", raw, at)
    at += 4
    if hlen > HEADER_MAX:
        raise ValueError("header too long")
    h = json.loads(raw[at:at + hlen])
    at += hlen
    body = memoryview(raw)[at:]
    if not isinstance(h, dict) or h.get("version") != VERSION:
        raise ValueError("another version")
    if h.get("repository") != repo_id or h.get("set") != set_key:
        raise ValueError("another repository or set")
    if hashlib.blake2b(body, digest_size=32).hexdigest() != h.get("digest"):
        raise ValueError("digest does not match: truncated or damaged")
    if h.get("snapshot") != snapshot:
        raise _Stale
    n = {k: int(h[k]) for k in ("rows", "segs", "phys", "blobs", "xattr_bytes")}
    if min(n.values()) < 0:
        raise ValueError("negative size")
    parts = []
    pos = 0
    for dt, count in ((ROW, n["rows"]), (SEG, n["segs"]), (PHYS, n["phys"]),
                      (np.dtype("S32"), n["blobs"])):
        size = dt.itemsize * count
        if pos + size > len(body):
            raise ValueError("shorter than its header says")
        parts.append(np.frombuffer(body[pos:pos + size], dtype=dt))
        pos += size
    if pos + n["xattr_bytes"] != len(body):
        raise ValueError("length does not match its header")
    xattrs = bytes(body[pos:])
    rows, segs, phys, blobs = parts
    # the offsets must be sane before anything slices with them
    for col, total in (("seg_end", n["segs"]), ("phys_end", n["phys"]),
                       ("xattr_end", n["xattr_bytes"])):
        ends = rows[col]
        if len(ends) and (np.any(ends[1:] < ends[:-1]) or int(ends[-1]) != total):
            raise ValueError(f"{col} out of order")
    if len(segs) and int(segs["blob"].max()) >= len(blobs):
        raise ValueError("a range names no blob")
    return FilesCache(snapshot, int(h["started_ns"]), rows, segs, phys, blobs, xattrs)


class CacheBuilder:
    """The next snapshot's rows: files written (``add``) and rows of the
    parent's cache kept for unchanged files (``keep``)."""

    def __init__(self) -> None:
        self.rows = bytearray()
        self.segs = bytearray()
        self.seg_blobs = bytearray()  # 32 bytes a range, numbered at the end
        self.exts = bytearray()  # the maps of the files added, whole
        self.xattrs = bytearray()
        self.kept_rows = array.array("q")
        self.kept_entries = array.array("Q")
        self.n_segs = self.n_exts = 0
        self.built = False

    def add(self, path: bytes, st: tuple[int, int, int, int], entry_id: int, iflags: int,
            xattrs: list[tuple[bytes, bytes]], offsets: list[int], lengths: list[int],
            blobs: list[bytes], blob_offsets: list[int], ext: np.ndarray | None) -> None:
        """A file written: ``st`` its (inode, size, mtime, ctime), the BLOB
        records' fields, ``ext`` its extent map (EXTENT_DTYPE; kept whole
        here, reduced to PHYS ranges for all files at once in ``build``)."""
        assert not self.built, "rows added to a CacheBuilder already built"
        for i in range(len(offsets)):
            self.segs += _SEG.pack(offsets[i], lengths[i], 0, blob_offsets[i])
            self.seg_blobs += blobs[i]
        self.n_segs += len(offsets)
        if ext is not None and len(ext):
            self.exts += ext.tobytes()
            self.n_exts += len(ext)
        if xattrs:
            self.xattrs += encode_xattrs(xattrs)
        ino, size, mtime, ctime = st  # as the metadata rule compares them
        self.rows += _ROW.pack(path_hash(path), ino, size, mtime, ctime, entry_id, iflags,
                               self.n_segs, self.n_exts, len(self.xattrs))

    def _phys(self, rows: np.ndarray) -> np.ndarray:
        """The PHYS ranges of the files added, from their maps: those another
        file could share (not a hole, not inline, delayed, unknown...); each
        row's ``phys_end`` set to match."""
        ext = np.frombuffer(self.exts, dtype=EXTENT_DTYPE)
        ends = rows["phys_end"].astype(np.int64)
        counts = np.diff(ends, prepend=0)
        owner = np.repeat(np.arange(len(rows)), counts)
        keep = (ext["physical"] != 0) & ((ext["flags"] & NOT_CANDIDATE) == 0)
        rows["phys_end"] = np.cumsum(np.bincount(owner[keep], minlength=len(rows)))
        out = np.empty(int(keep.sum()), dtype=PHYS)
        out["start"] = ext["physical"][keep]
        out["length"] = ext["length"][keep]
        return out

    def keep(self, row: int, entry_id: int) -> None:
        self.kept_rows.append(row)
        self.kept_entries.append(entry_id)

    def keep_many(self, rows: np.ndarray, first_entry: int) -> None:
        """Rows kept as entries first_entry, first_entry + 1, ..."""
        self.kept_rows.frombytes(rows.astype("<i8").tobytes())
        self.kept_entries.frombytes(np.arange(first_entry, first_entry + len(rows),
                                              dtype="<u8").tobytes())

    def build(self, old: FilesCache | None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                      np.ndarray, bytes]:
        """The cache's arrays, made once: they are views of this builder's
        bytes, rewritten in place (no copy of a whole cache), so it takes no
        more rows after and builds nothing again."""
        assert not self.built, "a CacheBuilder builds once"
        self.built = True
        # views of the builder's own bytes, written in place: no copy
        rows = np.frombuffer(self.rows, dtype=ROW)
        segs = np.frombuffer(self.segs, dtype=SEG)
        seg_ids = np.frombuffer(self.seg_blobs, dtype="S32")
        phys = self._phys(rows)
        xattrs = bytes(self.xattrs)
        if old is not None and len(self.kept_rows):
            k = np.frombuffer(self.kept_rows, dtype=np.int64)
            kr = old.rows[k].copy()
            kr["entry"] = np.frombuffer(self.kept_entries, dtype=np.uint64)
            si, se = _gather(old.rows["seg_end"], k)
            pi, pe = _gather(old.rows["phys_end"], k)
            xs = _starts(old.rows["xattr_end"])[k].astype(np.int64)
            xl = old.rows["xattr_end"][k].astype(np.int64) - xs
            xe = np.cumsum(xl).astype(np.uint64)
            kr["seg_end"] = se + np.uint64(len(segs))
            kr["phys_end"] = pe + np.uint64(len(phys))
            kr["xattr_end"] = xe + np.uint64(len(xattrs))
            if int(xl.sum()):
                xb = np.frombuffer(old.xattrs, dtype=np.uint8)
                xi = np.repeat(xs - (xe.astype(np.int64) - xl), xl) + np.arange(int(xl.sum()))
                xattrs += xb[xi].tobytes()
            ks = old.segs[si]
            seg_ids = np.concatenate([seg_ids, old.blobs[ks["blob"]]])
            segs = np.concatenate([segs, ks])
            phys = np.concatenate([phys, old.phys[pi]])
            rows = np.concatenate([rows, kr])
        blobs, inverse = np.unique(seg_ids, return_inverse=True)
        segs["blob"] = inverse.astype(np.uint32)
        return rows, segs, phys, blobs, xattrs

    def write(self, path: str, old: FilesCache | None, repo_id: str, set_key: str,
              snapshot: str, started_ns: int) -> None:
        rows, segs, phys, blobs, xattrs = self.build(old)
        # the body's parts hashed and written one after another, never
        # joined: a copy of the whole cache was the backup's peak of memory
        body = [np.ascontiguousarray(a).view(np.uint8).data for a in (rows, segs, phys, blobs)]
        body.append(memoryview(xattrs))
        digest = hashlib.blake2b(digest_size=32)
        for part in body:
            digest.update(part)
        header = json.dumps({
            "version": VERSION, "repository": repo_id, "set": set_key, "snapshot": snapshot,
            "started_ns": started_ns, "rows": len(rows), "segs": len(segs), "phys": len(phys),
            "blobs": len(blobs), "xattr_bytes": len(xattrs), "digest": digest.hexdigest(),
        }, sort_keys=True).encode()
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with AtomicFile(path, replace=True, mode=0o600) as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            for part in body:
                f.write(part)
            f.commit()
