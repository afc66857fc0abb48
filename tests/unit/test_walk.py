"""walk.py and the CLI's argument handling: order, names, symlinks, refusals.
Runs on the test machine's own temporary directory; needs no root."""
from __future__ import annotations

import os
import stat

import pytest
from helpers.cli import cli
from helpers.fsutil import fs_info_path

from cloneaware import fsinfo
from cloneaware.errors import EXIT_USAGE, UsageError
from cloneaware.source.walk import root_names, walk


def collect(paths, one_file_system=True):
    errors = []
    nodes = list(walk([str(p) for p in paths], lambda p, r: errors.append((p, r)),
                      one_file_system))
    return nodes, errors


@pytest.fixture
def tree(tmp_path):
    t = tmp_path / "tree"
    (t / "b" / "deep").mkdir(parents=True)
    (t / "a").mkdir()
    (t / "a" / "z.txt").write_bytes(b"z")
    (t / "a" / "y.txt").write_bytes(b"y")
    (t / "b" / "deep" / "x").write_bytes(b"x")
    (t / "c.txt").write_bytes(b"c")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s" * 1000)
    os.symlink(outside, t / "link-to-dir")
    os.symlink(outside / "secret", t / "link-to-file")
    os.symlink(tmp_path / "nowhere", t / "dangling")
    return t


def test_walk_order_names_and_symlinks(tree):
    nodes, errors = collect([tree])
    assert errors == []
    names = [n.name for n in nodes]
    assert sorted(names) == [
        b"tree", b"tree/a", b"tree/a/y.txt", b"tree/a/z.txt", b"tree/b", b"tree/b/deep",
        b"tree/b/deep/x", b"tree/c.txt", b"tree/dangling", b"tree/link-to-dir",
        b"tree/link-to-file"]
    # parents before children; the entries of a directory in sorted name order
    for i, name in enumerate(names[1:], 1):
        assert name.rsplit(b"/", 1)[0] in names[:i]
    for d in (b"tree", b"tree/a", b"tree/b"):
        kids = [n for n in names if n.rsplit(b"/", 1)[0] == d]
        assert kids == sorted(kids)
    assert [n.name for n in collect([tree])[0]] == names  # deterministic
    for n in nodes:
        assert n.src == os.fsencode(tree.parent) + b"/" + n.name
        assert n.st.st_ino == os.lstat(n.src).st_ino
    # symlinks are entries of their own, never followed
    links = {n.name: n for n in nodes if b"link" in n.name or b"dangling" in n.name}
    assert all(os.path.islink(n.src) for n in links.values())
    assert not any(b"secret" in n.name for n in nodes)


def test_walk_root_that_is_a_symlink_is_not_followed(tree):
    nodes, errors = collect([tree / "link-to-dir"])
    assert errors == []
    assert [n.name for n in nodes] == [b"link-to-dir"]
    assert os.path.islink(nodes[0].src)


def test_walk_several_roots_in_argument_order(tree):
    nodes, _ = collect([tree / "c.txt", tree / "a"])
    assert [n.name for n in nodes] == [b"c.txt", b"a", b"a/y.txt", b"a/z.txt"]


def test_root_names_refusals(tree, tmp_path):
    with pytest.raises(UsageError, match="No such file"):
        root_names([str(tmp_path / "missing")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a").mkdir()
    with pytest.raises(UsageError, match="both be stored"):
        root_names([str(tree / "a"), str(tmp_path / "other" / "a")])
    with pytest.raises(UsageError, match="root directory"):
        root_names(["/"])
    # the same path named twice (or through "..") is kept once
    got = root_names([str(tree / "a"), str(tree / "b" / ".." / "a"), str(tree / "a") + "/"])
    assert got == [(b"a", os.fsencode(tree / "a"))]
    # a dangling symlink is a valid entry: scan does not follow it
    assert root_names([str(tree / "dangling")]) == [(b"dangling", os.fsencode(tree / "dangling"))]


def test_fs_info_of_the_test_directory(tmp_path):
    info = fs_info_path(str(tmp_path))
    st = os.stat(tmp_path)
    if info.type == "btrfs":
        assert info.key.startswith("btrfs:")
    else:
        assert info.key == f"dev:{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    assert info.block_size > 0


def test_probe_forget_drops_cached_identities(tmp_path):
    """st_dev numbers are reused after an unmount; walk() starts afresh."""
    st = os.stat(tmp_path)
    fsinfo._cache[st.st_dev] = fsinfo.FsInfo("stale", "stale", 1)
    try:
        nodes, errors = collect([tmp_path])
        assert errors == []
        assert fsinfo._cache[st.st_dev].key != "stale"
    finally:
        fsinfo.forget()
    assert fsinfo._cache == {}


def test_cli_scan_missing_path_is_a_usage_error(tmp_path):
    r = cli("scan", "--json", tmp_path / "missing", check_rc=EXIT_USAGE, timeout=120)
    assert "missing" in r.err and "No such file" in r.err
    assert r.json() == {"ok": False, "error": r.err.strip()[len("cloneaware: "):],
                        "exit": EXIT_USAGE}


def test_probe_errno_reason():
    import errno
    assert fsinfo.errno_reason(errno.EXDEV) == "different filesystems"
    assert fsinfo.errno_reason(errno.EOPNOTSUPP) == "filesystem cannot reflink"
    assert fsinfo.errno_reason(errno.ENOTTY) == "filesystem cannot reflink"
    assert "alignment" in fsinfo.errno_reason(errno.EINVAL)
    assert fsinfo.errno_reason(errno.EIO) == os.strerror(errno.EIO)


@pytest.fixture
def wide(tmp_path):
    """More directories than one batch of the lister, and more entries in
    some than one chunk of its threads, of every kind of inode."""
    t = tmp_path / "wide"
    for d in range(40):
        sub = t / f"d{d:02d}"
        sub.mkdir(parents=True)
        for f in range(d * 3):
            (sub / f"f{f:03d}").write_bytes(b"x" * f)
        os.symlink(f"f{d}", sub / "link")
        (sub / "inner" / "deeper").mkdir(parents=True)
    os.mkfifo(t / "fifo")
    os.mknod(t / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.utime(t / "d05" / "f001", ns=(-1_500_000_001, 1_700_000_000_123_456_789))
    return t


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_walk_stats_are_lstats_in_sorted_order(wide):
    """Every entry's stat, listed in batches on other threads, is its
    lstat, field by field; the order is parents first, names sorted."""
    nodes, errors = collect([wide])
    assert errors == []
    expect = [b"wide"]
    stack = [b""]
    while stack:  # the oracle: os.listdir and os.lstat, depth first, sorted
        rel = stack.pop()
        names = sorted(os.listdir(os.fsencode(wide) + rel))
        subs = []
        for n in names:
            expect.append(b"wide" + rel + b"/" + n)
            if stat.S_ISDIR(os.lstat(os.fsencode(wide) + rel + b"/" + n).st_mode):
                subs.append(rel + b"/" + n)
        stack.extend(reversed(subs))
    assert [n.name for n in nodes] == expect
    for n in nodes:
        want = os.lstat(n.src)
        for field in ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid",
                      "st_size", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_rdev",
                      "st_blocks"):
            if field == "st_atime_ns" and stat.S_ISDIR(want.st_mode):
                continue  # listing a directory may set its atime
            assert getattr(n.st, field) == getattr(want, field), (n.name, field)


def test_walk_closes_what_it_opened(wide):
    """The directories opened ahead of the walk are closed at its end, and
    when it is left half-way (a backup that stops)."""
    before = open_fds()
    assert len(collect([wide])[0]) > 40 * 4
    assert open_fds() == before
    it = walk([str(wide)], lambda p, r: None)
    for _ in range(50):  # into the first subdirectory: the next ones are listed
        next(it)
    assert len(open_fds()) > len(before) + 10  # directories are open ahead
    it.close()
    assert open_fds() == before
