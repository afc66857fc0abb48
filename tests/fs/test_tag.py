"""``tag`` (issue 32): tags added, removed and set on chosen snapshots; a
retagged snapshot is a new object (a new id) with the same data, which
restores as the source was, and which the host that wrote it still takes
as the parent of its next backup (nothing read again: the backup's own
byte counts, and the repository's size on disk, say so)."""
from __future__ import annotations

import json
import os

import pytest
from helpers.cli import assert_one_line_error, cli, cli_json
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.testing import rewrite_blocks, write_random

pytestmark = pytest.mark.root

MiB = 1 << 20


def _snaps(repo) -> list[dict]:
    return json.loads(cli("snapshots", "--json", "-r", repo, check_rc=0).out)


def _du(path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512
               for d, _, fs in os.walk(path) for f in fs)


def test_retagged_snapshots_keep_their_data_and_stay_the_parent(btrfs_dir, tmp_path):
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a.img", 12 * MiB, 1)
    for i in range(30):
        (src / f"f{i}").write_bytes(b"small %d\n" % i)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    first = cli_json("backup", "--json", "-r", repo, src)["snapshot"]
    other = btrfs_dir / "other"
    other.mkdir()
    (other / "x").write_bytes(b"x\n")
    cli("backup", "-r", repo, other, check_rc=0)

    r = cli_json("tag", "--json", "-r", repo, "--add", "release", "--add", "keep", first[:8])
    (ch,) = r["changed"]
    assert ch["old"] == first and ch["new"] != first and ch["tags"] == ["release", "keep"]
    snaps = {s["id"]: s for s in _snaps(repo)}
    assert first not in snaps and snaps[ch["new"]]["tags"] == ["release", "keep"]
    old = [s for s in _snaps(repo) if s["id"] == ch["new"]][0]
    assert old["paths"] == [str(src)]
    # chosen by tag, and the same data: it restores as the source is
    restored = tmp_path / "restored"
    cli("restore", "-r", repo, "--tag", "release", "latest", restored, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(restored / "src", atime=False))
    # the host that wrote it goes on from it, its anchors too: of a file with
    # a few blocks rewritten only those are read and stored
    size = _du(repo)
    changed = rewrite_blocks(src / "a.img", 0.04, 7)
    night = cli("backup", "--json", "-r", repo, src, check_rc=0)
    out = json.loads(night.out)
    assert "is gone" not in night.err and "every file is read" not in night.err, night.err
    assert out["bytes_read"] < changed + MiB and out["added_bytes"] < changed + MiB, out
    assert _du(repo) - size < changed + MiB
    assert _snaps(repo)[-1]["parent"] == ch["new"]

    # remove one, set, and the selection by --tag
    r = cli_json("tag", "--json", "-r", repo, "--remove", "keep", "--tag", "release")
    assert [c["tags"] for c in r["changed"]] == [["release"]]
    r = cli_json("tag", "--json", "-r", repo, "--set", "", "--tag", "release")
    assert [c["tags"] for c in r["changed"]] == [[]]
    assert all(s["tags"] == [] for s in _snaps(repo))
    r = cli_json("tag", "--json", "-r", repo, "--set", "a", "--dry-run")
    assert len(r["changed"]) == 3 and all(s["tags"] == [] for s in _snaps(repo))


def test_tag_refuses_clearly(tmp_path):
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    assert "--add, --remove or --set" in assert_one_line_error(cli("tag", "-r", repo), 2)
    assert "without a comma" in assert_one_line_error(
        cli("tag", "-r", repo, "--add", "a,b"), 2)
    assert "not with --add" in assert_one_line_error(
        cli("tag", "-r", repo, "--set", "a", "--add", "b"), 2)
    (tmp_path / "src").mkdir()
    assert "without a comma" in assert_one_line_error(
        cli("backup", "-r", repo, "--tag", "x,y", tmp_path / "src"), 2)
