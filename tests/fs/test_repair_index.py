"""repair index (issue 31, item 9's advice; issue 33): a repository whose
index objects were lost or damaged gets an index rebuilt from its packs'
own trailers, written before the old objects go; check then passes and
every snapshot restores exactly (hashed), prune then keeps what they need.
Plain and encrypted, on real filesystems."""
from __future__ import annotations

import json

import pytest
from helpers.cli import cli
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.testing import write_random

pytestmark = pytest.mark.root


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_lost_index_is_rebuilt_from_the_packs(btrfs_dir, tmp_path, monkeypatch, encrypted):
    repo = tmp_path / "repo"
    if encrypted:
        monkeypatch.setenv("CLONEAWARE_PASSWORD", "pw")
        cli("init", "-r", repo, "--encrypt", "--kdf-n", "16384", "--pack-size", "1",
            check_rc=0)
    else:
        cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a", 3 << 20, 1)
    (src / "small").write_bytes(b"x" * 100)
    ids = [json.loads(cli("backup", "--json", "-r", repo, src, check_rc=0).out)["snapshot"]]
    write_random(src / "b", 2 << 20, 2)
    ids.append(json.loads(cli("backup", "--json", "-r", repo, src, check_rc=0).out)["snapshot"])
    packs = sorted(p.name for p in (repo / "data").rglob("*") if p.is_file())
    index = sorted((repo / "index").iterdir())
    assert len(index) >= 2
    index[0].unlink()  # one lost
    index[1].write_bytes(b"junk")  # one damaged
    r = cli("check", "-r", repo)
    assert r.returncode == 3 and "Do not prune" in r.out + r.err, str(r)
    r = cli("prune", "-r", repo)  # refuses: snapshots need blobs no index lists
    assert r.returncode == 3, str(r)
    assert sorted(p.name for p in (repo / "data").rglob("*") if p.is_file()) == packs
    r = cli("repair", "index", "--dry-run", "-r", repo, check_rc=0)
    assert "would write an index of" in r.out and (repo / "index" / index[1].name).exists()
    out = json.loads(cli("repair", "index", "--json", "-r", repo, check_rc=0).out)
    assert out["packs"] == len(packs) and out["index_written"] >= 1, out
    assert not (repo / "index" / index[1].name).exists()  # the damaged one is gone
    assert json.loads(cli("check", "--json", "-r", repo, check_rc=0).out)["ok"]
    cli("prune", "-r", repo, check_rc=0)
    assert json.loads(cli("check", "--json", "--read-data", "-r", repo, check_rc=0).out)["ok"]
    dest = btrfs_dir / "dest"
    cli("restore", "-r", repo, ids[-1][:12], dest, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))
    r = cli("repair", "snapshots-and-more", "-r", repo)
    assert r.returncode == 2 and "'index', 'packs' or 'snapshots'" in r.err, str(r)
