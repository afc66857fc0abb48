"""Repositories (issue 16, docs/REPOSITORY.md) on real loopback filesystems.

Day 1 backs up a clone family; day 2 changes it the ways a host does
overnight (1% of the golden image rewritten in 64 KiB blocks, a new clone,
a clone renamed, one deleted, a new file, an edited small file, an
unshared file overwritten in place).  Day 2 must read about what changed
(the process's block reads, from wait4's rusage, with the source's pages
evicted first), the repository must grow by about what changed, and both
snapshots must restore exactly with their sharing.  Then: the edge cases of
change detection, forget and prune, check finding damage, a killed backup,
concurrent backups, locks, several snapshots restored together, export and
import, and hostile repositories.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error, cli, cli_json, cli_popen, finished
from helpers.space import Usage
from helpers.treeutil import MiB, Snapshot, assert_close, assert_same_tree, physical_bytes

from cloneaware.testing import (
    reflink_copy,
    rewrite_blocks,
    timeout,
    write_letters,
    write_random,
)

pytestmark = pytest.mark.root

KiB = 1 << 10


# --- helpers -------------------------------------------------------------------------

def evict(root: Path) -> None:
    """Drop the page cache of every file under root (so reads hit the disk)."""
    os.sync()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def device_reads(path: Path) -> int:
    """Bytes the filesystem holding ``path`` has read from its block device
    (/sys/block/DEV/stat), metadata and readahead included: what a backup
    of it really cost in reads, whatever the interpreter maps."""
    from cloneaware.source.anchors import Mounts

    top = Mounts().top(os.fsencode(path))
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4].encode() == top:
            dev = fields[fields.index("-") + 2]
            break
    else:
        raise AssertionError(f"no mount for {path}")
    name = os.path.basename(os.path.realpath(dev))
    return int(open(f"/sys/block/{name}/stat").read().split()[2]) * 512


def measured(source: Path, *args) -> tuple[dict, int]:
    """Run the CLI; its JSON and the bytes read from the device under ``source``
    while it ran (this worker's tests run one at a time on that device)."""
    before = device_reads(source)
    r = cli(*args, check_rc=0, timeout=timeout(300))
    return json.loads(r.stdout), device_reads(source) - before


def data_bytes(repo: Path) -> int:
    return sum(f.stat().st_size for f in (repo / "data").rglob("*") if f.is_file())


def repo_bytes(repo: Path) -> int:
    return sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())


def init(repo: Path, *extra) -> None:
    cli("init", "-r", repo, *extra, check_rc=0)


def new_repo(tmp_path: Path, root: Path) -> tuple[Path, Path]:
    """A repository made under tmp_path, and an empty source directory
    ``root``/src for it."""
    repo = tmp_path / "repo"
    init(repo)
    src = root / "src"
    src.mkdir()
    return repo, src


def backup(repo: Path, *paths, extra=(), rc: int = 0) -> dict:
    return cli_json("backup", "--json", "-r", repo, *extra, *paths, check_rc=rc,
                    timeout=timeout(300))


def day1(root: Path) -> Path:
    fam = root / "fam"
    (fam / "images").mkdir(parents=True)
    (fam / "etc").mkdir()
    (fam / "data").mkdir()
    write_random(fam / "images" / "golden.img", 32 * MiB, 1)
    for i in range(3):
        c = fam / "images" / f"clone{i}.img"
        reflink_copy(fam / "images" / "golden.img", c)
        rewrite_blocks(c, 0.02, 10 + i)
    for i in range(20):
        (fam / "etc" / f"conf{i:03d}").write_bytes(b"setting %d\n" % i * (i + 1))
    write_random(fam / "data" / "db.bin", 2 * MiB, 5)
    os.sync()
    return fam


def day2(fam: Path) -> int:
    """The night's changes; returns the bytes of new content."""
    changed = rewrite_blocks(fam / "images" / "golden.img", 0.01, 77)
    reflink_copy(fam / "images" / "golden.img", fam / "images" / "clone-new.img")
    os.rename(fam / "images" / "clone1.img", fam / "images" / "clone1-renamed.img")
    os.unlink(fam / "images" / "clone2.img")
    write_random(fam / "data" / "new.bin", 1 * MiB, 6)
    changed += 1 * MiB
    (fam / "etc" / "conf003").write_bytes(b"edited on day 2\n")
    changed += 16
    with open(fam / "data" / "db.bin", "r+b") as f:  # in place, same size
        f.seek(512 * KiB)
        f.write(os.urandom(256 * KiB))
        f.flush()
        os.fsync(f.fileno())
    changed += 256 * KiB
    os.sync()
    return changed


def restore(repo: Path, snap: str, dest: Path, *extra) -> dict:
    return cli_json("restore", "--json", "-r", repo, *extra, snap, dest, check_rc=0,
                    timeout=timeout(300))


# --- day 1, day 2 ----------------------------------------------------------------------

def test_incremental_reads_and_adds_what_changed(reflink_dir, tmp_path):
    repo = tmp_path / "repo"
    init(repo)
    fam = day1(reflink_dir / "src")
    want1 = Snapshot(fam, atime=False)
    phys1 = physical_bytes(fam)
    s1 = backup(repo, fam)
    assert s1["snapshot"] and s1["captured_by_clone"] == 5  # 4 images and db.bin
    assert_close(s1["added_bytes"], phys1, 0.02, "day 1 adds the physical data")
    size1 = repo_bytes(repo)

    changed = day2(fam)
    want2 = Snapshot(fam, atime=False)
    phys2 = physical_bytes(fam)
    evict(reflink_dir / "src")
    s2, read = measured(fam, "backup", "--json", "-r", repo, fam)
    grown = repo_bytes(repo) - size1
    # read about what changed, add about what changed
    assert s2["bytes_read"] <= 2 * changed, (s2["bytes_read"], changed)
    assert read <= 2 * changed + 1 * MiB, (read, changed)  # + metadata, readahead
    assert s2["added_bytes"] <= 1.25 * changed, (s2["added_bytes"], changed)
    assert grown <= 1.25 * changed + 512 * KiB, (grown, changed)
    assert s2["unchanged_bytes"] >= 32 * MiB  # the images' shared data, proved unread
    snaps = cli_json("snapshots", "--json", "-r", repo)
    assert [s["id"] for s in snaps] == [s1["snapshot"], s2["snapshot"]]
    assert snaps[1]["hostname"] == socket.gethostname() and snaps[1]["paths"] == [str(fam)]

    for snap, want, phys, name in ((s1["snapshot"][:10], want1, phys1, "d1"),
                                   (s2["snapshot"], want2, phys2, "d2")):
        dest = reflink_dir / name
        with Usage(reflink_dir) as u:
            restore(repo, snap, dest)
        assert_same_tree(want, Snapshot(dest / "fam"))
        assert u.delta <= 1.02 * phys + 256 * KiB, (name, u.delta, phys)  # by df
        assert_close(physical_bytes(dest), phys, 0.02, f"restored {name}")
    cli("check", "-r", repo, "--read-data", check_rc=0)


def test_change_detection_edge_cases(xfs_dir, tmp_path):
    """A file edited with its mtime put back (only ctime tells), read by the
    metadata rule; and on XFS a file whose clones were all deleted before it
    was overwritten in place: its anchor still shares its blocks, so the
    write moved them.  Without an anchor, the physical addresses would not
    have moved at all (the last part shows it): trusting them would miss it."""
    repo, src = new_repo(tmp_path, xfs_dir)
    small = src / "small.conf"
    small.write_bytes(b"a" * 1000)
    big = src / "big.img"
    write_random(big, 4 * MiB, 3)
    reflink_copy(big, src / "clone.img")
    os.sync()
    backup(repo, src)
    st = small.stat()
    small.write_bytes(b"b" * 1000)
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.unlink(src / "clone.img")  # no user clone left: only our anchor shares big.img
    fd = os.open(big, os.O_WRONLY)
    try:
        bst = os.fstat(fd)
        os.pwrite(fd, b"\xee" * 65536, 1 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.utime(big, ns=(bst.st_atime_ns, bst.st_mtime_ns))
    s2 = backup(repo, src)
    assert s2["bytes_read"] >= 65536 + 1000, s2
    dest = xfs_dir / "dest"
    restore(repo, "latest", dest)
    assert (dest / "src" / "small.conf").read_bytes() == b"b" * 1000
    assert (dest / "src" / "big.img").read_bytes() == big.read_bytes()

    # Without any clone (no anchor), XFS overwrites the unshared block in place:
    # the map, hence every physical address, is the same before and after.
    from cloneaware.source.mapping import fiemap

    lone = xfs_dir / "lone.img"
    write_random(lone, 4 * MiB, 4)
    with open(lone, "r+b") as f:
        before = fiemap(f.fileno())
        os.pwrite(f.fileno(), b"\x11" * 65536, 1 * MiB)
        os.fsync(f.fileno())
        after = fiemap(f.fileno())
    assert [tuple(r)[:3] for r in before] == [tuple(r)[:3] for r in after]


def test_no_point_in_time_uses_the_metadata_rule(btrfs_dir, tmp_path):
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "a.img", 2 * MiB, 1)
    write_random(src / "b.img", 2 * MiB, 2)
    os.sync()
    time.sleep(0.2)  # older than the files cache's racy margin (filescache.RACY_NS)
    backup(repo, src, extra=["--no-point-in-time"])
    assert not (btrfs_dir / ".cloneaware-anchors").exists()
    st = (src / "b.img").stat()
    with open(src / "b.img", "r+b") as f:
        f.write(b"\0" * 4096)
    os.utime(src / "b.img", ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime tells
    s2 = backup(repo, src, extra=["--no-point-in-time"])
    assert s2["unchanged_bytes"] == 2 * MiB and s2["bytes_read"] == 2 * MiB, s2
    assert s2["added_bytes"] <= 1 * MiB  # one grid cell of b.img changed
    restore(repo, "latest", btrfs_dir / "d")
    assert (btrfs_dir / "d" / "src" / "b.img").read_bytes() == (src / "b.img").read_bytes()


def test_anchors_are_replaced_tampered_ones_distrusted_and_scan_reports_them(
        btrfs_dir, tmp_path):
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "a.img", 4 * MiB, 1)
    s1 = backup(repo, src)
    top = btrfs_dir.parent  # the shared filesystem's mount point
    anchors = top / ".cloneaware-anchors"
    assert (anchors / "CLONEAWARE-ANCHORS").is_file()
    sets = list(anchors.glob("*/*/*"))
    assert [p.name for p in sets if p.name == s1["snapshot"]] == [s1["snapshot"]]
    s2 = backup(repo, src)
    assert s2["bytes_read"] == 0 and s2["unchanged_bytes"] == 4 * MiB
    mine = [p for p in anchors.glob("*/*/*") if p.name in (s1["snapshot"], s2["snapshot"])]
    assert [p.name for p in mine] == [s2["snapshot"]]  # the old set is gone
    # a backup never stores the anchors, even when backing up the whole mount
    names = [e["path"] for e in cli_json("ls", "--json", "-r", repo, "latest")["entries"]]
    assert not any(".cloneaware-anchors" in n for n in names)
    # scan says what they pin: a rewrite leaves the old blocks with the anchor
    # (the whole file: on Btrfs an extent the live file still uses in part
    # stays whether or not the anchor does, and is not counted; test_anchors.py)
    write_random(src / "a.img", 4 * MiB, 9)
    out = cli_json("scan", "--json", src)
    assert out["anchors"]["files"] >= 1 and out["anchors"]["pinned_bytes"] >= 4 * MiB
    # someone writes the anchor: it proves nothing any more, the file is read
    anchor = mine[0] / "1"
    os.chmod(anchor, 0o600)
    with open(anchor, "r+b") as f:
        f.write(b"x")
    _s3 = backup(repo, src)
    assert _s3["bytes_read"] == 4 * MiB, _s3
    restore(repo, "latest", btrfs_dir / "d")
    assert (btrfs_dir / "d" / "src" / "a.img").read_bytes() == (src / "a.img").read_bytes()


def test_an_unreadable_anchors_record_is_said(btrfs_dir, tmp_path):
    """Issue 29: an ANCHORS record that could not be read was dropped without
    a word, and the next backup read every file again without saying why.
    Now it says so (and still reads the files: nothing unproved is trusted)."""
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "a.img", 4 * MiB, 3)
    s1 = backup(repo, src)
    (rec,) = (btrfs_dir.parent / ".cloneaware-anchors").glob(f"*/*/{s1['snapshot']}/ANCHORS")
    rec.unlink()
    rec.mkdir()  # there, but not a record anyone can read
    with open(src / "a.img", "r+b") as f:  # a change: its anchor is needed
        f.write(b"\1" * 65536)
    r = cli("backup", "--json", "-r", repo, src, timeout=timeout(300))
    assert r.returncode == 0, str(r)
    assert r.json()["bytes_read"] == 4 * MiB
    assert "ANCHORS" in r.err and "read again" in r.err, str(r)


# --- forget, prune, check, kills, concurrency ----------------------------------------------

def test_forget_prune_shrink_and_keep_the_rest_exact(btrfs_dir, tmp_path):
    repo, src = new_repo(tmp_path, btrfs_dir)
    ids, states = [], []
    for day in range(4):
        write_random(src / f"day{day}.bin", 2 * MiB, 100 + day)
        if day:
            (src / f"day{day - 1}.bin").unlink()
        ids.append(backup(repo, src)["snapshot"])
        states.append(Snapshot(src, atime=False))
    before = data_bytes(repo)
    out = cli_json("forget", "--json", "-r", repo, "--keep-last", "2", "--prune")
    assert sorted(s["id"] for s in out["removed"]) == sorted(ids[:2])
    assert data_bytes(repo) < before - 3 * MiB
    assert [s["id"] for s in cli_json("snapshots", "--json", "-r", repo)] == ids[2:]
    for i in (2, 3):
        dest = btrfs_dir / f"r{i}"
        restore(repo, ids[i], dest)
        assert_same_tree(states[i], Snapshot(dest / "src"))
    cli("check", "-r", repo, "--read-data", check_rc=0)
    r = cli("forget", "-r", repo, check_rc=2)
    assert b"--keep-last" in r.stderr


def test_check_finds_a_flipped_byte_and_names_the_pack(btrfs_dir, tmp_path):
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "f.bin", 3 * MiB, 1)
    backup(repo, src)
    cli("check", "-r", repo, check_rc=0)
    pack = max((p for p in (repo / "data").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[1000] ^= 0x40
    pack.write_bytes(bytes(data))
    cli("check", "-r", repo, check_rc=0)  # without --read-data the packs are not read
    r = cli("check", "-r", repo, "--read-data", check_rc=3)
    assert pack.name.encode() in r.stderr, r.stderr
    r = cli("restore", "-r", repo, "latest", btrfs_dir / "d", check_rc=3)
    assert b"damaged" in r.stderr and not (btrfs_dir / "d" / "src" / "f.bin").exists()


def test_killed_backup_leaves_a_repository_that_checks(btrfs_dir, tmp_path):
    repo = tmp_path / "repo"
    init(repo, "--pack-size", "1")
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a.bin", 4 * MiB, 1)
    backup(repo, src)
    for i in range(6):
        write_random(src / f"big{i}.bin", 8 * MiB, 20 + i)
    os.sync()
    def packs() -> set[str]:
        return {f.name for f in (repo / "data").rglob("*") if len(f.name) == 64}

    first = packs()
    p = cli_popen("backup", "-r", repo, "--compress", "zstd:19", src)
    deadline = time.monotonic() + timeout(60)
    while len(packs() - first) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    orphans = packs() - first
    assert len(orphans) >= 2  # killed with packs written, not yet in an index
    assert len(cli_json("snapshots", "--json", "-r", repo)) == 1
    r = cli("check", "-r", repo, check_rc=0)
    assert b"no problems found" in r.stdout
    cli("unlock", "-r", repo, check_rc=0)  # the killed backup's lock is stale: removed
    assert not list((repo / "locks").iterdir())
    for i in range(6):  # what the killed backup stored is no longer there to store
        (src / f"big{i}.bin").unlink()
    s = backup(repo, src)
    restore(repo, s["snapshot"], btrfs_dir / "d")
    assert_same_tree(Snapshot(src, atime=False), Snapshot(btrfs_dir / "d" / "src"))
    # the orphan packs (no index lists them) go, once they are old enough
    assert orphans <= packs()
    out = cli_json("prune", "--json", "-r", repo)
    assert out["orphans_deleted"] == 0 and out["orphans_kept"] >= 2, out  # young: kept
    old = time.time() - 7200
    for f in (repo / "data").rglob("*"):
        if f.is_file():
            os.utime(f, (old, old))
    out = cli_json("prune", "--json", "-r", repo)
    assert out["orphans_deleted"] >= 2, out
    assert not orphans & packs()
    cli("check", "-r", repo, "--read-data", check_rc=0)


def test_concurrent_backups_both_land_and_common_data_is_stored_once(btrfs_dir, xfs_dir,
                                                                      tmp_path):
    """Two hosts back up at once; a golden image copied (not cloned) to both is
    stored once after prune, whatever the disk layout under each copy."""
    repo = tmp_path / "repo"
    init(repo)
    golden = tmp_path / "golden.img"
    write_random(golden, 24 * MiB, 42)
    a, b = btrfs_dir / "hostA", xfs_dir / "hostB"
    for d, seed in ((a, 1), (b, 2)):
        d.mkdir()
        shutil.copyfile(golden, d / "golden.img")
        write_random(d / "own.bin", 2 * MiB, seed)
    os.sync()
    pa = cli_popen("backup", "--json", "-r", repo, "--host", "a", a)
    pb = cli_popen("backup", "--json", "-r", repo, "--host", "b", b)
    ra, rb = finished(pa, ["backup", "a"]), finished(pb, ["backup", "b"])
    assert ra.returncode == 0 and rb.returncode == 0, (ra, rb)
    snaps = cli_json("snapshots", "--json", "-r", repo)
    assert sorted(s["hostname"] for s in snaps) == ["a", "b"]
    cli("prune", "-r", repo, check_rc=0)
    stored = data_bytes(repo)
    assert stored < (24 + 4) * MiB * 1.05, stored  # one golden image, two own files
    for host, d in (("a", a), ("b", b)):
        sid = next(s["id"] for s in snaps if s["hostname"] == host)
        dest = tmp_path / f"r-{host}"
        restore(repo, sid, dest)
        assert_same_tree(Snapshot(d, atime=False), Snapshot(dest / d.name))


def test_locks(btrfs_dir, tmp_path):
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "a", 1 * MiB, 1)
    backup(repo, src)
    from cloneaware.repo.backend import LocalBackend
    from cloneaware.repo.repository import Repository

    r = Repository.open(LocalBackend(str(repo)))
    # a live exclusive lock (ours: this pid) stops a backup; a shared one does not
    with r.lock(True, "prune"):
        res = cli("backup", "-r", repo, src, check_rc=6)
        assert b"locked by an exclusive lock of prune" in res.stderr, res.stderr
    with r.lock(False, "backup"):
        backup(repo, src)
        res = cli("prune", "-r", repo, check_rc=6)
        assert b"locked by a lock of backup" in res.stderr
    # a lock of a process gone from this host is stale at once
    lk = r.lock(True, "prune")
    lk.__enter__()
    lk._stop.set()
    name = lk.name
    dead = subprocess.Popen(["true"])
    dead.wait()
    r.backend.write(name, r.encode_object(3, json.dumps({
        "time": "2026-01-01T00:00:00Z", "time_ns": time.time_ns(),
        "hostname": socket.gethostname(), "username": "root", "pid": dead.pid,
        "exclusive": True, "operation": "prune"}).encode()))
    backup(repo, src)
    # another host's lock is live for 30 minutes, then stale: by its own time
    # and by the time the store wrote it (the file's mtime), so that a writer
    # whose clock is behind does not have its live lock taken as stale, and
    # one whose clock is ahead does not keep a dead lock live
    other = f"locks/{'ab' * 32}"
    for age, written, rc in ((60, 0, 6), (3600, 0, 6), (-7200, 3600, 0), (3600, 3600, 0)):
        r.backend.write(other, r.encode_object(3, json.dumps({
            "time": "x", "time_ns": time.time_ns() - age * 10**9, "hostname": "elsewhere",
            "username": "root", "pid": 1, "exclusive": True, "operation": "prune"}).encode()))
        t = time.time() - written
        os.utime(repo / other, (t, t))
        cli("backup", "-r", repo, src, check_rc=rc)
    out = cli("unlock", "-r", repo, check_rc=0)
    assert b"removed 2 locks" in out.stdout, out
    assert list((repo / "locks").iterdir()) == []
    r.close()


#: a lock rewritten every 0.1 s, stale after 1.5 s: lost after 1.3 s without a write
#: (a margin a lock write slowed by a busy test machine still fits in)
REFRESH, STALE = 0.1, 1.5
LOST = STALE - 2 * REFRESH
SHORT_LOCKS = {"CLONEAWARE_LOCK_REFRESH": str(REFRESH), "CLONEAWARE_LOCK_STALE": str(STALE)}


def test_a_backup_whose_lock_cannot_be_refreshed_stops_before_it_could_go_stale(btrfs_dir):
    """The locks directory made unwritable (chattr +i) while a backup runs:
    once its lock could go stale for another host, the backup stops with
    one line and exit 6, wherever it is (not at its next pack, which is far
    off), and writes no snapshot.  The same backup, run beside it with its
    locks directory writable, lasts well over the margin and lands:
    refreshing keeps the lock.  Run side by side, the two see the same load.
    (That it does not stop at the first failed write is tested with exact
    timings in tests/unit/test_repo_lock.py.)"""
    src = btrfs_dir / "src"
    src.mkdir()
    write_letters(src / "slow.txt", 80 * MiB, 1)  # seconds of zstd:19 on the workers
    env = {**os.environ, **SHORT_LOCKS}
    ok_repo, repo = btrfs_dir / "ok", btrfs_dir / "repo"
    init(ok_repo, "--grid", "128")  # small blobs: little work under way when it stops
    init(repo, "--grid", "128")
    args = ("backup", "--compress", "zstd:19", src)
    t0 = time.monotonic()
    ok = cli_popen(*args, "-r", ok_repo, env=env)
    p = cli_popen(*args, "-r", repo, env=env)
    locks = repo / "locks"
    try:
        deadline = time.monotonic() + timeout(30)
        while not [f for f in locks.iterdir() if len(f.name) == 64]:  # not a .partial
            assert p.poll() is None and time.monotonic() < deadline, "no lock taken"
            time.sleep(0.005)
        subprocess.run(["chattr", "+i", locks], check=True)
        t1 = time.monotonic()
        r = finished(p, ["backup"], timeout=timeout(120))
        took = time.monotonic() - t1
    finally:
        subprocess.run(["chattr", "-i", locks], check=True)
    line = assert_one_line_error(r, rc=6)
    assert "the lock of backup could not be refreshed for" in line, line
    assert "Operation not permitted" in line, line
    assert "stopped before another command could take it as stale" in line, line
    assert line.endswith("; its lock was left behind (cloneaware unlock removes it once "
                         "stale)"), line
    assert list((repo / "snapshots").iterdir()) == []
    left = [f for f in locks.iterdir() if len(f.name) == 64]
    assert left  # it could not be removed; stale, now that its process is gone
    out = cli("unlock", "-r", repo, check_rc=0).stdout
    assert f"removed {len(left)} locks".encode() in out, out

    finished(ok, ["backup"], check_rc=0, timeout=timeout(120))
    full = time.monotonic() - t0
    assert full > 2 * LOST, full  # the lock outlived its margin, more than once
    assert len(list((ok_repo / "snapshots").iterdir())) == 1
    assert list((ok_repo / "locks").iterdir()) == []
    # stopped a lock's margin after the directory froze, not at its first pack (16 MiB
    # of about 40 stored: well past a third of the way) nor at its end
    assert took < full / 3, (took, full)


# --- restore, export, import ----------------------------------------------------------------

def test_several_snapshots_restored_together_share_their_data(btrfs_dir, tmp_path):
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "vm.img", 16 * MiB, 1)
    s1 = backup(repo, src)["snapshot"]
    rewrite_blocks(src / "vm.img", 0.05, 2)
    s2 = backup(repo, src)["snapshot"]
    dest = btrfs_dir / "both"
    out = restore(repo, s1[:8], dest, )
    shutil.rmtree(dest)
    with Usage(btrfs_dir) as u:
        out = cli_json("restore", "--json", "-r", repo, s1, s2, dest, check_rc=0)
    assert sorted(os.listdir(dest)) == sorted([s1[:8], s2[:8]])
    assert out["written_bytes"] <= 16 * MiB * 1.1  # the second snapshot is mostly clones
    assert u.delta <= 16 * MiB * 1.08, u.delta  # by df
    assert_close(physical_bytes(dest), int(16 * MiB * 1.05), 0.03, "two snapshots")
    assert (dest / s2[:8] / "src" / "vm.img").read_bytes() == (src / "vm.img").read_bytes()


def _same_plans(r, snaps: list, dest: Path) -> list[bytes]:
    """The fetch order quick_plan gives for restoring ``snaps`` together,
    checked against the receiver's own (a dry pass with a Planner)."""
    from cloneaware.repo.restore import Planner, quick_plan
    from cloneaware.restore.several import ManifestsRestore

    ms = [r.manifest(s) for s in snaps]
    quick = quick_plan(r, ms)
    assert quick is not None
    exact = Planner(r)
    ManifestsRestore([(m, s.short_id) for m, s in zip(ms, snaps)], str(dest)).receive(
        exact, record=True)
    assert quick.order == exact.order, [s.short_id for s in snaps]
    assert quick.sizes == exact.sizes
    return exact.order


@pytest.mark.parametrize("cache", [64 * MiB, 2560 * KiB, 3584 * KiB, 256 * KiB],
                         ids=["cache 64 MiB", "cache 2.5 MiB", "cache 3.5 MiB", "cache 256 KiB"])
def test_the_fetch_plan_read_from_blob_records_is_the_receivers_own(btrfs_dir, tmp_path,
                                                                    monkeypatch, cache):
    """restore -r plans its blob reads from the manifests' BLOB records
    (repo/restore.py quick_plan) instead of running the receiver over them
    once more: its order must be the one the receiver asks in, over ranges
    of a blob already written (cloned, not fetched), parts of a blob
    apart (fetched again once out of the cache) and several snapshots."""
    from cloneaware.repo import restore as repo_restore
    from cloneaware.repo.connect import opened
    from cloneaware.repo.restore import quick_plan, restore_snapshots

    monkeypatch.setattr(repo_restore, "CACHE", cache)  # the Planner's and the Fetcher's
    took: list = []  # what restore_snapshots planned with: the quick plan, not None
    monkeypatch.setattr(repo_restore, "quick_plan",
                        lambda *a: took.append(quick_plan(*a)) or took[-1])
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "vm.img", 12 * MiB, 1)
    write_random(src / "other.img", 2 * MiB, 3)
    s1 = backup(repo, src)["snapshot"]
    rewrite_blocks(src / "vm.img", 0.3, 2)  # its blobs' ranges now have holes
    s2 = backup(repo, src)["snapshot"]
    s3 = backup(repo, src)["snapshot"]  # the same ranges as s2's, parts of blobs apart
    again = 0
    with opened(str(repo)) as r:
        r.load_index(check_packs=True)
        snaps = {s.id: s for s in r.snapshots()}
        for chosen in ([s2], [s1, s2], [s2, s1], [s2, s3]):
            order = _same_plans(r, [snaps[i] for i in chosen], tmp_path / "plan")
            again = max(again, len(order) - len(set(order)))
        if cache < MiB:  # the small cache makes the restore fetch a blob again
            assert again > 0
        took.clear()
        got = restore_snapshots(r, [snaps[s2]], str(tmp_path / "out"))
        both = restore_snapshots(r, [snaps[s1], snaps[s2]], str(tmp_path / "both"))
    assert len(took) == 2 and None not in took
    assert got.unplanned_fetches == 0 and both.unplanned_fetches == 0
    assert_same_tree(Snapshot(src, atime=False), Snapshot(tmp_path / "out" / "src"))
    assert_same_tree(Snapshot(src, atime=False), Snapshot(tmp_path / "both" / s2[:8] / "src"))


def test_the_fetch_plan_follows_the_caches_order_of_use(btrfs_dir, tmp_path, monkeypatch):
    """A blob asked for again while cached is the most recently used: the
    next fetch evicts another one, which a later range then fetches again
    (a file made of ranges of two earlier blobs in turn, cloned, and new
    bytes between them, with room in the cache for two blobs and a half)."""
    from cloneaware import native
    from cloneaware.repo import restore as repo_restore
    from cloneaware.repo.connect import opened

    monkeypatch.setattr(repo_restore, "CACHE", 2560 * KiB)
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "old", 4 * MiB, 5)  # blobs A, B, C, D of 1 MiB
    backup(repo, src)
    q = 256 * KiB
    fs = os.open(src / "old", os.O_RDONLY)
    fd = os.open(src / "mix", os.O_RDWR | os.O_CREAT, 0o644)
    try:  # A, B, A again (cached: used last), 1 MiB new (evicts B), B again (fetched)
        for off, length, at in ((0, q, 0), (MiB, q, q), (q, q, 2 * q)):
            native.ficlonerange(fd, fs, off, length, at)
        os.pwrite(fd, os.urandom(MiB), 3 * q)
        native.ficlonerange(fd, fs, MiB + q, q, 3 * q + MiB)
    finally:
        os.close(fd)
        os.close(fs)
    backup(repo, src)
    with opened(str(repo)) as r:
        r.load_index(check_packs=True)
        order = _same_plans(r, [r.snapshots()[-1]], tmp_path / "plan")
    # A, B, the two new blobs, then B again (A stayed: it was used last)
    assert len(set(order[:4])) == 4 and order[4] == order[1], order


def test_planned_blobs_the_restore_never_asks_for_are_passed_over(btrfs_dir, tmp_path):
    """A plan that strays costs the reads it planned for nothing: the
    blobs after a skipped one are still read ahead, not one at a time."""
    from cloneaware.archive import format as fmt
    from cloneaware.repo.connect import opened
    from cloneaware.repo.pieces import walk_piece
    from cloneaware.repo.restore import Fetcher

    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "f", 6 * MiB, 4)
    backup(repo, src)
    with opened(str(repo)) as r:
        r.load_index(check_packs=True)
        data = r.manifest(r.snapshots()[-1])
        ids = walk_piece(data, len(fmt.MAGIC)).ranges.id_list()  # f's blobs, in order
        assert len(ids) == 6
        fetcher = Fetcher(r, ids)
        try:
            for bid in ids[:2] + ids[4:]:  # the third and fourth never asked for
                assert fetcher.get(bid) == r.read_blob(bid)
        finally:
            fetcher.close()
    assert (fetcher.unplanned, fetcher.passed) == (0, 2)


def test_export_and_import_keep_the_sharing(reflink_dir, tmp_path):
    repo = tmp_path / "repo"
    init(repo)
    fam = day1(reflink_dir / "src")
    want = Snapshot(fam, atime=False)
    s = backup(repo, fam)["snapshot"]
    arch = tmp_path / "x.caw"
    cli("export", "-r", repo, s, "-o", arch, check_rc=0)
    cli("verify", arch, check_rc=0)
    assert os.path.getsize(arch) < physical_bytes(fam) * 1.05
    dest = reflink_dir / "from-archive"
    with Usage(reflink_dir) as u:
        cli("restore", arch, dest, check_rc=0)
    assert_same_tree(want, Snapshot(dest / "fam"))
    assert u.delta <= 1.02 * physical_bytes(fam) + 256 * KiB, u.delta  # by df
    assert_close(physical_bytes(dest), physical_bytes(fam), 0.02, "exported")
    repo2 = tmp_path / "repo2"
    init(repo2)
    imp = cli_json("backup", "--json", "-r", repo2, "--from-archive", arch, check_rc=0)
    assert imp["files"] == len([e for e in want.entries.values() if e.get("kind") == "file"]) \
        or imp["files"] > 20
    dest2 = reflink_dir / "imported"
    with Usage(reflink_dir) as u:
        restore(repo2, "latest", dest2)
    assert_same_tree(want, Snapshot(dest2 / "fam"))
    assert u.delta <= 1.02 * physical_bytes(fam) + 256 * KiB, u.delta  # by df
    assert_close(physical_bytes(dest2), physical_bytes(fam), 0.02, "imported")
    snaps = cli_json("snapshots", "--json", "-r", repo2)
    assert snaps[0]["paths"] == ["archive:x.caw"]


# --- bad input -------------------------------------------------------------------------------

def test_usage_errors(btrfs_dir, tmp_path):
    r = cli("snapshots", "-r", tmp_path / "nothing", check_rc=2)
    assert b"no such repository" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"x")
    r = cli("init", "-r", tmp_path / "full", check_rc=2)
    assert b"not empty" in r.stderr
    r = cli("snapshots", "-r", tmp_path / "full", check_rc=2)  # the wrong -r: usage
    assert b"not a cloneaware repository" in r.stderr
    (tmp_path / "empty").mkdir()
    r = cli("snapshots", "-r", tmp_path / "empty", check_rc=2)
    assert b"not a cloneaware repository" in r.stderr
    repo = tmp_path / "repo"
    init(repo)
    cli("init", "-r", repo, check_rc=2)
    r = cli("restore", "-r", repo, "latest", tmp_path / "d", check_rc=2)
    assert b"no snapshot yet" in r.stderr
    # a password file exported for a whole job, given to an unencrypted
    # repository: a usage matter said plainly, not "damaged" (issue 31, item 6)
    (tmp_path / "pw").write_text("secret\n")
    r = cli("snapshots", "-r", repo, check_rc=2,
            env=dict(os.environ, CLONEAWARE_PASSWORD_FILE=str(tmp_path / "pw")))
    assert r.err == f"cloneaware: {repo}: this repository is not encrypted, but a password " \
        "was given; refusing to use it (if you made it unencrypted, give no password)\n"
    src = btrfs_dir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    backup(repo, src)
    backup(repo, src)
    for spec, msg in (("", b"not a snapshot id"), ("zz", b"not a snapshot id"),
                      ("0123456789", b"no snapshot 0123456789")):
        r = cli("ls", "-r", repo, spec, check_rc=2)
        assert msg in r.stderr, r.stderr
    ids = [s["id"] for s in cli_json("snapshots", "--json", "-r", repo)]
    common = os.path.commonprefix(ids)
    if len(common) < 8:
        r = cli("ls", "-r", repo, common, check_rc=2) if common else None
        assert r is None or b"names 2 snapshots" in r.stderr
    r = cli("backup", "-r", repo, "-o", tmp_path / "a.caw", src, check_rc=2)
    assert b"not both" in r.stderr
    r = cli("backup", "-r", repo, "--base", src, src, check_rc=2)
    assert b"thin archives" in r.stderr
    r = cli("restore", "-r", repo, "latest", tmp_path / "d", check_rc=0)
    r = cli("restore", "-r", repo, "latest", tmp_path / "d", check_rc=2)
    assert b"exists" in r.stderr


@pytest.mark.parametrize("what", ["config", "index", "snapshot", "key-less pack", "lock"])
def test_damaged_objects_are_refused_in_one_line(btrfs_dir, tmp_path, what):
    repo, src = new_repo(tmp_path, btrfs_dir)
    write_random(src / "f", 1 * MiB, 1)
    backup(repo, src)
    target = {
        "config": repo / "config",
        "index": next((repo / "index").iterdir()),
        "snapshot": next((repo / "snapshots").iterdir()),
        "key-less pack": next(p for p in (repo / "data").rglob("*") if p.is_file()),
        "lock": repo / "locks" / ("cd" * 32),
    }[what]
    if what == "lock":
        target.write_bytes(b"CAWO\x01\x03\x00\x00garbage")
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    # a damaged snapshot object is passed over by a listing (issue 35), so
    # the only one's damage is the error of a restore that needs it
    cmd = {"config": ("snapshots",), "index": ("check",),
           "snapshot": ("restore", "latest", tmp_path / "dest"),
           "key-less pack": ("check", "--read-data"), "lock": ("backup", src)}[what]
    r = cli(cmd[0], "-r", repo, *cmd[1:], check_rc=3)
    lines = [ln for ln in r.stderr.decode().splitlines() if ln]
    assert lines and all(ln.startswith("cloneaware: ") for ln in lines), r.stderr
    assert "Traceback" not in r.err
