"""``mount`` (issue 32): a repository as a read-only FUSE filesystem, on a
real FUSE mount.  The oracles are independent of the code under test: the
source tree itself (entry by entry, through the kernel's lstat, getxattr,
readlink and read), ``cp -a`` and ``diff -r`` run on the mounted tree, the
bytes the mount process read from the repository's packs as the kernel
counts them (/proc/PID/io), and /proc/self/mountinfo for what is left
mounted."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import time

import pytest
from helpers.cli import assert_one_line_error, cli, cli_popen
from helpers.packs import pack_of_only
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.repo.backend import pack_name
from cloneaware.testing import write_random

pytestmark = pytest.mark.root

MiB = 1 << 20


def _mounted(path) -> bool:
    want = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == want for line in f)


@contextlib.contextmanager
def mounted(repo, mnt, *extra, env=None, _archive=False):
    """``cloneaware mount`` of a repository (or ``_archive``: an archive
    file) running on ``mnt``; unmounted (and the process ended) on the way
    out, whatever happened."""
    mnt.mkdir(exist_ok=True)
    p = cli_popen("mount", *(() if _archive else ("-r",)), repo, *extra, mnt, env=env)
    try:
        deadline = time.monotonic() + 60
        while not _mounted(mnt):
            if p.poll() is not None:
                raise AssertionError(f"mount exited {p.returncode}: {p.stderr.read()!r}")
            assert time.monotonic() < deadline, "not mounted after 60 s"
            time.sleep(0.05)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if _mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)


def _sha(p) -> str:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _seen(top) -> Snapshot:
    """The tree as the project's comparator sees it (helpers/treeutil.py:
    types, modes, owners, mtimes, sizes, contents, xattrs and ACLs, link
    targets, device numbers, hard-link groups); access times left out (a
    snapshot records none unless --atime)."""
    return Snapshot(top, atime=False)


def _tree(src) -> None:
    (src / "etc" / "app").mkdir(parents=True)
    write_random(src / "disk.img", 5 * MiB, 1)
    with open(src / "sparse.img", "wb") as f:  # data, a 6 MiB hole, data, a hole at the end
        f.write(os.urandom(MiB))
        f.seek(7 * MiB)
        f.write(os.urandom(MiB // 2))
        f.truncate(10 * MiB)
    (src / "etc" / "app" / "conf").write_bytes(b"key = value\n")
    os.link(src / "etc" / "app" / "conf", src / "conf-again")
    os.symlink("etc/app/conf", src / "link")
    os.symlink("/nowhere/at/all", src / "dangling")
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (src / "empty").write_bytes(b"")
    os.setxattr(src / "disk.img", "user.bin", b"\xff\x00\x01")
    subprocess.run(["setfacl", "-m", "u:1234:rw", src / "etc" / "app" / "conf"], check=True)
    os.chown(src / "etc", 1234, 5678)
    os.chmod(src / "etc", 0o2750)
    os.utime(src / "disk.img", ns=(1_500_000_000_000_000_000, 1_600_000_000_123_456_789))


def _snapshot_dir(mnt) -> str:
    return os.path.join(mnt, "latest")


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_mounted_snapshot_is_the_source_entry_by_entry(btrfs_dir, tmp_path, encrypted):
    src = btrfs_dir / "src"
    src.mkdir()
    _tree(src)
    repo, env = tmp_path / "repo", None
    if encrypted:
        pw = tmp_path / "pw"
        pw.write_text("correct horse\n")
        env = dict(os.environ, CLONEAWARE_PASSWORD_FILE=str(pw))
        cli("init", "-r", repo, "--encrypt", env=env, check_rc=0)
    else:
        cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, "--tag", "nightly", "--tag", "../x/%", src, env=env, check_rc=0)
    want = _seen(src)
    snaps = json.loads(cli("snapshots", "--json", "-r", repo, env=env, check_rc=0).out)
    sid, host = snaps[0]["short_id"], snaps[0]["hostname"]
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt, env=env) as p:
        top = os.path.join(_snapshot_dir(mnt), "src")
        assert_same_tree(want, _seen(top))
        # the layout: every way to name the snapshot leads to the same directory
        name = os.readlink(mnt / "latest").split("/")[-1]
        assert name.endswith("-" + sid) and sorted(os.listdir(mnt / "snapshots")) == [name]
        for via in (mnt / "ids" / sid, mnt / "hosts" / host / "latest",
                    mnt / "hosts" / host / name, mnt / "tags" / "nightly" / "latest",
                    mnt / "tags" / "nightly" / name, mnt / "tags" / "..%2Fx%2F%25" / name):
            assert os.path.samefile(via, mnt / "snapshots" / name)
        # hard links share an inode; holes are not counted as blocks
        a, b = os.stat(os.path.join(top, "conf-again")), os.stat(os.path.join(top, "etc/app/conf"))
        assert (a.st_ino, a.st_nlink) == (b.st_ino, 2)
        sp = os.stat(os.path.join(top, "sparse.img"))
        assert sp.st_blocks * 512 < 2 * MiB, sp
        # what cp -a and diff -r make of it
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", top, copy], check=True)
        assert_same_tree(want, _seen(copy))
        synced = tmp_path / "synced"
        subprocess.run(["rsync", "-aHAX", f"{top}/", synced], check=True)
        assert_same_tree(want, _seen(synced))
        r = subprocess.run(["diff", "-r", "--no-dereference", src, top], capture_output=True)
        assert r.returncode == 0 or b"is a fifo while" in r.stdout, r
        assert b"differ" not in r.stdout and b"Only in" not in r.stdout, r.stdout
        # read-only
        with pytest.raises(OSError) as e:
            open(os.path.join(top, "empty"), "wb")
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    assert p.returncode == 0, p.stderr.read()
    assert not _mounted(mnt)


def _read_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_a_read_fetches_only_the_file_s_blobs_and_a_damaged_pack_fails_only_its_file(
        btrfs_dir, tmp_path):
    """/proc/PID/io counts what the mount process read: listing the tree and
    reading one 8 MiB file reads about that file, not the 40 MiB beside it;
    reading it again reads nothing (the kernel's page cache and the blob
    cache).  A pack with flipped bytes under one file gives EIO on that
    file only, and the mount says why; every other file reads."""
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "wanted", 8 * MiB, 1)
    write_random(src / "other", 40 * MiB, 2)
    write_random(src / "victim", 3 * MiB, 3)
    for i in range(20):
        (src / f"small{i}").write_bytes(b"small %d\n" % i * 100)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    victim, _ = pack_of_only(repo, (src / "victim").read_bytes())
    path = repo / pack_name(victim)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt) as p:
        top = os.path.join(_snapshot_dir(mnt), "src")
        subprocess.run(["ls", "-lR", mnt / "snapshots"], check=True, capture_output=True)
        before = _read_bytes(p.pid)
        assert _sha(os.path.join(top, "wanted")) == _sha(src / "wanted")
        got = _read_bytes(p.pid) - before
        assert 8 * MiB <= got < 10 * MiB, got
        assert _sha(os.path.join(top, "wanted")) == _sha(src / "wanted")
        assert _read_bytes(p.pid) - before - got < MiB
        with pytest.raises(OSError) as e:
            _sha(os.path.join(top, "victim"))
        assert e.value.errno == errno.EIO
        for n in ["other"] + [f"small{i}" for i in range(20)]:
            assert _sha(os.path.join(top, n)) == _sha(src / n), n
        p.send_signal(signal.SIGINT)
        p.wait(30)
        log = p.stderr.read().decode()
    assert p.returncode == 0, log
    assert "src/victim" in log and "damaged" in log, log
    assert not _mounted(mnt)


def test_unmounted_from_outside_the_mount_ends(btrfs_dir, tmp_path):
    src = btrfs_dir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x\n")
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt) as p:
        assert (mnt / "latest" / "src" / "f").read_bytes() == b"x\n"
        subprocess.run(["fusermount3", "-u", mnt], check=True)
        p.wait(30)
    assert p.returncode == 0, p.stderr.read()
    assert not _mounted(mnt)


def test_mount_refuses_clearly(tmp_path):
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    (tmp_path / "file").write_bytes(b"")
    assert "not a directory" in assert_one_line_error(
        cli("mount", "-r", repo, tmp_path / "file"), 2)
    assert "give -r REPO" in assert_one_line_error(cli("mount", tmp_path), 2)
    assert "reads an archive where it needs to" in assert_one_line_error(
        cli("mount", "-", tmp_path), 2)
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "pyfuse3.py").write_text("raise ImportError('no libfuse3 here', name='pyfuse3')\n")
    # (no empty component: that would put the working directory, a source
    # tree without its built extension maybe, before the installed package)
    env = dict(os.environ, PYTHONPATH=":".join(
        x for x in (str(fake), os.environ.get("PYTHONPATH")) if x))
    line = assert_one_line_error(cli("mount", "-r", repo, tmp_path, env=env), 2)
    assert "python3-pyfuse3" in line


def test_an_s3_repository_mounts(ceph, btrfs_dir, tmp_path):
    import secrets

    src = btrfs_dir / "src"
    src.mkdir()
    _tree(src)
    url, env = f"s3://t-{secrets.token_hex(6)}/repo", {**os.environ, **ceph.env}
    cli("init", "-r", url, env=env, check_rc=0)
    cli("backup", "-r", url, src, env=env, check_rc=0)
    mnt = tmp_path / "mnt"
    with mounted(url, mnt, env=env):
        assert_same_tree(_seen(src), _seen(os.path.join(_snapshot_dir(mnt), "src")))
    assert not _mounted(mnt)


def test_versions_lists_each_distinct_version_once(btrfs_dir, tmp_path):
    """Four nights: f goes A, B, B touched, A again (two versions, named by
    the snapshots that first held them); gone is there the first two nights
    only (one); a link is pointed elsewhere (two); same never changes (one).
    Each version is the snapshot's own entry (the same inode) and reads as
    the source did that night."""
    src = btrfs_dir / "src"
    src.mkdir()
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    nights = [
        {"f": b"A" * 5000, "gone": b"g", "same": b"s", "link": "f"},
        {"f": b"B" * 7000, "gone": b"g", "same": b"s", "link": "f"},
        {"f": None, "same": b"s", "link": "same"},  # f only touched
        {"f": b"A" * 5000, "same": b"s", "link": "same"},
    ]
    for night in nights:
        for name, v in night.items():
            p = src / name
            if name == "link":
                if os.path.lexists(p):
                    p.unlink()
                os.symlink(v, p)
            elif v is None:
                os.utime(p)
            else:
                p.write_bytes(v)
        if "gone" not in night and (src / "gone").exists():
            (src / "gone").unlink()
        cli("backup", "-r", repo, src, check_rc=0)
    snaps = json.loads(cli("snapshots", "--json", "-r", repo, check_rc=0).out)
    mnt = tmp_path / "mnt"
    with mounted(repo, mnt, "--versions"):
        names = {n.rsplit("-", 1)[1]: n for n in os.listdir(mnt / "snapshots")}
        night = [names[s["short_id"]] for s in snaps]  # oldest first
        v = mnt / "versions" / "src"
        assert sorted(os.listdir(v)) == ["f", "gone", "link", "same"]
        assert sorted(os.listdir(v / "f")) == sorted([night[0], night[1]])
        assert (v / "f" / night[0]).read_bytes() == b"A" * 5000
        assert (v / "f" / night[1]).read_bytes() == b"B" * 7000
        assert os.listdir(v / "gone") == [night[0]]
        assert os.listdir(v / "same") == [night[0]]
        assert sorted(os.listdir(v / "link")) == sorted([night[0], night[2]])
        assert os.readlink(v / "link" / night[2]) == "same"
        assert os.path.samefile(v / "f" / night[1], mnt / "snapshots" / night[1] / "src" / "f")


def test_an_archive_file_mounts_with_its_references_resolved(btrfs_dir, tmp_path):
    """An archive of a clone family (its clones' shared ranges are REF
    records to the base image, a file sharing with itself too), mounted:
    every entry as the source, each clone's bytes read through the REFs.
    A DATA record with a flipped byte gives EIO on its file only; an
    archive without its footer is refused before anything is mounted."""
    from cloneaware.testing import make_family

    src = btrfs_dir / "fam"
    make_family(src, base_size=6 * MiB, clones=3, small_files=10)
    _tree(src / "tree")
    write_random(src / "tree" / "unique.img", 2 * MiB, 99)
    arc = tmp_path / "a.caw"
    cli("backup", "-o", arc, src, check_rc=0)
    ls = json.loads(cli("ls", "--json", arc, check_rc=0).out)
    assert sum(e["referenced_bytes"] for e in ls["entries"]) > 6 * MiB, ls  # REFs are there
    mnt = tmp_path / "mnt"
    with mounted_archive(arc, mnt) as p:
        assert_same_tree(_seen(src), _seen(mnt / "fam"))
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    assert p.returncode == 0
    # a flipped byte in the first DATA of tree/unique.img (random: stored as it is)
    raw = bytearray(arc.read_bytes())
    at = raw.find((src / "tree" / "unique.img").read_bytes()[:4096])
    assert at > 0
    raw[at + 100] ^= 0xFF
    bad = tmp_path / "bad.caw"
    bad.write_bytes(bytes(raw))
    with mounted_archive(bad, mnt) as p:
        with pytest.raises(OSError) as e:
            _sha(mnt / "fam" / "tree" / "unique.img")
        assert e.value.errno == errno.EIO
        for n in ("sparse.img", "disk.img"):
            assert _sha(mnt / "fam" / "tree" / n) == _sha(src / "tree" / n)
        for n in os.listdir(src):
            if os.path.isfile(src / n):
                assert _sha(mnt / "fam" / n) == _sha(src / n), n
    (tmp_path / "cut.caw").write_bytes(arc.read_bytes()[:-10])
    line = assert_one_line_error(cli("mount", tmp_path / "cut.caw", mnt), 3)
    assert "footer" in line
    assert not _mounted(mnt)


@contextlib.contextmanager
def mounted_archive(arc, mnt):
    with mounted(arc, mnt, _archive=True) as p:
        yield p
