"""Inode flags (chattr, FS_IOC_GETFLAGS/SETFLAGS; issue 21, defect 3): stored
in the archive (format 5) and restored: C before any data is written (Btrfs
ignores it on a file that holds data), i and a after everything else, the
others with the metadata; a flag a target cannot take is listed as not
restored (exit 1).  The flags are set and read with chattr and lsattr, not
with cloneaware's own calls."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.cli import cli

from cloneaware.errors import EXIT_WARNINGS
from cloneaware.testing import write_random

pytestmark = pytest.mark.root


def chattr(flags: str, *paths) -> None:
    subprocess.run(["chattr", flags, *map(str, paths)], check=True, capture_output=True)


def lsattr(top: Path) -> dict[str, str]:
    """{path below top: the flag letters lsattr shows}, top itself as '.'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in [".", *dirnames, *filenames] if dirpath == str(top) else [*dirnames, *filenames]:
            p = os.path.normpath(os.path.join(dirpath, n))
            if os.path.islink(p):
                continue
            r = subprocess.run(["lsattr", "-d", p], check=True, capture_output=True, text=True)
            letters = r.stdout.split()[0].replace("-", "")
            out[os.path.relpath(p, top)] = "".join(sorted(letters))
    return out


@pytest.fixture
def unflag():
    """Trees whose i and a flags are cleared at the end (else nobody could
    remove them)."""
    trees: list[Path] = []
    yield trees
    for t in trees:
        if t.exists():
            subprocess.run(["chattr", "-R", "-i", "-a", str(t)], capture_output=True)


def flagged_tree(top: Path) -> Path:
    """A VM image directory with C (an image made after it inherits C, a
    file made before does not), an image with C in a plain directory, and
    files with i, a, d and A, one with several; a directory with d and A."""
    src = top / "src"
    (src / "vm").mkdir(parents=True)
    (src / "vm" / "before.txt").write_bytes(b"made before +C\n")
    chattr("+C", src / "vm")
    write_random(src / "vm" / "disk.img", 4 << 20, 1)
    (src / "plain").mkdir()
    own = src / "plain" / "nocow.img"
    own.touch()
    chattr("+C", own)
    write_random(own, 1 << 20, 2)
    for name, flags in (("immutable", "+i"), ("append", "+a"), ("nodump", "+d"),
                        ("noatime", "+A"), ("several", "+dAi")):
        p = src / "plain" / name
        p.write_bytes(name.encode() * 100)
        chattr(flags, p)
    os.link(src / "plain" / "nodump", src / "plain" / "nodump-link")
    (src / "quiet").mkdir()
    (src / "quiet" / "f").write_bytes(b"in a d A directory\n")
    chattr("+dA", src / "quiet")
    return src


def test_defect_3_inode_flags_are_stored_and_restored(btrfs_dir, unflag):
    """Defect 3: chattr flags were dropped without a word.  Now a Btrfs tree
    comes back onto Btrfs with every flag, C on the images from the start
    (lsattr shows it, which Btrfs allows only on a file set before its data),
    the immutable and append-only files as they were, and the same through
    a repository."""
    src = flagged_tree(btrfs_dir)
    unflag += [src, btrfs_dir / "dest", btrfs_dir / "dest2"]
    want = lsattr(src)
    assert want["vm"] == "C" and want["vm/disk.img"] == "C" and want["vm/before.txt"] == ""
    assert want["plain/several"] == "Adi" and want["quiet"] == "Ad"
    arch = btrfs_dir / "a.caw"
    cli("backup", "-o", arch, src, check_rc=0)
    cli("restore", arch, btrfs_dir / "dest", check_rc=0)
    got = lsattr(btrfs_dir / "dest" / "src")
    assert got == want
    # the data is whole, the immutable file is immutable, the append-only appends
    r = subprocess.run(["cmp", src / "vm" / "disk.img", btrfs_dir / "dest/src/vm/disk.img"])
    assert r.returncode == 0
    with pytest.raises(PermissionError):
        open(btrfs_dir / "dest/src/plain/immutable", "ab")
    with pytest.raises(PermissionError):
        open(btrfs_dir / "dest/src/plain/append", "wb")
    with open(btrfs_dir / "dest/src/plain/append", "ab") as f:
        f.write(b"more")
    # a repository's manifest carries them too
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    cli("restore", "-r", repo, "latest", btrfs_dir / "dest2", check_rc=0)
    assert lsattr(btrfs_dir / "dest2" / "src") == want


@pytest.mark.parametrize("target", ["xfs", "tmpfs"])
def test_defect_3_flags_the_target_cannot_take_are_listed(btrfs_dir, xfs_dir, tmpfs_dir,
                                                          unflag, target):
    """Onto XFS (no C) and tmpfs (only i, a, d, A): what the target takes is
    restored, each flag it does not is named as not restored, exit 1."""
    src = flagged_tree(btrfs_dir)
    dest = (xfs_dir if target == "xfs" else tmpfs_dir) / "dest"
    unflag += [src, dest]
    arch = btrfs_dir / "a.caw"
    cli("backup", "-o", arch, src, check_rc=0)
    r = cli("restore", "--json", arch, dest)
    assert r.returncode == EXIT_WARNINGS, str(r)
    missing = {d["path"]: d["reason"] for d in r.json()["not_exact"]}
    want = lsattr(src)
    got = lsattr(dest / "src")
    assert set(got) == set(want)
    for p in want:
        takes = {"xfs": "AaSdi", "tmpfs": "Aadi"}[target]
        kept = "".join(c for c in want[p] if c in takes)
        assert got[p] == kept, (p, got[p], want[p])
        lost = "".join(c for c in want[p] if c not in takes)
        key = f"src/{p}" if p != "." else "src"
        if lost:
            assert missing.get(key, "").startswith(f"inode flags +{lost} not restored"), \
                (p, missing)
        else:
            assert key not in missing, (p, missing)
    assert f"{dest}/src/vm/disk.img: inode flags +C not restored" in r.err


def test_no_compression_is_kept_where_nothing_is_compressed(btrfs_dir, xfs_dir, unflag):
    """+m (which Btrfs also sets by itself on a file that did not compress
    well) restored onto XFS, which compresses nothing: it holds there by
    itself, so it is not reported (it was, exit 1); onto Btrfs it is set."""
    src = btrfs_dir / "src"
    src.mkdir()
    f = src / "nocomp.img"
    f.touch()
    chattr("+m", f)
    write_random(f, 1 << 20, 3)
    assert "m" in lsattr(src)["nocomp.img"]
    arch = btrfs_dir / "a.caw"
    cli("backup", "-o", arch, src, check_rc=0)
    r = cli("restore", "--json", arch, xfs_dir / "dest", check_rc=0)
    assert r.json()["not_exact"] == [] and "not restored" not in r.err, str(r)
    cli("restore", arch, btrfs_dir / "dest", check_rc=0)
    assert "m" in lsattr(btrfs_dir / "dest" / "src")["nocomp.img"]
