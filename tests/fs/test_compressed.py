"""Compressed (ENCODED) Btrfs extents: shared only when the content matches.

docs/KERNEL.md F10: FIEMAP reports an encoded extent's disk start and the length a
file references, not which part of the extent it references; two ranges
with the same start and length may hold different bytes.  The index makes
them candidates and the backup hashes them: equal hashes make a reference,
anything else is stored.  This is what keeps a compressed root filesystem
and its snapshots (a common Btrfs setup) from being stored once per snapshot.
"""
from __future__ import annotations

import os
import subprocess

import pytest
from helpers.cli import cli_json
from helpers.fsutil import as_tuples, compressible, write_at
from helpers.treeutil import KiB, MiB, Snapshot, assert_same_tree, backup_json, restore_json

from cloneaware import native
from cloneaware.index import flags as fl
from cloneaware.source.mapping import extent_map
from cloneaware.testing import reflink_copy

pytestmark = pytest.mark.root


def fiemap(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return extent_map(fd, os.fstat(fd).st_size, str(path))
    finally:
        os.close(fd)


def clone_range(src, dst, src_off, length, dst_off) -> None:
    with open(src, "rb") as s, open(dst, "r+b" if os.path.exists(dst) else "w+b") as d:
        native.ficlonerange(d.fileno(), s.fileno(), src_off, length, dst_off, str(dst))


def block_map(path, block: int = 4 * KiB) -> dict[int, int]:
    """logical -> physical address of every 4 KiB block of data (uncompressed
    filesystems: the restore targets)."""
    out = {}
    for e in as_tuples(fiemap(path)):
        assert not e.flags & fl.FE_ENCODED
        for off in range(0, e.length, block):
            out[e.logical + off] = e.physical + off
    return out


@pytest.fixture
def zbtrfs(loopfs):
    return loopfs("btrfs", mount_options="compress-force=zstd").path


@pytest.mark.vm
@pytest.mark.parametrize("dst_kind", ["btrfs", "xfs"])
def test_snapshot_of_compressed_subvolume_is_stored_once(request, zbtrfs, dst_kind):
    """A compressed subvolume and a snapshot of it, changed a little: the
    snapshot's unchanged compressed extents become references after a hash
    check, and the restore shares them again."""
    vol = zbtrfs / "root"
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(vol)], check=True)
    (vol / "etc").mkdir()
    (vol / "var").mkdir()
    (vol / "var" / "log.txt").write_bytes(compressible(3 * MiB, seed=1))
    (vol / "etc" / "conf").write_bytes(compressible(300 * KiB, seed=2))
    (vol / "small").write_bytes(b"inline\n" * 100)  # inline: never shared
    os.sync()
    snap = zbtrfs / "snap"
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", str(vol), str(snap)], check=True)
    write_at(snap / "var" / "log.txt", 1 * MiB, compressible(64 * KiB, seed=9))
    os.sync()
    log = as_tuples(fiemap(vol / "var" / "log.txt"))
    assert all(e.flags & fl.FE_ENCODED for e in log)

    scan = cli_json("scan", "--json", vol, snap)
    t = scan["totals"]
    assert t["shared_bytes"] == 0  # encoded: never shared on physical overlap
    changed = 128 * KiB  # the write touched one 128 KiB compressed extent
    same = 3 * MiB + 300 * KiB - changed
    assert t["encoded_candidate_bytes"] == same

    arch = zbtrfs / "a.caw"
    b = backup_json(arch, vol, snap, compress="zstd")
    assert b["checked_bytes"] == same and b["check_mismatch_bytes"] == 0
    assert b["referenced_bytes"] == same
    # stored: the subvolume once, the rewritten extent and the inline file twice
    assert b["stored_bytes"] == 2 * (3 * MiB + 300 * KiB + 700) - same

    dst = request.getfixturevalue(f"{dst_kind}_dir") / "out"
    r, _ = restore_json(arch, dst)
    assert r["copied_bytes"] == 0
    assert_same_tree(Snapshot(vol), Snapshot(dst / "root"))
    assert_same_tree(Snapshot(snap), Snapshot(dst / "snap"))
    # the unchanged parts share disk space again, the changed extent does not
    a = block_map(dst / "root" / "var" / "log.txt")
    s = block_map(dst / "snap" / "var" / "log.txt")
    same_blocks = {k for k in a if a[k] == s.get(k)}
    blocks = set(range(0, 3 * MiB, 4 * KiB))
    changed_blocks = set(range(1 * MiB, 1 * MiB + changed, 4 * KiB))
    assert same_blocks == blocks - changed_blocks
    assert block_map(dst / "root" / "etc" / "conf") == block_map(dst / "snap" / "etc" / "conf")


@pytest.mark.vm
def test_windows_of_one_extent_with_the_same_length_are_not_confused(zbtrfs, xfs_dir):
    """Three 64 KiB clones of different parts of one compressed extent report
    the same physical start and length (docs/KERNEL.md F10) yet hold other bytes: only
    the clone of the same part may become a reference."""
    src = zbtrfs / "src"
    src.write_bytes(compressible(512 * KiB))
    os.sync()
    d = zbtrfs / "d"
    d.mkdir()
    for name, off in (("a", 0), ("b", 32 * KiB), ("c", 64 * KiB), ("a-again", 0)):
        clone_range(src, d / name, off, 64 * KiB, 0)
    starts = {name: as_tuples(fiemap(d / name)) for name in ("a", "b", "c", "a-again")}
    assert len({(e[0].physical, e[0].length) for e in starts.values()}) == 1
    assert (d / "a").read_bytes() != (d / "b").read_bytes()

    arch = zbtrfs / "w.caw"
    b = backup_json(arch, d)  # walk order: a, a-again, b, c
    assert b["checked_bytes"] == 64 * KiB              # a-again -> a
    assert b["check_mismatch_bytes"] == 128 * KiB      # b and c hold other bytes
    assert b["stored_bytes"] == 3 * 64 * KiB
    dst = xfs_dir / "out"
    restore_json(arch, dst)
    for name in ("a", "b", "c", "a-again"):
        assert (dst / "d" / name).read_bytes() == (d / name).read_bytes(), name
    assert block_map(dst / "d" / "a") == block_map(dst / "d" / "a-again")
    assert not set(block_map(dst / "d" / "a").values()) & set(block_map(dst / "d" / "b").values())


def test_thin_backup_of_a_compressed_clone(zbtrfs):
    """--base on a compressed filesystem: the clone's unchanged compressed
    extents are checked against the base's bytes and become base references."""
    base = zbtrfs / "golden.img"
    base.write_bytes(compressible(2 * MiB, seed=5))
    os.sync()
    clone = zbtrfs / "clone.img"
    reflink_copy(base, clone)
    write_at(clone, 256 * KiB, compressible(4 * KiB, seed=77))
    os.sync()
    arch = zbtrfs / "t.caw"
    b = backup_json(arch, clone, extra=("--base", str(base)))
    same = 2 * MiB - 128 * KiB
    assert b["base_referenced_bytes"] == same == b["checked_bytes"]
    assert b["stored_bytes"] == 128 * KiB
    out = zbtrfs / "restored"
    restore_json(arch, out, extra=("--base", str(base)))
    assert (out / "clone.img").read_bytes() == clone.read_bytes()
