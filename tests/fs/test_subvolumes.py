"""Btrfs subvolumes and their snapshots (issue 21, defect 12): they came back
as plain directories without a word.  Now a Btrfs target gets subvolumes
again, a read-only snapshot as a read-only snapshot of the restored
subvolume, in its place and with exactly its tree; any other target gets
directories and is told so (exit 1).  Subvolumes are made and inspected
with btrfs-progs here, not with cloneaware's own calls."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.cli import cli
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.errors import EXIT_WARNINGS
from cloneaware.testing import write_random

pytestmark = [pytest.mark.root, pytest.mark.skipif(shutil.which("btrfs") is None,
                                                   reason="btrfs-progs is not installed")]


def btrfs(*args) -> str:
    return subprocess.run(["btrfs", *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


def show(path) -> dict[str, str]:
    """``btrfs subvolume show``: UUID, Parent UUID, Flags; {} for a directory."""
    r = subprocess.run(["btrfs", "subvolume", "show", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        return {}
    out = {}
    for line in r.stdout.splitlines():
        k, _, v = line.strip().partition(":")
        if k in ("UUID", "Parent UUID", "Flags"):
            out[k] = v.strip()
    return out


def drop_subvolumes(top: Path) -> None:
    """Make every subvolume under top writable and delete it, deepest first."""
    found = []
    for dirpath, dirnames, _ in os.walk(top):
        for n in dirnames:
            p = os.path.join(dirpath, n)
            if os.lstat(p).st_ino == 256:
                found.append(p)
    for p in sorted(found, key=len, reverse=True):
        subprocess.run(["btrfs", "property", "set", "-f", "-ts", p, "ro", "false"],
                       capture_output=True)
        subprocess.run(["btrfs", "subvolume", "delete", p], capture_output=True)


@pytest.fixture
def subvol_tree(btrfs_dir):
    """top/vol a subvolume; top/snaps/vol-1 its read-only snapshot, walked
    before vol's content; top/zz/vol-2 a later read-only snapshot, walked
    after it (so it starts as a copy of the restored vol, with what vol has
    since: an extra file, a file turned into a directory); top/scratch a
    writable subvolume of its own."""
    top = btrfs_dir / "top"
    top.mkdir()
    vol = top / "vol"
    btrfs("subvolume", "create", vol)
    write_random(vol / "image.raw", 3 << 20, 5)
    (vol / "k").write_bytes(b"first\n")
    (vol / "d").mkdir()
    (vol / "d" / "x").write_bytes(b"x\n")
    (vol / "t").write_bytes(b"t is a file in vol-1 and vol-2\n")
    (top / "snaps").mkdir()
    btrfs("subvolume", "snapshot", "-r", vol, top / "snaps" / "vol-1")
    (vol / "k").write_bytes(b"second\n")
    (vol / "d" / "x").unlink()
    (vol / "new").write_bytes(b"new after vol-1\n")
    (top / "zz").mkdir()
    btrfs("subvolume", "snapshot", "-r", vol, top / "zz" / "vol-2")
    (vol / "k").write_bytes(b"third\n")
    (vol / "t").unlink()
    (vol / "t").mkdir()
    (vol / "t" / "inside").write_bytes(b"t is a directory in vol now\n")
    (vol / "newest").write_bytes(b"only in vol\n")
    btrfs("subvolume", "create", top / "scratch")
    (top / "scratch" / "s").write_bytes(b"scratch\n")
    subprocess.run(["sync"], check=True)
    yield top
    drop_subvolumes(btrfs_dir)


def test_defect_12_subvolumes_and_snapshots_come_back_on_btrfs(subvol_tree, btrfs_dir):
    top = subvol_tree
    arch = btrfs_dir / "a.caw"
    cli("backup", "-o", arch, top, check_rc=0)
    dest = btrfs_dir / "dest"
    r = cli("restore", "--json", arch, dest, check_rc=0)
    assert r.json()["subvolumes"] == 4, r.out
    got = dest / "top"
    assert_same_tree(Snapshot(top), Snapshot(got))
    vol, v1, v2, sc = (show(got / p) for p in ("vol", "snaps/vol-1", "zz/vol-2", "scratch"))
    assert vol and sc and "readonly" not in vol["Flags"] and "readonly" not in sc["Flags"]
    for snap in (v1, v2):
        assert snap["Flags"] == "readonly" and snap["Parent UUID"] == vol["UUID"], (snap, vol)
    assert sc["Parent UUID"] == "-" and show(got / "snaps") == {}
    with pytest.raises(OSError):
        (got / "zz" / "vol-2" / "k").write_bytes(b"read-only\n")
    # the snapshot's data is shared with the subvolume it was taken of
    du = btrfs("filesystem", "du", "-s", "--raw", got)
    total, exclusive = (int(x) for x in du.splitlines()[-1].split()[:2])
    assert exclusive < total / 2, du


def test_defect_12_elsewhere_they_are_directories_and_said_so(subvol_tree, btrfs_dir, xfs_dir):
    top = subvol_tree
    arch = btrfs_dir / "a.caw"
    cli("backup", "-o", arch, top, check_rc=0)
    r = cli("restore", "--json", arch, xfs_dir / "dest")
    assert r.returncode == EXIT_WARNINGS, str(r)
    said = {d["path"]: d["reason"] for d in r.json()["not_exact"]}
    assert said == {
        "top/vol": "a Btrfs subvolume: restored as a plain directory (the destination is "
                   "not Btrfs)",
        "top/snaps/vol-1": "a read-only Btrfs subvolume (a snapshot of top/vol): restored "
                           "as a plain directory (the destination is not Btrfs)",
        "top/zz/vol-2": "a read-only Btrfs subvolume (a snapshot of top/vol): restored "
                        "as a plain directory (the destination is not Btrfs)",
        "top/scratch": "a Btrfs subvolume: restored as a plain directory (the destination "
                       "is not Btrfs)",
    }, said
    assert_same_tree(Snapshot(top), Snapshot(xfs_dir / "dest" / "top"))
