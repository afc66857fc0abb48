"""Compressed (ENCODED) Btrfs extents: shared exactly when Btrfs's file
extent items can be read, and only when the content matches otherwise.

docs/KERNEL.md F10: FIEMAP reports an encoded extent's disk start and the
length a file references, not which part of the extent it references; two
ranges with the same start and length may hold different bytes.  As root,
the file extent items (BTRFS_IOC_TREE_SEARCH_V2, F23) say where inside the
extent each range lies, and the index shares those ranges exactly without
reading them.  Without the tree search (a user, or CLONEAWARE_TREE_SEARCH=0
here) the index makes them candidates and the backup hashes them: equal
hashes make a reference, anything else is stored.
"""
from __future__ import annotations

import os
import random
import subprocess

import numpy as np
import pytest
from helpers.cli import cli, cli_json
from helpers.fsutil import as_tuples, compressible, write_at
from helpers.treeutil import KiB, MiB, Snapshot, assert_same_tree, backup_json, restore_json

from cloneaware import native
from cloneaware.source import flags as fl
from cloneaware.source.mapping import btrfs_file_extents, extent_map
from cloneaware.testing import reflink_copy, write_letters

pytestmark = pytest.mark.root

#: the two ways compressed sharing is found: from the extent items (root),
#: and by reading and hashing (what a user gets)
MODES = {"exact": None, "read": {**os.environ, "CLONEAWARE_TREE_SEARCH": "0"}}


def fiemap(path, exact: bool = False):
    fd = os.open(path, os.O_RDONLY)
    try:
        return extent_map(fd, os.fstat(fd).st_size, str(path), exact=exact)
    finally:
        os.close(fd)


def items(path) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        return btrfs_file_extents(fd, os.fstat(fd).st_ino, str(path))
    finally:
        os.close(fd)


def clone_range(src, dst, src_off, length, dst_off) -> None:
    with open(src, "rb") as s, open(dst, "r+b" if os.path.exists(dst) else "w+b") as d:
        native.ficlonerange(d.fileno(), s.fileno(), src_off, length, dst_off, str(dst))


def block_map(path, block: int = 4 * KiB) -> dict[int, int]:
    """logical -> physical address of every 4 KiB block of data; a block of
    a compressed extent by its exact address inside the extent (a Btrfs
    target gets the extents written as they were)."""
    out = {}
    for e in as_tuples(fiemap(path, exact=True)):
        assert not e.flags & fl.FE_ENCODED or e.flags & fl.CA_EXACT
        for off in range(0, e.length, block):
            out[e.logical + off] = e.physical + off
    return out


def compsize(*paths) -> dict[str, int]:
    """``compsize -b`` (btrfs-compsize): the TOTAL line's disk usage,
    uncompressed and referenced bytes, each extent counted once: an
    independent check of what a tree takes on a compressed Btrfs."""
    out = subprocess.run(["compsize", "-b", *map(str, paths)], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "TOTAL":
            return {"disk": int(f[2]), "uncompressed": int(f[3]), "referenced": int(f[4])}
    raise AssertionError(out)


@pytest.fixture
def zbtrfs(loopfs):
    return loopfs("btrfs", mount_options="compress-force=zstd").path


@pytest.mark.vm
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dst_kind", ["btrfs", "xfs"])
def test_snapshot_of_compressed_subvolume_is_stored_once(request, zbtrfs, dst_kind, mode):
    """A compressed subvolume and a snapshot of it, changed a little: the
    snapshot's unchanged compressed ranges become references (exactly, or
    after a hash check), and the restore shares them again."""
    env = MODES[mode]
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

    scan = cli_json("scan", "--json", vol, snap, env=env)
    t = scan["totals"]
    if mode == "exact":
        # the rewritten 64 KiB is new; the other half of its 128 KiB extent
        # is still the same bytes of the same extent (F24)
        same = 3 * MiB + 300 * KiB - 64 * KiB
        assert t["shared_bytes"] == 2 * same
        assert t["encoded_candidate_bytes"] == 0
        # all but the inline file (F18: inline and ENCODED)
        assert t["encoded_exact_bytes"] == t["encoded_bytes"] - t["inline_bytes"] > 0
    else:
        assert t["shared_bytes"] == 0  # encoded: never shared on physical overlap
        # the write spoilt one 128 KiB compressed extent for matching (F13)
        same = 3 * MiB + 300 * KiB - 128 * KiB
        assert t["encoded_candidate_bytes"] == same

    arch = zbtrfs / "a.caw"
    b = backup_json(arch, vol, snap, compress="zstd", env=env)
    assert b["referenced_bytes"] == same and b["check_mismatch_bytes"] == 0
    # stored: the subvolume once, what differs and the inline file twice
    assert b["stored_bytes"] == 2 * (3 * MiB + 300 * KiB + 700) - same
    if mode == "exact":
        assert b["checked_bytes"] == 0
        assert b["bytes_read"] == b["stored_bytes"]  # no shared range is read
    else:
        assert b["checked_bytes"] == same

    dst = request.getfixturevalue(f"{dst_kind}_dir") / "out"
    rr = cli("restore", "--json", arch, dst, check_rc=0 if dst_kind == "btrfs" else 1)
    r = rr.json()
    assert r["copied_bytes"] == 0
    if dst_kind == "xfs":  # issue 21, defect 12: said, not silent
        assert [x["path"] for x in r["not_exact"]] == ["root", "snap"], r["not_exact"]
    else:
        assert r["not_exact"] == [] and r["subvolumes"] == 2, r
    assert_same_tree(Snapshot(vol), Snapshot(dst / "root"))
    assert_same_tree(Snapshot(snap), Snapshot(dst / "snap"))
    # the unchanged parts share disk space again, the changed range does not
    a = block_map(dst / "root" / "var" / "log.txt")
    s = block_map(dst / "snap" / "var" / "log.txt")
    same_blocks = {k for k in a if a[k] == s.get(k)}
    blocks = set(range(0, 3 * MiB, 4 * KiB))
    changed = 64 * KiB if mode == "exact" else 128 * KiB
    changed_blocks = set(range(1 * MiB, 1 * MiB + changed, 4 * KiB))
    assert same_blocks == blocks - changed_blocks
    assert block_map(dst / "root" / "etc" / "conf") == block_map(dst / "snap" / "etc" / "conf")


@pytest.mark.vm
def test_tree_search_says_where_each_window_lies(zbtrfs):
    """F23: the file extent items of three 64 KiB clones of different parts
    of one compressed extent name the same extent (the address FIEMAP
    reports) and say where in it each window starts."""
    src = zbtrfs / "src"
    src.write_bytes(compressible(512 * KiB))
    os.sync()
    whole = items(src)
    assert len(whole) == 4
    assert (whole["type"] == fl.BTRFS_FILE_EXTENT_REG).all()
    assert (whole["compression"] == fl.BTRFS_COMPRESS_ZSTD).all()
    assert (whole["num_bytes"] == 128 * KiB).all() and (whole["ram_bytes"] == 128 * KiB).all()
    assert (whole["disk_num_bytes"] < 128 * KiB).all()  # compressed, sector-aligned
    assert (whole["disk_num_bytes"] % 4096 == 0).all()
    assert whole["logical"].tolist() == [0, 128 * KiB, 256 * KiB, 384 * KiB]
    fm = as_tuples(fiemap(src))
    assert [e.physical for e in fm] == whole["disk_bytenr"].tolist()
    for name, off in (("a", 0), ("b", 32 * KiB), ("c", 64 * KiB)):
        clone_range(src, zbtrfs / name, off, 64 * KiB, 0)
        it = items(zbtrfs / name)
        assert len(it) == 1, it
        assert int(it["disk_bytenr"][0]) == int(whole["disk_bytenr"][0])
        assert int(it["offset"][0]) == off and int(it["num_bytes"][0]) == 64 * KiB
        assert int(it["ram_bytes"][0]) == 128 * KiB
        (e,) = as_tuples(fiemap(zbtrfs / name))
        assert (e.physical, e.length) == (int(whole["disk_bytenr"][0]), 64 * KiB)
        # the refined map: the address of the window inside the extent
        (x,) = as_tuples(fiemap(zbtrfs / name, exact=True))
        assert x.flags & fl.CA_EXACT
        assert x.physical == (e.physical << fl.EXACT_SHIFT) + off


@pytest.mark.vm
@pytest.mark.parametrize("mode", MODES)
def test_windows_of_one_extent_with_the_same_length_are_not_confused(zbtrfs, xfs_dir, mode):
    """Three 64 KiB clones of different parts of one compressed extent report
    the same physical start and length (docs/KERNEL.md F10) yet hold other
    bytes.  By reading, only the clone of the same part becomes a reference;
    from the extent items, the parts that overlap do too, exactly."""
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
    b = backup_json(arch, d, env=MODES[mode])  # walk order: a, a-again, b, c
    if mode == "exact":
        # a-again is a; b's first half is a's second; c's first half is b's second
        assert b["checked_bytes"] == 0 and b["check_mismatch_bytes"] == 0
        assert b["referenced_bytes"] == 64 * KiB + 32 * KiB + 32 * KiB
        assert b["stored_bytes"] == 128 * KiB == b["bytes_read"]
    else:
        assert b["checked_bytes"] == 64 * KiB              # a-again -> a
        assert b["check_mismatch_bytes"] == 128 * KiB      # b and c hold other bytes
        assert b["stored_bytes"] == 3 * 64 * KiB
    dst = xfs_dir / "out"
    restore_json(arch, dst)
    for name in ("a", "b", "c", "a-again"):
        assert (dst / "d" / name).read_bytes() == (d / name).read_bytes(), name
    assert block_map(dst / "d" / "a") == block_map(dst / "d" / "a-again")
    ba, bb = block_map(dst / "d" / "a"), block_map(dst / "d" / "b")
    if mode == "exact":
        assert {bb[k] for k in range(0, 32 * KiB, 4 * KiB)} == \
            {ba[k] for k in range(32 * KiB, 64 * KiB, 4 * KiB)}
    else:
        assert not set(ba.values()) & set(bb.values())


@pytest.mark.parametrize("mode", MODES)
def test_thin_backup_of_a_compressed_clone(zbtrfs, mode):
    """--base on a compressed filesystem: the clone's unchanged compressed
    ranges become base references, exactly or after a check against the
    base's bytes."""
    base = zbtrfs / "golden.img"
    base.write_bytes(compressible(2 * MiB, seed=5))
    os.sync()
    clone = zbtrfs / "clone.img"
    reflink_copy(base, clone)
    write_at(clone, 256 * KiB, compressible(4 * KiB, seed=77))
    os.sync()
    arch = zbtrfs / "t.caw"
    b = backup_json(arch, clone, extra=("--base", str(base)), env=MODES[mode])
    if mode == "exact":
        assert b["base_referenced_bytes"] == 2 * MiB - 4 * KiB
        assert b["checked_bytes"] == 0 and b["stored_bytes"] == 4 * KiB
    else:
        same = 2 * MiB - 128 * KiB
        assert b["base_referenced_bytes"] == same == b["checked_bytes"]
        assert b["stored_bytes"] == 128 * KiB
    out = zbtrfs / "restored"
    restore_json(arch, out, extra=("--base", str(base)))
    assert (out / "clone.img").read_bytes() == clone.read_bytes()


# --- families on compressed Btrfs, restored onto compressed Btrfs ------------------------

def words(size: int, seed: int) -> bytes:
    """Text of random words from a small vocabulary: zstd, zlib and lzo
    (which has no entropy coder) all compress it."""
    rng = random.Random(seed)
    vocab = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randint(2, 9)))
             for _ in range(400)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(vocab, k=64)) + b"\n"
    return bytes(out[:size])


def rewrite_words(path, count: int, seed: int, block: int = 64 * KiB) -> None:
    """Rewrite ``count`` scattered blocks with other compressible text."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for b in rng.sample(range(size // block), count):
            f.seek(b * block)
            f.write(words(block, rng.randrange(1 << 30)))
        f.flush()
        os.fsync(f.fileno())


def words_family(root, size: int, clones: int, rewrites: int, golden: str = "base.img"):
    images = root / "images"
    images.mkdir(parents=True)
    (images / golden).write_bytes(words(size, 1))
    for i in range(clones):
        c = images / f"clone{i}.img"
        reflink_copy(images / golden, c)
        rewrite_words(c, rewrites, 100 + i)
    os.sync()
    return images


COMPRESSIONS = ["compress=zstd:1", "compress-force=zstd", "compress=lzo"]


@pytest.mark.parametrize("golden", ["base.img", "zz-golden.img"])
@pytest.mark.parametrize("opts", COMPRESSIONS)
def test_scattered_rewrites_restore_at_the_source_usage(loopfs, xfs_dir, opts, golden):
    """The issue's family, small: a golden image of compressible data and
    clones rewritten in scattered 64 KiB blocks.  From the extent items no
    shared range is read, and the restore onto the same kind of Btrfs takes
    the source's disk (compsize, each extent once) within 2%: exactly, where
    each extent is stored whole as it is on disk (the golden image comes
    first in walk order and holds every extent whole); onto XFS the sharing
    is exact."""
    src = loopfs("btrfs", mount_options=opts).path
    fam = words_family(src / "fam", 16 * MiB, 4, 20, golden)
    before = compsize(fam)
    assert before["disk"] < before["uncompressed"]  # it is compressed
    scan = cli_json("scan", "--json", fam)["totals"]
    assert scan["encoded_exact_bytes"] == scan["encoded_bytes"] > 0
    assert scan["encoded_candidate_bytes"] == 0

    arch = src / "fam.caw"
    b = backup_json(arch, fam, compress="zstd")
    assert b["bytes_read"] == b["stored_bytes"] == scan["physical_bytes"]
    assert b["checked_bytes"] == 0 and b["check_mismatch_bytes"] == 0
    assert b["referenced_bytes"] == scan["logical_bytes"] - b["stored_bytes"]

    zstd = "zstd" in opts
    whole = golden == "base.img"
    if zstd and not whole:
        # a clone walked first owns the halves of the extents it kept, the
        # golden image the other halves: two owners, stored plainly
        assert 0 < b["encoded_stored_bytes"] < b["stored_bytes"]
    elif zstd:
        # every extent has one owner that holds it whole: stored as it is on
        # disk (CODEC_BTRFS), so the archive is no larger than the disk usage
        assert b["encoded_stored_bytes"] == b["stored_bytes"]
        assert b["archive_bytes"] <= before["disk"]
    else:  # lzo: no checker for it here, stored decompressed (zstd)
        assert b["encoded_stored_bytes"] == 0

    dst = loopfs("btrfs", mount_options=opts).path
    r, _ = restore_json(arch, dst / "out")
    assert r["copied_bytes"] == 0
    assert r["encoded_written_bytes"] == b["encoded_stored_bytes"]
    assert_same_tree(Snapshot(fam), Snapshot(dst / "out" / fam.name))
    after = compsize(dst / "out")
    assert after["referenced"] == before["referenced"]
    if zstd and whole:  # the same extents, written as they were: the same disk usage
        assert after["disk"] == before["disk"], (before, after)
    else:
        assert after["disk"] <= 1.02 * before["disk"], (before, after)

    r, _ = restore_json(arch, xfs_dir / "out")  # elsewhere: decompressed, written plainly
    assert r["copied_bytes"] == 0 and r["encoded_written_bytes"] == 0
    assert_same_tree(Snapshot(fam), Snapshot(xfs_dir / "out" / fam.name))
    got = cli_json("scan", "--json", xfs_dir / "out")["totals"]
    assert got["physical_bytes"] == scan["physical_bytes"]
    assert got["shared_bytes"] == scan["shared_bytes"]


def test_compressed_farm_of_2000_clones_is_read_once(loopfs):
    """2,000 reflink clones of one compressed image: every compressed extent
    is read once, whatever the number of files that reference it, and the
    restore onto compressed Btrfs takes what the source takes."""
    src = loopfs("btrfs", 2 << 30, mount_options="compress-force=zstd").path
    farm = src / "farm"
    farm.mkdir()
    size = 1 * MiB
    write_letters(farm / "golden.img", size, 7)
    for i in range(1999):
        reflink_copy(farm / "golden.img", farm / f"vm{i:04d}.img")
    os.sync()
    arch = src / "farm.caw"
    b = backup_json(arch, farm, compress="zstd")
    assert b["files"] == 2000
    assert b["bytes_read"] == size == b["stored_bytes"]
    assert b["referenced_bytes"] == 1999 * size
    dst = loopfs("btrfs", 2 << 30, mount_options="compress-force=zstd").path
    r, _ = restore_json(arch, dst / "out", timeout=600)
    assert r["files"] == 2000 and r["copied_bytes"] == 0
    before, after = compsize(farm), compsize(dst / "out")
    assert after["referenced"] == before["referenced"] == 2000 * size
    assert after["disk"] <= 1.02 * before["disk"], (before, after)


@pytest.mark.vm
@pytest.mark.parametrize("algo", ["zstd", "zlib", "lzo"])
def test_encoded_read_returns_the_extent_as_stored(loopfs, algo):
    """F26: BTRFS_IOC_ENCODED_READ gives a whole compressed extent as it is
    on disk: its disk_num_bytes bytes (one zstd frame of window <= 128 KiB,
    one zlib stream, or Btrfs's lzo framing: a 4-byte total length first),
    zeros after it to the sector; the window of the file it was read at; and
    what it decompresses to is the file's bytes."""
    import zlib

    import zstandard

    fs = loopfs("btrfs", mount_options=f"compress-force={algo}").path
    data = words(512 * KiB, 3)
    (fs / "f").write_bytes(data)
    os.sync()
    it = items(fs / "f")
    assert (it["compression"] == {"zstd": fl.BTRFS_COMPRESS_ZSTD, "zlib": fl.BTRFS_COMPRESS_ZLIB,
                                  "lzo": fl.BTRFS_COMPRESS_LZO}[algo]).all()
    fd = os.open(fs / "f", os.O_RDONLY)
    try:
        e = native.btrfs_encoded_read(fd, 160 * KiB)  # inside the second extent
    finally:
        os.close(fd)
    assert len(e.data) == int(it["disk_num_bytes"][1])
    assert (e.len, e.unencoded_len, e.unencoded_offset, e.encryption) == \
        (96 * KiB, 128 * KiB, 32 * KiB, 0)
    want = data[128 * KiB:256 * KiB]
    if algo == "zstd":
        assert e.compression == 2 and e.data[:4] == b"\x28\xb5\x2f\xfd"
        p = zstandard.get_frame_parameters(e.data)
        assert p.window_size <= 128 * KiB and p.content_size == 128 * KiB
        d = zstandard.ZstdDecompressor().decompressobj()
        assert d.decompress(e.data) == want and d.eof
        assert set(d.unused_data) <= {0}
    elif algo == "zlib":
        assert e.compression == 1
        z = zlib.decompressobj()
        assert z.decompress(e.data) == want and z.eof
        assert set(z.unused_data) <= {0}
    else:  # lzo, 4 KiB sectors; its own framing, no standard lzo container
        assert e.compression == 3
        total = int.from_bytes(e.data[:4], "little")
        assert total <= len(e.data) and set(e.data[total:]) <= {0}


def test_repository_references_compressed_ranges_unread(loopfs):
    """The exact compressed ranges are ordinary references, so a backup
    into a repository turns them into blob ranges of their owner without
    reading them (the repository stores raw bytes: no encoded blobs)."""
    src = loopfs("btrfs", mount_options="compress=zstd:1").path
    fam = words_family(src / "fam", 8 * MiB, 3, 10)
    scan = cli_json("scan", "--json", fam)["totals"]
    repo = src / "repo"
    cli("init", "-r", repo, check_rc=0)
    b = cli_json("backup", "--json", "-r", repo, fam)
    assert b["bytes_read"] == scan["physical_bytes"] < scan["logical_bytes"]
    assert b["referenced_bytes"] == scan["logical_bytes"] - scan["physical_bytes"]
    assert b["checked_bytes"] == 0
