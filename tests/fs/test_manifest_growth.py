"""A snapshot costs what changed, not what exists (issue 36): the manifest's
records do not depend on where an entry is (docs/FORMAT.md version 6,
"Relative references"), its blobs are cut where its content says
(docs/REPOSITORY.md, "Manifest blobs"), and access times, which every read
moves, are not recorded unless asked ("Access times").  The judge is the
repository's filesystem: statfs before and after the night, on a
filesystem of its own."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers.cli import cli
from helpers.space import Usage
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.archive import format as fmt
from cloneaware.repo import format as rf
from cloneaware.repo.backend import LocalBackend
from cloneaware.repo.repository import Repository
from cloneaware.testing import timeout

pytestmark = pytest.mark.root

DAY_NS = 86_400 * 10**9


def many_files(root: Path, dirs: int = 60, per_dir: int = 50) -> Path:
    """3,000 small files in 60 directories, with names and sizes that vary
    as a real tree's do, a hard link, a symlink and a reflinked copy of a
    directory."""
    src = root / "src"
    for d in range(dirs):
        sub = src / f"pkg-{d:02d}" / ("doc" if d % 3 else "lib")
        sub.mkdir(parents=True)
        for i in range(per_dir):
            (sub / f"file-{i:03d}-{'x' * (d % 7)}.txt").write_bytes(
                b"package %d file %d\n" % (d, i) * (1 + (d * i) % 13 + 400 * (d < 20)))
    os.link(src / "pkg-01" / "doc" / "file-000-x.txt", src / "pkg-01" / "hard")
    os.symlink("doc/file-001-x.txt", src / "pkg-01" / "soft")
    # a layer that shares its files' blocks with another (a container's):
    # read on night 1 as files later ones share with, taken from the files
    # cache on night 2; their entries must not change for that
    layer = src / "layer"
    layer.mkdir()
    for d in range(20):  # files of 8 KiB and more: in extents of their own, not inline
        subprocess.run(["cp", "-a", "--reflink=always", src / f"pkg-{d:02d}", layer],
                       check=True)
    return src


def age_directories(src: Path) -> None:
    """Every directory's atime two days back: the next readdir moves it
    (relatime), as it does every night on a real host."""
    for dirpath, _dirs, _files in os.walk(src):
        st = os.stat(dirpath)
        os.utime(dirpath, ns=(st.st_mtime_ns - 2 * DAY_NS, st.st_mtime_ns))


def backup(repo: Path, src: Path, *opts) -> dict:
    r = cli("backup", "--json", "-r", repo, *opts, src, check_rc=0, timeout=timeout(300))
    return json.loads(r.stdout)


def manifest_pieces(repo: Path) -> dict[bytes, int]:
    """The repository's manifest blobs (type 2) and their raw lengths, from
    its index objects."""
    att = Repository.open(LocalBackend(str(repo)))
    try:
        att.load_index()
        return {bid: e.raw_length for bid, e in att.index.items() if e.type == rf.T_TREE}
    finally:
        att.close()


def index_piece_bytes(repo: Path, new: set[bytes]) -> dict:
    """The length of the last snapshot's INDEX (FOOTER to INDEX), and the
    bytes of the pieces in ``new`` that hold some of it."""
    att = Repository.open(LocalBackend(str(repo)))
    try:
        att.load_index()
        snap = att.snapshots()[-1]
        ids = att.manifest_ids(snap)
        manifest = att.manifest(snap)
        footer = len(manifest) - fmt.FOOTER_SIZE
        start = fmt.Footer.decode(manifest[footer + 8:-4], footer).index_offset
        off, got = 0, 0
        for bid in ids:
            n = att.index.get(bid).raw_length
            if bid in new and off + n > start and off < footer:
                got += min(off + n, footer) - max(off, start)
            off += n
        return {"index": footer - start, "new": got}
    finally:
        att.close()


def manifest_bytes(repo: Path) -> int:
    r = cli("snapshots", "--json", "-r", repo, check_rc=0)
    return json.loads(r.stdout)[-1]["manifest_bytes"]


@pytest.mark.parametrize("atime", [False, True], ids=["default", "atime"])
def test_a_night_that_adds_one_file_stores_a_few_kib(btrfs_dir, loopfs, atime):
    repo_fs = loopfs("ext4", 256 << 20)
    repo = repo_fs.path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = many_files(btrfs_dir)
    opts = ("--atime",) if atime else ()
    backup(repo, src, *opts)
    whole = manifest_bytes(repo)
    assert whole > 400 << 10, whole  # storing it again would not fit in the bound
    age_directories(src)
    (src / "pkg-31" / "doc" / "new.conf").write_bytes(b"1\n")
    time.sleep(0.25)  # past the files cache's racy margin
    before = manifest_pieces(repo)
    with Usage(repo_fs.path) as u:
        s2 = backup(repo, src, *opts)
    assert s2["bytes_read"] == 2, s2
    new = [b for b in manifest_pieces(repo) if b not in before]
    if atime:
        # every directory's entry changed (its atime moved), so nearly every
        # piece of the manifest is new: what the default is spared
        assert u.delta > 64 << 10, u.delta
        return
    # the new file's blob, the few manifest pieces it changed, the snapshot,
    # an index and a pack: not the 3,000 unchanged entries again
    assert u.delta <= 64 << 10, (u.delta, whole)
    # nor the INDEX after the new item, which compresses well enough to hide
    # in the bound: its pieces are cut where the content says, not on a grid
    index_new = index_piece_bytes(repo, set(new))
    assert index_new["new"] <= index_new["index"] // 4, index_new
    dest = btrfs_dir / "dest"
    cli("restore", "-r", repo, "latest", dest, check_rc=0, timeout=timeout(300))
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))


def test_access_times_are_modification_times_unless_asked(btrfs_dir, tmp_path):
    src = btrfs_dir / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"data\n")
    os.utime(f, ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    plain = backup(repo, src)["snapshot"]
    kept = backup(repo, src, "--atime")["snapshot"]
    for snap, atime in ((plain, 1_500_000_000_987_654_321),
                        (kept, 1_600_000_000_123_456_789)):
        dest = btrfs_dir / f"dest-{snap}"
        cli("restore", "-r", repo, snap, dest, check_rc=0)
        st = os.stat(dest / "src" / "f")
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, 1_500_000_000_987_654_321), snap
    # an archive always keeps them: the option is refused there, not ignored
    r = cli("backup", "--atime", "-o", tmp_path / "a.caw", src)
    assert r.returncode == 2 and "repositories" in r.err and "Traceback" not in r.err, r.err
