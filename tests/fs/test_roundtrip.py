"""Backup and restore round trips on real filesystems, through the CLI.

A tree with a clone family and one of every kind of entry and metadata goes
through ``cloneaware backup`` and ``cloneaware restore`` between Btrfs and
XFS in all four directions, through a pipe, and onto ext4 and tmpfs; the
restored tree must be the same entry for entry (compared with an independent
snapshot: os.lstat, xattrs, getfacl, content hashes, hard-link groups) and,
on reflink filesystems, take the same physical space as the source."""
from __future__ import annotations

import json
import os
import stat

import pytest
from helpers.cli import cli, cli_json
from helpers.fsutil import tmpfs_takes_user_xattrs
from helpers.space import Usage
from helpers.treeutil import (
    KiB,
    MiB,
    Snapshot,
    TiB,
    assert_close,
    assert_same_tree,
    backup_json,
    build_tree,
    getfacl,
    physical_bytes,
    pipe_backup_restore,
    restore_json,
)

from cloneaware.testing import make_family

pytestmark = pytest.mark.root

PAIRS = [("btrfs", "btrfs"), ("xfs", "xfs"), ("btrfs", "xfs"), ("xfs", "btrfs")]


def _dirs(request, src_kind: str, dst_kind: str):
    src = request.getfixturevalue(f"{src_kind}_dir")
    dst = request.getfixturevalue(f"{dst_kind}_dir")
    return src / "src", dst / "dst"


def _check_tree_extras(snap: Snapshot) -> None:
    """The snapshot really holds what the round trip claims to test, so that a
    comparison of two empty-handed snapshots cannot pass."""
    e = snap.entries
    assert e[b"data/links/abs"]["target"] == b"/nonexistent/absolute/target"
    assert e[b"data/links/dangling"]["target"] == b"no/such/file"
    assert (b"data/hard/a", b"data/hard/b", b"other/peer") in snap.link_groups
    assert e[b"data/xattrs/file"]["xattrs"][b"user.binary"] == bytes(range(256))
    assert b"system.posix_acl_default" in e[b"data/acl/dir"]["xattrs"]
    assert b"system.posix_acl_access" in e[b"data/acl/dir/child"]["xattrs"]
    assert e[b"data/modes/setuid"]["mode"] == oct(0o4755)
    assert e[b"data/modes/sticky"]["mode"] == oct(0o1777)
    assert (e[b"data/modes/setuid"]["uid"], e[b"data/modes/setuid"]["gid"]) == (1234, 5678)
    assert e[b"data/dev/fifo"]["type"] == stat.S_IFIFO
    assert e[b"data/dev/null"]["rdev"] == (1, 3)
    assert e[b"data/odd/new\nline"]["size"] > 0
    assert e[b"data/odd/bad\xff\xfename"]["size"] > 0
    assert e[b"data/empty"]["size"] == 0
    assert e[b"data/images/base.img"]["mtime_ns"] % 1000 != 0  # odd nanoseconds
    assert e[b"data/images/base.img"]["atime_ns"] % 1000 != 0


def _check_acls(acl: dict[bytes, bytes]) -> None:
    assert b"user:1234:rw-" in acl[b"./data/acl/file"], acl[b"./data/acl/file"]
    assert b"default:user:1234:rwx" in acl[b"./data/acl/dir"], acl[b"./data/acl/dir"]
    assert b"user:1234:rwx" in acl[b"./data/acl/dir/child"]
    assert b"flags: s-t" in acl[b"./data/modes/odd"] or b"flags: --t" in acl[b"./data/modes/odd"]


@pytest.mark.parametrize("src_kind,dst_kind", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_roundtrip_tree_and_sharing(request, tmp_path, src_kind, dst_kind):
    src, dst = _dirs(request, src_kind, dst_kind)
    with Usage(src.parent) as src_usage:
        paths = build_tree(src, base_size=12 * MiB, clones=3, seed=11)
    before = Snapshot(src)
    acl_before = getfacl(src)
    _check_tree_extras(before)
    _check_acls(acl_before)
    src_phys = physical_bytes(src)

    archive = tmp_path / "tree.cla"
    b = backup_json(archive, *paths, compress="none")
    assert b["skipped"] == [] and b["changed"] == []
    assert b["referenced_bytes"] > 3 * 11 * MiB  # the clones were referenced, not stored
    assert os.path.getsize(archive) <= 1.02 * src_phys, (os.path.getsize(archive), src_phys)
    assert b["archive_bytes"] == os.path.getsize(archive)

    assert b["stored_bytes"] + b["referenced_bytes"] + b["hole_bytes"] == b["logical_bytes"]
    kinds = [rec["type"] for rec in before.entries.values()]
    assert b["symlinks"] == kinds.count(stat.S_IFLNK) == 5
    assert b["hardlinks"] == 3  # hard/b, other/peer, hard/clone2

    with Usage(dst.parent) as dst_usage:
        r, err = restore_json(archive, dst)
    assert r["not_exact"] == [], r["not_exact"]
    assert r["reflinked_bytes"] > 3 * 11 * MiB, r
    for k in ("files", "symlinks", "hardlinks", "specials", "logical_bytes"):
        assert r[k] == b[k], (k, r[k], b[k])
    after = Snapshot(dst)
    assert_same_tree(before, after)
    assert getfacl(dst) == acl_before

    # the source was not touched by the backup (atimes included)
    assert_same_tree(before, Snapshot(src))

    # the judge: the filesystems' own count (statfs); FIEMAP a second opinion
    # (no more than the source took: XFS may keep the source's speculative
    # preallocation a while, so the source can take more, never less)
    assert dst_usage.delta <= 1.03 * src_usage.delta + 256 * KiB, \
        (dst_usage.delta, src_usage.delta)
    assert src_usage.delta < 1.3 * src_phys  # the tree holds its clones shared, by df too
    dst_phys = physical_bytes(dst)
    assert_close(dst_phys, src_phys, 0.02, "restored physical bytes vs source")
    # the sparse files stayed sparse
    st = os.stat(dst / "data" / "sparse.img")
    assert st.st_blocks * 512 < 2 * MiB, st


def test_archive_sizes_none_and_zstd(btrfs_dir, tmp_path):
    """--compress none: at most 2% above the physical data; zstd: much smaller
    on compressible data, and it restores to the same tree and sharing."""
    src = btrfs_dir / "src"
    paths = build_tree(src, base_size=8 * MiB, clones=3, seed=5, text=True, specials=False)
    phys = physical_bytes(src)
    plain = tmp_path / "plain.cla"
    packed = tmp_path / "packed.cla"
    bp = backup_json(plain, *paths, compress="none")
    bz = backup_json(packed, *paths, compress="zstd:3")
    assert bp["physical_bytes"] == bz["physical_bytes"]
    assert bp["stored_bytes"] == bz["stored_bytes"] >= 8 * MiB
    assert os.path.getsize(plain) <= 1.02 * phys, (os.path.getsize(plain), phys)
    assert os.path.getsize(plain) >= bp["stored_bytes"]  # 'none' really stores the bytes
    assert os.path.getsize(packed) < 0.5 * os.path.getsize(plain), \
        (os.path.getsize(packed), os.path.getsize(plain))
    before = Snapshot(src)
    dst = btrfs_dir / "dst"
    with Usage(btrfs_dir) as u:
        restore_json(packed, dst)
    assert_same_tree(before, Snapshot(dst))
    assert u.delta <= 1.02 * phys + 256 * KiB, (u.delta, phys)  # by df
    assert_close(physical_bytes(dst), phys, 0.02, "restored from the zstd archive")


@pytest.mark.vm
@pytest.mark.parametrize("fs_kind,compress", [("btrfs", "zstd"), ("xfs", "none")])
def test_pipe_roundtrip(request, fs_kind, compress):
    """backup -o - SRC | restore - DEST: same tree, same sharing."""
    reflink_dir = request.getfixturevalue(f"{fs_kind}_dir")
    src = reflink_dir / "src"
    paths = build_tree(src, base_size=8 * MiB, clones=3, seed=21)
    before = Snapshot(src)
    src_phys = physical_bytes(src)
    dst = reflink_dir / "dst"
    # PATHs in the other order: the hard link's first name is now other/peer
    with Usage(reflink_dir) as u:
        brc, rrc, berr, rerr = pipe_backup_restore(list(reversed(paths)), dst, compress)
    assert (brc, rrc) == (0, 0), (berr, rerr)
    assert u.delta <= 1.02 * src_phys + 256 * KiB, (u.delta, src_phys)  # by df
    assert "Traceback" not in berr + rerr
    assert_same_tree(before, Snapshot(dst))
    assert_close(physical_bytes(dst), src_phys, 0.02, "restored through a pipe")


@pytest.mark.parametrize("dst_kind", ["ext4", "tmpfs"])
def test_restore_onto_filesystem_without_reflink(request, btrfs_dir, tmp_path, dst_kind):
    """Exact tree, exit 0, and the copies are counted and reported.  On tmpfs
    before Linux 6.6 (no user.* xattrs there), exactly the user xattrs are
    listed as not restored, with exit 1, and the rest is exact."""
    src = btrfs_dir / "src"
    paths = build_tree(src, base_size=8 * MiB, clones=3, seed=31)
    before = Snapshot(src)
    acl_before = getfacl(src)
    archive = tmp_path / "a.cla"
    b = backup_json(archive, *paths, compress="zstd")
    assert b["referenced_bytes"] > 0
    d = request.getfixturevalue(f"{dst_kind}_dir")
    dst = d / "dst"
    user_xattrs = dst_kind != "tmpfs" or tmpfs_takes_user_xattrs(d)
    r = cli("restore", "--json", archive, dst, check_rc=0 if user_xattrs else 1)
    res, err = json.loads(r.stdout), r.stderr.decode()
    if user_xattrs:
        assert res["not_exact"] == [], res
    else:
        assert sorted((x["path"], x["reason"]) for x in res["not_exact"]) == sorted(
            (path, f"xattr {name} not restored: Operation not supported")
            for path, names in before.user_xattrs().items() for name in names), res
    assert res["copied_bytes"] >= b["referenced_bytes"] > 0, res
    assert res["reflinked_bytes"] == 0, res
    assert "copied instead of reflinked" in err, err
    assert_same_tree(before if user_xattrs else before.without_user_xattrs(),
                     Snapshot(dst))
    assert getfacl(dst) == acl_before


@pytest.mark.parametrize("fs_kind", ["btrfs", "xfs"])
def test_sparse_one_tib(request, tmp_path, fs_kind):
    """1 TiB of hole with 1 MiB of data: the archive holds the MiB, and the
    restore puts it back at its offset without writing the holes."""
    d = request.getfixturevalue(f"{fs_kind}_dir")
    src = d / "src"
    src.mkdir()
    f = src / "huge.img"
    offset = 700 * (1 << 30) + 12345 * 4096
    payload = os.urandom(1 * MiB)
    with open(f, "wb") as fh:
        fh.truncate(1 * TiB)
        fh.seek(offset)
        fh.write(payload)
        os.fsync(fh.fileno())
    archive = tmp_path / "huge.cla"
    # generous timeouts, not timings: reading or writing the holes would take hours
    b = cli_json("backup", "--json", "--compress", "none", "-o", archive, src, timeout=120)
    assert b["bytes_read"] <= 2 * MiB and b["hole_bytes"] >= 1 * TiB - 2 * MiB, b
    assert os.path.getsize(archive) < 2 * MiB
    dst = d / "dst"
    r, _ = restore_json(archive, dst, timeout=120)
    assert r["written_bytes"] <= 2 * MiB, r
    out = dst / "src" / "huge.img"
    st = os.stat(out)
    assert st.st_size == 1 * TiB
    assert st.st_blocks * 512 < 4 * MiB
    fd = os.open(out, os.O_RDONLY)
    try:
        first = os.lseek(fd, 0, os.SEEK_DATA)
        assert offset - 64 * KiB <= first <= offset  # nothing stored before the data
        assert os.pread(fd, len(payload), offset) == payload
        assert os.lseek(fd, offset + len(payload), os.SEEK_HOLE) <= offset + len(payload) \
            + 64 * KiB
        assert os.pread(fd, 4096, offset - 4096) == bytes(4096)
        assert os.pread(fd, 4096, 1 * TiB - 4096) == bytes(4096)
    finally:
        os.close(fd)


def test_backup_json_accounting(reflink_dir, tmp_path):
    """Each physical byte is read once, and every logical byte is stored,
    referenced or a hole."""
    fam = make_family(reflink_dir / "fam", base_size=12 * MiB, clones=3, change=0.05,
                      small_files=10, sparse=True, seed=41)
    fam_phys = physical_bytes(fam["root"])
    logical = sum(p.stat().st_size for p in fam["root"].rglob("*") if p.is_file())
    b = backup_json(tmp_path / "f.cla", fam["root"], compress="zstd")
    assert b["physical_bytes"] == fam_phys
    assert b["bytes_read"] == b["physical_bytes"], b
    assert b["logical_bytes"] == logical
    assert b["stored_bytes"] + b["referenced_bytes"] + b["hole_bytes"] == b["logical_bytes"], b
    assert b["referenced_bytes"] >= 3 * 12 * MiB * 0.9
    assert b["stored_bytes"] == b["physical_bytes"]
    assert b["files"] == 1 + 3 + 10 + 1
    assert b["hole_bytes"] >= 60 * MiB


def test_hard_links_counted_once(reflink_dir, tmp_path):
    """A file with several names occupies its blocks once: backup reads and
    stores it once, and scan and backup agree on the physical bytes."""
    from helpers.treeutil import write_random

    d = reflink_dir / "links"
    d.mkdir()
    (d / "small").write_bytes(b"hard-linked content\n" * 100)  # inline on Btrfs
    os.link(d / "small", d / "small2")
    os.link(d / "small", d / "small3")
    write_random(d / "big", 1 * MiB, 9)
    os.link(d / "big", d / "big2")
    b = backup_json(tmp_path / "l.cla", d)
    assert b["hardlinks"] == 3 and b["files"] == 2, b
    assert b["stored_bytes"] == 2000 + 1 * MiB, b
    assert b["bytes_read"] == b["physical_bytes"] <= 1 * MiB + 4096, b
    assert physical_bytes(d) == b["physical_bytes"]
