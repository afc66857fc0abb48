"""Unit tests of extents.py on hand-made maps: data_ranges, is_own, the
plan's pieces and totals for the cases the kernel produces, families()."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cloneaware.index import plan as ex
from cloneaware.source import flags as fl

K = 4096


def emap(*rows) -> np.ndarray:
    a = np.zeros(len(rows), dtype=fl.EXTENT_DTYPE)
    for i, r in enumerate(rows):
        a[i] = tuple(r) + (0,) * (5 - len(r))
    return a


def rows(a: np.ndarray) -> list[tuple]:
    return [(int(r["logical"]), int(r["physical"]), int(r["length"]), int(r["flags"]))
            for r in a]


def test_dtype_matches_native_layer():
    from cloneaware import native

    assert fl.EXTENT_DTYPE.itemsize == native.EXTENT_SIZE == 32


def test_flags_match_kernel_header():
    """Each FE_* is FIEMAP_EXTENT_* of <linux/fiemap.h> (where installed)."""
    header = Path("/usr/include/linux/fiemap.h")
    if not header.exists():
        pytest.skip("no <linux/fiemap.h> on this machine")
    kernel = {m.group(1): int(m.group(2), 16) for m in re.finditer(
        r"#define\s+FIEMAP_EXTENT_(\w+)\s+0x([0-9a-fA-F]+)", header.read_text())}
    ours = {n[3:]: v for n, v in vars(fl).items() if n.startswith("FE_")}
    assert ours and all(kernel[n] == v for n, v in ours.items()), (ours, kernel)


# --- data_ranges ----------------------------------------------------------

def test_data_ranges_clamps_xfs_whole_block_to_size():
    # XFS: a 5-byte file reports one 4096-byte extent
    d = ex.data_ranges(emap((0, 40960, K, fl.FE_LAST)), 5)
    assert rows(d) == [(0, 40960, 5, fl.FE_LAST)]


def test_data_ranges_clamps_last_and_drops_past_eof():
    m = emap((0, 100 * K, 4 * K), (4 * K, 200 * K, 4 * K), (8 * K, 300 * K, 4 * K, fl.FE_LAST))
    assert rows(ex.data_ranges(m, 6 * K + 1)) == [(0, 100 * K, 4 * K, 0),
                                                  (4 * K, 200 * K, 2 * K + 1, 0)]
    # an extent that starts exactly at EOF is not data
    assert rows(ex.data_ranges(m, 8 * K)) == [(0, 100 * K, 4 * K, 0), (4 * K, 200 * K, 4 * K, 0)]
    assert rows(ex.data_ranges(m, 0)) == []
    # past the last extent the file is a hole: nothing is stretched
    assert rows(ex.data_ranges(m, 64 * K))[-1] == (8 * K, 300 * K, 4 * K, fl.FE_LAST)


def test_data_ranges_drops_unwritten_and_empty():
    m = emap((0, 100 * K, 4 * K, fl.FE_UNWRITTEN),
             (4 * K, 104 * K, 4 * K, 0),
             (8 * K, 108 * K, 0, 0),
             (12 * K, 112 * K, 4 * K, fl.FE_UNWRITTEN | fl.FE_SHARED | fl.FE_LAST))
    assert rows(ex.data_ranges(m, 16 * K)) == [(4 * K, 104 * K, 4 * K, 0)]


def test_data_ranges_keeps_input_untouched_and_handles_empty():
    m = emap((0, 100 * K, 8 * K, fl.FE_LAST))
    ex.data_ranges(m, 10)
    assert rows(m) == [(0, 100 * K, 8 * K, fl.FE_LAST)]
    e = ex.data_ranges(np.zeros(0, dtype=fl.EXTENT_DTYPE), 100)
    assert len(e) == 0 and e.dtype == fl.EXTENT_DTYPE


def test_is_own():
    flags = np.array([0, fl.FE_SHARED, fl.FE_LAST, fl.FE_ENCODED, fl.FE_DATA_INLINE,
                      fl.FE_DELALLOC, fl.FE_UNKNOWN, fl.FE_DATA_ENCRYPTED, fl.FE_DATA_TAIL,
                      fl.FE_NOT_ALIGNED, 0], dtype=np.uint32)
    phys = np.array([K] * 10 + [0], dtype=np.uint64)
    assert ex.is_own(flags, phys).tolist() == [False, False, False] + [True] * 8


# --- the plan on kernel-shaped maps ----------------------------------------

def build(*files):
    b = ex.IndexBuilder()
    for fs, size, m in files:
        b.add(fs, size, m)
    return b.build()


def test_empty_set_and_empty_files():
    p = build()
    assert p.totals == ex.Totals()
    assert len(p.pieces) == 0 and p.file_start.tolist() == [0]
    assert p.families() == []
    p = build((0, 0, emap()), (0, 1 << 20, emap()))  # empty file, all-hole file
    assert p.totals.files == 2 and p.totals.logical_bytes == 1 << 20
    assert p.totals.data_bytes == p.totals.physical_bytes == 0
    assert len(p.file_pieces(0)) == len(p.file_pieces(1)) == 0


def test_partial_clone_btrfs_shape():
    """docs/KERNEL.md F4: on Btrfs the source keeps one 1 MiB extent at P, the clone of
    128 KiB from 448 KiB reports P + 448 KiB."""
    P = 13631488
    src = emap((0, P, 1 << 20, fl.FE_SHARED | fl.FE_LAST))
    dst = emap((0, 50 << 20, 128 << 10), (128 << 10, P + (448 << 10), 128 << 10, fl.FE_SHARED),
               (256 << 10, 60 << 20, 768 << 10, fl.FE_LAST))
    p = build((0, 1 << 20, src), (0, 1 << 20, dst))
    assert p.file_pieces(0).tolist() == [(0, 0, 1 << 20, -1, 0, 0)]
    assert p.file_pieces(1).tolist() == [(1, 0, 128 << 10, -1, 0, 0),
                                         (1, 128 << 10, 128 << 10, 0, 448 << 10, 0),
                                         (1, 256 << 10, 768 << 10, -1, 0, 0)]
    t = p.totals
    assert t.shared_bytes == 2 * (128 << 10)
    assert t.physical_bytes == (2 << 20) - (128 << 10)
    # the rest of the source is SHARED (with the clone's range) yet mapped once
    assert t.external_shared_bytes == (1 << 20) - (128 << 10)
    assert p.stored_bytes() == t.physical_bytes
    assert p.referenced_bytes() == 128 << 10


def test_walk_order_decides_the_owner():
    """The same two maps in the other order: the other file stores the bytes."""
    a = emap((0, 10 * K, 4 * K, fl.FE_LAST))
    b = emap((0, 8 * K, 4 * K, fl.FE_LAST))       # overlaps a's first 2 blocks
    p = build((0, 4 * K, a), (0, 4 * K, b))
    assert p.file_pieces(1).tolist() == [(1, 0, 2 * K, -1, 0, 0), (1, 2 * K, 2 * K, 0, 0, 0)]
    p = build((0, 4 * K, b), (0, 4 * K, a))
    assert p.file_pieces(1).tolist() == [(1, 0, 2 * K, 0, 2 * K, 0), (1, 2 * K, 2 * K, -1, 0, 0)]


def test_same_physical_on_two_filesystems_is_not_shared():
    m = emap((0, 13631488, 1 << 20, fl.FE_LAST))
    p = build((0, 1 << 20, m), (1, 1 << 20, m))
    assert p.totals.shared_bytes == 0
    assert p.totals.physical_bytes == 2 << 20
    assert p.referenced_bytes() == 0
    p = build((0, 1 << 20, m), (0, 1 << 20, m))
    assert p.totals.shared_bytes == 2 << 20
    assert p.referenced_bytes() == 1 << 20


def test_inline_is_own_and_clamped():
    """docs/KERNEL.md F16: Btrfs inline: flags 0x301, physical 0, length one block."""
    inline = emap((0, 0, K, fl.FE_LAST | fl.FE_NOT_ALIGNED | fl.FE_DATA_INLINE))
    p = build((0, 100, inline), (0, 100, inline.copy()))
    t = p.totals
    assert t.inline_bytes == t.data_bytes == t.physical_bytes == 200
    assert t.shared_bytes == 0 and p.referenced_bytes() == 0


def test_encoded_windows_are_own_and_counted_once():
    """docs/KERNEL.md F10: a file referencing part of a compressed extent reports the
    same physical start with a shorter length; never shared on overlap."""
    E = fl.FE_ENCODED
    full = emap((0, 1 << 30, 128 << 10, E | fl.FE_SHARED),
                (128 << 10, (1 << 30) + K, 128 << 10, E | fl.FE_SHARED | fl.FE_LAST))
    part = emap((0, 1 << 30, 64 << 10, E | fl.FE_SHARED | fl.FE_LAST))
    p = build((0, 256 << 10, full), (0, 256 << 10, full.copy()), (0, 64 << 10, part))
    t = p.totals
    assert t.shared_bytes == 0 and p.referenced_bytes() == 0
    assert t.encoded_bytes == t.data_bytes == 2 * (256 << 10) + (64 << 10)
    assert t.physical_bytes == 256 << 10       # two extents, each counted once
    assert t.external_shared_bytes == t.encoded_bytes
    # The copy names the same extents with the same lengths: candidates, to be
    # checked by content.  ``part`` has another length: not even a candidate.
    C, H = ex.CHECK_CANDIDATE, ex.CHECK_HASHED
    assert p.file_pieces(0).tolist() == [(0, 0, 128 << 10, -1, 0, H),
                                         (0, 128 << 10, 128 << 10, -1, 0, H)]
    assert p.file_pieces(1).tolist() == [(1, 0, 128 << 10, 0, 0, C),
                                         (1, 128 << 10, 128 << 10, 0, 128 << 10, C)]
    assert p.file_pieces(2).tolist() == [(2, 0, 64 << 10, -1, 0, 0)]
    assert t.encoded_candidate_bytes == p.candidate_bytes() == 256 << 10
    assert p.stored_bytes() == (256 << 10) + (64 << 10)
    # the same physical start on another filesystem is another extent
    p = build((0, 256 << 10, full), (1, 64 << 10, part))
    assert p.totals.physical_bytes == (256 << 10) + (64 << 10)


def test_fiemap_physical_zero_is_never_swept():
    # delalloc (unsynced) ranges report physical 0: they must not all "share" byte 0
    m = emap((0, 0, 8 * K, fl.FE_DELALLOC | fl.FE_UNKNOWN | fl.FE_LAST))
    plain0 = emap((0, 0, 8 * K, fl.FE_LAST))
    p = build((0, 8 * K, m), (0, 8 * K, m.copy()), (0, 8 * K, plain0), (0, 8 * K, plain0))
    assert p.totals.shared_bytes == 0
    assert p.totals.physical_bytes == 32 * K


def test_self_sharing_file():
    """FICLONERANGE within one file: [512K, 768K) is a clone of [0, 256K)."""
    P = 14680064
    m = emap((0, P, 512 << 10, fl.FE_SHARED), (512 << 10, P, 256 << 10, fl.FE_SHARED),
             (768 << 10, P + (768 << 10), 256 << 10, fl.FE_LAST))
    p = build((0, 1 << 20, m))
    assert p.file_pieces(0).tolist() == [(0, 0, 512 << 10, -1, 0, 0),
                                         (0, 512 << 10, 256 << 10, 0, 0, 0),
                                         (0, 768 << 10, 256 << 10, -1, 0, 0)]
    assert p.totals.shared_bytes == 512 << 10
    assert p.totals.physical_bytes == 768 << 10
    assert p.families() == []   # sharing only with itself: no family


def test_unwritten_and_holes_are_not_data():
    m = emap((0, 100 * K, 64 * K, fl.FE_UNWRITTEN),
             (64 * K, 164 * K, 16 * K, 0),
             (80 * K, 180 * K, 176 * K, fl.FE_UNWRITTEN | fl.FE_LAST))
    sparse = emap((256 * K, 900 * K, 16 * K), (768 * K, 916 * K, 16 * K, fl.FE_LAST))
    p = build((0, 256 * K, m), (0, 1024 * K, sparse))
    assert p.totals.data_bytes == 48 * K
    assert p.totals.physical_bytes == 48 * K
    assert p.totals.logical_bytes == 1280 * K
    assert p.file_pieces(0).tolist() == [(0, 64 * K, 16 * K, -1, 0, 0)]
    assert p.file_pieces(1).tolist() == [(1, 256 * K, 16 * K, -1, 0, 0),
                                         (1, 768 * K, 16 * K, -1, 0, 0)]


def test_extent_count_counts_raw_extents():
    b = ex.IndexBuilder()
    b.add(0, 10, emap((0, 100 * K, K), (K, 101 * K, K, fl.FE_UNWRITTEN),
                      (2 * K, 102 * K, K, fl.FE_LAST)))
    assert b.extent_count == 3
    assert b.build().totals.extents == 3


# --- families ---------------------------------------------------------------

def test_families_connected_components_largest_first():
    K2 = 8 * K
    base = emap((0, 100 * K, K2, fl.FE_LAST))
    other = emap((0, 500 * K, 4 * K, fl.FE_LAST))
    alone = emap((0, 900 * K, K2, fl.FE_LAST))
    files = [
        (0, K2, base),                                   # 0: family A
        (0, 4 * K, other),                               # 1: family B
        (0, K2, emap((0, 100 * K, K2, fl.FE_LAST))),     # 2: clone of 0
        (0, K2, alone),                                  # 3: no sharing
        (0, 4 * K, emap((0, 500 * K, 4 * K, fl.FE_LAST))),  # 4: clone of 1
        (0, K2, emap((0, 104 * K, 4 * K), (4 * K, 700 * K, 4 * K, fl.FE_LAST))),  # 5: part of 0
        (0, K2, emap((0, 700 * K, 4 * K, fl.FE_LAST))),  # 6: shares with 5 only
        (1, K2, base),                                   # 7: same physical, other fs
    ]
    p = build(*files)
    fams = [f.tolist() for f in p.families()]
    assert fams == [[0, 2, 5, 6], [1, 4]]
    assert all(f.dtype == np.int64 for f in p.families())


def test_families_order_breaks_ties_by_first_file():
    m1 = emap((0, 100 * K, K, fl.FE_LAST))
    m2 = emap((0, 200 * K, K, fl.FE_LAST))
    p = build((0, K, m2), (0, K, m1), (0, K, m2), (0, K, m1))
    assert [f.tolist() for f in p.families()] == [[0, 2], [1, 3]]


def test_totals_as_dict_is_plain_ints():
    p = build((0, 100, emap((0, K, K, fl.FE_LAST))))
    d = p.totals.as_dict()
    assert d["files"] == 1 and d["physical_bytes"] == 100
    assert all(type(v) is int for v in d.values())
    assert set(d) == {"files", "extents", "logical_bytes", "data_bytes", "physical_bytes",
                      "shared_bytes", "external_shared_bytes", "encoded_bytes",
                      "encoded_exact_bytes", "encoded_candidate_bytes", "inline_bytes"}


@pytest.mark.parametrize("n", [1, 2, 3, 1000])
def test_many_clones_of_one_block(n):
    m = emap((0, 100 * K, K, fl.FE_LAST))
    p = build(*[(0, K, m)] * n)
    assert p.totals.physical_bytes == K
    assert p.totals.shared_bytes == (n * K if n > 1 else 0)
    assert p.referenced_bytes() == (n - 1) * K
    refs = p.pieces[p.pieces["ref_file"] >= 0]
    assert (refs["ref_file"] == 0).all() and (refs["ref_logical"] == 0).all()


# --- exact compressed ranges from Btrfs's file extent items ------------------------

def items(*rows) -> np.ndarray:
    """(logical, disk_bytenr, offset, num_bytes[, ram_bytes, compression, type])."""
    a = np.zeros(len(rows), dtype=fl.FILE_EXTENT_DTYPE)
    for i, r in enumerate(rows):
        lg, d, off, n = r[:4]
        ram = r[4] if len(r) > 4 else 128 * 1024
        a[i]["logical"], a[i]["disk_bytenr"], a[i]["offset"] = lg, d, off
        a[i]["num_bytes"], a[i]["ram_bytes"] = n, ram
        a[i]["compression"] = r[5] if len(r) > 5 else fl.BTRFS_COMPRESS_ZSTD
        a[i]["type"] = r[6] if len(r) > 6 else fl.BTRFS_FILE_EXTENT_REG
        a[i]["disk_num_bytes"] = 40960
    return a


def test_file_extent_dtype_matches_native_layer():
    from cloneaware import native

    assert fl.FILE_EXTENT_DTYPE.itemsize == native.FILE_EXTENT_SIZE == 64


ENC = fl.FE_ENCODED
KiB = 1024


def test_refine_gives_the_place_inside_the_extent():
    from cloneaware.source.mapping import refine_encoded

    D, E = 1 << 30, (1 << 30) + 40960
    m = emap((0, D, 64 * KiB, ENC), (64 * KiB, E, 32 * KiB, ENC | fl.FE_LAST))
    it = items((0, D, 8 * KiB, 32 * KiB), (32 * KiB, D, 0, 32 * KiB), (64 * KiB, E, 0, 32 * KiB))
    got = rows(refine_encoded(m, it))
    X = fl.CA_EXACT
    assert got == [(0, D * 32 + 8 * KiB, 32 * KiB, ENC | X), (32 * KiB, D * 32, 32 * KiB, ENC | X),
                   (64 * KiB, E * 32, 32 * KiB, ENC | fl.FE_LAST | X)]


def test_refine_leaves_what_the_items_do_not_prove():
    """A range the items do not cover whole, whose first item names another
    extent (the file changed between the two calls), or whose item is not
    compressed, stays as FIEMAP gave it: a candidate, never swept."""
    from cloneaware.source.mapping import refine_encoded

    D = 1 << 30
    m = emap((0, D, 64 * KiB, ENC), (64 * KiB, D + 40960, 64 * KiB, ENC),
             (128 * KiB, D + 81920, 64 * KiB, ENC), (192 * KiB, 5 * D, 64 * KiB, ENC | fl.FE_LAST))
    it = items((0, D, 0, 32 * KiB),  # half of the first range only
               (64 * KiB, 2 * D, 0, 64 * KiB),  # another extent than FIEMAP says
               (128 * KiB, D + 81920, 0, 64 * KiB, 64 * KiB, fl.BTRFS_COMPRESS_NONE),
               (192 * KiB, 5 * D, 0, 64 * KiB, 256 * KiB))  # larger than Btrfs compresses
    out = refine_encoded(m, it)
    assert rows(out) == rows(m)
    assert ex.is_own(out["flags"], out["physical"]).all()


def test_exact_ranges_share_by_overlap_and_the_sole_owner_may_be_encoded():
    """Exact addresses sweep like plain ones: windows that overlap inside one
    extent share exactly what overlaps; a whole range that is its extent's
    only stored piece is CHECK_ENCODED."""
    X = ENC | fl.CA_EXACT
    D = (1 << 30) * 32
    a = emap((0, D, 128 * KiB, X | fl.FE_LAST))  # the whole extent
    b = emap((0, D + 64 * KiB, 64 * KiB, X | fl.FE_LAST))  # its second half
    other = (1 << 31) * 32
    c = emap((0, other, 64 * KiB, X), (64 * KiB, other + 96 * KiB, 32 * KiB, X | fl.FE_LAST))
    p = build((0, 128 * KiB, a), (0, 64 * KiB, b), (0, 96 * KiB, c))
    pieces = p.pieces.tolist()
    assert (0, 0, 128 * KiB, -1, 0, ex.CHECK_ENCODED) in pieces
    assert (1, 0, 64 * KiB, 0, 64 * KiB, ex.CHECK_NONE) in pieces
    # c owns two windows of one extent: stored plainly
    assert [x[5] for x in pieces if x[0] == 2] == [ex.CHECK_NONE]
    assert p.totals.shared_bytes == 2 * 64 * KiB
    assert p.totals.encoded_exact_bytes == p.totals.encoded_bytes == 288 * KiB
    assert p.totals.encoded_candidate_bytes == 0
    # exact addresses never meet the plain ones of the same filesystem
    plain = emap((0, D + 64 * KiB, 64 * KiB, fl.FE_LAST))
    p = build((0, 128 * KiB, a), (0, 64 * KiB, plain))
    assert p.totals.shared_bytes == 0


def test_map_digest_small_maps_as_the_numpy_layout():
    """map_digest merges small maps in plain Python: the digest must be the
    one of the numpy layout (continuing runs merged, a zero physical never
    merged, flags ignored), else a file read would be judged changed."""
    import hashlib
    import random

    from cloneaware.backup.meta import SMALL_MAP, layout, map_digest

    def numpy_digest(e):
        return hashlib.blake2b(np.ascontiguousarray(layout(e)).tobytes(),
                               digest_size=16).digest()

    rng = random.Random(7)
    merged = 0
    for _ in range(3000):
        rs, lg, ph = [], 0, rng.choice([0, 1 << 20])
        for _ in range(rng.randint(0, SMALL_MAP)):
            ln = rng.choice([K, 2 * K, 64 * K])
            rs.append((lg, ph, ln, rng.choice([0, 0x8, 0x2000])))
            lg += ln + rng.choice([0, 0, K])
            ph = rng.choice([ph + ln, ph + ln, 0, rng.randint(1, 1 << 20) * K])
        e = emap(*rs)
        merged += len(layout(e)) < len(e)
        assert map_digest(e) == numpy_digest(e), rows(e)
    assert merged > 100  # the merging rule was exercised
    big = emap(*[(i * K, (i + 9) * K, K) for i in range(SMALL_MAP + 1)])
    assert map_digest(big) == numpy_digest(big) == map_digest(emap((0, 9 * K, (SMALL_MAP + 1) * K)))
