"""The files cache (issue 36, docs/REPOSITORY.md "Files cache"): a file whose
stat proves it unchanged since the last backup of its set is not opened
(strace sees no open of it), a change that put the mtime back is still
caught (its ctime), new sharing with an unchanged file is still found (df
sees the restore share it), and a cache lost, damaged, stale or of another
repository costs speed only.  On real loopback filesystems."""
from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from helpers.cli import CliServer, cli, cli_json
from helpers.space import Usage
from helpers.treeutil import MiB, Snapshot, assert_same_tree

from cloneaware.repo.filescache import RACY_NS
from cloneaware.testing import reflink_copy, timeout, write_random

pytestmark = pytest.mark.root

#: the files cache does not trust a file changed this close to a backup's
#: start (cloneaware/repo/filescache.py RACY_NS); the tests wait it out
SETTLE = 0.25


def init(repo: Path) -> None:
    cli("init", "-r", repo, check_rc=0)


def backup(repo: Path, *paths, prefix=()) -> tuple[dict, str]:
    r = cli("backup", "--json", "-r", repo, *paths, check_rc=0, prefix=prefix,
            timeout=timeout(300))
    return json.loads(r.stdout), r.err


def restore(repo: Path, dest: Path, snap: str = "latest") -> None:
    cli("restore", "-r", repo, snap, dest, check_rc=0, timeout=timeout(300))


def cache_files() -> list[Path]:
    return sorted(Path(os.environ["CLONEAWARE_STATE_DIR"]).glob("*.files/*.cache"))


def small_tree(root: Path, n: int = 40) -> Path:
    src = root / "src"
    (src / "etc").mkdir(parents=True)
    for i in range(n):
        (src / "etc" / f"keep-{i:03d}.conf").write_bytes(b"value %d\n" % i * (i + 1))
    write_random(src / "keep-big.img", 2 * MiB, 1)  # cloned for its point in time: anchored
    os.link(src / "etc" / "keep-000.conf", src / "keep-000.link")
    os.setxattr(src / "etc" / "keep-001.conf", "user.colour", b"blue")
    os.sync()
    time.sleep(SETTLE)
    return src


def test_an_unchanged_file_is_not_opened_and_comes_back_exact(btrfs_dir, tmp_path):
    repo = tmp_path / "repo"
    init(repo)
    src = small_tree(btrfs_dir)
    s1, _ = backup(repo, src)
    assert s1["unopened_files"] == 0 and len(cache_files()) == 1
    (src / "etc" / "changed.conf").write_bytes(b"new on night 2\n")
    log = tmp_path / "strace.log"
    s2, _ = backup(repo, src, prefix=["strace", "-f", "-qq", "-e",
                                      "trace=open,openat,openat2", "-o", log])
    opened = log.read_text()
    # the oracle sees opens: the new file was opened (and read)
    assert re.search(r'"[^"]*changed\.conf"', opened), opened[-2000:]
    kept = re.findall(r'"([^"]*keep-[^"]*)"', opened)
    assert kept == [], kept  # not one unchanged file (nor its hard link) was opened
    assert s2["unopened_files"] == 40 + 1, s2  # the confs and the image (a second name
    # of an inode is a hard link entry)
    assert s2["bytes_read"] == len(b"new on night 2\n"), s2
    assert s2["unchanged_bytes"] >= 2 * MiB
    dest = btrfs_dir / "dest"
    restore(repo, dest)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))
    assert os.stat(dest / "src" / "keep-000.link").st_ino == \
        os.stat(dest / "src" / "etc" / "keep-000.conf").st_ino
    # night 3 carries the image's anchor on: a rewrite of part of it reads that part
    time.sleep(SETTLE)
    backup(repo, src)
    with open(src / "keep-big.img", "r+b") as f:
        f.write(b"\x07" * 65536)
    s4, _ = backup(repo, src)
    assert s4["bytes_read"] <= 1 * MiB, s4  # not the whole image: the anchor proved the rest
    restore(repo, btrfs_dir / "dest4")
    assert_same_tree(Snapshot(src, atime=False), Snapshot(btrfs_dir / "dest4" / "src"))


@pytest.mark.parametrize("fs", ["btrfs", "xfs"])
def test_changes_that_put_the_mtime_back_are_caught_by_ctime(fs, btrfs_dir, xfs_dir,
                                                            tmp_path):
    top = btrfs_dir if fs == "btrfs" else xfs_dir
    repo = tmp_path / "repo"
    init(repo)
    src = small_tree(top)
    backup(repo, src)
    edits = {
        "etc/keep-002.conf": lambda p: p.write_bytes(b"edited\n"),  # same size or not
        "etc/keep-003.conf": lambda p: p.write_bytes(b"X" * p.stat().st_size),  # same size
        "etc/keep-001.conf": lambda p: os.setxattr(p, "user.colour", b"red"),
        "etc/keep-004.conf": lambda p: os.chmod(p, 0o600),
        "keep-big.img": lambda p: _poke(p, 1 * MiB),
    }
    for rel, edit in edits.items():
        p = src / rel
        st = p.stat()
        edit(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back
    s2, _ = backup(repo, src)
    assert s2["unopened_files"] == 41 - len(edits), s2
    dest = top / "dest"
    restore(repo, dest)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))


def _poke(p: Path, at: int) -> None:
    with open(p, "r+b") as f:
        f.seek(at)
        f.write(b"\xaa" * 4096)


def test_new_sharing_with_an_unchanged_file_is_found(btrfs_dir, tmp_path):
    """A clone made of an unchanged file is found sharing its blocks: the
    unchanged file is mapped after all, and the clone is neither read nor
    restored as a copy (df)."""
    repo = tmp_path / "repo"
    init(repo)
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "golden.img", 8 * MiB, 3)
    (src / "note.txt").write_bytes(b"hello\n")
    os.sync()
    time.sleep(SETTLE)
    backup(repo, src)
    reflink_copy(src / "golden.img", src / "clone.img")
    os.sync()
    s2, _ = backup(repo, src)
    assert s2["bytes_read"] == 0, s2  # the clone's blocks are the unchanged image's
    assert s2["unopened_files"] == 1, s2  # note.txt; golden.img was mapped after all
    dest = btrfs_dir / "dest"
    with Usage(btrfs_dir) as u:
        restore(repo, dest)
    assert u.delta <= 8 * MiB + 512 * 1024, u.delta  # one copy of the image, by statfs
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))


def _break_cache(how: str, other_cache: Path | None, old: bytes) -> None:
    (path,) = [p for p in cache_files() if p != other_cache]
    raw = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "flipped":
        b = bytearray(raw)
        b[-40] ^= 0x01
        path.write_bytes(bytes(b))
    elif how == "stale":  # the cache of the snapshot before the parent
        path.write_bytes(old)
    elif how == "foreign":  # another repository's cache of the same tree
        assert other_cache is not None
        path.write_bytes(other_cache.read_bytes())


@pytest.mark.parametrize("how", ["deleted", "truncated", "flipped", "stale", "foreign"])
def test_a_lost_damaged_stale_or_foreign_cache_costs_speed_only(how, xfs_dir, tmp_path):
    repo = tmp_path / "repo"
    init(repo)
    src = small_tree(xfs_dir, n=10)
    other_cache = None
    if how == "foreign":
        other = tmp_path / "other"
        init(other)
        backup(other, src)
        (other_cache,) = cache_files()
    backup(repo, src)
    (mine,) = [p for p in cache_files() if p != other_cache]
    old = mine.read_bytes()
    (src / "etc" / "keep-005.conf").write_bytes(b"night 2\n")
    time.sleep(SETTLE)
    backup(repo, src)
    # The night: a change whose stat the cache must not explain away, then the break.
    st = (src / "etc" / "keep-006.conf").stat()
    (src / "etc" / "keep-006.conf").write_bytes(b"night 3!\n"[:st.st_size] or b"!")
    os.utime(src / "etc" / "keep-006.conf", ns=(st.st_atime_ns, st.st_mtime_ns))
    _break_cache(how, other_cache, old)
    time.sleep(SETTLE)
    s3, err = backup(repo, src)
    assert s3["unopened_files"] == 0, s3  # nothing taken on the word of that cache
    if how in ("truncated", "flipped", "foreign"):
        assert "not a files cache of this backup set" in err, err
    dest = xfs_dir / "dest"
    restore(repo, dest)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))
    # and the next night has a good cache again
    time.sleep(SETTLE)
    s4, _ = backup(repo, src)
    assert s4["unopened_files"] == 11, s4
    cli("check", "-r", repo, "--read-data", check_rc=0)


@pytest.mark.parametrize("index_last", [False, True])
def test_a_file_whose_blobs_the_store_lost_is_read_again(index_last, btrfs_dir, tmp_path,
                                                        monkeypatch):
    """The packs of night 1 gone from the store (damaged, or served from
    before a prune): the index is loaded beside night 2's walk, which takes
    files on their stat meanwhile; the files whose blobs the index no longer
    has are opened and stored again, so the snapshot restores exactly.
    ``index_last``: the walk ends before the index is loaded (night 2 run
    here, with the load held back until the walk's end)."""
    repo = tmp_path / "repo"
    init(repo)
    src = small_tree(btrfs_dir)
    backup(repo, src)
    for pack in (repo / "data").rglob("*"):
        if pack.is_file():
            pack.unlink()
    if index_last:
        from cloneaware.backup.run import Backup
        from cloneaware.repo import sink as repo_sink
        from cloneaware.repo.backend import LocalBackend
        from cloneaware.repo.repository import Repository

        class Held:
            """The call run when it is waited for: after the whole walk."""

            def __init__(self, call):
                self.call = call

            def result(self):
                self.call()

            wait = result

        monkeypatch.setattr(repo_sink, "Background", Held)
        said: list[str] = []
        r = Repository.open(LocalBackend(str(repo)), warn=said.append)
        r.warn = said.append
        sink = repo_sink.RepositorySink(r, [str(src)], warn=said.append)
        s2 = Backup([str(src)], sink, warn=said.append).run().as_dict()
        assert sink.files is not None and sink.files.complete  # night 1's cache was used
        err = "\n".join(said)
    else:
        got = cli("backup", "--json", "-r", repo, src, timeout=timeout(300))
        assert got.returncode in (0, 1), str(got)
        s2, err = got.json(), got.err
    assert "not in the store" in err, err
    assert s2["unopened_files"] == 0, s2  # every blob gone: nothing taken on its stat
    assert s2["bytes_read"] >= 2 * MiB + sum(len(b"value %d\n" % i * (i + 1))
                                             for i in range(40)), s2
    dest = btrfs_dir / "dest"
    got = cli("restore", "-r", repo, s2["snapshot"], dest, check_rc=1, timeout=timeout(300))
    assert got.err.count("not in the store") == 1, got.err  # said, and restored all the same
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))


def test_a_file_written_as_the_backup_started_is_not_trusted_next_time(btrfs_dir, tmp_path):
    """A file written just before the backup started (for all its ctime can
    tell, in the same clock tick as it was read) is read again next time.
    The backup runs in a process that has imported the CLI already, so that
    it starts within the margin of the write."""
    repo = tmp_path / "repo"
    init(repo)
    src = small_tree(btrfs_dir, n=5)
    with CliServer() as srv:
        srv.run("backup", "-r", repo, src, check_rc=0)  # its imports, once
        for attempt in range(20):  # a loaded machine (pytest -n) may miss the margin
            racy = src / f"racy-{attempt}.conf"
            racy.write_bytes(b"written at the last moment\n")
            srv.run("backup", "-r", repo, src, check_rc=0)
            started = _ns(cli_json("snapshots", "--json", "-r", repo)[-1]["time"])
            if started - racy.stat().st_ctime_ns < RACY_NS:
                break
        else:
            pytest.fail(f"no backup started within {RACY_NS} ns of a write")
    s3, _ = backup(repo, src)
    assert s3["unopened_files"] == 5 + 1 + attempt, s3  # all but the last racy file
    assert s3["bytes_read"] == len(b"written at the last moment\n"), s3


def _ns(rfc3339: str) -> int:
    """2026-12-06T08:23:16.864476151Z in ns since the epoch."""
    whole, _, frac = rfc3339.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) * 10**9 + \
        int(frac.ljust(9, "0"))


def test_dry_run_and_a_cache_dir_that_cannot_be_written(btrfs_dir, tmp_path):
    repo = tmp_path / "repo"
    init(repo)
    src = small_tree(btrfs_dir, n=5)
    cli("backup", "--dry-run", "-r", repo, src, check_rc=0)
    assert cache_files() == []  # a dry run writes nothing
    backup(repo, src)
    (cache,) = cache_files()
    shutil.rmtree(cache.parent)
    cache.parent.write_bytes(b"")  # a file where the directory should be
    s2, err = backup(repo, src)
    assert "the next backup opens and maps every file" in err, err
    assert s2["snapshot"] and s2["unopened_files"] == 0


def test_a_renamed_file_is_proved_unchanged_by_the_anchor_of_its_old_name(btrfs_dir, tmp_path):
    """A renamed file has no row (its path is new) and is mapped: the anchor
    its old name left shares its blocks and proves them; none is read."""
    repo = tmp_path / "repo"
    init(repo)
    src = small_tree(btrfs_dir, n=3)
    backup(repo, src)
    os.rename(src / "keep-big.img", src / "renamed.img")
    s2, err = backup(repo, src)
    assert s2["bytes_read"] == 0 and s2["unchanged_bytes"] >= 2 * MiB, (s2, err)
    restore(repo, btrfs_dir / "dest")
    assert_same_tree(Snapshot(src, atime=False), Snapshot(btrfs_dir / "dest" / "src"))
