"""FICLONERANGE, FICLONE and FIDEDUPERANGE on the real kernel: the sharing
they make is what the index reports, and their refusals come back as
OSError(errno, strerror, path)."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest
from helpers.fsutil import as_tuples, digest, reflink_support, write_at

from cloneaware import fsinfo, native
from cloneaware.scan import report as scan
from cloneaware.source import flags as fl
from cloneaware.source import mapping
from cloneaware.testing import reflink_copy, write_random

KiB, MiB = 1 << 10, 1 << 20

pytestmark = pytest.mark.vm

#: What "this filesystem cannot do it" looks like (xfstests common/reflink).
NOT_SUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL}


def fiemap(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return as_tuples(mapping.fiemap(fd, str(path)))
    finally:
        os.close(fd)


def clone(src, dst, src_off, length, dst_off):
    with open(src, "rb") as s, open(dst, "r+b") as d:
        native.ficlonerange(d.fileno(), s.fileno(), src_off, length, dst_off, str(dst))


def pieces(plan, f):
    """(file, logical, length, ref_file, ref_logical) of file f's pieces.
    These are plain extents: sharing proved by physical addresses alone."""
    p = plan.file_pieces(f)
    assert (p["check"] == 0).all()
    return [tuple(x[:5]) for x in p.tolist()]


# --- FICLONERANGE ------------------------------------------------------------

def test_clone_unaligned_to_extents_is_indexed_exactly(reflink_dir):
    """Clone 128 KiB from offset 448 KiB of a 1 MiB file into another 1 MiB
    file at 128 KiB: the index reports exactly that range as shared."""
    src, dst = reflink_dir / "a_src", reflink_dir / "b_dst"
    write_random(src, 1 * MiB, 21)
    write_random(dst, 1 * MiB, 22)
    clone(src, dst, 448 * KiB, 128 * KiB, 128 * KiB)
    assert dst.read_bytes()[128 * KiB:256 * KiB] == src.read_bytes()[448 * KiB:576 * KiB]

    res = scan.scan([str(reflink_dir)])
    assert [n.name.rsplit(b"/", 1)[1] for n in res.files] == [b"a_src", b"b_dst"]
    plan, t = res.plan, res.plan.totals
    assert pieces(plan, 0) == [(0, 0, 1 * MiB, -1, 0)]
    assert pieces(plan, 1) == [(1, 0, 128 * KiB, -1, 0),
                               (1, 128 * KiB, 128 * KiB, 0, 448 * KiB),
                               (1, 256 * KiB, 768 * KiB, -1, 0)]
    assert t.shared_bytes == 256 * KiB
    assert t.data_bytes == t.logical_bytes == 2 * MiB
    assert t.physical_bytes == 2 * MiB - 128 * KiB
    assert plan.stored_bytes() == t.physical_bytes
    assert [f.tolist() for f in plan.families()] == [[0, 1]]

    # The other walk order: the clone owns the range, the source refers to it.
    res = scan.scan([str(dst), str(src)])
    assert pieces(res.plan, 0) == [(0, 0, 1 * MiB, -1, 0)]
    assert pieces(res.plan, 1) == [(1, 0, 448 * KiB, -1, 0),
                                   (1, 448 * KiB, 128 * KiB, 0, 128 * KiB),
                                   (1, 576 * KiB, 448 * KiB, -1, 0)]
    assert res.plan.totals.shared_bytes == 256 * KiB
    assert res.plan.totals.physical_bytes == t.physical_bytes


def test_clone_within_one_file_is_self_sharing(reflink_dir):
    f = reflink_dir / "img"
    write_random(f, 1 * MiB, 23)
    head = f.read_bytes()[:256 * KiB]
    clone(f, f, 0, 256 * KiB, 512 * KiB)
    assert f.read_bytes()[512 * KiB:768 * KiB] == head
    with pytest.raises(OSError) as ei:   # overlapping ranges in one file
        clone(f, f, 0, 256 * KiB, 128 * KiB)
    assert ei.value.errno == errno.EINVAL

    plan = scan.scan([str(f)]).plan
    assert pieces(plan, 0) == [(0, 0, 512 * KiB, -1, 0),
                               (0, 512 * KiB, 256 * KiB, 0, 0),
                               (0, 768 * KiB, 256 * KiB, -1, 0)]
    assert plan.totals.shared_bytes == 512 * KiB
    assert plan.totals.physical_bytes == 768 * KiB
    assert plan.families() == []


def test_clone_across_filesystems_is_exdev(btrfs_dir, xfs_dir, loopfs):
    other_btrfs = loopfs("btrfs").path
    for src_dir, dst_dir in ((btrfs_dir, xfs_dir), (xfs_dir, btrfs_dir),
                             (btrfs_dir, other_btrfs)):
        src, dst = src_dir / "src", dst_dir / "dst"
        write_random(src, 64 * KiB, 24)
        dst.write_bytes(b"")
        with pytest.raises(OSError) as ei:
            clone(src, dst, 0, 64 * KiB, 0)
        assert ei.value.errno == errno.EXDEV
        assert ei.value.filename == str(dst)
        assert ei.value.strerror == os.strerror(errno.EXDEV)
        with open(src, "rb") as s, open(dst, "r+b") as d:
            with pytest.raises(OSError) as ei:
                native.ficlone(d.fileno(), s.fileno(), str(dst))
        assert (ei.value.errno, ei.value.filename) == (errno.EXDEV, str(dst))
        assert dst.stat().st_size == 0


def test_clone_alignment_rules(reflink_dir):
    src, dst, empty = reflink_dir / "src", reflink_dir / "dst", reflink_dir / "empty"
    write_random(src, 10000, 25)          # ends inside a block
    write_random(dst, 1 * MiB, 26)
    empty.write_bytes(b"")
    before = digest(dst)
    refused = [
        (100, 4096, 0),        # source offset not block-aligned
        (0, 4096, 100),        # destination offset not block-aligned
        (0, 5000, 0),          # length not aligned and not reaching EOF
        (0, 0, 0),             # the unaligned EOF tail into the middle of dst
        (0, 16384, 0),         # past the source's EOF
    ]
    for s_off, n, d_off in refused:
        with pytest.raises(OSError) as ei:
            clone(src, dst, s_off, n, d_off)
        assert ei.value.errno == errno.EINVAL, (s_off, n, d_off)
        assert ei.value.filename == str(dst)
    assert digest(dst) == before
    # a range may end at the source's EOF when it also ends the destination
    clone(src, empty, 0, 0, 0)
    assert empty.read_bytes() == src.read_bytes()
    clone(src, dst, 8192, 0, 1 * MiB)
    assert dst.stat().st_size == 1 * MiB + 10000 - 8192
    assert dst.read_bytes()[1 * MiB:] == src.read_bytes()[8192:]


def test_ficlone_whole_file_and_probe(reflink_dir):
    src, dst = reflink_dir / "src", reflink_dir / "dst"
    write_random(src, 300 * KiB + 17, 27)
    reflink_copy(src, dst)
    assert digest(src) == digest(dst)
    a, b = fiemap(src), fiemap(dst)
    assert [(e.logical, e.physical) for e in a] == [(e.logical, e.physical) for e in b]
    plan = scan.scan([str(src), str(dst)]).plan
    assert plan.totals.physical_bytes == 300 * KiB + 17
    assert plan.referenced_bytes() == 300 * KiB + 17
    fd = os.open(reflink_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert reflink_support(fd) == (True, "reflink")
    finally:
        os.close(fd)
    assert not [n for n in os.listdir(reflink_dir) if n.startswith(".cloneaware-probe")]


@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_no_reflink_on_ext4_and_tmpfs(kind, request, record_property):
    d = request.getfixturevalue(f"{kind}_dir")
    src, dst = d / "src", d / "dst"
    write_random(src, 64 * KiB, 28)
    write_random(dst, 64 * KiB, 29)
    seen = {}
    with open(src, "rb") as s, open(dst, "r+b") as t:
        for name, call in [
            ("FICLONERANGE", lambda: native.ficlonerange(t.fileno(), s.fileno(), 0, 4096, 0,
                                                        str(dst))),
            ("FICLONE", lambda: native.ficlone(t.fileno(), s.fileno(), str(dst))),
            ("FIDEDUPERANGE", lambda: native.fideduperange(s.fileno(), 0, 4096,
                                                          [(t.fileno(), 0)], str(src))),
        ]:
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno in NOT_SUPPORTED, (name, ei.value)
            assert ei.value.filename in (str(src), str(dst))
            seen[name] = ei.value.errno
    # Observed on Linux 6.18: EOPNOTSUPP from all three, on ext4 and on tmpfs.
    record_property(f"{kind}_errnos", {k: errno.errorcode[v] for k, v in seen.items()})
    assert digest(dst) != digest(src)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ok, reason = reflink_support(fd)
    finally:
        os.close(fd)
    assert not ok and reason == os.strerror(seen["FICLONERANGE"])
    assert not [n for n in os.listdir(d) if n.startswith(".cloneaware-probe")]
    assert fsinfo.errno_reason(errno.EOPNOTSUPP) == "filesystem cannot reflink"


# --- FIDEDUPERANGE -------------------------------------------------------------

def test_dedupe_same_then_shared(reflink_dir):
    a, b = reflink_dir / "a", reflink_dir / "b"
    write_random(a, 1 * MiB, 30)
    write_random(b, 1 * MiB, 30)           # same bytes, written twice
    plan = scan.scan([str(a), str(b)]).plan
    assert plan.totals.shared_bytes == 0 and plan.totals.physical_bytes == 2 * MiB
    h = digest(a)
    with open(a, "rb") as s, open(b, "rb") as d:   # dedupe needs no write access
        got = native.fideduperange(s.fileno(), 0, 1 * MiB, [(d.fileno(), 0)], str(a))
    assert got == [native.DedupeResult(1 * MiB, native.DEDUPE_SAME)]
    assert digest(a) == digest(b) == h
    fa, fb = fiemap(a), fiemap(b)
    assert [(e.logical, e.physical, e.length) for e in fa] == \
        [(e.logical, e.physical, e.length) for e in fb]
    assert all(e.flags & fl.FE_SHARED for e in fa + fb)
    plan = scan.scan([str(a), str(b)]).plan
    assert plan.totals.shared_bytes == 2 * MiB
    assert plan.totals.physical_bytes == 1 * MiB
    assert pieces(plan, 1) == [(1, 0, 1 * MiB, 0, 0)]


def test_dedupe_differs_changes_nothing(reflink_dir):
    a, b = reflink_dir / "a", reflink_dir / "b"
    write_random(a, 1 * MiB, 31)
    write_random(b, 1 * MiB, 31)
    write_at(b, 700 * KiB + 3, b"\x00" if a.read_bytes()[700 * KiB + 3] else b"\x01")
    ha, hb = digest(a), digest(b)
    ma, mb = fiemap(a), fiemap(b)
    with open(a, "rb") as s, open(b, "rb") as d:
        got = native.fideduperange(s.fileno(), 0, 1 * MiB, [(d.fileno(), 0)], str(a))
        once = native.fideduperange_once(s.fileno(), 0, 1 * MiB, [(d.fileno(), 0)], str(a))
    assert got == once == [native.DedupeResult(0, native.DEDUPE_DIFFERS)]
    assert (digest(a), digest(b)) == (ha, hb)
    assert (fiemap(a), fiemap(b)) == (ma, mb)
    assert scan.scan([str(a), str(b)]).plan.totals.shared_bytes == 0


def test_dedupe_many_destinations_in_one_call(reflink_dir):
    n = 256 * KiB
    src = reflink_dir / "src"
    write_random(src, n, 32)
    data = src.read_bytes()
    same0, differs, same_at, unaligned = (reflink_dir / f"d{i}" for i in range(4))
    same0.write_bytes(data)
    differs.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    same_at.write_bytes(os.urandom(64 * KiB) + data)        # the same bytes at 64 KiB
    unaligned.write_bytes(b"z" * 100 + data)
    os.sync()
    hashes = [digest(p) for p in (same0, differs, same_at, unaligned)]
    fds = [os.open(p, os.O_RDONLY) for p in (src, same0, differs, same_at, unaligned)]
    try:
        dests = [(fds[1], 0), (fds[2], 0), (fds[3], 64 * KiB), (fds[4], 100)]
        got = native.fideduperange_once(fds[0], 0, n, dests, str(src))
        assert got == [native.DedupeResult(n, native.DEDUPE_SAME),
                       native.DedupeResult(0, native.DEDUPE_DIFFERS),
                       native.DedupeResult(n, native.DEDUPE_SAME),
                       native.DedupeResult(0, -errno.EINVAL)]
        # the looping wrapper gives the same answers (dedupe is idempotent)
        assert native.fideduperange(fds[0], 0, n, dests, str(src)) == got
        # a range past the source's EOF fails the whole call
        with pytest.raises(OSError) as ei:
            native.fideduperange(fds[0], 0, n + 8192, dests[:1], str(src))
        assert (ei.value.errno, ei.value.filename) == (errno.EINVAL, str(src))
        with pytest.raises(ValueError):
            native.fideduperange_once(fds[0], 0, n, [], str(src))
    finally:
        for fd in fds:
            os.close(fd)
    assert [digest(p) for p in (same0, differs, same_at, unaligned)] == hashes
    P = fiemap(src)[0].physical
    assert [(e.logical, e.physical) for e in fiemap(same0)] == [(0, P)]
    assert (64 * KiB, P) in [(e.logical, e.physical) for e in fiemap(same_at)]
    assert P not in [e.physical for e in fiemap(differs)]

    res = scan.scan([str(reflink_dir)])
    names = [n.name.rsplit(b"/", 1)[1] for n in res.files]
    assert names == [b"d0", b"d1", b"d2", b"d3", b"src"]
    plan = res.plan
    assert plan.totals.shared_bytes == 3 * n
    assert pieces(plan, 2) == [(2, 0, 64 * KiB, -1, 0), (2, 64 * KiB, n, 0, 0)]
    assert pieces(plan, 4) == [(4, 0, n, 0, 0)]
    assert [f.tolist() for f in plan.families()] == [[0, 2, 4]]
    assert plan.totals.external_shared_bytes == 0
    assert fl.FE_SHARED == fl.FE_SHARED


def test_dedupe_unaligned_length_shares_whole_blocks_only(reflink_dir, record_property):
    """Observed on Linux 6.18 (docs/KERNEL.md D4): with a length that is not a
    block multiple and does not reach EOF, FIDEDUPERANGE answers SAME and
    bytes_deduped == the length asked, but shares only the whole blocks:
    bytes_deduped does not say how much became shared."""
    seen = {}
    for n in (100, 4096 + 904, 3 * 4096 + 100):
        a, b = reflink_dir / f"a{n}", reflink_dir / f"b{n}"
        write_random(a, 1 * MiB, n)
        write_random(b, 1 * MiB, n)
        with open(a, "rb") as s, open(b, "rb") as d:
            (got,) = native.fideduperange(s.fileno(), 0, n, [(d.fileno(), 0)], str(a))
        assert got.status == native.DEDUPE_SAME
        assert got.bytes_deduped in (n, n // 4096 * 4096)
        seen[n] = got.bytes_deduped
        whole = n // 4096 * 4096
        shared = [(e.logical, e.length) for e in fiemap(b) if e.flags & fl.FE_SHARED]
        assert shared == ([(0, whole)] if whole else [])
        assert scan.scan([str(a), str(b)]).plan.totals.shared_bytes == 2 * whole
    record_property("bytes_deduped", seen)


def test_dedupe_tail_is_shared_only_when_it_ends_both_files(reflink_dir):
    """An unaligned tail that ends both files is deduped with its last,
    partial block; ending before the destination's EOF it is cut to whole
    blocks, though bytes_deduped says the full length (docs/KERNEL.md D4)."""
    a, b, longer = reflink_dir / "a", reflink_dir / "b", reflink_dir / "longer"
    write_random(a, 10000, 40)
    write_random(b, 10000, 40)
    longer.write_bytes(a.read_bytes() + os.urandom(5000))
    with open(a, "rb") as s, open(b, "rb") as d, open(longer, "rb") as e:
        got = native.fideduperange(s.fileno(), 0, 10000, [(d.fileno(), 0), (e.fileno(), 0)],
                                   str(a))
    assert got == [native.DedupeResult(10000, native.DEDUPE_SAME)] * 2
    pa = {e.logical: e.physical for e in fiemap(a)}
    assert [(x.logical, x.physical) for x in fiemap(b)] == sorted(pa.items())
    shared = [(x.logical, x.length) for x in fiemap(longer) if x.physical in pa.values()]
    assert shared and sum(n for _, n in shared) == 8192, fiemap(longer)
    assert scan.scan([str(a), str(b)]).plan.totals.physical_bytes == 10000


def test_dedupe_changes_no_times(reflink_dir):
    """FIDEDUPERANGE moves no time of either file: not the atime (it reads
    both files, opened here without O_NOATIME, whose atimes relatime would
    update), not the mtime, not the ctime (docs/KERNEL.md D8)."""
    a, b = reflink_dir / "a", reflink_dir / "b"
    write_random(a, 4 * MiB, 41)
    write_random(b, 4 * MiB, 41)
    old = 1_500_000_000_123_456_789
    for p in (a, b):
        os.utime(p, ns=(old, old + 1000))
    before = [os.stat(p) for p in (a, b)]
    with open(a, "rb") as s, open(b, "rb") as d:
        got = native.fideduperange(s.fileno(), 0, 4 * MiB, [(d.fileno(), 0)], str(a))
    assert got == [native.DedupeResult(4 * MiB, native.DEDUPE_SAME)]
    assert scan.scan([str(a), str(b)]).plan.totals.physical_bytes == 4 * MiB
    after = [os.stat(p) for p in (a, b)]
    for x, y in zip(before, after):
        assert (x.st_atime_ns, x.st_mtime_ns, x.st_ctime_ns) == \
            (y.st_atime_ns, y.st_mtime_ns, y.st_ctime_ns)


def test_btrfs_releases_an_extent_only_when_no_block_of_it_is_referenced(loopfs):
    """docs/KERNEL.md D12 and I14, by statfs on a fresh Btrfs: b, a plain
    copy of a (each one 8 MiB extent), deduplicated into a for its first
    7 MiB, still takes its whole extent (FIEMAP calls those 7 MiB shared;
    df does not move); LOGICAL_INO_V2 names both inodes for a's extent and
    b alone for b's; once b's last MiB is deduplicated too, b's extent is
    released: 8 MiB back.  TREE_SEARCH's items say which part of b's
    extent b still refers to."""
    from helpers.space import used

    fs = loopfs("btrfs", 512 * MiB)
    a, b = fs.path / "a", fs.path / "b"
    write_random(a, 8 * MiB, 51)
    write_random(b, 8 * MiB, 51)
    start = used(fs.path)
    with open(a, "rb") as s, open(b, "rb") as d:
        ia, ib = os.fstat(s.fileno()).st_ino, os.fstat(d.fileno()).st_ino
        old = mapping.btrfs_file_extents(d.fileno(), ib)
        assert len(old) == 1 and old["num_bytes"][0] == old["disk_num_bytes"][0] == 8 * MiB
        got = native.fideduperange(s.fileno(), 0, 7 * MiB, [(d.fileno(), 0)])
        assert got[0].status == native.DEDUPE_SAME
        assert used(fs.path) - start > -512 * KiB  # nothing released
        items = mapping.btrfs_file_extents(d.fileno(), ib)
        mine = items[items["disk_bytenr"] == old["disk_bytenr"][0]]
        assert [(int(x["logical"]), int(x["offset"]), int(x["num_bytes"])) for x in mine] \
            == [(7 * MiB, 7 * MiB, MiB)]  # a bookend: 1 MiB of an 8 MiB extent
        tree = native.btrfs_subvol_info(s.fileno()).tree_id
        of_a = native.btrfs_logical_ino(s.fileno(), int(items["disk_bytenr"][0]))
        assert {(ino, root) for ino, _, root in of_a} == {(ia, tree), (ib, tree)}
        of_b = native.btrfs_logical_ino(s.fileno(), int(old["disk_bytenr"][0]))
        assert {(ino, root) for ino, _, root in of_b} == {(ib, tree)}
        native.fideduperange(s.fileno(), 7 * MiB, MiB, [(d.fileno(), 7 * MiB)])
    freed = start - used(fs.path)
    assert 8 * MiB - 256 * KiB <= freed <= 8 * MiB + 256 * KiB, freed
    with open(a, "rb") as s:
        assert native.btrfs_logical_ino(s.fileno(), int(old["disk_bytenr"][0])) == []


def _as_user(uid: int, fn):
    """fn() in a forked child that dropped to uid/gid ``uid`` (no groups, no
    capabilities); returns its result (descriptors opened before are kept)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            out = repr(fn())
        except BaseException as e:
            out = "error " + repr(e)
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_dedupe_permission_rules_for_other_users(reflink_dir):
    """As a user without CAP_SYS_ADMIN, a destination open read-only may be
    deduped into when the user owns it or may write it, and answers EPERM
    (that destination only) otherwise (docs/KERNEL.md D6).  Descriptors are
    opened by root and the ioctl made after dropping to uid 65534: the rule
    is the caller's at the ioctl, not at open."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    src = reflink_dir / "src"
    write_random(src, 256 * KiB, 42)
    cases = {"own_readonly": (65534, 0o444), "other_readonly": (1234, 0o444),
             "other_writable": (1234, 0o666)}
    fds = [os.open(src, os.O_RDONLY)]
    for name, (owner, mode) in cases.items():
        p = reflink_dir / name
        write_random(p, 256 * KiB, 42)
        os.chown(p, owner, owner)
        os.chmod(p, mode)
        fds.append(os.open(p, os.O_RDONLY))
    try:
        got = _as_user(65534, lambda: native.fideduperange_once(
            fds[0], 0, 256 * KiB, [(fd, 0) for fd in fds[1:]], str(src)))
    finally:
        for fd in fds:
            os.close(fd)
    assert got == repr([native.DedupeResult(256 * KiB, native.DEDUPE_SAME),
                        native.DedupeResult(0, -errno.EPERM),
                        native.DedupeResult(256 * KiB, native.DEDUPE_SAME)]), got


def test_dedupe_at_most_127_destinations(reflink_dir):
    """24 + 32 x count bytes must fit in a 4 KiB page: 127 destinations are
    taken, 128 fail the whole call with ENOMEM (docs/KERNEL.md D7)."""
    src, dst = reflink_dir / "src", reflink_dir / "dst"
    write_random(src, 64 * KiB, 43)
    write_random(dst, 64 * KiB, 43)
    s = os.open(src, os.O_RDONLY)
    fds = [os.open(dst, os.O_RDONLY) for _ in range(128)]
    try:
        got = native.fideduperange_once(s, 0, 64 * KiB, [(fd, 0) for fd in fds[:127]], str(src))
        assert got == [native.DedupeResult(64 * KiB, native.DEDUPE_SAME)] * 127
        with pytest.raises(OSError) as ei:
            native.fideduperange_once(s, 0, 64 * KiB, [(fd, 0) for fd in fds], str(src))
        assert (ei.value.errno, ei.value.filename) == (errno.ENOMEM, str(src))
    finally:
        for fd in [s, *fds]:
            os.close(fd)


def test_dedupe_64_mib_in_one_call(reflink_dir):
    """One call dedupes 64 MiB whole: the kernel's cap is 1 GiB
    (docs/KERNEL.md D5)."""
    a, b = reflink_dir / "a", reflink_dir / "b"
    write_random(a, 64 * MiB, 44)
    write_random(b, 64 * MiB, 44)
    with open(a, "rb") as s, open(b, "rb") as d:
        got = native.fideduperange_once(s.fileno(), 0, 64 * MiB, [(d.fileno(), 0)], str(a))
    assert got == [native.DedupeResult(64 * MiB, native.DEDUPE_SAME)]
    assert scan.scan([str(a), str(b)]).plan.totals.physical_bytes == 64 * MiB


def test_dedupe_probe_asks_without_changing_anything(reflink_dir, tmp_path, request):
    """fsinfo.dedupe_support: a file's first block deduped onto itself is an
    overlap, refused with EINVAL where the filesystem can dedupe, and
    EOPNOTSUPP where it cannot: XFS without reflink says so per destination,
    ext4 and tmpfs fail the call (docs/KERNEL.md D9).  Nothing changes."""
    def probe(d):
        p = d / "probe"
        write_random(p, 64 * KiB, 45)
        fd = os.open(p, os.O_RDONLY)
        try:
            (raw,) = native.fideduperange_once(fd, 0, 4096, [(fd, 0)], str(p))
            assert raw == native.DedupeResult(0, -errno.EINVAL), raw
        except OSError as e:
            assert e.errno == errno.EOPNOTSUPP, e
        try:
            return fsinfo.dedupe_support(fd, 64 * KiB)
        finally:
            os.close(fd)

    p = reflink_dir / "probe"
    state = lambda: (digest(p), fiemap(p), os.stat(p).st_mtime_ns,  # noqa: E731
                     os.stat(p).st_ctime_ns)
    assert probe(reflink_dir) is True
    before = state()
    with open(p, "rb") as f:
        assert fsinfo.dedupe_support(f.fileno(), 64 * KiB) is True
    assert state() == before
    for kind in ("ext4", "tmpfs"):
        assert probe(request.getfixturevalue(f"{kind}_dir")) is False
    # an XFS made without reflink (the fixtures' XFS has it)
    image, mnt = tmp_path / "noreflink.img", tmp_path / "noreflink"
    with open(image, "wb") as f:
        f.truncate(320 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=0", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        p = mnt / "probe"
        write_random(p, 64 * KiB, 45)
        fd = os.open(p, os.O_RDONLY)
        try:
            (raw,) = native.fideduperange_once(fd, 0, 4096, [(fd, 0)], str(p))
            assert raw == native.DedupeResult(0, -errno.EOPNOTSUPP)
            assert fsinfo.dedupe_support(fd, 64 * KiB) is False
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    empty = reflink_dir / "empty"
    empty.write_bytes(b"")
    with open(empty, "rb") as f:
        assert fsinfo.dedupe_support(f.fileno(), 0) is None
