"""prune's counts match what it did (issue 31, item 11): after a backup
interrupted for good (its packs written, no index or snapshot naming them),
prune deletes those packs and says so, in its line and its --json, and a
dry run says the same beforehand.  Judged by the packs left on disk."""
from __future__ import annotations

import json
import os
import time

import pytest
from helpers.cli import cli

from cloneaware.testing import write_random

pytestmark = pytest.mark.root


def _packs(repo) -> list:
    return [p for p in (repo / "data").rglob("*") if p.is_file()]


def test_prune_counts_the_orphans_it_deletes(btrfs_dir, tmp_path):
    repo = tmp_path / "repo"
    cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a", 3 << 20, 1)
    cli("backup", "-r", repo, src, check_rc=0)
    for d in ("snapshots", "index"):  # as if the backup never finished
        for p in (repo / d).iterdir():
            p.unlink()
    packs = _packs(repo)
    assert len(packs) >= 3, packs
    old = time.time() - 7200  # older than the hour a running backup is given
    for p in packs:
        os.utime(p, (old, old))
    # exit 1: this host notices that the snapshot it wrote is gone (a rollback?)
    r = cli("prune", "--dry-run", "-r", repo, check_rc=1)
    n = len(packs)
    assert f"prune: would delete {n} packs ({n} of them in no index), repacked 0;" in r.out, \
        str(r)
    assert r.out.rstrip().endswith("-> 0 B"), str(r)
    assert len(_packs(repo)) == n
    out = json.loads(cli("prune", "--json", "-r", repo, check_rc=1).out)
    assert (out["orphans_deleted"], out["packs_deleted"], out["bytes_after"]) == (n, 0, 0), out
    assert _packs(repo) == []
