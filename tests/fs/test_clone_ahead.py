"""Larger files cloned, and their first chunks read, ahead of their turn
(backup/cloneahead.py, issue 36): what is stored is what the turn would
have stored (the tree restored exact, on Btrfs and XFS, into an archive
and a repository, night 1 and night 2), the files counted; a file changed
after the walk is stored as its clone holds it; and a backup that fails
or is interrupted with files prepared lets go of every descriptor."""
from __future__ import annotations

import errno
import os
import random
import time

import pytest
from helpers.cli import cli, cli_json
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.backup import ArchiveSink, Backup, cloneahead
from cloneaware.backup.cloneahead import CloneAhead
from cloneaware.backup.sinks import file_output
from cloneaware.source.capture import SMALL
from cloneaware.testing import reflink_copy, write_letters, write_random

pytestmark = pytest.mark.root

KiB, MiB = 1 << 10, 1 << 20


def _tree(top, reflinks: bool = True) -> int:
    """Files over Capture.SMALL of many sizes (random and compressible, one
    with a hole, one with an xattr), a reflinked copy and a hard link, with
    small files between them; returns how many files are expected to be
    cloned ahead: those over SMALL with data of their own, but the first
    (nothing is ahead of it)."""
    sizes = [SMALL + 1, 70 * KiB, 200 * KiB, 256 * KiB, 300 * KiB, 1 * MiB, 3 * MiB + 5,
             5 * MiB, 130 * KiB, 2 * MiB]
    top.mkdir()
    for i, size in enumerate(sizes * 2):
        p = top / f"f{i:02d}"
        (write_random if i % 2 else write_letters)(p, size, 100 + i)
        (top / f"f{i:02d}-small").write_bytes(b"s%d" % i * 50)
    holed = top / "holed"
    with open(holed, "wb") as f:
        f.write(random.Random(5).randbytes(300 * KiB))
        f.seek(2 * MiB)
        f.write(random.Random(6).randbytes(100 * KiB))
        os.fsync(f.fileno())
    os.setxattr(top / "f03", "user.note", b"kept")
    if reflinks:
        reflink_copy(top / "f05", top / "f05-copy")  # its data: the f05's
    os.link(top / "f07", top / "f07-link")  # a second name: no file of its own
    os.sync()
    return len(sizes) * 2 + 1 - 1


@pytest.mark.parametrize("to", ["archive", "repository"])
def test_files_cloned_ahead_are_stored_exactly(reflink_dir, xfs_dir, to):
    src = reflink_dir / "src"
    expected = _tree(src)
    want = Snapshot(src, atime=False)
    if to == "archive":
        target = ["-o", xfs_dir / "a.ca"]
    else:
        cli("init", "-r", xfs_dir / "repo", check_rc=0)
        target = ["-r", xfs_dir / "repo"]
    s = cli_json("backup", "--json", *target, src, check_rc=0)
    assert s["cloned_ahead_files"] == expected, s
    assert s["changed"] == [] and s["skipped"] == [], s
    dest = xfs_dir / "out"
    if to == "archive":
        cli("restore", xfs_dir / "a.ca", dest, check_rc=0)
        assert_same_tree(want, Snapshot(dest / "src", atime=False))
        return
    cli("restore", "-r", xfs_dir / "repo", "latest", dest, check_rc=0)
    assert_same_tree(want, Snapshot(dest / "src", atime=False))
    # night 2: the changed files (new bytes in place, one grown) cloned ahead too
    for i in (2, 6, 9, 15):
        with open(src / f"f{i:02d}", "r+b") as f:
            f.seek(10 * KiB)
            f.write(random.Random(i).randbytes(80 * KiB))
            os.fsync(f.fileno())
    with open(src / "f11", "ab") as f:
        f.write(random.Random(11).randbytes(600 * KiB))
    os.sync()
    want2 = Snapshot(src, atime=False)
    s2 = cli_json("backup", "--json", *target, src, check_rc=0)
    assert s2["cloned_ahead_files"] == 4, s2  # the first changed file: nothing ahead of it
    dest2 = xfs_dir / "out2"
    cli("restore", "-r", xfs_dir / "repo", "latest", dest2, check_rc=0)
    assert_same_tree(want2, Snapshot(dest2 / "src", atime=False))


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _settled(before: set[str]) -> set[str]:
    """The descriptors open now that were not before, once the workers'
    last chunks (their descriptors closed when they end) are done."""
    deadline = time.monotonic() + 10
    while _fds() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    return _fds() - before


def test_a_failed_backup_with_files_prepared_closes_them(btrfs_dir, monkeypatch):
    """The sink fails (ENOSPC) at a stored chunk while later files are
    cloned and their chunks on the workers: the backup fails with that
    error, and every file it opened and cloned is closed."""
    src = btrfs_dir / "src"
    _tree(src)
    held = []
    real_take = CloneAhead.take

    def take(self, n):
        held.append(len(self.ready))
        return real_take(self, n)

    stores = []

    def store(self, fd, offset, length, chunk):
        stores.append(length)
        if len(stores) == 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out.ca")
        return real_store(self, fd, offset, length, chunk)

    real_store = ArchiveSink.store
    monkeypatch.setattr(CloneAhead, "take", take)
    monkeypatch.setattr(ArchiveSink, "store", store)
    before = _fds()
    out = btrfs_dir / "out.ca"
    with pytest.raises(OSError) as ei:
        Backup([str(src)], ArchiveSink(file_output(str(out)), str(out))).run()
    assert ei.value.errno == errno.ENOSPC
    assert max(held) >= 2, held  # files were prepared when it failed
    assert _settled(before) == set()
    assert not out.exists()


class _Signal(Exception):
    """What a signal handler raises (the command line's Interrupted is an
    Exception too)."""


def test_an_interrupt_while_the_next_are_prepared_closes_everything(btrfs_dir,
                                                                    monkeypatch):
    """A signal's handler raises while the writer, at a file that was
    prepared, prepares the next ones (in the map of a clone): that file,
    the ones prepared before, the one being prepared, the small files
    read ahead and the chunks on the workers are all let go."""
    src = btrfs_dir / "src"
    _tree(src)
    real_take, real_map = CloneAhead.take, cloneahead.extent_map
    at = {"n": None}
    raised = []

    def take(self, n):
        at["n"] = n if n in self.ready else None
        try:
            return real_take(self, n)
        finally:
            at["n"] = None

    def extent_map(fd, size, path=None):
        if at["n"] is not None and not raised:
            raised.append(at["n"])
            raise _Signal
        return real_map(fd, size, path)

    monkeypatch.setattr(CloneAhead, "take", take)
    monkeypatch.setattr(cloneahead, "extent_map", extent_map)
    before = _fds()
    out = btrfs_dir / "out.ca"
    with pytest.raises(_Signal):
        Backup([str(src)], ArchiveSink(file_output(str(out)), str(out))).run()
    assert raised, "no file was prepared when the next were"
    assert _settled(before) == set()
    assert not out.exists()


def test_a_file_read_live_takes_its_stat_at_its_turn(ext4_dir, xfs_dir, monkeypatch):
    """Where no clone can be made (ext4) a file prepared ahead is read live:
    its stat before the read is taken at its turn, so a file appended to
    after it was prepared is seen changed since the walk and stored whole,
    complete, not cut at the size the walk saw."""
    src = ext4_dir / "src"
    _tree(src, reflinks=False)
    victim = src / "f12"
    real_prepare, seen = CloneAhead._prepare, []

    def prepare(self, item):
        p = real_prepare(self, item)
        if item.node.leaf == b"f12":
            seen.append(p and p.got)
            with open(victim, "ab") as f:
                f.write(random.Random(12).randbytes(300 * KiB))
                os.fsync(f.fileno())
        return p

    monkeypatch.setattr(CloneAhead, "_prepare", prepare)
    out = xfs_dir / "out.ca"
    s = Backup([str(src)], ArchiveSink(file_output(str(out)), str(out))).run()
    assert seen and isinstance(seen[0], str), seen  # prepared, not cloned
    assert [(os.path.basename(p), why) for p, why in s.changed] == \
        [("f12", "changed between scan and read; stored whole")], s.changed
    cli("restore", out, xfs_dir / "dest", check_rc=0)
    assert (xfs_dir / "dest" / "src" / "f12").read_bytes() == victim.read_bytes()


def test_a_file_rewritten_before_its_clone_is_stored_as_cloned(reflink_dir, xfs_dir,
                                                                monkeypatch):
    """A file rewritten after the walk mapped it and before it is cloned
    ahead: its plan is stale (another map), nothing is read ahead for it,
    and it is stored whole as its clone holds it, the new bytes."""
    src = reflink_dir / "src"
    _tree(src)
    victim = src / "f12"
    new = random.Random(77).randbytes(victim.stat().st_size)
    real_prepare, seen = CloneAhead._prepare, []

    def prepare(self, item):
        if item.node.leaf != b"f12":
            return real_prepare(self, item)
        with open(src / "f12.new", "wb") as f:  # another file: other extents, another map
            f.write(new)
            os.fsync(f.fileno())
        os.rename(src / "f12.new", victim)
        p = real_prepare(self, item)
        seen.append((p, p and len(p.jobs)))
        return p

    monkeypatch.setattr(CloneAhead, "_prepare", prepare)
    out = xfs_dir / "out.ca"
    s = Backup([str(src)], ArchiveSink(file_output(str(out)), str(out))).run()
    assert len(seen) == 1 and seen[0][0] is not None and isinstance(seen[0][0].got, int)
    assert seen[0][1] == 0  # stale: nothing read ahead
    assert s.changed == []  # a clone is one instant: nothing to report
    want = Snapshot(src, atime=False)
    cli("restore", out, xfs_dir / "dest", check_rc=0)
    assert (xfs_dir / "dest" / "src" / "f12").read_bytes() == new
    assert_same_tree(want, Snapshot(xfs_dir / "dest" / "src", atime=False))


def test_a_file_written_after_its_clone_ahead_is_stored_as_cloned(reflink_dir, xfs_dir,
                                                                  monkeypatch):
    """A file written in place after it was cloned ahead and before its
    turn: what is stored is the clone, the instant it was taken (its
    bytes and its times), and nothing is reported."""
    src = reflink_dir / "src"
    _tree(src)
    victim = src / "f16"  # 3 MiB: its chunks read ahead
    old = victim.read_bytes()
    old_mtime = victim.stat().st_mtime_ns
    real_prepare, seen = CloneAhead._prepare, []

    def prepare(self, item):
        p = real_prepare(self, item)
        if item.node.leaf == b"f16":
            seen.append(p and len(p.jobs))
            with open(victim, "r+b") as f:
                f.write(b"N" * len(old))
                os.fsync(f.fileno())
        return p

    monkeypatch.setattr(CloneAhead, "_prepare", prepare)
    out = xfs_dir / "out.ca"
    s = Backup([str(src)], ArchiveSink(file_output(str(out)), str(out))).run()
    assert seen and seen[0] > 0, seen  # its chunks were read ahead
    assert s.changed == []
    cli("restore", out, xfs_dir / "dest", check_rc=0)
    got = xfs_dir / "dest" / "src" / "f16"
    assert got.read_bytes() == old
    assert got.stat().st_mtime_ns == old_mtime
