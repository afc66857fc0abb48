"""mapping.fiemap on real Btrfs, XFS, ext4 and tmpfs, cross-checked against
``xfs_io -c 'fiemap -v'`` and ``filefrag -v``, and the docs/KERNEL.md facts about
maps that the index relies on."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from helpers.fsutil import (
    Ext,
    as_tuples,
    compressible,
    filefrag,
    fs_info_path,
    write_at,
    xfs_io_fiemap,
)

from cloneaware import native
from cloneaware.scan import report as scan
from cloneaware.source import flags as fl
from cloneaware.source import mapping
from cloneaware.testing import reflink_copy, write_random

KiB, MiB = 1 << 10, 1 << 20


def fs_type(path) -> str:
    return fs_info_path(str(path)).type


def fiemap(path) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mapping.fiemap(fd, str(path))
    finally:
        os.close(fd)


def clone_range(src, dst, src_off, length, dst_off) -> None:
    with open(src, "rb") as s, open(dst, "r+b" if os.path.exists(dst) else "w+b") as d:
        native.ficlonerange(d.fileno(), s.fileno(), src_off, length, dst_off, str(dst))


def make_zoo(d) -> dict:
    """Files of every shape the kernel maps differently."""
    z = {}
    z["plain"] = d / "plain"
    write_random(z["plain"], 1 * MiB, 1)
    z["sparse"] = d / "sparse"
    with open(z["sparse"], "wb") as f:
        f.truncate(4 * MiB)
    write_at(z["sparse"], 1 * MiB, os.urandom(64 * KiB))
    write_at(z["sparse"], 3 * MiB, os.urandom(64 * KiB))
    z["falloc"] = d / "falloc"
    fd = os.open(z["falloc"], os.O_RDWR | os.O_CREAT, 0o644)
    os.posix_fallocate(fd, 0, 1 * MiB)
    os.pwrite(fd, os.urandom(64 * KiB), 256 * KiB)
    os.fsync(fd)
    os.close(fd)
    z["clone"] = d / "clone"
    write_random(z["clone"], 1 * MiB, 2)
    clone_range(z["plain"], z["clone"], 448 * KiB, 128 * KiB, 128 * KiB)
    z["self"] = d / "self"
    write_random(z["self"], 1 * MiB, 3)
    clone_range(z["self"], z["self"], 0, 256 * KiB, 512 * KiB)
    z["tiny"] = d / "tiny"
    z["tiny"].write_bytes(b"x" * 100)
    z["reflink"] = d / "reflink"
    reflink_copy(z["plain"], z["reflink"])
    z["empty"] = d / "empty"
    z["empty"].write_bytes(b"")
    os.sync()
    return z


@pytest.mark.vm
def test_fiemap_matches_xfs_io_and_filefrag(reflink_dir):
    z = make_zoo(reflink_dir)
    for name, path in z.items():
        ours = as_tuples(fiemap(path))
        assert ours == xfs_io_fiemap(path), name
        bs, ff = filefrag(path)
        assert bs == 4096
        assert ours == ff, name
        # a map is sorted, non-overlapping, and its last extent says so
        for a, b in zip(ours, ours[1:], strict=False):
            assert a.logical + a.length <= b.logical, name
        if ours:
            assert ours[-1].flags & fl.FE_LAST, name
            assert not any(e.flags & fl.FE_LAST for e in ours[:-1]), name
    assert as_tuples(fiemap(z["empty"])) == []
    # holes are not reported; fallocated space is UNWRITTEN
    sparse = as_tuples(fiemap(z["sparse"]))
    assert [(e.logical, e.length) for e in sparse] == [(1 * MiB, 64 * KiB), (3 * MiB, 64 * KiB)]
    fa = as_tuples(fiemap(z["falloc"]))
    written = [e for e in fa if not e.flags & fl.FE_UNWRITTEN]
    assert [(e.logical, e.length) for e in written] == [(256 * KiB, 64 * KiB)]
    assert sum(e.length for e in fa) == 1 * MiB
    # a whole-file reflink maps the same physical ranges, all SHARED
    a, b = as_tuples(fiemap(z["plain"])), as_tuples(fiemap(z["reflink"]))
    assert [(e.logical, e.physical, e.length) for e in a] == \
        [(e.logical, e.physical, e.length) for e in b]
    assert all(e.flags & fl.FE_SHARED for e in a + b)


@pytest.mark.vm
def test_partial_clone_maps_as_kernel_md_says(reflink_dir):
    """docs/KERNEL.md F4: clone 128 KiB from offset 448 KiB of a 1 MiB extent.  Btrfs
    keeps the source as one extent; XFS splits it at the share boundaries.
    Either way the physical ranges intersect exactly."""
    src, dst = reflink_dir / "src", reflink_dir / "dst"
    write_random(src, 1 * MiB, 11)
    write_random(dst, 1 * MiB, 12)
    before = as_tuples(fiemap(src))
    assert len(before) == 1 and before[0].length == 1 * MiB
    P = before[0].physical
    clone_range(src, dst, 448 * KiB, 128 * KiB, 128 * KiB)
    s, d = as_tuples(fiemap(src)), as_tuples(fiemap(dst))
    F = fl.FE_SHARED
    if fs_type(reflink_dir) == "btrfs":
        assert s == [Ext(0, P, 1 * MiB, F | fl.FE_LAST)]
    else:
        assert s == [Ext(0, P, 448 * KiB, 0), Ext(448 * KiB, P + 448 * KiB, 128 * KiB, F),
                     Ext(576 * KiB, P + 576 * KiB, 448 * KiB, fl.FE_LAST)]
    mid = [e for e in d if e.logical == 128 * KiB]
    assert mid == [Ext(128 * KiB, P + 448 * KiB, 128 * KiB, F)]
    assert [(e.logical, e.length) for e in d] == [(0, 128 * KiB), (128 * KiB, 128 * KiB),
                                                 (256 * KiB, 768 * KiB)]
    assert not d[0].flags & F and not d[2].flags & F


@pytest.mark.vm
def test_small_file_maps(reflink_dir):
    """Btrfs: inline, flags 0x301, physical 0, one block.  XFS: a 5-byte file
    reports a whole 4096-byte block."""
    p = reflink_dir / "small"
    p.write_bytes(b"hello")
    os.sync()
    e = as_tuples(fiemap(p))
    if fs_type(reflink_dir) == "btrfs":
        assert e == [Ext(0, 0, 4096, fl.FE_LAST | fl.FE_NOT_ALIGNED | fl.FE_DATA_INLINE)]
    else:
        assert len(e) == 1 and e[0].length == 4096 and e[0].physical > 0
        assert e[0].flags == fl.FE_LAST


def test_fiemap_100000_extents_in_one_call(xfs_dir):
    """Clone one block to every other block of a file: 100,000 extents.  One
    mapping.fiemap call returns them all, as filefrag sees them."""
    n = 100_000
    src, dst = xfs_dir / "block", xfs_dir / "striped"
    write_random(src, 4096, 5)
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(n):
            native.ficlonerange(d, s, 0, 4096, 2 * 4096 * i)
        ext = mapping.fiemap(d)
    finally:
        os.close(s)
        os.close(d)
    assert len(ext) == n
    bs, ff = filefrag(dst)
    assert len(ff) == n
    P = int(fiemap(src)["physical"][0])
    assert (ext["logical"] == np.arange(n, dtype=np.uint64) * 8192).all()
    assert (ext["physical"] == P).all()
    assert (ext["length"] == 4096).all()
    assert (ext["flags"][:-1] == fl.FE_SHARED).all()
    assert ext["flags"][-1] == fl.FE_SHARED | fl.FE_LAST
    assert as_tuples(ext) == ff
    # and the index puts 100,001 places on one physical block
    res = scan.scan([str(xfs_dir)])
    t = res.plan.totals
    assert t.extents == n + 1
    assert t.physical_bytes == 4096
    assert t.shared_bytes == t.data_bytes == (n + 1) * 4096
    assert res.plan.referenced_bytes() == n * 4096


@pytest.mark.vm
def test_btrfs_compressed_maps(loopfs):
    """docs/KERNEL.md F10: ENCODED extents report the compressed extent's disk start
    and the logical length; a clone of part of one reports the same start
    with a shorter length, whatever part it takes."""
    fs = loopfs("btrfs", mount_options="compress-force=zstd")
    src = fs.path / "text"
    src.write_bytes(compressible(512 * KiB))
    os.sync()
    s = as_tuples(fiemap(src))
    assert all(e.flags & fl.FE_ENCODED for e in s)
    assert s[0].length == 128 * KiB  # btrfs compresses in 128 KiB extents
    # compressed extents lie closer together on disk than their logical length
    assert s[1].physical - s[0].physical < s[0].length
    for i, off in enumerate((0, 32 * KiB, 64 * KiB)):
        part = fs.path / f"part{i}"
        clone_range(src, part, off, 64 * KiB, 0)
        p = as_tuples(fiemap(part))
        assert [(e.logical, e.physical, e.length) for e in p] == [(0, s[0].physical, 64 * KiB)]
        assert p[0].flags & fl.FE_ENCODED and p[0].flags & fl.FE_SHARED
        assert part.read_bytes() == src.read_bytes()[off:off + 64 * KiB]
    assert as_tuples(fiemap(src)) == xfs_io_fiemap(src) == filefrag(src)[1]


@pytest.mark.vm
def test_fiemap_on_ext4(ext4_dir):
    p = ext4_dir / "f"
    write_random(p, 256 * KiB, 7)
    e = as_tuples(fiemap(p))
    assert sum(x.length for x in e) == 256 * KiB
    assert all(x.physical > 0 and not x.flags & fl.FE_SHARED for x in e)
    assert e == xfs_io_fiemap(p) == filefrag(p)[1]


@pytest.mark.vm
def test_tmpfs_has_no_fiemap_and_scan_uses_seek_data(tmpfs_dir):
    p = tmpfs_dir / "sparse"
    with open(p, "wb") as f:
        f.truncate(1 * MiB)
    write_at(p, 256 * KiB, os.urandom(8 * KiB))
    write_at(p, 768 * KiB, os.urandom(4 * KiB))
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            mapping.fiemap(fd, str(p))
        assert ei.value.errno == errno.EOPNOTSUPP
        assert ei.value.filename == str(p)
        m = mapping.extent_map(fd, 1 * MiB, str(p))
    finally:
        os.close(fd)
    assert as_tuples(m) == [Ext(256 * KiB, 0, 8 * KiB, fl.FE_UNKNOWN),
                            Ext(768 * KiB, 0, 4 * KiB, fl.FE_UNKNOWN)]
    reflink_copy_failed = False
    try:
        reflink_copy(p, tmpfs_dir / "copy")
    except OSError as e:
        reflink_copy_failed = e.errno == errno.EOPNOTSUPP
    assert reflink_copy_failed
    (tmpfs_dir / "copy").write_bytes(p.read_bytes())
    res = scan.scan([str(tmpfs_dir)])
    t = res.plan.totals
    assert t.files == 2 and t.logical_bytes == 2 * MiB
    # the copy was written densely (zeros are data); tmpfs data is never shared
    assert t.data_bytes == 12 * KiB + 1 * MiB
    assert t.shared_bytes == 0 and t.physical_bytes == t.data_bytes
    assert [f.type for f in res.filesystems] == ["tmpfs"]


def test_fiemap_error_names_the_path(tmp_path):
    p = tmp_path / "f"
    with pytest.raises(OSError) as ei:
        mapping.fiemap(-1, str(p))
    assert ei.value.errno == errno.EBADF
    assert ei.value.filename == str(p)


@pytest.mark.parametrize("kind", ["btrfs", "xfs", "tmpfs"])
def test_map_tree_batches_map_as_each_file_alone(loopfs, kind):
    """map_tree maps regular files 64 at a time in one native call: each
    file's map and stat must be what mapping it alone gives (extent_map on
    a descriptor of its own, os.lstat), over more than one batch and for
    every shape in the zoo (more extents than a batch keeps, compressed
    extents, tmpfs without FIEMAP); a file deleted after the walk saw it
    and before its batch opened it is skipped with its reason, the rest
    of its batch mapped."""
    fs = loopfs(kind, mount_options="compress-force=zstd" if kind == "btrfs" else "")
    top = fs.path / "t"
    (top / "many").mkdir(parents=True)
    zoo = make_zoo(top) if kind != "tmpfs" else {}
    for i in range(150):
        (top / "many" / f"f{i:03d}").write_bytes(compressible(100 + 997 * i))
    frag = top / "frag"  # 40 extents: more than a batch keeps
    with open(frag, "wb") as f:
        for i in range(40):
            f.seek(2 * i * 64 * KiB)
            f.write(os.urandom(64 * KiB))
    os.sync()
    doomed = top / "many" / "f120"

    def known(node) -> int:
        if node.leaf == b"f100":  # f120 waits in the same batch, listed already
            doomed.unlink()
        return -1

    items = list(mapping.map_tree([str(top)], known=known))
    mapped = {it.node.src: it for it in items if isinstance(it, mapping.Mapped)}
    skipped = [it for it in items if isinstance(it, mapping.Skipped)]
    assert [(s.path, s.reason) for s in skipped] == [(os.fsencode(doomed),
                                                      "No such file or directory")]
    assert len(mapped) == 150 - 1 + 1 + len(zoo)
    for src, it in mapped.items():
        st = os.lstat(src)
        assert (it.node.st.st_ino, it.node.st.st_size, it.node.st.st_mtime_ns,
                it.node.st.st_mode) == (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
        fd = os.open(src, os.O_RDONLY)
        try:
            alone = mapping.extent_map(fd, st.st_size, src)
        finally:
            os.close(fd)
        assert it.ext.dtype == alone.dtype and it.ext.tobytes() == alone.tobytes(), src
    assert len(mapped[os.fsencode(frag)].ext) >= 40 if kind != "tmpfs" else True
    if kind == "btrfs":
        assert any(len(it.ext) and it.ext["flags"][0] & fl.FE_ENCODED for it in mapped.values())


def test_map_tree_batches_let_known_see_a_hard_links_first_name(btrfs_dir):
    """A backup's known() says a second name of an inode is a link by what
    map_tree has yielded so far: the batch must have yielded the first name
    before it asks about the second, else the link is opened and mapped."""
    top = btrfs_dir / "hl"
    top.mkdir()
    for i in range(10):
        (top / f"a{i}").write_bytes(b"x" * 100)
    os.link(top / "a3", top / "b3")
    seen: set[int] = set()

    def known(node) -> int:
        return 0 if node.st.st_ino in seen else -1

    kinds = {}
    for it in mapping.map_tree([str(top)], known=known):
        if isinstance(it, (mapping.Mapped, mapping.Unopened)):
            seen.add(it.node.st.st_ino)
            kinds[it.node.leaf] = type(it).__name__
    assert kinds[b"b3"] == "Unopened" and kinds[b"a3"] == "Mapped", kinds
