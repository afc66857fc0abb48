"""Choosing snapshots and entries (issue 31, items 1 to 3): every command
that takes a SNAPSHOT takes --host, --path and --tag, and 'latest' is the
latest of what they leave, said on stderr where the repository holds
several backup sets; forget removes named snapshots, and its policy
applies to what the filters leave; ls takes the patterns restore
--include takes.  Two backup sets in one repository, one on Btrfs and one
on XFS, as the sysadmin had; restored trees judged by hashing them."""
from __future__ import annotations

import json
import time

import pytest
from helpers.cli import cli, cli_json
from helpers.treeutil import Snapshot, assert_same_tree

pytestmark = pytest.mark.root


@pytest.fixture
def two_sets(btrfs_dir, loopfs, tmp_path):
    """A repository holding a Btrfs set (a), an XFS set (b, backed up last),
    and a set of another host tagged t1 and t2 (c, backed up first)."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    a = btrfs_dir / "home"
    (a / "bob").mkdir(parents=True)
    (a / "bob" / "note.txt").write_bytes(b"bob's note\n")
    b = loopfs("xfs", 300 << 20).path / "srv"
    (b / "bob").mkdir(parents=True)
    (b / "bob" / "note.txt").write_bytes(b"the server's note, not bob's\n")
    c = btrfs_dir / "etc"
    c.mkdir()
    (c / "hosts").write_bytes(b"127.0.0.1 localhost\n")
    ids = {"c": cli_json("backup", "--json", "-r", repo, "--host", "other", "--tag", "t1",
                         "--tag", "t2", c)["snapshot"],
           "a": cli_json("backup", "--json", "-r", repo, a)["snapshot"],
           "b": cli_json("backup", "--json", "-r", repo, b)["snapshot"]}
    return repo, {"a": a, "b": b, "c": c}, ids


def test_latest_is_the_latest_of_what_the_filters_leave(two_sets, btrfs_dir):
    repo, src, ids = two_sets
    # unfiltered, latest is the XFS set's, and ls says so
    r = cli("ls", "-r", repo, "latest", "srv/bob/note.txt", check_rc=0)
    assert "srv/bob/note.txt" in r.out
    assert f"latest is {ids['b'][:8]}" in r.err and str(src["b"]) in r.err, str(r)
    r = cli("ls", "-r", repo, "--path", str(src["a"]), "latest", "home/bob/note.txt",
            check_rc=0)
    assert "home/bob/note.txt" in r.out and f"latest is {ids['a'][:8]}" in r.err, str(r)
    # a trailing slash names the same PATH; -q says nothing of the choice
    dest = btrfs_dir / "dest-q"
    r = cli("restore", "-q", "-r", repo, "--path", f"{src['a']}/", "latest", dest, check_rc=0)
    assert (dest / "home" / "bob" / "note.txt").exists() and r.err == "", str(r)
    dest = btrfs_dir / "dest"
    cli("restore", "-r", repo, "--path", str(src["a"]), "latest", dest, check_rc=0)
    assert_same_tree(Snapshot(src["a"], atime=False), Snapshot(dest / "home"))
    assert not (dest / "srv").exists()
    dest2 = btrfs_dir / "dest2"
    cli("restore", "-r", repo, "--host", "other", "latest", dest2, check_rc=0)
    assert_same_tree(Snapshot(src["c"], atime=False), Snapshot(dest2 / "etc"))
    # an id outside what the filters leave is not chosen
    r = cli("restore", "-r", repo, "--host", "other", ids["a"][:12], btrfs_dir / "d3")
    assert r.returncode == 2 and r.err.count("\n") == 1 and "host other" in r.err, str(r)
    r = cli("export", "-r", repo, "--tag", "t9", "latest", "-o", btrfs_dir / "x.caw")
    assert r.returncode == 2 and "no snapshot yet (tag t9)" in r.err, str(r)
    assert not (btrfs_dir / "x.caw").exists()
    # latest of the Btrfs set is its own snapshot: nothing added or removed
    # (the XFS set's would add srv and remove home)
    out = cli("diff", "-r", repo, "--path", str(src["a"]), ids["a"][:12], "latest",
              check_rc=0)
    assert "srv" not in out.out and "home" not in out.out, str(out)
    r = cli("restore", "--host", "other", btrfs_dir / "x.caw", btrfs_dir / "d4")
    assert r.returncode == 2 and "(-r)" in r.err, str(r)


def test_snapshots_are_listed_by_host_path_and_tag(two_sets):
    repo, src, ids = two_sets

    def listed(*opts) -> list[str]:
        r = cli("snapshots", "--json", "-r", repo, *opts, check_rc=0)
        return [s["id"] for s in json.loads(r.out)]

    assert listed() == [ids["c"], ids["a"], ids["b"]]
    assert listed("--host", "other") == [ids["c"]]
    assert listed("--path", str(src["b"])) == [ids["b"]]
    assert listed("--tag", "t1,t2") == [ids["c"]]
    assert listed("--tag", "t1,t3") == []
    assert listed("--tag", "t3", "--tag", "t2") == [ids["c"]]


def test_forget_removes_the_snapshots_it_is_given(two_sets):
    repo, src, ids = two_sets
    out = cli_json("forget", "--json", "-r", repo, ids["a"][:10])
    assert [s["id"] for s in out["removed"]] == [ids["a"]], out
    assert cli_json("snapshots", "--json", "-r", repo) and \
        [s["id"] for s in json.loads(cli("snapshots", "--json", "-r", repo).out)] == \
        [ids["c"], ids["b"]]
    r = cli("forget", "-r", repo, "--keep-last", "1", ids["b"][:10])
    assert r.returncode == 2 and "not both" in r.err, str(r)
    # latest among what the filters leave
    out = cli_json("forget", "--json", "-r", repo, "--host", "other", "latest")
    assert [s["id"] for s in out["removed"]] == [ids["c"]], out


def test_forget_policy_applies_to_what_the_filters_leave(two_sets, btrfs_dir):
    repo, src, ids = two_sets
    again = cli_json("backup", "--json", "-r", repo, "--host", "other", "--tag", "t1",
                     src["c"])["snapshot"]
    out = cli_json("forget", "--json", "-r", repo, "--tag", "t1", "--keep-last", "1")
    assert [s["id"] for s in out["removed"]] == [ids["c"]], out
    left = [s["id"] for s in json.loads(cli("snapshots", "--json", "-r", repo).out)]
    assert left == [ids["a"], ids["b"], again], left


def test_forget_keep_within_tag_and_hourly(two_sets):
    """--keep-within (issues 32 and 34): of the group's newest, not of now; a
    bad duration is a usage error that removes nothing.  --keep-tag keeps
    what carries the tag, --keep-hourly the newest of each hour."""
    repo, src, ids = two_sets
    for bad in ("never", "5x", "0d"):
        r = cli("forget", "-r", repo, "--keep-within", bad)
        assert r.returncode == 2 and "--keep-within" in r.err, str(r)
    time.sleep(1.5)  # c is then more than 1 s older than the next
    again = cli_json("backup", "--json", "-r", repo, "--host", "other", "--tag", "t1",
                     src["c"])["snapshot"]
    out = cli_json("forget", "--json", "-r", repo, "--host", "other", "--keep-within", "1h")
    assert out["removed"] == [] and {s["id"]: s["reasons"] for s in out["kept"]} == \
        {ids["c"]: ["within"], again: ["within"]}, out
    out = cli_json("forget", "--json", "--dry-run", "-r", repo, "--host", "other",
                   "--keep-within", "1s")
    assert [s["id"] for s in out["removed"]] == [ids["c"]], out  # more than 1 s older
    # --keep-tag: c has t1 and t2, the newer one t1 only; --keep-hourly 1 the newest
    out = cli_json("forget", "--json", "-r", repo, "--host", "other", "--keep-tag", "t2",
                   "--keep-hourly", "1")
    assert out["removed"] == [] and {s["id"]: s["reasons"] for s in out["kept"]} == \
        {ids["c"]: ["tag"], again: ["hourly"]}, out
    out = cli_json("forget", "--json", "-r", repo, "--host", "other", "--keep-tag", "t2")
    assert [s["id"] for s in out["removed"]] == [again], out


def test_ls_takes_the_patterns_restore_include_takes(two_sets):
    repo, src, ids = two_sets
    r = cli("ls", "--json", "-r", repo, "--path", str(src["a"]), "latest", "home/*/note.txt",
            check_rc=0)
    assert [e["path"] for e in json.loads(r.out)["entries"]] == ["home/bob/note.txt"]
    r = cli("ls", "--json", "-r", repo, ids["b"][:12], "bob", check_rc=0)  # a directory, whole
    assert [e["path"] for e in json.loads(r.out)["entries"]] == ["srv/bob", "srv/bob/note.txt"]
    r = cli("ls", "-r", repo, ids["b"][:12], "nothing*")
    assert r.returncode == 2 and r.err == \
        f"cloneaware: nothing*: no entry of snapshot {ids['b'][:8]} matches it\n", str(r)


def test_forget_group_by(two_sets):
    """--group-by (issue 32): the groups --keep counts in; by default host and
    PATHs (each of the three sets keeps its only snapshot)."""
    repo, src, ids = two_sets

    def removed(*args) -> set[str]:
        out = cli_json("forget", "--json", "--dry-run", "-r", repo, "--keep-last", "1", *args)
        return {s["id"] for s in out["removed"]}

    assert removed() == set()
    assert removed("--group-by", "") == {ids["a"], ids["c"]}  # one group: b is the newest
    assert removed("--group-by", "host") == {ids["a"]}  # a and b: this host's
    assert removed("--group-by", "tags") == {ids["a"]}  # a and b: no tags
    assert removed("--group-by", "paths,tags,host") == set()
    r = cli("forget", "-r", repo, "--keep-last", "1", "--group-by", "host,user")
    assert r.returncode == 2 and "'user' is not one of host, paths, tags" in r.err, str(r)
    assert len(json.loads(cli("snapshots", "--json", "-r", repo).out)) == 3
