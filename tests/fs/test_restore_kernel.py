"""Restores whose outcome the kernel decides: the ranges a thin backup
shares with its base come back as reflinks from the base (FICLONERANGE
between two files), from an archive and from the sparse form; onto ext4 and
tmpfs, which cannot reflink (EOPNOTSUPP), and across filesystems (EXDEV),
they come back as verified, counted and reported copies.  And a kernel fact
a restore onto tmpfs meets: user.* xattrs on tmpfs arrived in Linux 6.6.

Small on purpose: these are in the ``vm`` subset, which runs under emulation
on another kernel (``make vm-test``)."""
from __future__ import annotations

import json
import os
import platform

import pytest
from helpers.cli import cli, cli_json
from helpers.fsutil import as_tuples, digest, tmpfs_takes_user_xattrs
from helpers.treeutil import backup_json, restore_json

from cloneaware.source import flags as fl
from cloneaware.source import mapping
from cloneaware.testing import make_family, reflink_copy, rewrite_blocks, write_random

pytestmark = [pytest.mark.root, pytest.mark.vm]

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB


def extents(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return as_tuples(mapping.fiemap(fd, str(path)))
    finally:
        os.close(fd)


def bytes_shared(a, b) -> int:
    """How many of b's bytes lie on the same physical blocks as some of a's."""
    ea = [(e.physical, e.physical + e.length) for e in extents(a) if e.physical]
    n = 0
    for e in extents(b):
        if e.physical:
            for lo, hi in ea:
                n += max(0, min(hi, e.physical + e.length) - max(lo, e.physical))
    return n


def golden_and_guest(d):
    """A base image and a reflinked clone of it with 1/16 of its blocks rewritten."""
    d.mkdir()
    base, guest = d / "golden.img", d / "guest.img"
    write_random(base, SIZE, 61)
    reflink_copy(base, guest)
    changed = rewrite_blocks(guest, 1 / 16, 62)
    return base, guest, changed


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)



def test_thin_restore_reflinks_from_the_base(reflink_dir, tmp_path):
    base, guest, changed = golden_and_guest(reflink_dir / "src")
    b = cli_json("backup", "--json", "--compress", "none", "--base", base,
                 "-o", tmp_path / "thin.caw", guest)
    assert b["base_referenced_bytes"] == SIZE - changed, b
    assert b["stored_bytes"] == changed, b

    dest = reflink_dir / "dest"
    r, err = restore_json(tmp_path / "thin.caw", dest, extra=("--base", base))
    out = dest / "guest.img"
    assert digest(out) == digest(guest)
    assert r["not_exact"] == [] and r["copied_bytes"] == 0, (r, err)
    assert r["base_bytes"] == r["reflinked_bytes"] == SIZE - changed, r
    assert r["verified_bytes"] == SIZE - changed, r   # cloned, then hashed
    # the kernel's view: the restored clone sits on the base's blocks
    assert bytes_shared(base, out) == SIZE - changed
    assert sum(e.length for e in extents(out) if e.flags & fl.FE_SHARED) == SIZE - changed

    # the sparse form: the clone's own data at its offsets, holes elsewhere
    sparse = reflink_dir / "guest.thin"
    cli_json("backup", "--json", "--base", base, "--sparse", "-o", sparse, guest)
    assert os.stat(sparse).st_size == SIZE
    assert os.stat(sparse).st_blocks * 512 <= changed + 64 * KiB
    dest2 = reflink_dir / "dest2"
    r, err = restore_json(sparse, dest2, extra=("--base", base))
    assert digest(dest2 / "guest.img") == digest(guest)
    assert r["not_exact"] == [] and r["copied_bytes"] == 0, (r, err)
    assert r["reflinked_bytes"] == SIZE, r   # from the base and from the sparse file
    assert bytes_shared(base, dest2 / "guest.img") == SIZE - changed
    assert bytes_shared(sparse, dest2 / "guest.img") == changed


def test_thin_restore_onto_another_filesystem_copies(btrfs_dir, ext4_dir, tmp_path):
    """The base on Btrfs, DEST on ext4: FICLONERANGE says EXDEV, so every
    range from the base is copied, verified and reported; exit 0."""
    base, guest, changed = golden_and_guest(btrfs_dir / "src")
    cli_json("backup", "--json", "--base", base, "-o", tmp_path / "thin.caw", guest)
    dest = ext4_dir / "dest"
    r, err = restore_json(tmp_path / "thin.caw", dest, extra=("--base", base))
    assert digest(dest / "guest.img") == digest(guest)
    assert r["not_exact"] == [], r
    assert r["reflinked_bytes"] == 0, r
    assert r["copied_bytes"] == r["base_bytes"] == r["verified_bytes"] == SIZE - changed, r
    assert r["copy_reasons"] == {"different filesystems": SIZE - changed}, r
    assert "copied instead of reflinked" in err, err


def test_restore_onto_ext4_and_tmpfs_copies(btrfs_dir, ext4_dir, tmpfs_dir, tmp_path):
    """A clone family restored where reflinks are refused (EOPNOTSUPP): every
    referenced byte is copied and counted under its reason.  The one user.*
    xattr comes back on ext4, and on tmpfs only where the kernel has user
    xattrs there (6.6 and later); before that the restore says so and exits 1
    rather than dropping it silently."""
    fam = make_family(btrfs_dir / "fam", base_size=2 * MiB, clones=2, change=0.1,
                      small_files=3, sparse=False, seed=71)
    os.setxattr(fam["base"], "user.origin", b"golden")
    b = backup_json(tmp_path / "fam.caw", fam["root"], compress="zstd")
    assert b["referenced_bytes"] > 2 * MiB, b
    want = {p.relative_to(fam["root"]): digest(p) for p in fam["root"].rglob("*")
            if p.is_file()}

    for d in (ext4_dir, tmpfs_dir):
        dest = d / "dest"
        xattrs = d is ext4_dir or tmpfs_takes_user_xattrs(d)
        r = cli("restore", "--json", tmp_path / "fam.caw", dest, check_rc=0 if xattrs else 1)
        out, err = json.loads(r.stdout), r.stderr.decode()
        got = {p.relative_to(dest / "fam"): digest(p) for p in (dest / "fam").rglob("*")
               if p.is_file()}
        assert got == want
        assert out["reflinked_bytes"] == 0, out
        assert out["copied_bytes"] == b["referenced_bytes"], (out, b)
        assert out["copy_reasons"] == {"filesystem cannot reflink": b["referenced_bytes"]}, out
        assert "copied instead of reflinked" in err, err
        restored = dest / "fam" / "images" / "base.img"
        if xattrs:
            assert out["not_exact"] == [], out
            assert os.getxattr(restored, "user.origin") == b"golden"
        else:
            assert [x["path"] for x in out["not_exact"]] == ["fam/images/base.img"], out
            assert "user.origin" in out["not_exact"][0]["reason"], out
            assert "Operation not supported" in out["not_exact"][0]["reason"], out


def test_tmpfs_user_xattrs_arrived_in_linux_6_6(tmpfs_dir):
    """Kernel fact: tmpfs takes user.* xattrs from Linux 6.6 on (commit
    "shmem: add support for user extended attributes"); 6.1 answers
    EOPNOTSUPP.  A test that restores user xattrs onto tmpfs must expect
    them reported as not restored on older kernels."""
    assert tmpfs_takes_user_xattrs(tmpfs_dir) == (kernel_version() >= (6, 6))
