"""Anchors you can see and drop (issue 30): ``cloneaware anchors list``
says what each set pins, ``anchors drop`` gives it back (judged by statfs
on fresh loopback filesystems), ``scan`` says the same whatever path it
scans, and a copy of a repository does not take over the original's
anchors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error, cli, cli_json
from helpers.space import Usage

from cloneaware.testing import write_random

pytestmark = pytest.mark.root

MiB = 1 << 20


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def backup(repo, *paths) -> dict:
    return cli_json("backup", "--json", "-r", repo, *paths)


def sets(fs) -> list[dict]:
    return cli_json("anchors", "list", "--json", fs.path)


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_anchors_drop_gives_back_what_list_says_they_pin(loopfs, tmp_path, kind):
    """A 48 MiB file backed up, then rewritten whole: its anchor keeps the old
    48 MiB (the file costs its size twice, as df shows).  list says so, and
    drop gives that back by statfs; the live file is untouched."""
    fs = loopfs(kind, 1 << 30)
    src = fs.path / "src"
    src.mkdir()
    write_random(src / "a.img", 48 * MiB, 1)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    backup(repo, src)
    with Usage(fs.path) as rewrite:
        write_random(src / "a.img", 48 * MiB, 2)
    assert rewrite.delta >= 47 * MiB, rewrite.delta  # the anchor kept the old blocks
    (got,) = sets(fs)
    assert got["anchors"] == 1 and got["location"] == os.path.realpath(repo), got
    assert got["paths"] == [str(src)] and got["repository_present"] == "yes", got
    assert 47 * MiB <= got["pinned_bytes"] <= 49 * MiB, got
    want = sha(src / "a.img")
    with Usage(fs.path) as dropped:
        out = cli_json("anchors", "drop", "--json", "--all", fs.path)
    assert out["dropped"] == 1, out
    assert -dropped.delta >= 0.95 * got["pinned_bytes"], (dropped.delta, got)
    assert sets(fs) == []
    assert sha(src / "a.img") == want
    s = backup(repo, src)  # the next backup reads the file once, and keeps a new anchor
    assert s["bytes_read"] == 48 * MiB, s
    assert len(sets(fs)) == 1


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_scan_reports_pinned_space_the_same_whatever_path_is_scanned(loopfs, tmp_path, kind):
    """It was 55.2, 169.5 or 499.3 MiB for one filesystem, by what was
    scanned beside the anchors; now it is what the anchors alone hold."""
    fs = loopfs(kind, 1 << 30)
    src = fs.path / "src"
    (src / "sub").mkdir(parents=True)
    write_random(src / "a.img", 16 * MiB, 1)
    write_random(src / "sub" / "b.img", 16 * MiB, 2)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    backup(repo, src)
    write_random(src / "a.img", 16 * MiB, 3)  # 16 MiB now pinned by a.img's anchor
    (fs.path / "other").mkdir()  # b.img's anchor shares all with b.img, scanned or not
    figures = {cli_json("scan", "--json", p)["anchors"]["pinned_bytes"]
               for p in (fs.path, src, src / "sub", src / "sub" / "b.img", fs.path / "other")}
    assert len(figures) == 1, figures
    (pin,) = figures
    assert 15 * MiB <= pin <= 17 * MiB, pin
    assert pin == sets(fs)[0]["pinned_bytes"]


def test_a_copied_repository_does_not_take_over_the_originals_anchors(btrfs_dir, tmp_path):
    """A repository copied with rsync keeps its id.  Backups into the copy
    used to replace the original's anchors and this host's memory of its
    last snapshot, so the original's next backup read everything again.
    Now each location has its own set: both go on reading only what changed."""
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a.img", 16 * MiB, 1)
    write_random(src / "b.img", 16 * MiB, 2)
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    cli("init", "-r", r1, check_rc=0)
    backup(r1, src)
    shutil.copytree(r1, r2)  # what rsync -a does: the same config, the same id
    with open(src / "a.img", "r+b") as f:
        f.write(os.urandom(64 << 10))
    s2 = backup(r2, src)
    assert s2["bytes_read"] >= 16 * MiB  # its first backup of the set: no anchors of its own
    with open(src / "b.img", "r+b") as f:
        f.write(os.urandom(64 << 10))
    r = cli("backup", "--json", "-r", r1, src, check_rc=0)
    s3 = json.loads(r.out)
    assert s3["bytes_read"] <= 2 * (16 * MiB), s3  # a.img and b.img changed since r1's last
    assert s3["unchanged_bytes"] >= 32 * MiB - 2 * (16 * MiB), s3
    assert "is gone" not in r.err and "rolled back" not in r.err, r.err
    # and the copy's next backup proves from its own anchors too
    s4 = backup(r2, src)
    assert s4["bytes_read"] <= 16 * MiB + MiB, s4
    locations = {s["location"] for s in cli_json("anchors", "list", "--json", src)
                 if s["location"] in (os.path.realpath(r1), os.path.realpath(r2))}
    assert len(locations) == 2


def test_anchors_drop_chooses_by_repository_age_and_gone(btrfs_dir, tmp_path):
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a.img", 4 * MiB, 1)
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    for r in (r1, r2):
        cli("init", "-r", r, check_rc=0)
        backup(r, src)
    id1 = json.loads((r1 / "config").read_bytes())["id"]
    id2 = json.loads((r2 / "config").read_bytes())["id"]
    mine = {id1, id2}

    def ours() -> dict:
        return {s["repository_id"]: s for s in cli_json("anchors", "list", "--json", src)
                if s["repository_id"] in mine}

    assert set(ours()) == mine
    line = assert_one_line_error(cli("anchors", "drop", src), 2)
    assert "say which anchor sets to drop" in line
    line = assert_one_line_error(cli("anchors", "drop", "--older-than", "soon", src), 2)
    assert "give an age" in line
    line = assert_one_line_error(cli("anchors", "drop", "--repository-id", "", src), 2)
    assert "at least 4 hex digits" in line  # an empty prefix would name every repository
    out = cli_json("anchors", "drop", "--json", "--older-than", "1h", src)
    assert [s for s in out["sets"] if s["repository_id"] in mine] == []  # both just renewed
    shutil.rmtree(r2)  # a repository deleted with rm -rf
    assert ours()[id2]["repository_present"] == "no" and ours()[id1]["repository_present"] \
        == "yes"
    out = cli_json("anchors", "drop", "--json", "--gone", "--dry-run", src)
    assert id2 in {s["repository_id"] for s in out["sets"]} and out["dropped"] == 0
    assert set(ours()) == mine
    out = cli_json("anchors", "drop", "--json", "--gone", src)
    assert id1 not in {s["repository_id"] for s in out["sets"]}
    assert set(ours()) == {id1}
    cli("anchors", "drop", "-r", r1, src, check_rc=0)
    assert ours() == {}


def test_a_backup_notes_anchor_sets_nobody_renews(btrfs_dir, tmp_path):
    """A set whose last backup is 40 days old (its repository moved, or its
    PATHs no longer backed up) is said by the next backup on that filesystem."""
    src, other = btrfs_dir / "src", btrfs_dir / "other"
    src.mkdir()
    other.mkdir()
    write_random(src / "a.img", 1 * MiB, 1)
    write_random(other / "b.img", 1 * MiB, 2)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    backup(repo, other)
    (info,) = [p for p in (btrfs_dir.parent / ".cloneaware-anchors").glob("*/*/SET")
               if json.loads(p.read_bytes())["paths"] == [str(other)]]
    d = json.loads(info.read_bytes())
    d["time_ns"] = time.time_ns() - 40 * 86400 * 10**9
    info.write_text(json.dumps(d))
    r = cli("backup", "-r", repo, src, check_rc=0)
    assert "not been renewed by a backup for more than 30 days" in r.err, r.err
    assert "anchors drop --older-than 30d" in r.err


def test_a_set_kept_by_an_earlier_version_is_taken_over(btrfs_dir, tmp_path):
    """Anchors and this host's memory kept under the set key of an earlier
    version (before the repository's location was part of it): the first
    backup after the upgrade goes on from them instead of reading everything."""
    from cloneaware.source.anchors import set_key

    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a.img", 8 * MiB, 1)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    backup(repo, src)
    rid = json.loads((repo / "config").read_bytes())["id"]
    host = os.uname().nodename
    new, old = set_key(host, [str(src)], os.path.realpath(repo)), set_key(host, [str(src)])
    base = btrfs_dir.parent / ".cloneaware-anchors" / rid
    os.rename(base / new, base / old)
    sf = Path(os.environ["CLONEAWARE_STATE_DIR"]) / f"{rid}.json"  # conftest's, per test
    d = json.loads(sf.read_bytes())
    d["sets"] = {old: d["sets"].pop(new)}
    sf.write_text(json.dumps(d))
    r = cli("backup", "--json", "-r", repo, src, check_rc=0)
    s = json.loads(r.out)
    assert s["bytes_read"] == 0 and s["unchanged_bytes"] == 8 * MiB, (s, r.err)
    assert (base / new).is_dir() and not (base / old).exists()
