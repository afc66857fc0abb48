"""``cloneaware scan`` on real filesystems: totals against independent
measures (filefrag), compressed and inline data, holes, unreadable paths,
symlinks, and the filesystem identity that keys physical addresses."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers.cli import cli, cli_json
from helpers.fsutil import (
    as_tuples,
    compressible,
    coverage,
    filefrag,
    fs_info_path,
    regular_files,
    write_at,
)

from cloneaware import native
from cloneaware.index import plan as ex
from cloneaware.scan import report as scan
from cloneaware.source import flags as fl
from cloneaware.source import mapping
from cloneaware.testing import make_family, reflink_copy, write_random

KiB, MiB = 1 << 10, 1 << 20


def fiemap(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return as_tuples(mapping.fiemap(fd, str(path)))
    finally:
        os.close(fd)


def fsid_of(path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return native.btrfs_fsid(fd, str(path)).hex()
    finally:
        os.close(fd)


def filefrag_totals(files) -> dict:
    """logical, data and physical bytes of a set of files on one filesystem,
    from ``filefrag -v`` alone: plain extents clamped to the file size and
    unioned; inline and other own data counted per file; compressed extents
    counted once per physical start (docs/KERNEL.md F11)."""
    ranges, own, data = [], 0, 0
    encoded: dict[int, int] = {}
    for p in files:
        size = p.stat().st_size
        for e in filefrag(p)[1]:
            if e.flags & fl.FE_UNWRITTEN or e.logical >= size:
                continue
            n = min(e.length, size - e.logical)
            data += n
            if e.flags & fl.FE_ENCODED and e.physical:
                encoded[e.physical] = max(encoded.get(e.physical, 0), n)
            elif e.flags & fl.OWN_FLAGS or e.physical == 0:
                own += n
            else:
                ranges.append((e.physical, e.physical + n))
    union, shared = coverage(ranges)
    return {"logical": sum(p.stat().st_size for p in files), "data": data,
            "physical": union + own + sum(encoded.values()), "shared": shared,
            "encoded": sum(encoded.values())}


# --- families, as users have them ----------------------------------------------

def test_scan_json_of_a_clone_family(reflink_dir):
    fam = make_family(reflink_dir / "fam", base_size=8 * MiB, clones=4, change=0.05,
                      small_files=20, sparse=True, seed=3)
    os.sync()
    files = regular_files(reflink_dir / "fam")
    ref = filefrag_totals(files)
    out = cli_json("scan", "--json", "--families", "3", reflink_dir / "fam")
    t = out["totals"]
    assert out["skipped"] == []
    assert t["files"] == len(files) == 1 + 4 + 20 + 1
    assert t["logical_bytes"] == ref["logical"] == sum(p.stat().st_size for p in files)
    assert t["data_bytes"] == ref["data"]
    assert abs(t["physical_bytes"] - ref["physical"]) <= ref["physical"] // 100
    # and exactly what was made: the 8 MiB base, 4 clones with 5% of their
    # 64 KiB blocks rewritten each (testing.rewrite_blocks), 192 KiB in the
    # sparse file, and the small files
    rewritten = 4 * int(128 * 0.05 + 0.5) * 64 * KiB
    small = sum(p.stat().st_size for p in files if p.parent.name == "etc")
    assert t["physical_bytes"] == 8 * MiB + rewritten + 192 * KiB + small
    assert t["shared_bytes"] == ref["shared"] > 4 * MiB
    assert t["encoded_bytes"] == 0 and t["external_shared_bytes"] == 0
    # the ratio of data to physical bytes; the holes apart (issue 21, defect 15)
    assert out["saving"] == pytest.approx(t["data_bytes"] / t["physical_bytes"])
    assert out["hole_bytes"] == t["logical_bytes"] - t["data_bytes"] > 60 * MiB
    kind = fs_info_path(str(reflink_dir)).type
    assert [f["type"] for f in out["filesystems"]] == [kind]
    fams = out["families"]
    assert len(fams) == 1
    assert fams[0]["files"] == 5
    assert fams[0]["logical_bytes"] == 5 * 8 * MiB
    assert fams[0]["first"] == "fam/images/base.img"
    assert fams[0]["stored_bytes"] == 8 * MiB + rewritten
    assert fam["base"].exists()

    # the human-readable form says the same
    r = cli("scan", "--families", "1", reflink_dir / "fam", check_rc=0)
    assert "clone families" in r.out and "fam/images/base.img" in r.out
    assert f"{t['data_bytes'] / t['physical_bytes']:.2f}x" in r.out  # issue 21, defect 15


def test_shared_bytes_of_a_family_are_exact(reflink_dir):
    """base + 3 whole reflinks, one 64 KiB block rewritten in each clone."""
    d = reflink_dir
    write_random(d / "base", 2 * MiB, 40)
    for i in range(3):
        reflink_copy(d / "base", d / f"clone{i}")
        write_at(d / f"clone{i}", (i + 1) * 256 * KiB, os.urandom(64 * KiB))
    t = cli_json("scan", "--json", d)["totals"]
    # each rewritten block leaves three other copies of its original sharing
    assert t["physical_bytes"] == 2 * MiB + 3 * 64 * KiB
    assert t["shared_bytes"] == 4 * 2 * MiB - 3 * 64 * KiB
    assert t["logical_bytes"] == t["data_bytes"] == 8 * MiB


# --- what is not shared: compressed, inline ------------------------------------

def test_btrfs_compressed_family_is_never_shared_on_overlap(loopfs, monkeypatch):
    """By FIEMAP alone (a user: no tree search, F24), compressed ranges are
    never shared by physical overlap; those naming the same extent with the
    same length are candidates only (the backup checks their content:
    tests/fs/test_compressed.py).  With the extent items they share exactly."""
    monkeypatch.setattr(mapping.TREE_SEARCH, "denied", "the test")
    fs = loopfs("btrfs", mount_options="compress-force=zstd")
    d = fs.path / "fam"
    d.mkdir()
    (d / "base.txt").write_bytes(compressible(1 * MiB))
    os.sync()
    for i in range(3):
        reflink_copy(d / "base.txt", d / f"clone{i}.txt")
        write_at(d / f"clone{i}.txt", i * 256 * KiB, compressible(64 * KiB, seed=1000 * (i + 1)))
    # a partial clone of a compressed extent, and incompressible data (which
    # btrfs stores plainly even with compress-force) with a reflink of it
    with open(d / "base.txt", "rb") as s, open(d / "part.txt", "wb") as t:
        native.ficlonerange(t.fileno(), s.fileno(), 32 * KiB, 64 * KiB, 0)
    write_random(d / "random.bin", 512 * KiB, 41)
    reflink_copy(d / "random.bin", d / "random2.bin")
    os.sync()
    files = regular_files(d)
    assert any(e.flags & fl.FE_ENCODED for e in fiemap(d / "base.txt"))
    assert not any(e.flags & fl.FE_ENCODED for e in fiemap(d / "random.bin"))

    monkeypatch.setattr(mapping.TREE_SEARCH, "denied", None)
    exact = scan.scan([str(d)]).plan.totals
    assert exact.encoded_exact_bytes == exact.encoded_bytes > 0
    assert exact.encoded_candidate_bytes == 0
    # each byte of base.txt counted once per place that maps it: base.txt,
    # the clones that did not rewrite it (clone i rewrote [i*256K, +64K)),
    # part.txt over [32K, 96K)
    places = [1 + sum(not i * 256 <= k < i * 256 + 64 for i in range(3)) + (32 <= k < 96)
              for k in range(0, 1024, 4)]
    assert exact.shared_bytes == 2 * 512 * KiB + 4 * KiB * sum(n for n in places if n > 1)
    monkeypatch.setattr(mapping.TREE_SEARCH, "denied", "the test")

    res = scan.scan([str(d)])
    t = res.plan.totals
    ref = filefrag_totals(files)
    assert t.encoded_bytes > 0
    assert t.encoded_bytes == t.data_bytes - 2 * 512 * KiB
    assert t.shared_bytes == 2 * 512 * KiB          # the plain pair only
    assert t.physical_bytes == ref["physical"]
    assert t.logical_bytes == ref["logical"]
    # no reference starts, ends or lies in an encoded range, nor points into one
    enc = {}
    for i, node in enumerate(res.files):
        enc[i] = [(e.logical, e.logical + e.length) for e in fiemap(node.src)
                  if e.flags & fl.FE_ENCODED]
    pieces = res.plan.pieces
    refs = pieces[(pieces["ref_file"] >= 0) & (pieces["check"] == ex.CHECK_NONE)]
    assert len(refs) == 1
    # candidates: each clone's 128 KiB extents but the rewritten one, naming
    # base.txt; and one of the two 64 KiB windows of base.txt's first extent
    # (clone0's rest of it after the rewrite, and part.txt) naming the other:
    # same start, same length, other bytes, which only the backup's hash check
    # can tell
    cand = pieces[pieces["check"] == ex.CHECK_CANDIDATE]
    names = [n.name.rsplit(b"/", 1)[-1] for n in res.files]
    whole = cand[cand["length"] == 128 * KiB]
    assert set(whole["ref_file"].tolist()) == {names.index(b"base.txt")}
    assert (whole["ref_logical"] == whole["logical"]).all()
    assert int(whole["length"].sum()) == 3 * (1 * MiB - 128 * KiB)
    window = cand[cand["length"] != 128 * KiB].tolist()
    assert len(window) == 1 and window[0][2] == 64 * KiB
    assert {names[window[0][0]], names[window[0][3]]} == {b"clone0.txt", b"part.txt"}
    assert t.encoded_candidate_bytes == int(cand["length"].sum())
    for p in refs.tolist():
        f, lg, n, rf, rl, _ = p
        for a, b in enc[f]:
            assert lg + n <= a or b <= lg
        for a, b in enc[rf]:
            assert rl + n <= a or b <= rl
    out = cli_json("scan", "--json", d, env={**os.environ, "CLONEAWARE_TREE_SEARCH": "0"})
    assert out["totals"] == t.as_dict()
    assert cli_json("scan", "--json", d)["totals"] == exact.as_dict()


def test_btrfs_inline_files_are_own(btrfs_dir):
    small = btrfs_dir / "small"
    small.write_bytes(b"s" * 100)
    (btrfs_dir / "mid").write_bytes(b"m" * 3000)   # above max_inline (2048)
    os.sync()
    reflink_copy(small, btrfs_dir / "small2")       # btrfs copies inline data
    e = fiemap(small)
    assert len(e) == 1 and e[0].flags & fl.FE_DATA_INLINE and e[0].physical == 0
    assert e[0].flags == 0x301
    assert fiemap(btrfs_dir / "small2")[0].flags & fl.FE_DATA_INLINE
    assert not fiemap(btrfs_dir / "mid")[0].flags & fl.FE_DATA_INLINE
    t = cli_json("scan", "--json", btrfs_dir)["totals"]
    assert t["inline_bytes"] == 200
    assert t["shared_bytes"] == 0
    assert t["data_bytes"] == t["logical_bytes"] == 3200
    assert t["physical_bytes"] == 3200


def test_hard_links_are_one_file(reflink_dir):
    """A second name of a file occupies nothing and is not a clone."""
    d = reflink_dir
    (d / "small").write_bytes(b"x" * 2000)           # inline on Btrfs
    os.link(d / "small", d / "small2")
    os.link(d / "small", d / "small3")
    write_random(d / "big", 1 * MiB, 53)
    os.link(d / "big", d / "big2")
    res = scan.scan([str(d)])
    t = res.plan.totals
    assert [n.name.rsplit(b"/", 1)[1] for n in res.files] == [b"big", b"small"]
    assert t.files == 2
    assert t.logical_bytes == t.data_bytes == t.physical_bytes == 2000 + 1 * MiB
    assert t.shared_bytes == 0 and res.plan.referenced_bytes() == 0


# --- holes ---------------------------------------------------------------------

def test_sparse_and_fallocated_files(reflink_dir):
    sp = reflink_dir / "sparse"
    with open(sp, "wb") as f:
        f.truncate(4 * MiB)
    write_at(sp, 1 * MiB, os.urandom(64 * KiB))
    write_at(sp, 3 * MiB, os.urandom(64 * KiB))
    fa = reflink_dir / "falloc"
    fd = os.open(fa, os.O_RDWR | os.O_CREAT, 0o644)
    os.posix_fallocate(fd, 0, 1 * MiB)
    os.pwrite(fd, os.urandom(64 * KiB), 512 * KiB)
    os.fsync(fd)
    os.close(fd)
    assert any(e.flags & fl.FE_UNWRITTEN for e in fiemap(fa))
    t = cli_json("scan", "--json", reflink_dir)["totals"]
    assert t["logical_bytes"] == 5 * MiB
    assert t["data_bytes"] == t["physical_bytes"] == 192 * KiB
    assert t["shared_bytes"] == 0
    plan = scan.scan([str(fa)]).plan
    assert plan.pieces.tolist() == [(0, 512 * KiB, 64 * KiB, -1, 0, 0)]


@pytest.mark.vm
def test_scan_on_every_filesystem(any_dir):
    kind = fs_info_path(str(any_dir)).type
    write_random(any_dir / "a", 256 * KiB, 42)
    with open(any_dir / "b", "wb") as f:
        f.truncate(1 * MiB)
    write_at(any_dir / "b", 512 * KiB, os.urandom(4 * KiB))
    out = cli_json("scan", "--json", any_dir)
    t = out["totals"]
    assert t["files"] == 2 and t["logical_bytes"] == 256 * KiB + 1 * MiB
    assert t["data_bytes"] == t["physical_bytes"] == 260 * KiB
    assert t["shared_bytes"] == 0
    (fs,) = out["filesystems"]
    assert fs["type"] == kind and fs["block_size"] == 4096
    if kind == "btrfs":
        assert fs["key"] == "btrfs:" + fsid_of(any_dir)
    else:
        st = os.stat(any_dir)
        assert fs["key"] == f"dev:{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


# --- unreadable paths, symlinks ------------------------------------------------

def test_unreadable_paths_are_reported_and_exit_1(btrfs_dir):
    """Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH obeys mode bits like
    any user, while still reading its own (root-owned) Python installation."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    tree = btrfs_dir / "tree"
    (tree / "locked").mkdir(parents=True)
    write_random(tree / "locked" / "hidden", 128 * KiB, 43)
    write_random(tree / "ok.bin", 64 * KiB, 44)
    write_random(tree / "noread.bin", 32 * KiB, 45)
    os.chmod(tree / "locked", 0)
    os.chmod(tree / "noread.bin", 0)
    drop = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
            "--bounding-set=-dac_override,-dac_read_search")
    try:
        r = cli("scan", "--json", tree, prefix=drop, check_rc=1)
        r_text = cli("scan", tree, prefix=drop, check_rc=1)
    finally:
        os.chmod(tree / "locked", 0o755)
    out = r.json()
    assert out["totals"]["files"] == 1
    assert out["totals"]["logical_bytes"] == 64 * KiB
    assert {(s["path"], s["reason"]) for s in out["skipped"]} == {
        (str(tree / "locked"), os.strerror(13)), (str(tree / "noread.bin"), os.strerror(13))}
    assert f"skipped {tree / 'locked'}: Permission denied" in r.err
    assert f"skipped {tree / 'noread.bin'}: Permission denied" in r.err
    # text mode: totals printed, then exit 1
    assert "logical" in r_text.out and "64.0 KiB" in r_text.out
    # as full root everything is readable
    assert scan.scan([str(tree)]).plan.totals.files == 3


def test_symlinks_are_not_followed(btrfs_dir):
    outside = btrfs_dir / "outside"
    outside.mkdir()
    write_random(outside / "big.bin", 1 * MiB, 46)
    tree = btrfs_dir / "tree"
    tree.mkdir()
    write_random(tree / "real.bin", 64 * KiB, 47)
    os.symlink("../outside/big.bin", tree / "link-file")
    os.symlink("../outside", tree / "link-dir")
    os.symlink(btrfs_dir / "nowhere", tree / "dangling")
    t = cli_json("scan", "--json", tree)["totals"]
    assert t["files"] == 1 and t["logical_bytes"] == 64 * KiB
    # a symlink given as an argument is an entry too, not its target
    for arg in (tree / "link-dir", tree / "link-file", tree / "dangling"):
        res = scan.scan([str(arg)])
        assert res.plan.totals.files == 0 and res.plan.totals.logical_bytes == 0
        assert res.skipped == []
    out = cli_json("scan", "--json", tree / "dangling", tree / "link-dir")
    assert out["totals"]["files"] == 0 and out["skipped"] == []


# --- filesystem identity (docs/DESIGN.md, rule 6) ----------------------------

def btrfs(*args):
    subprocess.run(["btrfs", *map(str, args)], check=True, capture_output=True)


@pytest.mark.vm
def test_btrfs_snapshot_shares_with_its_subvolume(btrfs_dir):
    sv, snap = btrfs_dir / "sv", btrfs_dir / "snap"
    btrfs("subvolume", "create", sv)
    try:
        write_random(sv / "img", 4 * MiB, 48)
        (sv / "etc").mkdir()
        (sv / "etc" / "conf").write_bytes(b"k=v\n")     # inline
        btrfs("subvolume", "snapshot", sv, snap)
        devs = {os.stat(p).st_dev for p in (btrfs_dir, sv, snap)}
        assert len(devs) == 3          # docs/KERNEL.md F9: a st_dev per subvolume
        one = scan.scan([str(sv)]).plan.totals.as_dict()
        assert one["physical_bytes"] == 4 * MiB + 4
        both = cli_json("scan", "--json", btrfs_dir)
        t = both["totals"]
        assert len(both["filesystems"]) == 1
        assert both["filesystems"][0]["key"] == "btrfs:" + fsid_of(btrfs_dir)
        assert t["files"] == 4
        assert t["logical_bytes"] == 2 * one["logical_bytes"]
        assert t["physical_bytes"] == one["physical_bytes"] + 4   # inline is own
        assert t["shared_bytes"] == 2 * 4 * MiB
        # the two trees as two arguments: the same
        assert scan.scan([str(sv), str(snap)]).plan.totals.as_dict() == t
        # diverge: rewrite 64 KiB in the snapshot
        write_at(snap / "img", 1 * MiB, os.urandom(64 * KiB))
        t2 = scan.scan([str(btrfs_dir)]).plan.totals.as_dict()
        assert t2["physical_bytes"] == t["physical_bytes"] + 64 * KiB
        assert t2["shared_bytes"] == t["shared_bytes"] - 2 * 64 * KiB
    finally:
        for p in (snap, sv):
            if p.exists():
                btrfs("subvolume", "delete", p)


def test_two_btrfs_filesystems_do_not_share_addresses(loopfs):
    a, b = loopfs("btrfs"), loopfs("btrfs")
    write_random(a.path / "fa", 1 * MiB, 49)
    write_random(b.path / "fb", 1 * MiB, 50)
    ea, eb = fiemap(a.path / "fa"), fiemap(b.path / "fb")
    # docs/KERNEL.md F8: fresh filesystems place their first data at the same address
    assert [(e.physical, e.length) for e in ea] == [(e.physical, e.length) for e in eb]
    out = cli_json("scan", "--json", a.path / "fa", b.path / "fb")
    t = out["totals"]
    assert t["files"] == 2
    assert t["shared_bytes"] == 0
    assert t["physical_bytes"] == 2 * MiB
    keys = [f["key"] for f in out["filesystems"]]
    assert len(keys) == 2 and keys[0] != keys[1]
    assert keys == ["btrfs:" + fsid_of(a.path), "btrfs:" + fsid_of(b.path)]


def test_identity_is_not_stale_after_a_remount(loopfs):
    """st_dev numbers come back after an unmount: a new filesystem must not
    inherit the key of one that was mounted before (probe cache)."""
    seen = []
    for kind in ("btrfs", "btrfs", "tmpfs", "btrfs"):
        fs = loopfs(kind)
        write_random(fs.path / "f", 64 * KiB, 51)
        res = scan.scan([str(fs.path)])
        dev = os.stat(fs.path).st_dev
        want = ("btrfs:" + fsid_of(fs.path) if kind == "btrfs"
                else f"dev:{os.major(dev)}:{os.minor(dev)}")
        assert [(i.key, i.type) for i in res.filesystems] == [(want, kind)]
        seen.append(want)
        fs.unmount()
    assert len({k for k in seen if k.startswith("btrfs:")}) == 3


def test_scan_paths_on_two_filesystems(btrfs_dir, xfs_dir):
    write_random(btrfs_dir / "a", 128 * KiB, 52)
    write_random(xfs_dir / "b", 128 * KiB, 52)
    out = cli_json("scan", "--json", btrfs_dir, xfs_dir)
    assert sorted(f["type"] for f in out["filesystems"]) == ["btrfs", "xfs"]
    assert out["totals"]["physical_bytes"] == 256 * KiB
    assert out["totals"]["shared_bytes"] == 0
    assert out["totals"]["files"] == 2
