"""``copy`` (issue 33): snapshots into a second repository, plain to
encrypted and back.  Judged by hashing what the copy restores against the
source tree, by the snapshot metadata each side lists, by the bytes under
each repository's data/ (os.stat), and by what a restore onto Btrfs
reflinks."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers.cli import cli, cli_json
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.testing import write_random

pytestmark = pytest.mark.root

MiB = 1 << 20


def _used(path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _data_bytes(repo) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(repo / "data")
               for f in fs)


def _snaps(repo, env=None) -> list[dict]:
    return json.loads(cli("snapshots", "--json", "-r", repo, env=env, check_rc=0).out)


def test_copy_plain_to_encrypted_and_back(btrfs_dir, tmp_path, loopfs):
    src = btrfs_dir / "vm"
    src.mkdir()
    write_random(src / "golden.img", 6 * MiB, 1)
    subprocess.run(["cp", "--reflink=always", src / "golden.img", src / "clone.img"],
                   check=True)
    for i in range(20):
        (src / f"note{i}.txt").write_bytes(b"note %d\n" % i)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    pw = tmp_path / "pw"
    pw.write_text("a password\n")
    cli("init", "-r", a, check_rc=0)
    cli("init", "-r", b, "--encrypt", "--password-file", pw, check_rc=0)
    cli("init", "-r", c, check_rc=0)
    first = cli_json("backup", "--json", "-r", a, "--tag", "nightly", src)["snapshot"]
    with open(src / "clone.img", "r+b") as f:
        f.write(os.urandom(MiB))
    second = cli_json("backup", "--json", "-r", a, src)["snapshot"]

    r = cli("copy", "--dry-run", "--json", "-r", a, "--to", b, "--to-password-file", pw,
            check_rc=0)
    assert len(json.loads(r.out)["copied"]) == 2 and _snaps(b, _pw(pw)) == []
    out = cli_json("copy", "--json", "-r", a, "--to", b, "--to-password-file", pw, first)
    assert [x["snapshot"] for x in out["copied"]] == [first]
    out = cli_json("copy", "--json", "-r", a, "--to", b, "--to-password-file", pw)
    assert [x["snapshot"] for x in out["copied"]] == [second] and out["skipped"] == [first]
    assert out["how"] == "re-cut", out  # other ids: sealed under b's keys
    # what travelled: the second night's one new MiB, not its 12 logical
    assert MiB <= out["added_bytes"] < MiB + 64 * 1024, out
    out = cli_json("copy", "--json", "-r", a, "--to", b, "--to-password-file", pw)
    assert out["copied"] == [] and out["added_bytes"] == 0, out

    sa, sb = _snaps(a), _snaps(b, _pw(pw))
    keys = ("time", "hostname", "paths", "tags")
    assert [{k: s[k] for k in keys} for s in sa] == [{k: s[k] for k in keys} for s in sb]
    assert sb[0]["tags"] == ["nightly"]
    # an encrypted repository's data is not the plain one's bytes again, and
    # holds each shared extent once (6 + 1 MiB of random data, and notes)
    assert 7 * MiB <= _data_bytes(b) < 7 * MiB + 512 * 1024

    # and back out, encrypted to plain, then restored onto a fresh Btrfs:
    # exact, and shared (statfs: the clone's unchanged 5 MiB take no space)
    cli("copy", "-r", b, "--password-file", pw, "--to", c, check_rc=0)
    fresh = loopfs("btrfs", 512 << 20).path
    os.sync()
    before = _used(fresh)
    dest = fresh / "restored"
    cli("restore", "-r", c, "latest", dest, check_rc=0)
    os.sync()
    delta = _used(fresh) - before
    assert 7 * MiB <= delta < 8 * MiB + 512 * 1024, delta  # of 12 MiB logical
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "vm", atime=False))
    cli("check", "--read-data", "-r", c, check_rc=0)
    cli("check", "--read-data", "-r", b, "--password-file", pw, check_rc=0)

    r = cli("copy", "-r", a, "--to", a)
    assert r.returncode == 2 and "copied from" in r.err, str(r)
    r = cli("copy", "-r", a)
    assert r.returncode == 2 and "--to" in r.err, str(r)


def test_copy_dedups_whatever_grid_the_source_used(btrfs_dir, tmp_path):
    """The copy is cut on the destination's grid: what the destination
    already holds of a tree it backed up itself, on a finer grid, is not
    stored again."""
    src = btrfs_dir / "data"
    src.mkdir()
    write_random(src / "a.bin", 5 * MiB + 12345, 3)
    write_random(src / "b.bin", 3 * MiB, 4)
    a, b = tmp_path / "a", tmp_path / "b"
    cli("init", "-r", a, "--grid", "1024", check_rc=0)
    cli("init", "-r", b, "--grid", "64", check_rc=0)
    cli("backup", "-r", a, src, check_rc=0)
    cli("backup", "-r", b, src, check_rc=0)
    before = _data_bytes(b)
    out = cli_json("copy", "--json", "-r", a, "--to", b)
    assert len(out["copied"]) == 1 and out["added_bytes"] == 0 and out["how"] == "re-cut", out
    assert _data_bytes(b) - before < 64 * 1024  # a manifest, no data


def _pw(pw) -> dict:
    return dict(os.environ, CLONEAWARE_PASSWORD_FILE=str(pw))


def test_copy_blob_by_blob_adds_what_the_backup_added(btrfs_dir, tmp_path):
    """Same ids and grid (plain to plain): the manifest as it is, and the
    blobs the destination lacks; a night of scattered 4 KiB rewrites costs
    the copy what it cost the backup, not a grid cell each."""
    src = btrfs_dir / "img"
    src.mkdir()
    write_random(src / "disk.img", 8 * MiB, 5)
    a, b = tmp_path / "a", tmp_path / "b"
    cli("init", "-r", a, check_rc=0)
    cli("init", "-r", b, check_rc=0)
    cli("backup", "-r", a, src, check_rc=0)
    out = cli_json("copy", "--json", "-r", a, "--to", b)
    assert out["how"] == "blob by blob" and out["added_bytes"] >= 8 * MiB, out
    with open(src / "disk.img", "r+b") as f:
        for i in range(8):
            f.seek(i * MiB + 12288)
            f.write(os.urandom(4096))
    night = cli_json("backup", "--json", "-r", a, src)
    out = cli_json("copy", "--json", "-r", a, "--to", b)
    assert out["added_bytes"] == night["added_bytes"] < MiB, (out, night["added_bytes"])
    before = _data_bytes(b)
    cli("check", "--read-data", "-r", b, check_rc=0)
    dest = btrfs_dir / "restored"
    cli("restore", "-r", b, "latest", dest, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "img", atime=False))
    assert _data_bytes(b) == before


def test_copy_from_a_damaged_source_fails_in_one_line_and_adds_no_snapshot(btrfs_dir, tmp_path):
    src = btrfs_dir / "d"
    src.mkdir()
    write_random(src / "big", 3 * MiB, 6)
    a, b = tmp_path / "a", tmp_path / "b"
    cli("init", "-r", a, "--pack-size", "1", check_rc=0)
    cli("init", "-r", b, check_rc=0)
    cli("backup", "-r", a, src, check_rc=0)
    packs = [os.path.join(d, f) for d, _, fs in os.walk(a / "data") for f in fs]
    victim = max(packs, key=os.path.getsize)
    data = bytearray(open(victim, "rb").read())
    data[100] ^= 0xFF  # inside its first blob
    open(victim, "wb").write(bytes(data))
    for to in (b, None):  # blob by blob, and re-cut into an encrypted one
        if to is None:
            pw = tmp_path / "pw"
            pw.write_text("pw\n")
            to = tmp_path / "c"
            cli("init", "-r", to, "--encrypt", "--password-file", pw, check_rc=0)
            r = cli("copy", "-r", a, "--to", to, "--to-password-file", pw)
            left = _snaps(to, _pw(pw))
        else:
            r = cli("copy", "-r", a, "--to", to)
            left = _snaps(to)
        assert r.returncode == 3 and "do not match its id (damaged)" in r.err, str(r)
        assert len(r.err.strip().splitlines()) == 1 and left == [], (str(r), left)
