"""A PATH that does not exist (issue 31, item 5): the others are backed up,
the missing one is said and listed as skipped, and the job exits 1, as tar
and Borg do; --strict keeps the old refusal (exit 2, nothing written).
Judged by what is in the repository and archive afterwards, restored and
hashed."""
from __future__ import annotations

import json

import pytest
from helpers.cli import cli
from helpers.treeutil import Snapshot, assert_same_tree

pytestmark = pytest.mark.root


@pytest.fixture
def tree(btrfs_dir):
    a = btrfs_dir / "a"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "f").write_bytes(b"kept\n" * 1000)
    return a, btrfs_dir / "gone"


def _snapshots(repo) -> list:
    return json.loads(cli("snapshots", "--json", "-r", repo, check_rc=0).out)


def test_a_missing_path_is_skipped_and_the_rest_backed_up(tree, tmp_path, btrfs_dir):
    a, gone = tree
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    r = cli("backup", "--json", "-r", repo, a, gone)
    assert r.returncode == 1, str(r)
    assert json.loads(r.out)["skipped"] == [
        {"path": str(gone), "reason": "no such file or directory (a PATH given; not backed up)"}]
    assert f"skipped {gone}: no such file or directory" in r.err, str(r)
    cli("restore", "-r", repo, "latest", btrfs_dir / "dest", check_rc=0)
    assert_same_tree(Snapshot(a, atime=False), Snapshot(btrfs_dir / "dest" / "a"))
    assert not (btrfs_dir / "dest" / "gone").exists()
    # an archive likewise
    arch = tmp_path / "a.caw"
    r = cli("backup", "-o", arch, gone, a)
    assert r.returncode == 1 and f"skipped {gone}" in r.err, str(r)
    cli("restore", arch, btrfs_dir / "dest2", check_rc=0)
    assert_same_tree(Snapshot(a), Snapshot(btrfs_dir / "dest2" / "a"))


def test_strict_and_nothing_there_refuse_before_writing(tree, tmp_path):
    a, gone = tree
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    r = cli("backup", "-r", repo, "--strict", a, gone)
    assert r.returncode == 2 and r.err == \
        f"cloneaware: {gone}: No such file or directory (--strict: nothing backed up)\n", str(r)
    r = cli("backup", "-r", repo, gone, tmp_path / "also-gone")
    assert r.returncode == 2 and r.err == \
        "cloneaware: none of the PATHs exists; nothing backed up\n", str(r)
    assert _snapshots(repo) == []
    assert list((repo / "data").rglob("*")) == [] or \
        all(p.is_dir() for p in (repo / "data").rglob("*"))
    r = cli("backup", "-o", tmp_path / "s.caw", "--strict", gone, a)
    assert r.returncode == 2 and not (tmp_path / "s.caw").exists(), str(r)
