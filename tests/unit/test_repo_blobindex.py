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
    assert len(idx.blobs) == 2
