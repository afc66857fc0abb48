"""``dump`` (issue 32): one entry of a snapshot to standard output.  A
file's bytes are hashed against the source; a directory's tar stream,
extracted by GNU tar, is compared entry by entry with a restore of the
same subtree (content, modes, owners, times, links, xattrs)."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess

import pytest
from helpers.cli import cli, cli_json
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.testing import write_random

pytestmark = pytest.mark.root

MiB = 1 << 20


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


@pytest.mark.parametrize("encrypted", [False, True])
def test_dump_a_file_and_a_directory(btrfs_dir, tmp_path, encrypted):
    src = btrfs_dir / "home"
    sub = src / "bob"
    (sub / "docs").mkdir(parents=True)
    write_random(sub / "disk.img", 3 * MiB, 1)
    with open(sub / "sparse.img", "wb") as f:  # a hole between two written MiB
        f.write(os.urandom(MiB))
        f.seek(3 * MiB)
        f.write(os.urandom(MiB // 2))
        f.truncate(5 * MiB)
    subprocess.run(["cp", "--reflink=always", sub / "disk.img", sub / "clone.img"], check=True)
    (sub / "docs" / "a.txt").write_bytes(b"a\n")
    os.link(sub / "docs" / "a.txt", sub / "docs" / "a-again.txt")
    (src / "outside.txt").write_bytes(b"outside bob\n")
    os.link(src / "outside.txt", sub / "link-to-outside.txt")
    os.symlink("docs/a.txt", sub / "sym")
    os.mkfifo(sub / "fifo", 0o640)
    os.setxattr(sub / "docs" / "a.txt", "user.note", b"text")
    os.setxattr(sub / "disk.img", "user.bin", b"\xff\x00\x01")
    os.chown(sub / "docs", 1234, 5678)
    os.chmod(sub / "docs", 0o2750)
    os.utime(sub / "clone.img", ns=(0, 1_600_000_000_123_456_789))
    with socket.socket(socket.AF_UNIX) as s:
        here = os.getcwd()
        os.chdir(sub)
        try:
            s.bind("sock")
        finally:
            os.chdir(here)
    repo = tmp_path / "repo"
    env = None
    if encrypted:
        pw = tmp_path / "pw"
        pw.write_text("correct horse\n")
        env = dict(os.environ, CLONEAWARE_PASSWORD_FILE=str(pw))
        cli("init", "-r", repo, "--encrypt", env=env, check_rc=0)
    else:
        cli("init", "-r", repo, check_rc=0)
    cli_json("backup", "--json", "-r", repo, src, env=env)
    # a night that rewrites 4 KiB inside disk.img: its ranges then end on 4 KiB
    # lines, not on those of tarfile's reads
    with open(sub / "disk.img", "r+b") as f:
        f.seek(MiB + 4096)
        f.write(os.urandom(4096))
    sid = cli_json("backup", "--json", "-r", repo, src, env=env)["snapshot"]

    for name in ("disk.img", "sparse.img", "clone.img", "docs/a.txt"):
        r = cli("dump", "-r", repo, sid[:8], f"home/bob/{name}", env=env, check_rc=0)
        assert hashlib.sha256(r.stdout).hexdigest() == _sha(sub / name), name
    r = cli("dump", "-r", repo, "latest", "home/bob/link-to-outside.txt", env=env, check_rc=0)
    assert r.stdout == b"outside bob\n"

    # a directory: tar -x of the stream is what a restore of it makes
    restored = btrfs_dir / "restored"
    cli("restore", "-r", repo, "latest", restored, "--include", "home/bob", env=env,
        check_rc=0)
    out = btrfs_dir / "untarred"
    out.mkdir()
    dump = subprocess.Popen([*_cli_argv(), "dump", "-r", str(repo), "latest", "home/bob"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    tar = subprocess.run(["tar", "-x", "-p", "--numeric-owner", "--xattrs",
                          "--xattrs-include=*", "-C", str(out)], stdin=dump.stdout,
                         capture_output=True)
    dump.stdout.close()
    err = dump.stderr.read().decode()
    assert dump.wait() == 1 and "home/bob/sock: a socket: tar cannot hold it" in err, err
    assert tar.returncode == 0, tar.stderr
    assert_same_tree(Snapshot(restored / "home" / "bob", ignore=(b"sock",), atime=False),
                     Snapshot(out / "home" / "bob", atime=False))
    # a file with holes went as a sparse member: tar made the holes again
    assert os.stat(out / "home" / "bob" / "sparse.img").st_blocks * 512 < 2 * MiB

    r = cli("dump", "-r", repo, "latest", "home/nobody", env=env)
    assert r.returncode == 2 and "no such entry in snapshot" in r.err, str(r)


def _cli_argv() -> list[str]:
    from helpers.cli import cli_command
    return cli_command()


def test_dump_an_archive_file(btrfs_dir, tmp_path):
    """``dump ARCHIVE PATH``: the archive of a clone family (its clones'
    shared ranges are REFs), a file's bytes and a directory's tar stream
    equal to what a restore of the archive makes; a file with holes
    comes out of tar with them."""
    from cloneaware.testing import make_family

    src = btrfs_dir / "fam"
    make_family(src, base_size=4 * MiB, clones=3, small_files=10)
    with open(src / "holes.img", "wb") as f:
        f.write(os.urandom(MiB))
        f.seek(6 * MiB)
        f.write(os.urandom(4096))
        f.truncate(9 * MiB)
    os.setxattr(src / "holes.img", "user.k", b"v")
    arc = tmp_path / "a.caw"
    cli("backup", "-o", arc, src, check_rc=0)
    for n in sorted(os.listdir(src)):
        if os.path.isfile(src / n):
            r = cli("dump", arc, f"fam/{n}", check_rc=0)
            assert hashlib.sha256(r.stdout).hexdigest() == _sha(src / n), n
    restored = btrfs_dir / "restored"
    cli("restore", arc, restored, check_rc=0)
    out = btrfs_dir / "untarred"
    out.mkdir()
    dump = subprocess.Popen([*_cli_argv(), "dump", str(arc), "fam"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "-p", "--numeric-owner", "--xattrs",
                          "--xattrs-include=*", "-C", str(out)], stdin=dump.stdout,
                         capture_output=True)
    dump.stdout.close()
    assert dump.wait() == 0, dump.stderr.read()
    assert tar.returncode == 0, tar.stderr
    assert_same_tree(Snapshot(restored / "fam", atime=False), Snapshot(out / "fam", atime=False))
    assert os.stat(out / "fam" / "holes.img").st_blocks * 512 < 2 * MiB
    r = cli("dump", arc, "fam/nothing")
    assert r.returncode == 2 and "no such entry in the archive" in r.err, str(r)
