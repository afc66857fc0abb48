"""--retry-lock (issue 31, item 7): a backup that finds the repository
locked by a prune waits for it instead of exiting 6 at once, for as long
as it is told, and then says the same as before.  The lock is a real one,
written by another process's Repository (this test's), on a real
repository whose backup is then restored and hashed."""
from __future__ import annotations

import json
import time

import pytest
from helpers.cli import cli, cli_popen, finished
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.repo.backend import LocalBackend
from cloneaware.repo.repository import Repository

pytestmark = pytest.mark.root


@pytest.fixture
def held(tmp_path, btrfs_dir):
    """A repository, a tree, and the repository opened by this process to
    hold an exclusive lock as a prune does."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = btrfs_dir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data\n" * 1000)
    owner = Repository.open(LocalBackend(str(repo)))
    yield repo, src, owner
    owner.close()


def test_a_backup_waits_for_a_prune_with_retry_lock(held, btrfs_dir):
    repo, src, owner = held
    with owner.lock(True, "prune"):
        p = cli_popen("backup", "--json", "-r", repo, "--retry-lock", "2m", src)
        time.sleep(3)
        assert p.poll() is None  # still waiting
    r = finished(p, ["backup", "--retry-lock"], timeout=120)
    assert r.returncode == 0, str(r)
    assert "locked by" in r.err and "waiting up to 120 s (--retry-lock)" in r.err, str(r)
    assert r.err.count("waiting") == 1, str(r)
    cli("restore", "-r", repo, json.loads(r.out)["snapshot"][:12], btrfs_dir / "dest",
        check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(btrfs_dir / "dest" / "src"))


def test_without_it_or_past_it_the_lock_stops_the_command(held):
    repo, src, owner = held
    with owner.lock(True, "prune"):
        r = cli("backup", "-r", repo, src)
        assert r.returncode == 6 and "locked by" in r.err and "waiting" not in r.err, str(r)
        t0 = time.monotonic()
        r = cli("check", "-r", repo, "--retry-lock", "2s")
        assert r.returncode == 6 and "waiting up to 2 s" in r.err, str(r)
        assert time.monotonic() - t0 >= 2
    r = cli("backup", "-r", repo, "--retry-lock", "soon", src)
    assert r.returncode == 2 and "'soon' is not a duration" in r.err, str(r)
    assert json.loads(cli("snapshots", "--json", "-r", repo, check_rc=0).out) == []
