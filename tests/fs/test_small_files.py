"""Small files made in batches by one native call (restore/smallfiles.py,
issue 36): the restored tree must be what a file-by-file restore makes,
every owner, mode, time, size and hole, through more than one batch, from
an archive and from a repository, with the hard links and clones that
need a batched file on disk before the batch ends."""
from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import struct
import subprocess
import threading
import time

import pytest
from helpers.archivecraft import temp_files
from helpers.cli import assert_one_line_error, cli, cli_json
from helpers.fsutil import filefrag, spread_files
from helpers.space import used
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.errors import ArchiveError
from cloneaware.repo.connect import opened
from cloneaware.repo.restore import restore_snapshots
from cloneaware.restore.run import Restore
from cloneaware.restore.smallfiles import SMALL_MAX, Held, Holder, SmallFiles

#: a restore run as a process may be by default, hard limit too (the command
#: raises its soft limit to the hard one: cli raise_nofile)
NOFILE_1024 = ["prlimit", "--nofile=1024:1024", "--"]

KiB = 1 << 10
MODES = [0o644, 0o600, 0o4755, 0o2750, 0o000, 0o1777, 0o444, 0o777]


def _small_tree(top, n: int, seed: int = 3) -> dict[str, int]:
    """``n`` small files in a few directories, each with its own owner,
    mode and times (some before 1970, all with nanoseconds), sizes around
    the edges of SMALL_MAX; plus the cases that leave a batch: holes,
    xattrs, a file over SMALL_MAX, hard links, duplicates.  Returns the
    names of the files with a trailing hole and their data bytes."""
    rng = random.Random(seed)
    sizes = [0, 1, 100, 4095, 4096, 4097, 30000, SMALL_MAX - 1, SMALL_MAX, SMALL_MAX + 1]
    dirs = [top / f"d{i}" / f"sub{i % 3}" for i in range(7)]
    for d in dirs:
        d.mkdir(parents=True)
    for i in range(n):
        p = dirs[i % len(dirs)] / f"f{i:05d}"
        p.write_bytes(rng.randbytes(sizes[i % len(sizes)]))
        os.chown(p, rng.randrange(0, 70000), rng.randrange(0, 70000))
        os.chmod(p, MODES[i % len(MODES)])
        os.utime(p, ns=(rng.randrange(-2 * 10**18, 2 * 10**18),
                        rng.randrange(-10**18, 2 * 10**18)))
    holes = {}
    for i, (lead, data, size) in enumerate([(0, 1, 60 * KiB), (0, 4 * KiB, SMALL_MAX),
                                            (8 * KiB, 100, 40 * KiB)]):
        p = top / f"sparse{i}"
        with open(p, "wb") as f:
            f.seek(lead)
            f.write(rng.randbytes(data))
            f.truncate(size)
        holes[p.name] = lead + data
    x = top / "with-xattr"
    x.write_bytes(b"x" * 100)
    os.setxattr(x, "user.note", b"kept")
    (top / "linked").write_bytes(rng.randbytes(5000))
    os.link(top / "linked", top / "d0" / "link-to-linked")
    hl = top / "hl"  # only small files: the link comes while its file waits in a batch
    hl.mkdir()
    for name in ("a", "c"):
        (hl / name).write_bytes(rng.randbytes(3000))
    os.link(hl / "a", hl / "b")
    same = rng.randbytes(9000)
    for name in ("dup-a", "dup-b", "dup-c"):
        (top / name).write_bytes(same)
    return holes


def _assert_holes_kept(src, dest, holes: dict[str, int]) -> None:
    for name, data in holes.items():
        st = os.stat(dest / name)
        assert st.st_size == os.stat(src / name).st_size
        # data rounded up to blocks, never the zeros of the hole
        assert st.st_blocks * 512 <= data + 8 * KiB, (name, st.st_blocks)


@pytest.fixture
def small_src(btrfs_dir):
    src = btrfs_dir / "src"
    src.mkdir()
    holes = _small_tree(src, 2 * SmallFiles.BATCH_FILES + 300)
    return src, holes


def test_archive_restore_of_many_small_files_is_exact(small_src, xfs_dir):
    src, holes = small_src
    want = Snapshot(src)
    archive = xfs_dir / "a.ca"
    cli("backup", "-o", archive, src, check_rc=0)
    dest = xfs_dir / "out"
    out = cli_json("restore", "--json", archive, dest, check_rc=0)
    assert out["files"] + out["hardlinks"] == len([e for e in want.entries.values()
                                                   if "size" in e])
    assert out["hardlinks"] == 2
    assert_same_tree(want, Snapshot(dest / "src"))
    _assert_holes_kept(src, dest / "src", holes)
    # and no temporary name is left anywhere
    left = subprocess.run(["find", dest, "-name", ".cloneaware-*"], capture_output=True,
                          text=True, check=True).stdout
    assert left == "", left


def test_a_signal_just_as_a_batch_is_taken_leaves_no_descriptor(small_src, xfs_dir,
                                                                monkeypatch):
    """A signal's handler raises once a call returns: one that comes just
    as a batch was packed (SmallFiles.take returned) finds it pending
    already, so the failed restore closes what it holds (its directories'
    descriptors, its clones' sources) and leaves no temporary name."""
    src, _holes = small_src
    archive = xfs_dir / "a.ca"
    cli("backup", "-o", archive, src, check_rc=0)
    real, taken = SmallFiles.take, []

    def take(self, *a, **k):
        job = real(self, *a, **k)
        if not taken:
            taken.append(job)
            raise KeyboardInterrupt  # as the handler of a signal raises it
        return job

    monkeypatch.setattr(SmallFiles, "take", take)
    fds_before = set(os.listdir("/proc/self/fd"))
    dest = xfs_dir / "out"
    with pytest.raises(KeyboardInterrupt):
        Restore(str(archive), str(dest)).run()
    assert taken and taken[0].dirs == {}, "the batch held no descriptor, or kept them"
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert not temp_files(dest)


def test_an_interrupted_repository_restore_says_so_and_lets_go_of_everything(
        small_src, btrfs_dir, xfs_dir, monkeypatch):
    """restore -r stopped by a signal while it makes small files, and its
    output's close failing too (the small-file helper's step, first): the
    interrupt is what is raised, and every step of the close has run (no
    writeback thread, no descriptor left, no temporary name)."""
    src, _holes = small_src
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    real_write, real_drop, calls = native.write_small, Holder.drop, []

    def write_small(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a signal's handler raises it
        return real_write(*a)

    def drop(self):
        real_drop(self)
        raise OSError(errno.EIO, "injected", "the small-file helper")

    monkeypatch.setattr(native, "write_small", write_small)
    monkeypatch.setattr(Holder, "drop", drop)
    dest = xfs_dir / "out"
    fds_before = set(os.listdir("/proc/self/fd"))
    with opened(str(repo), lock="shared", operation="restore") as r:
        with pytest.raises(KeyboardInterrupt):
            restore_snapshots(r, [r.find("latest", r.snapshots())], str(dest))
        assert len(calls) >= 2
        assert not [t for t in threading.enumerate() if t.name in ("writeback", "small files")]
    assert set(os.listdir("/proc/self/fd")) == fds_before  # the repository's closed too
    assert not temp_files(dest)


@pytest.mark.parametrize("then", ["links", "copies"])
def test_a_batch_made_behind_the_restore_is_waited_for(btrfs_dir, xfs_dir, monkeypatch, then):
    """Batches are made on a helper thread while the restore goes on
    (Holder.submit): a hard link to a file of a batch still being made, a
    clone from one (a repository's duplicate), and the end of the run each
    wait for it, and for those queued before it (up to Holder.DEPTH).  Each
    batch is slowed here, so that two are still queued or being made when
    those come: a big file ends each batch of small ones before it, then
    come links to files of both and copies of them, the second's first."""
    src = btrfs_dir / "src"
    rng = random.Random(7)
    for d in "abc":
        (src / d).mkdir(parents=True)
    for i in range(40):
        (src / "a" / f"f{i:02d}").write_bytes(rng.randbytes(5000 + 97 * i))
    (src / "a" / "f19big").write_bytes(rng.randbytes(SMALL_MAX + 4096))
    (src / "a" / "zbig").write_bytes(rng.randbytes(SMALL_MAX + 4096))
    for i in range(10):
        if then == "links":
            os.link(src / "a" / f"f{(20 + 4 * i) % 40:02d}", src / "b" / f"l{i:02d}")
        else:
            shutil.copy2(src / "a" / f"f{(25 + 3 * i) % 40:02d}", src / "c" / f"d{i:02d}")
    want = Snapshot(src, atime=False)
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    real, calls = native.write_small, []

    def slow(*a):
        time.sleep(0.3)
        calls.append(a[1])
        return real(*a)
    monkeypatch.setattr(native, "write_small", slow)
    with opened(str(repo), lock="shared", operation="restore") as r:
        restore_snapshots(r, [r.find("latest", r.snapshots())], str(xfs_dir / "out"))
    assert calls[:2] == [20, 20], calls  # the small files of a/, made behind the restore
    assert_same_tree(want, Snapshot(xfs_dir / "out" / "src", atime=False))
    out = xfs_dir / "out" / "src"
    for i in range(10 if then == "copies" else 0):  # cloned from the first copy (filefrag)
        got = [x.physical for x in filefrag(out / "c" / f"d{i:02d}")[1]]
        assert got and got == [x.physical
                               for x in filefrag(out / "a" / f"f{(25 + 3 * i) % 40:02d}")[1]]


@pytest.mark.parametrize("dest_fs", ["btrfs", "xfs"])
def test_repository_restore_of_many_small_files_is_exact(small_src, xfs_dir, dest_fs,
                                                         btrfs_dir):
    """From a repository, a duplicate's bytes are cloned from the first
    copy, which may still wait in a batch: it is made first."""
    src, holes = small_src
    want = Snapshot(src, atime=False)
    repo = xfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    dest = (btrfs_dir if dest_fs == "btrfs" else xfs_dir) / "out"
    out = cli_json("restore", "--json", "-r", repo, "latest", dest, check_rc=0)
    assert out["reflinked_bytes"] > 0, out  # the duplicates and the clones
    assert_same_tree(want, Snapshot(dest / "src", atime=False))
    _assert_holes_kept(src, dest / "src", holes)


def test_restore_into_a_full_filesystem_fails_in_one_line_and_names_nothing_half(
        small_src, loopfs):
    """ENOSPC in the middle of a batch: one line, exit 4, no temporary
    file left, and every file under its final name whole."""
    src, _ = small_src
    small = loopfs("xfs", 320 << 20)
    archive = small.path / "a.ca"
    cli("backup", "-o", archive, src, check_rc=0)
    filler = small.path / "filler"
    free = shutil.disk_usage(small.path).free
    with open(filler, "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, free - 40 * (1 << 20))
    dest = small.path / "out"
    r = cli("restore", archive, dest, check_rc=None)
    line = assert_one_line_error(r, 4)
    assert "No space left" in line, line
    made = 0
    for d, _dirs, files in os.walk(dest / "src"):
        for name in files:
            rel = os.path.relpath(os.path.join(d, name), dest / "src")
            assert not name.startswith(".cloneaware-"), rel
            assert (src / rel).read_bytes() == (dest / "src" / rel).read_bytes(), rel
            made += 1
    assert made > 100  # it got well into the tree before the disk was full


@pytest.mark.parametrize("dest_fs", ["xfs", "ext4"])
def test_reflinked_copies_of_small_files_are_cloned_in_batches(btrfs_dir, xfs_dir, ext4_dir,
                                                                dest_fs):
    """A reflinked copy of a tree of small files (a container layer): each
    copy's file is the whole of a file restored before it, cloned by the
    batch.  More clones and directories than the descriptors a process may
    hold by default (1,024), which a batch holds until it is made: it must
    end before they run out.  On XFS the copy takes no space of its
    own, by statfs; on ext4, which cannot clone, each is copied, counted
    with its reason; either way the tree is exact."""
    src = btrfs_dir / "layers"
    base = src / "base"
    base.mkdir(parents=True)
    rng = random.Random(5)
    sizes = [1, 700, 4096, 8192, 12000, 40960, SMALL_MAX - 3, SMALL_MAX]
    n = 1200
    for i in range(n):
        p = base / f"d{i % 600:03d}" / f"f{i:04d}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(rng.randbytes(sizes[i % len(sizes)]))
        os.chmod(p, MODES[i % len(MODES)])
        os.utime(p, ns=(rng.randrange(0, 2 * 10**18), rng.randrange(-10**18, 2 * 10**18)))
    subprocess.run(["cp", "-a", "--reflink=always", base, src / "copy"], check=True)
    want = Snapshot(src, atime=False)
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    dest_dir = xfs_dir if dest_fs == "xfs" else ext4_dir
    before = used(dest_dir)
    out = cli_json("restore", "--json", "-r", repo, "latest", dest_dir / "out",
                   check_rc=0, prefix=NOFILE_1024)
    assert_same_tree(want, Snapshot(dest_dir / "out" / "layers", atime=False))
    logical = sum(sizes[i % len(sizes)] for i in range(n))
    grew = used(dest_dir) - before
    if dest_fs == "xfs":
        assert out["reflinked_bytes"] >= logical, out
        assert grew < 1.5 * logical, (grew, logical)  # one copy's blocks, not two
    else:
        assert out["copied_bytes"] >= logical, out
        assert sum(out["copy_reasons"].values()) == out["copied_bytes"], out
        assert grew > 2 * logical * 0.9, (grew, logical)


@pytest.mark.parametrize("limit", ["1024:1024", "200:4096"], ids=["bounded", "raised"])
def test_two_snapshots_of_many_files_restore_within_the_descriptors_a_process_has(
        btrfs_dir, xfs_dir, limit):
    """Snapshots restored together write a blob once and clone it after:
    nearly every file of the second is cloned from the first's, which is
    in place by then and reopened for it.  Those kept open are bounded
    (Places.DONE_FDS): two snapshots of more files than a process may hold
    open by default (1,024) restore, exact, and the second takes no space
    of its own, by statfs.  Under a soft limit below what the restore's
    bounded caches hold (200), the command raises it to the hard one."""
    src = btrfs_dir / "src"
    n, size = 1500, 8192
    spread_files(src, n, size, 11)
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    first = Snapshot(src, atime=False)
    with open(src / "d00" / "f0000", "ab") as f:  # night 2: one file grows
        f.write(b"night two\n")
    cli("backup", "-r", repo, src, check_rc=0)
    second = Snapshot(src, atime=False)
    ids = [s["short_id"] for s in cli_json("snapshots", "--json", "-r", repo, check_rc=0)]
    assert len(ids) == 2, ids
    before = used(xfs_dir)
    out = cli_json("restore", "--json", "-r", repo, *ids, xfs_dir / "out", check_rc=0,
                   prefix=["prlimit", f"--nofile={limit}", "--"])
    assert_same_tree(first, Snapshot(xfs_dir / "out" / ids[0] / "src", atime=False))
    assert_same_tree(second, Snapshot(xfs_dir / "out" / ids[1] / "src", atime=False))
    assert out["reflinked_bytes"] >= (n - 1) * size, out
    assert used(xfs_dir) - before < 1.5 * n * size  # one tree's blocks, not two


@pytest.mark.parametrize("dest_fs,source", [("xfs", "archive"), ("ext4", "archive"),
                                            ("xfs", "repository")])
def test_reflinked_copies_with_tails_of_bytes_are_made_in_batches(btrfs_dir, xfs_dir, ext4_dir,
                                                                  monkeypatch, dest_fs, source):
    """An archive stores a reflinked copy (a container layer) as one clone
    of the file it copies; a copy appended to since (a log, a night's
    change) as clones of its whole blocks that are still shared and its
    rewritten tail as bytes; a file with a block rewritten as clones around
    bytes.  The batch makes a copy of any size, clones first, then its
    tail, where the restore's thread made the big ones and the appended
    ones alone; one whose bytes come between clones is made alone, its
    clones and bytes each where they belong.  Judged by the tree's hashes,
    and on XFS by the copies' first extents being their originals'
    (filefrag); on ext4, which cannot clone, each is copied (a big one
    alone: a batch never copies one), and counted so.  A repository
    restore clones a copy blob by blob from where each was first written:
    pieces that follow each other in one file, which the batch takes as
    one clone."""
    src = btrfs_dir / "layers"
    base = src / "base"
    base.mkdir(parents=True)
    rng = random.Random(11)
    sizes = [4096 + 700, 3 * 4096 + 1, 40960 + 3075, SMALL_MAX + 5000, 3 * SMALL_MAX + 123,
             (6 << 20) + 77]
    names = []
    for i in range(20):
        names.append(f"f{i:02d}")
        (base / names[-1]).write_bytes(rng.randbytes(sizes[i % len(sizes)]))
    subprocess.run(["cp", "-a", "--reflink=always", base, src / "copy"], check=True)
    for name in names[1::2]:
        with open(src / "copy" / name, "ab") as f:
            f.write(b"appended\n")
    with open(src / "copy" / "f03", "r+b") as f:  # one block of it its own: bytes between
        f.seek(8192)
        f.write(rng.randbytes(4096))
    # halves of one file swapped: clones from one file, whose places do not follow
    half = sizes[4] // 2 // 4096 * 4096
    with open(base / "f04", "rb") as f, open(src / "copy" / "swapped", "wb") as g:
        native.ficlonerange(g.fileno(), f.fileno(), half, half, 0, "swapped")
        native.ficlonerange(g.fileno(), f.fileno(), 0, half, half, "swapped")
    os.sync()
    want = Snapshot(src, atime=False)
    archive, repo = btrfs_dir / "a.ca", btrfs_dir / "repo"
    if source == "archive":
        cli("backup", "-o", archive, src, check_rc=0)
    else:
        cli("init", "-r", repo, check_rc=0)
        cli("backup", "-r", repo, src, check_rc=0)
    real, made = SmallFiles._pack, {}

    def pack(self, files, dirs):
        for h, _ in files:
            made[h.entry.path] = (h.cloned, len(h.data))
        return real(self, files, dirs)
    monkeypatch.setattr(SmallFiles, "_pack", pack)
    dest = (xfs_dir if dest_fs == "xfs" else ext4_dir) / "out"
    before = used(dest.parent)
    if source == "archive":
        summary = Restore(str(archive), str(dest)).run()
    else:
        with opened(str(repo), lock="shared", operation="restore") as r:
            summary = restore_snapshots(r, [r.find("latest", r.snapshots())], str(dest))
    assert_same_tree(want, Snapshot(dest / "layers", atime=False))
    assert b"layers/copy/swapped" not in made
    cloned = 0
    for i, name in enumerate(names):
        size = sizes[i % len(sizes)]
        path = b"layers/copy/" + name.encode()
        if name == "f03":
            assert path not in made, made[path]
            continue
        tail = size % 4096 + len(b"appended\n") if i % 2 else 0
        want_made = (size - size % 4096 if tail else size, tail)
        cloned += want_made[0]
        got = made.get(path)
        if dest_fs == "ext4" and size > SMALL_MAX:
            assert got is None, (name, got)  # never a big copy in a batch: made alone
            continue
        assert got == want_made, (name, got)
        if dest_fs == "xfs":
            exts = filefrag(dest / "layers" / "copy" / name)[1]
            orig = filefrag(dest / "layers" / "base" / name)[1]
            assert exts and exts[0].physical == orig[0].physical, (name, exts, orig)
    # counted as the restore's own clones and copies are
    base_bytes = sum(p.stat().st_size for p in base.iterdir())
    grew = used(dest.parent) - before
    if dest_fs == "xfs":  # by statfs: the copies took their tails, not their bytes again
        assert grew < 1.5 * base_bytes, (grew, base_bytes)
        assert summary.reflinked_bytes >= cloned and not summary.copied_bytes, summary
    else:
        assert summary.copied_bytes >= cloned and not summary.reflinked_bytes, summary
        assert sum(summary.copy_reasons.values()) == summary.copied_bytes, summary
        assert grew > 1.9 * base_bytes, (grew, base_bytes)


def test_a_batch_made_on_threads_stops_as_if_in_order(ext4_dir):
    """write_small spreads a batch over threads, yet answers as if it made
    the files in order: at the first that fails, the files before it are
    made and handed on, and none after it is left, though other threads
    made some of them meanwhile.  The one that fails does so slowly: a
    clone, copied on ext4, from a source 4 KiB shorter than said (8 MiB
    copied first), while the other threads go on past it."""
    out = ext4_dir / "out"
    out.mkdir()
    src = ext4_dir / "src"
    src.write_bytes(b"s" * (8 << 20))
    dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    sfd = os.open(src, os.O_RDONLY)
    made = []
    try:
        batch = SmallFiles(chown=False)
        for i in range(600):
            name = b"f%04d" % i
            h = Held(fmt.Entry(i, fmt.K_REG, b"out/" + name, size=3000), b"out", name,
                     bytearray(b"%04d" % i * 750))
            if i == 40:
                h = Held(fmt.Entry(i, fmt.K_REG, b"out/" + name, size=(8 << 20) + 4096),
                         b"out", name, bytearray())
                h.clone = (os.dup(sfd), 0, 8 << 20, "archive")
                h.cloned = (8 << 20) + 4096  # what the archive said to clone
            batch.add(h, dfd, name)
        job = batch.take()
        job.done = native.write_small(job.packed, len(job.files), job.names, job.data,
                                      threads=4)
        job.ended.set()
        with pytest.raises(ArchiveError, match="past the end of its source for out/f0040"):
            job.finish(lambda p: os.fsdecode(p), lambda h, tmp, fails: made.append(tmp))
    finally:
        os.close(dfd)
        os.close(sfd)
    assert made == [b"f%04d" % i for i in range(40)]
    assert sorted(os.listdir(out)) == [f"f{i:04d}" for i in range(40)]
    assert all((out / f"f{i:04d}").read_bytes() == b"%04d" % i * 750 for i in range(40))


def test_a_batch_made_and_not_handed_on_leaves_no_file(xfs_dir):
    """A batch made on the helper but never handed on (one queued before it
    failed, and the run ends: Holder.drop abandons it) leaves none of its
    files, not even those made under their final names below a new
    directory, which the failing run would otherwise name with it though
    nobody counted them or said what of them was not exact."""
    out = xfs_dir / "out"
    out.mkdir()
    dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        batch = SmallFiles(chown=False)
        for i in range(10):
            name = b"f%d" % i
            h = Held(fmt.Entry(i, fmt.K_REG, b"out/" + name, size=3), b"out", name,
                     bytearray(b"abc"))
            h.fresh = i % 2 == 0
            batch.add(h, dfd, name if h.fresh else b".cloneaware-tmp-%d" % i)
        job = batch.take()
        job.run()
        job.ended.wait()
        assert len(os.listdir(out)) == 10
        job.abandon()
    finally:
        os.close(dfd)
    assert os.listdir(out) == []


def test_a_batched_clone_whose_source_came_up_short_is_refused_and_removed(xfs_dir):
    """The source of a batched clone is shorter on disk than the archive
    said (changed under the restore): the file is not made -- its name is
    removed -- and the error says so in one line; the file before it in
    the batch is made whole."""
    src = xfs_dir / "src"
    src.write_bytes(b"s" * 4096)
    out = xfs_dir / "out"
    out.mkdir()
    fds_before = set(os.listdir("/proc/self/fd"))
    dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    sfd = os.open(src, os.O_RDONLY)
    made = []
    try:
        batch = SmallFiles(chown=False)
        ok = Held(fmt.Entry(1, fmt.K_REG, b"out/ok", size=4096), b"out", b"ok", bytearray())
        ok.clone, ok.cloned = (os.dup(sfd), 0, 4096, "archive"), 4096
        short = Held(fmt.Entry(2, fmt.K_REG, b"out/short", size=8192), b"out", b"short",
                     bytearray())
        short.clone, short.cloned = (os.dup(sfd), 0, 8192, "archive"), 8192  # 4096 there
        batch.add(ok, dfd, b"ok")
        batch.add(short, dfd, b"short")
        with pytest.raises(ArchiveError, match="past the end of its source for out/short"):
            batch.flush(lambda p: os.fsdecode(p), lambda h, tmp, fails: made.append(tmp))
    finally:
        os.close(dfd)
        os.close(sfd)
    assert made == [b"ok"]
    assert sorted(os.listdir(out)) == ["ok"]
    assert (out / "ok").read_bytes() == b"s" * 4096
    assert set(os.listdir("/proc/self/fd")) == fds_before  # the sources' copies closed


# -- backup: small files read ahead in batches (backup/ahead.py) ------------------------


def _read_ahead_expected(src) -> int:
    """The files a night 1 reads ahead: regular, 1 byte to 64 KiB, all data
    (no hole: one stored piece), a hard link's first name only."""
    n, seen = 0, set()
    for d, _, names in os.walk(src):
        for name in names:
            st = os.lstat(os.path.join(d, name))
            if not os.path.isfile(os.path.join(d, name)) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            n += 0 < st.st_size <= 64 * KiB and st.st_blocks * 512 >= st.st_size
    return n


@pytest.mark.parametrize("to", ["archive", "repository", "repository-uncompressed"])
def test_small_files_read_ahead_are_stored_exactly(small_src, xfs_dir, to):
    """Night 1 reads its small files ahead, in batches on a helper thread:
    every one of them is counted, and the tree comes back exact (bytes,
    owners, modes, times, xattrs, holes, links)."""
    src, holes = small_src
    want = Snapshot(src, atime=False)
    if to == "archive":
        target = ["-o", xfs_dir / "a.ca"]
    else:
        cli("init", "-r", xfs_dir / "repo", check_rc=0)
        target = ["-r", xfs_dir / "repo"] + (["--compress", "none"] if "un" in to else [])
    s = cli_json("backup", "--json", *target, src, check_rc=0)
    assert s["read_ahead_files"] == _read_ahead_expected(src) > 2 * 32, s
    assert s["changed"] == [] and s["skipped"] == [], s
    dest = xfs_dir / "out"
    if to == "archive":
        cli("restore", xfs_dir / "a.ca", dest, check_rc=0)
    else:
        cli("restore", "-r", xfs_dir / "repo", "latest", dest, check_rc=0)
    assert_same_tree(want, Snapshot(dest / "src", atime=False))
    _assert_holes_kept(src, dest / "src", holes)
    if to != "archive":  # night 2: the files cache takes them, nothing is read ahead
        s2 = cli_json("backup", "--json", *target, src, check_rc=0)
        assert s2["read_ahead_files"] == 0 and s2["bytes_read"] == 0, s2


def test_read_small_reports_each_file_as_the_kernel_does(btrfs_dir):
    """native.read_small: each file opened, stat'ed, read and mapped after
    its read, as os.fstat and FIEMAP say; a short file read as far as
    it goes, zeros after; a missing name, a symlink (not followed) and a
    FIFO (opened without blocking) said per file, the rest done."""
    from cloneaware.source.mapping import fiemap

    d = btrfs_dir / "rs"
    d.mkdir()
    (d / "a").write_bytes(b"a" * 5000)
    os.setxattr(d / "a", "user.note", b"kept")
    (d / "short").write_bytes(b"s" * 100)
    os.symlink("a", d / "link")
    os.mkfifo(d / "fifo")
    os.sync()
    names = [b"a", b"short", b"missing", b"link", b"fifo", b"a"]
    wants = [5000, 300, 10, 10, 10, 5000]
    size = native.READ_SMALL_SIZE
    recs, blob, data_at = bytearray(size * len(names)), b"".join(names), 0
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name_at = 0
        for i, (nm, w) in enumerate(zip(names, wants)):
            struct.pack_into("<iI3Q", recs, i * size, dfd, len(nm), name_at, data_at, w)
            name_at += len(nm)
            data_at += w
        data = bytearray(b"\xff" * data_at)
        native.read_small(recs, len(names), blob, data,
                          native.READ_SMALL_MAP | native.READ_SMALL_META, threads=3)
    finally:
        os.close(dfd)
    got = [native.READ_SMALL.unpack_from(recs, i * size) for i in range(len(names))]
    fds = [g[5] for g in got]
    try:
        for i in (0, 5):
            st, rec = os.fstat(fds[i]), got[i]
            assert rec[6:8] == (0, 0) and rec[9] == 5000  # err, step; got
            # xattr_err, iflags_err, the size of the xattr list, the inode flags
            assert rec[10:14] == (0, 0, len(b"user.note\0"), native.getflags(fds[i]))
            assert (rec[14], rec[18], rec[19], rec[21], rec[23], rec[24]) == (
                st.st_mode, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            ext = fiemap(fds[i])
            assert rec[8] == len(ext) >= 1
            at = i * size + native.READ_SMALL.size
            assert bytes(recs[at:at + len(ext) * native.EXTENT_SIZE]) == ext.tobytes()
        assert bytes(data[:5000]) == b"a" * 5000 == bytes(data[-5000:])
        assert got[1][9] == 100 and bytes(data[5000:5300]) == b"s" * 100 + bytes(200)
        assert got[1][12] == 0  # no xattr
        assert got[2][5:8] == (-1, errno.ENOENT, 1)
        assert got[3][5:8] == (-1, errno.ELOOP, 1)
        assert got[4][6:8] == (0, 0) and stat.S_ISFIFO(got[4][14]) and got[4][9] == 0
        assert bytes(data[5310:5320]) == b"\xff" * 10  # nothing read from the FIFO
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
