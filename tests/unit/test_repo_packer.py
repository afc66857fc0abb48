"""Packs being written (repo/packer.py), on a repository in a temporary
directory: blobs land in packs that a fresh reader finds through the index,
an index object is written every INDEX_EVERY packs while adding goes on,
``finish_packs`` hands back the packs it did not index, and the dry packer
(backup --dry-run) writes nothing at all."""
from __future__ import annotations

import random

import pytest

from cloneaware.repo import format as rf
from cloneaware.repo.backend import LocalBackend
from cloneaware.repo.packer import INDEX_EVERY, DryPacker, Packer
from cloneaware.repo.repository import Repository

MiB = 1 << 20
BLOB = 300 << 10  # four blobs fill a pack of 1 MiB


@pytest.fixture
def repo(tmp_path):
    r = Repository.init(LocalBackend(str(tmp_path / "repo")), pack_size=MiB)
    yield r
    r.close()


def blobs(repo: Repository, n: int, seed: int = 1) -> list[tuple[bytes, bytes, bytes]]:
    """(id, plain bytes, stored form) of ``n`` random blobs."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        data = rnd.randbytes(BLOB)
        bid = repo.crypto.blob_id(data)
        out.append((bid, data, repo.encode_blob(rf.T_DATA, bid, data, None)))
    return out


def add_all(packer: Packer, bs) -> list[bool]:
    return [packer.add(bid, rf.T_DATA, len(data), stored) for bid, data, stored in bs]


def listing(repo: Repository, d: str) -> set[str]:
    return {o.name for o in repo.backend.listing(d)}


def reopened(repo: Repository) -> Repository:
    return Repository.open(LocalBackend(repo.backend.path))  # type: ignore[attr-defined]


def test_blobs_land_in_packs_that_a_fresh_reader_finds(repo):
    bs = blobs(repo, 10)
    p = Packer(repo, connections=2)
    assert add_all(p, bs) == [True] * 10
    assert add_all(p, bs[:3]) == [False] * 3  # pending: not added twice
    p.flush()
    p.close()
    assert p.packs_written == 3 == len(listing(repo, "data"))  # 4 + 4 + 2 blobs
    assert p.bytes_written == sum(o.size for o in repo.backend.listing("data"))
    assert all(bid in repo.index for bid, _, _ in bs) and not p.pending
    fresh = reopened(repo)
    for bid, data, _ in bs:
        assert fresh.read_blob(bid) == data
    fresh.close()
    again = Packer(repo)
    assert add_all(again, bs[:2]) == [False, False]  # in the index now
    again.close()


def test_an_index_object_every_index_every_packs_while_adding(repo):
    per_pack = 4
    bs = blobs(repo, per_pack * (INDEX_EVERY + 3))
    p = Packer(repo, connections=1)
    add_all(p, bs)
    # with one uploader, every pack but the last two is done when one more
    # closes: INDEX_EVERY of them (or one more) went into one index object
    early = listing(repo, "index")
    assert len(early) == 1, early
    indexed = [bid for bid, _, _ in bs if bid in repo.index]
    assert len(indexed) in (per_pack * INDEX_EVERY, per_pack * (INDEX_EVERY + 1))
    assert not set(indexed) & set(p.pending)
    p.flush()
    p.close()
    assert len(listing(repo, "index")) == 2
    fresh = reopened(repo)
    fresh.load_index()
    assert all(bid in fresh.index for bid, _, _ in bs)
    fresh.close()


def test_finish_packs_writes_the_last_pack_and_indexes_nothing(repo):
    bs = blobs(repo, 6)
    p = Packer(repo)
    add_all(p, bs)
    packs = p.finish_packs()
    p.close()
    assert len(packs) == 2 == p.packs_written
    assert listing(repo, "index") == set()  # the caller indexes them
    assert {pk.id.hex() for pk in packs} == {n.rpartition("/")[2]
                                             for n in listing(repo, "data")}
    assert sorted(b[0] for pk in packs for b in pk.blobs) == sorted(bid for bid, _, _ in bs)
    assert not any(bid in repo.index for bid, _, _ in bs)
    assert p.finish_packs() == []  # handed over once
    repo.write_index(packs)
    fresh = reopened(repo)
    assert fresh.read_blob(bs[5][0]) == bs[5][1]
    fresh.close()


def test_the_dry_packer_writes_nothing(repo):
    bs = blobs(repo, 10)
    p = DryPacker(repo)
    assert add_all(p, bs) == [True] * 10
    assert add_all(p, bs[:1]) == [False]  # counted once, as a backup would add it once
    assert p.finish_packs() == []
    p.flush()
    p.close()
    assert p.packs_written == 0 and p.bytes_written == 0
    assert listing(repo, "data") == set() and listing(repo, "index") == set()


def _trailer_order(repo: Repository) -> list[bytes]:
    from cloneaware.repo.survey import read_trailer

    (pack,) = repo.backend.listing("data")
    return [r[0] for r in read_trailer(repo, pack.name.rpartition("/")[2], pack.size)]


def test_an_encrypted_pack_holds_its_blobs_in_random_order(tmp_path):
    """Issue 35: in the order they came, the sizes of the blobs a store
    sees would let it recognise a known file (cut on a fixed grid); in an
    encrypted repository they are shuffled.  Unencrypted, the order stays
    (nothing to hide, and adjacent blobs are read together)."""
    small = [bytes([i]) * (1000 + i) for i in range(40)]
    for encrypted in (False, True):
        r = Repository.init(LocalBackend(str(tmp_path / f"r{encrypted}")),
                            password=b"pw" if encrypted else None, kdf_n=1 << 14)
        p = Packer(r, connections=1)
        ids = []
        for data in small:
            bid = r.crypto.blob_id(data)
            ids.append(bid)
            p.add(bid, rf.T_DATA, len(data), r.encode_blob(rf.T_DATA, bid, data, None))
        p.flush()
        p.close()
        got = _trailer_order(r)
        assert sorted(got) == sorted(ids)
        assert (got != ids) is encrypted, encrypted
        r.close()
