"""New directories made under a temporary name and renamed once
(restore/fresh.py, issue 36): what a restore killed outright (SIGKILL, as
a power cut would) leaves is never a half file under its final path; what
it had made before its last checkpoint is there, whole; a plain rerun
removes the rest and finishes exactly."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from helpers.archivecraft import temp_files
from helpers.cli import assert_one_line_error, cli, cli_popen
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.restore.tree import TEMP_NAME

KiB = 1 << 10


def _tree(top, n: int) -> None:
    rng = random.Random(5)
    for i in range(n):
        d = top / f"d{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(rng.randbytes(rng.choice([10, 3000, 20 * KiB])))
    (top / "zbig").mkdir()
    for i in range(6):  # the tail the test holds back: big files, on workers
        (top / "zbig" / f"b{i}").write_bytes(rng.randbytes(4 << 20))


def _files_below(root) -> int:
    return sum(len(f) for _, _, f in os.walk(root))


def _wait_for(pred, p, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert p.poll() is None, f"the restore ended (exit {p.returncode}) before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def _kill_in_the_middle(archive, dest, env, until) -> None:
    """Feed the restore all but the last big files, wait for ``until``,
    then SIGKILL it."""
    data = archive.read_bytes()
    p = cli_popen("restore", "-", dest, stdin=subprocess.PIPE, env=env)
    try:
        p.stdin.write(data[:len(data) - 14 * (1 << 20)])
        p.stdin.flush()
        _wait_for(until, p, "the checkpoint")
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdin.close()


def _assert_whole_where_named(src, top) -> int:
    """Every file under a final path equals its source; how many.  (A file
    made after a checkpoint in a directory named by it has a temporary name
    until the next: not a final path, and removed by the rerun.)"""
    n = 0
    for dirpath, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith(".cloneaware-")]
        for f in files:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, top)
            if TEMP_NAME.match(os.fsencode(f)):
                continue
            assert not f.startswith(".cloneaware-"), rel
            with open(p, "rb") as a, open(src / rel, "rb") as b:
                assert a.read() == b.read(), f"{rel} is under its final path, not whole"
            n += 1
    return n


def _archived(btrfs_dir, xfs_dir, n: int):
    """A tree of ``n`` small files and its archive on Btrfs: (the tree,
    its snapshot, the archive, where it is restored on XFS)."""
    src = btrfs_dir / "src"
    _tree(src, n)
    archive = btrfs_dir / "a.ca"
    cli("backup", "--compress", "none", "-o", archive, src, check_rc=0)
    return src, Snapshot(src), archive, xfs_dir / "out"


def test_sigkill_keeps_what_was_checkpointed_and_a_rerun_finishes(btrfs_dir, xfs_dir):
    src, want, archive, dest = _archived(btrfs_dir, xfs_dir, 2500)
    # a checkpoint every 400 files: the new top directory gets its name after
    # the first, and new directories below it are then new roots of their own
    env = {**os.environ, "CLONEAWARE_FRESH_FILES": "400"}
    _kill_in_the_middle(archive, dest, env,
                        lambda: (dest / "src").is_dir() and _files_below(dest / "src") >= 1200)
    kept = _assert_whole_where_named(src, dest / "src")
    assert kept >= 400, kept
    r = cli("restore", archive, dest, check_rc=0)  # a plain rerun goes over it
    assert_same_tree(want, Snapshot(dest / "src"))
    assert not temp_files(dest), temp_files(dest)
    assert r.returncode == 0


def test_sigkill_before_any_checkpoint_leaves_no_final_path(btrfs_dir, xfs_dir):
    _src, want, archive, dest = _archived(btrfs_dir, xfs_dir, 1500)
    _kill_in_the_middle(archive, dest, None, lambda: _files_below(dest) >= 1000)
    # everything made is below the new directory's temporary name
    assert not (dest / "src").exists()
    assert temp_files(dest)
    cli("restore", archive, dest, check_rc=0)
    assert_same_tree(want, Snapshot(dest / "src"))
    assert not temp_files(dest), temp_files(dest)


@pytest.mark.parametrize("value", ["x", "0", "-5"])
def test_a_bad_checkpoint_count_is_a_usage_error(btrfs_dir, value):
    src = btrfs_dir / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    archive = btrfs_dir / "a.ca"
    cli("backup", "-o", archive, src, check_rc=0)
    r = cli("restore", archive, btrfs_dir / "out",
            env={**os.environ, "CLONEAWARE_FRESH_FILES": value})
    line = assert_one_line_error(r, 2)
    assert "CLONEAWARE_FRESH_FILES" in line, line
