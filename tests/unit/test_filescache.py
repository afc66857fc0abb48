"""The files cache's own logic (cloneaware/repo/filescache.py), beside a
brute-force model: rows kept and added come back whole after a write and a
load; the overlap search finds exactly the rows a brute force finds; rows
with a blob the repository lacks, or a ctime too close to the backup, are
not trusted; a damaged file is refused, never half read."""
from __future__ import annotations

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest

from cloneaware.repo import filescache as fc
from cloneaware.source.flags import EXTENT_DTYPE, FE_DATA_INLINE, PHYS

NOW = 10**18


def _ext(rows):
    e = np.zeros(len(rows), dtype=EXTENT_DTYPE)
    for i, (lg, ph, ln, fl) in enumerate(rows):
        e[i] = (lg, ph, ln, fl, 0)
    return e


def _add(b: fc.CacheBuilder, path: bytes, n: int, ext=None, xattrs=()):
    b.add(path, (1000 + n, 4096 * n, NOW - 5 * 10**9, NOW - 5 * 10**9 + n), 10 + n, n,
          list(xattrs), [0, 65536][:n % 3], [65536, 10][:n % 3], [bytes([n % 256]) * 32,
                                                                 b"\0" * 32][:n % 3],
          [0, 7][:n % 3], ext)


def _load(tmp_path, b, old=None, snap="s1", started=NOW) -> fc.FilesCache:
    p = os.fspath(tmp_path / "c" / "x.cache")
    b.write(p, old, "repo", "set", snap, started)
    got = fc.load(p, "repo", "set", snap, lambda m: pytest.fail(m))
    assert got is not None
    return got


def test_rows_added_and_kept_come_back_whole(tmp_path):
    b = fc.CacheBuilder()
    for n in range(6):
        _add(b, b"t/f%d" % n, n, _ext([(0, 4096 * (n + 1), 4096, 0), (4096, 0, 4096, 0),
                                       (8192, 77, 10, FE_DATA_INLINE)]),
             xattrs=[(b"user.a", b"%d" % n)] if n % 2 else [])
    one = _load(tmp_path, b)
    assert len(one) == 6
    # holes and inline data are not ranges another file could share
    for n in range(6):
        r = one.row(b"t/f%d" % n)
        assert r >= 0 and one.rows["entry"][r] == 10 + n
        lo = int(one.rows["phys_end"][r - 1]) if r else 0
        assert one.phys[lo:int(one.rows["phys_end"][r])].tolist() == [(4096 * (n + 1), 4096)]
        assert one.row_xattrs(r) == ([(b"user.a", b"%d" % n)] if n % 2 else [])
        sg = one.segments(r)
        assert len(sg) == n % 3
        assert [one.blob_id(x) for x in sg["blob"]] == [bytes([n]) * 32, b"\0" * 32][:n % 3]

    # the next snapshot: two files written anew, the others kept under new entry ids
    b2 = fc.CacheBuilder()
    _add(b2, b"t/new", 2, _ext([(0, 999 * 4096, 4096, 0)]))
    for n in (5, 1, 3, 0):
        b2.keep(one.row(b"t/f%d" % n), 100 + n)
    two = _load(tmp_path, b2, one, "s2")
    assert len(two) == 5
    for n in (5, 1, 3, 0):
        r, r1 = two.row(b"t/f%d" % n), one.row(b"t/f%d" % n)
        assert two.rows["entry"][r] == 100 + n
        for col in ("ino", "size", "mtime", "ctime", "iflags"):
            assert two.rows[col][r] == one.rows[col][r1]
        assert two.row_xattrs(r) == one.row_xattrs(r1)
        assert [(int(s["offset"]), int(s["length"]), two.blob_id(s["blob"]),
                 int(s["blob_offset"])) for s in two.segments(r)] == \
            [(int(s["offset"]), int(s["length"]), one.blob_id(s["blob"]),
              int(s["blob_offset"])) for s in one.segments(r1)]
    assert two.row(b"t/f2") == -1


def _two_rows() -> fc.CacheBuilder:
    b = fc.CacheBuilder()
    _add(b, b"a", 1)
    _add(b, b"b", 2)
    return b


def test_a_stat_matches_only_its_own_trusted_row(tmp_path):
    c = _load(tmp_path, _two_rows())
    st = SimpleNamespace(st_ino=1001, st_size=4096, st_mtime_ns=NOW - 5 * 10**9,
                         st_ctime_ns=NOW - 5 * 10**9 + 1)
    assert c.unchanged(b"a", st) == c.row(b"a") >= 0
    assert c.unchanged(b"b", st) == -1  # another file's row
    for field, value in (("st_ino", 1), ("st_size", 1), ("st_mtime_ns", 1), ("st_ctime_ns", 1)):
        changed = SimpleNamespace(**{**vars(st), field: value})
        assert c.unchanged(b"a", changed) == -1, field
    # racy: the backup that recorded it started within RACY_NS of its ctime
    racy = _load(tmp_path, _two_rows(), started=NOW - 5 * 10**9 + 1 + fc.RACY_NS - 1)
    assert racy.unchanged(b"a", st) == -1
    # a blob the repository lost: not trusted
    c.check_blobs(lambda ids: ids != np.array([bytes([1]) * 32], dtype="S32"))
    assert c.unchanged(b"a", st) == -1 and not c.blobs_ok[c.row(b"a")]
    assert c.blobs_ok[c.row(b"b")]


def test_the_overlap_search_finds_what_a_brute_force_finds(tmp_path):
    rng = random.Random(5)
    b = fc.CacheBuilder()
    ranges = {}
    for n in range(300):
        rows = []
        for k in range(rng.randrange(0, 4)):
            start = rng.randrange(1, 200) * 4096
            if rng.random() < 0.3 and ranges:  # a reflinked family: the very same ranges
                start = rng.choice([r for v in ranges.values() for r in v] or [(4096, 1)])[0]
            rows.append((k * 65536, start, rng.randrange(1, 8) * 4096, 0))
        ranges[n] = [(p, ln) for _lg, p, ln, _f in rows]
        _add(b, b"f%d" % n, n, _ext(rows))
    c = _load(tmp_path, b)
    for _ in range(50):
        q = np.zeros(rng.randrange(1, 6), dtype=PHYS)
        q["start"] = [rng.randrange(0, 210) * 4096 + rng.randrange(0, 4096) for _ in q]
        q["length"] = [rng.randrange(1, 3 * 4096) for _ in q]
        among = np.array(sorted(rng.sample(range(300), 150)), dtype=np.int64)
        rows_of = {c.row(b"f%d" % n): n for n in range(300)}
        want = sorted(r for r in among.tolist() if any(
            p < qs + ql and qs < p + ln for p, ln in ranges[rows_of[r]]
            for qs, ql in zip(q["start"].tolist(), q["length"].tolist())))
        assert c.sharing_with(among, q).tolist() == want


def test_a_damaged_cache_is_refused_whole(tmp_path):
    b = fc.CacheBuilder()
    for n in range(20):
        _add(b, b"f%d" % n, n, _ext([(0, 4096 * (n + 1), 4096, 0)]), [(b"user.x", b"y")])
    p = tmp_path / "c" / "x.cache"
    b.write(os.fspath(p), None, "repo", "set", "s1", NOW)
    raw = p.read_bytes()
    said: list[str] = []
    rng = random.Random(3)
    for cut in [0, 5, len(fc.MAGIC) + 3, len(raw) // 2, len(raw) - 1] + \
            [rng.randrange(len(raw)) for _ in range(30)]:
        p.write_bytes(raw[:cut])
        assert fc.load(os.fspath(p), "repo", "set", "s1", said.append) is None
    for _ in range(60):
        b2 = bytearray(raw)
        b2[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(b2))
        got = fc.load(os.fspath(p), "repo", "set", "s1", said.append)
        # a flip in the header's JSON may leave it meaning the same (a space, say)
        assert got is None or bytes(b2[:len(fc.MAGIC)]) == fc.MAGIC
        if got is not None:
            assert len(got) == 20
    p.write_bytes(raw)
    assert fc.load(os.fspath(p), "other-repo", "set", "s1", said.append) is None
    assert fc.load(os.fspath(p), "repo", "other-set", "s1", said.append) is None
    n = len(said)
    assert fc.load(os.fspath(p), "repo", "set", "s0", said.append) is None  # stale: not said
    assert len(said) == n
    assert all("not a files cache of this backup set" in m for m in said)


@pytest.mark.parametrize("atime", [False, True])
def test_files_taken_unopened_are_the_records_the_writer_writes_one_by_one(tmp_path, atime):
    """The native batch encoder (repo/unopened.py) writes, for files taken
    from the cache, exactly the bytes that entry, stat, blob... and end
    write record by record, index and footer included; runs of files
    written in one write each, between other entries."""
    import io

    from cloneaware.archive import format as fmt
    from cloneaware.archive.writer import Writer
    from cloneaware.repo.unopened import Encoded
    from cloneaware.source.mapping import Unopened

    b = fc.CacheBuilder()
    for n in range(7):
        _add(b, b"t/f%d" % n, n, xattrs=[(b"user.a", b"%d" % n), (b"trusted.x" * 3, b"")]
             if n % 2 else [])
    cache = _load(tmp_path, b)
    nodes = [SimpleNamespace(name=b"t/f%d" % n, src=b"/src/t/f%d" % n, st=SimpleNamespace(
        st_mode=0o100640 | (n << 9 & 0o7000), st_uid=n, st_gid=2 * n,
        st_atime_ns=NOW + n)) for n in range(7)]
    items = [Unopened(nd, cache.row(nd.name)) for nd in nodes]

    def archive(batched: bool) -> bytes:
        buf = io.BytesIO()
        w = Writer(buf)
        w.entry(fmt.Entry(0, fmt.K_DIR, b"t", mode=0o755))
        enc = Encoded(cache, items, atime) if batched else None
        for lo, hi in ((0, 3), (3, 4), (4, 7)):  # three runs, a directory after each
            if enc is not None:
                w.regulars(memoryview(enc.data)[enc.at[lo]:enc.at[hi]], enc.paths[lo:hi],
                           enc.sizes[lo:hi], enc.at[lo:hi + 1], enc.blob_bytes[lo:hi])
            else:
                for it in items[lo:hi]:
                    r, st = it.row, it.node.st
                    row = cache.rows[r]
                    w.entry(fmt.Entry(0, fmt.K_REG, it.node.name, mode=st.st_mode & 0o7777,
                                      uid=st.st_uid, gid=st.st_gid, mtime_ns=int(row["mtime"]),
                                      atime_ns=st.st_atime_ns if atime else int(row["mtime"]),
                                      size=int(row["size"]), iflags=int(row["iflags"]),
                                      xattrs=cache.row_xattrs(r)))
                    w.stat(int(row["ino"]), int(row["ctime"]))
                    for sg in cache.segments(r):
                        w.blob(int(sg["offset"]), int(sg["length"]), int(sg["blob_offset"]),
                               cache.blob_id(int(sg["blob"])))
                    w.end()
            w.entry(fmt.Entry(0, fmt.K_DIR, b"t/d%d" % lo, mode=0o700))
        w.finish()
        return buf.getvalue()

    one, batch = archive(False), archive(True)
    # the header's creation time differs: compare all but the HEADER record
    (hlen,) = np.frombuffer(one, "<u4", 1, len(fmt.MAGIC) + 4)
    after = len(fmt.MAGIC) + fmt.FRAME_OVERHEAD + int(hlen)
    assert len(one) == len(batch) and one[after:] == batch[after:]
