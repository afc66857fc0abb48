"""The blob index in memory (repo/blobindex.py): which pack a blob is read
from when index objects list it more than once, and what it counts."""
from __future__ import annotations

from cloneaware.repo import format as rf
from cloneaware.repo.blobindex import BlobIndex

A, B, C = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32
P1, P2 = b"\x01" * 32, b"\x02" * 32


def pack(pid: bytes, *blobs: tuple[bytes, int]) -> rf.IndexPack:
    """A pack of ``blobs`` (id, stored length) laid end to end."""
    p = rf.IndexPack(pid)
    off = 0
    for bid, n in blobs:
        p.blobs.append((bid, rf.T_DATA, off, n, n + 1))
        off += n
    return p


def test_lookup_gives_pack_offset_and_lengths():
    idx = BlobIndex()
    idx.add(pack(P1, (A, 10), (B, 20)))
    assert A in idx and B in idx and C not in idx
    assert idx.get(B) == rf.IndexEntry(P1, rf.T_DATA, 10, 20, 21)
    assert idx.get(C) is None
    assert idx.packs == {P1}
    assert idx.duplicates == 0


def test_the_first_location_listed_wins_and_later_ones_are_counted():
    idx = BlobIndex()
    idx.add(pack(P1, (A, 10)))
    idx.add(pack(P2, (C, 5), (A, 10)))
    assert idx.get(A) == rf.IndexEntry(P1, rf.T_DATA, 0, 10, 11)
    assert idx.get(C) == rf.IndexEntry(P2, rf.T_DATA, 0, 5, 6)
    assert idx.duplicates == 1
    assert idx.packs == {P1, P2}  # the second pack is known, though A is read from P1
    assert len(idx) == 2


def test_a_million_blobs_take_under_64_bytes_each_and_answer_as_before():
    """Issue 36: the index of a repository of 1,000,000 blobs held 227 to 252
    bytes a blob (a dict of tuples); the sorted arrays hold about 50.  Every
    blob is found where it was listed first, through merges of the recent
    ones, ids that end in zero bytes included (numpy's S32 strips them)."""
    import os
    import tracemalloc

    import cloneaware.repo.blobindex as bi

    n = 1_000_000
    ids = [os.urandom(31) + bytes([i % 3]) for i in range(n)]  # some end in \0
    ids[7] = b"\x00" * 32
    tracemalloc.start()
    try:
        idx = BlobIndex()
        for p in range(0, n, 2500):
            pk = rf.IndexPack(p.to_bytes(32, "big"))
            pk.blobs = [(ids[i], rf.T_DATA, i - p, 1, 2) for i in range(p, p + 2500)]
            idx.add(pk)
        idx._merge()
        resident, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(idx) == n
    assert resident / n < 64, resident / n
    assert idx.resident_bytes() / n < 64
    for i in (0, 7, 12345, n - 1):
        p = i - i % 2500
        assert idx.get(ids[i]) == rf.IndexEntry(p.to_bytes(32, "big"), rf.T_DATA, i - p, 1, 2)
    assert b"\x01" * 32 not in idx
    assert {b for b, _ in idx.items()} >= {ids[7], ids[3]}  # ids kept whole
    assert bi.RECENT_MAX < n  # the merges were exercised


def test_duplicates_across_merges_and_dropped_packs():
    """A blob listed again after the first listing was merged into the
    arrays is still a further location; dropping the pack of its first
    location makes the further one serve."""
    import cloneaware.repo.blobindex as bi

    idx = BlobIndex()
    idx.add(pack(P1, (A, 10), (B, 20)))
    idx._merge()
    idx.add(pack(P2, (A, 10)))
    assert idx.duplicates == 1 and idx.get(A).pack == P1
    assert idx.locations(A) == [rf.IndexEntry(P1, rf.T_DATA, 0, 10, 11),
                                rf.IndexEntry(P2, rf.T_DATA, 0, 10, 11)]
    assert idx.drop_packs({P1}) == 2  # A's first and B's only location
    assert idx.get(A) == rf.IndexEntry(P2, rf.T_DATA, 0, 10, 11)
    assert B not in idx and len(idx) == 1 and idx.packs == {P2}
    assert bi.RECENT_MAX > 2


def test_index_objects_read_as_arrays_give_what_adding_each_pack_gives():
    """load_into reads index objects as arrays (BlobIndex.add_arrays): for
    every blob the same first location, the same further ones in the same
    order, the same count of duplicates, as adding pack after pack; with
    blobs listed again identically and differently, within one object
    and after a merge, ids ending in zero bytes, and empty packs."""
    import random

    rng = random.Random(5)
    pool = [rng.randbytes(31) + bytes([i % 2]) for i in range(300)]  # half end in \0
    objects = []
    for o in range(6):
        packs = []
        for p in range(rng.randrange(0, 5)):
            pk = rf.IndexPack(bytes([o, p]) * 16)
            for _ in range(rng.randrange(0, 40)):
                bid = rng.choice(pool)
                same = rng.random() < 0.5  # a copy listed as before, or elsewhere
                pk.blobs.append((bid, rf.T_DATA if same else rf.T_TREE,
                                 0 if same else rng.randrange(1, 99), 7, 9))
            packs.append(pk)
        objects.append(rf.encode_index_payload(packs))
    one, many = BlobIndex(), BlobIndex()
    for k, raw in enumerate(objects):
        for pk in rf.decode_index_payload(raw, "i"):
            one.add(pk)
        many.add_arrays(*rf.decode_index_arrays(raw, "i"))
        if k == 2:  # the first objects merged into the sorted arrays
            one._merge()
    assert one.duplicates == many.duplicates > 0
    assert one.packs == many.packs and len(one) == len(many)
    for bid in pool:
        assert one.locations(bid) == many.locations(bid), bid.hex()
    assert sorted(one.items()) == sorted(many.items())
