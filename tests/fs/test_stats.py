"""``stats`` (issue 32): the figures of a snapshot and of the repository,
judged by independent oracles: the sizes the test wrote, the bytes under
the repository's data/ as os.stat sees them, and the space a restore of
the snapshot takes on a fresh XFS by statfs."""
from __future__ import annotations

import os
import subprocess

import pytest
from helpers.cli import cli, cli_json

from cloneaware.testing import write_random

pytestmark = pytest.mark.root

MiB = 1 << 20


def _used(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_stats_of_snapshots_and_repository(btrfs_dir, tmp_path, loopfs):
    src = btrfs_dir / "vm"
    src.mkdir()
    write_random(src / "golden.img", 8 * MiB, 1)
    subprocess.run(["cp", "--reflink=always", src / "golden.img", src / "clone.img"],
                   check=True)
    with open(src / "clone.img", "r+b") as f:  # the clone's own MiB
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
    for i in range(10):
        (src / f"small{i}.txt").write_bytes(b"%d" % i * 1000)
    os.symlink("golden.img", src / "link")
    os.link(src / "small0.txt", src / "small0-again.txt")
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    night1 = cli_json("backup", "--json", "-r", repo, src)["snapshot"]
    write_random(src / "new.bin", 3 * MiB, 2)
    night2 = cli_json("backup", "--json", "-r", repo, src)["snapshot"]

    out = cli_json("stats", "--json", "-r", repo, night1, night2)
    data = [os.path.join(d, f) for d, _, fs in os.walk(repo / "data") for f in fs]
    assert out["snapshots"] == 2 and out["packs"] == len(data) > 0
    assert out["pack_bytes"] == sum(os.path.getsize(p) for p in data)
    one, two = out["chosen"]
    assert (one["id"], two["id"]) == (night1, night2)
    assert two["files"] == 13 and two["dirs"] == 1 and two["others"] == 2, two  # link, hard link
    assert two["logical_bytes"] == (8 + 8 + 3) * MiB + 10 * 1000, two
    assert one["logical_bytes"] == two["logical_bytes"] - 3 * MiB
    # written by a restore: golden's 8 MiB, the clone's own MiB, new.bin, the small files
    want = (8 + 1 + 3) * MiB + 10 * 1000
    assert two["restore_write_bytes"] == want, two
    # what night 2 alone names: new.bin's blobs (random: stored as they are)
    assert 3 * MiB <= two["unique_stored_bytes"] <= 3 * MiB + 4096, two
    assert one["unique_stored_bytes"] == 0 and one["unique_blobs"] == 0, one
    assert two["stored_bytes"] - one["stored_bytes"] == two["unique_stored_bytes"]

    # the oracle for what a restore writes: the space it takes on a fresh XFS
    xfs = loopfs("xfs", 300 << 20).path
    before = _used(xfs)
    cli("restore", "-r", repo, night2, xfs / "r", check_rc=0)
    os.sync()
    delta = _used(xfs) - before
    assert want <= delta <= want + 2 * MiB, (delta, want)  # + metadata and small-file blocks

    r = cli("stats", "-r", repo, check_rc=0)
    assert r.out.startswith("repository: 2 snapshots, ") and len(r.out.splitlines()) == 1, \
        r.out
    r = cli("stats", "-r", repo, "ffffffff")
    assert r.returncode == 2 and "Traceback" not in r.err, str(r)
