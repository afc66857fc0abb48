"""Encrypted repositories (issue 18, docs/REPOSITORY.md "Keys and
encryption"), on real loopback filesystems: nothing in plaintext, wrong
passwords refused, several passwords, tampering found in every kind of
object, dedup across hosts inside one repository."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.cli import cli, cli_json
from helpers.treeutil import MiB, Snapshot, assert_same_tree

from cloneaware.testing import reflink_copy, write_random

pytestmark = pytest.mark.root

MARKER = b"CLONEAWARE-PLAINTEXT-MARKER-7f3a"
DIR_NAME = "distinctive-directory-q9z"
FILE_NAME = "distinctive-file-k4w.txt"
HOST = "distinctive-host-m2x"


@pytest.fixture
def pw(tmp_path) -> Path:
    f = tmp_path / "pw"
    f.write_text("correct horse battery staple\n")
    return f


def enc_init(repo: Path, pw: Path) -> None:
    cli("init", "-r", repo, "--encrypt", "--password-file", pw, "--kdf-n", "16384",
        check_rc=0)


def tree(root: Path) -> Path:
    d = root / DIR_NAME
    d.mkdir(parents=True)
    (d / FILE_NAME).write_bytes(MARKER * 1000)
    write_random(d / "disk.img", 4 * MiB, 1)
    reflink_copy(d / "disk.img", d / "clone.img")
    os.sync()
    return d


def test_nothing_in_plaintext_and_round_trip(btrfs_dir, tmp_path, pw):
    repo = tmp_path / "repo"
    enc_init(repo, pw)
    src = tree(btrfs_dir / "src")
    s = cli_json("backup", "--json", "-r", repo, "--password-file", pw, "--tag", "secret-tag",
                 "--host", HOST, src, check_rc=0)
    assert s["referenced_bytes"] >= 4 * MiB - 4096  # the clone is still a reference
    for f in repo.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for needle in (MARKER, DIR_NAME.encode(), FILE_NAME.encode(), b"secret-tag",
                           HOST.encode(), str(src).encode()):
                assert needle not in data, (f, needle)
    out = cli("snapshots", "-r", repo, "--password-file", pw, check_rc=0)
    assert b"(encrypted)" in out.stdout
    chk = cli_json("check", "--json", "--read-data", "-r", repo, "--password-file", pw)
    assert chk["encrypted"] is True and chk["ok"] is True
    dest = btrfs_dir / "dest"
    cli("restore", "-r", repo, "--password-file", pw, "latest", dest, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / DIR_NAME))
    # an export leaves the encryption, and says so (issue 31, item 10)
    exp = tmp_path / "e.caw"
    r = cli("export", "-r", repo, "--password-file", pw, "latest", "-o", exp,
            check_rc=0)
    assert r.err == f"cloneaware: note: the repository is encrypted; {exp} is not (an " \
        "archive holds every file's bytes in the clear; the file is its owner's alone, " \
        "mode 0600)\n", str(r)
    assert MARKER in exp.read_bytes() and exp.stat().st_mode & 0o777 == 0o600


def test_wrong_or_missing_password(btrfs_dir, tmp_path, pw):
    repo = tmp_path / "repo"
    enc_init(repo, pw)
    src = tree(btrfs_dir / "src")
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    r = cli("backup", "-r", repo, src, env=dict(os.environ, CLONEAWARE_PASSWORD="wrong"),
            check_rc=7)
    assert r.err.count("\n") == 1 and "wrong password" in r.err
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before  # nothing written
    r = cli("snapshots", "-r", repo, env={k: v for k, v in os.environ.items()
                                          if not k.startswith("CLONEAWARE_PASSWORD")},
            check_rc=2)
    assert "password" in r.err
    cli("snapshots", "-r", repo, env=dict(os.environ, CLONEAWARE_PASSWORD_FILE=str(pw)),
        check_rc=0)
    # an unencrypted repository refuses a password: storage rewritten to look
    # unencrypted must not make a client write in the clear (refused as a
    # usage matter, exit 2: more often a password exported for a whole job;
    # a repository this host has used encrypted is refused as hostile, exit 3)
    plain = tmp_path / "plain"
    cli("init", "-r", plain, check_rc=0)
    r = cli("backup", "-r", plain, "--password-file", pw, src, check_rc=2)
    assert "not encrypted" in r.err
    r = cli("init", "-r", tmp_path / "p2", "--password-file", pw, check_rc=2)
    assert "--encrypt" in r.err


def test_keys_add_passwd_remove(btrfs_dir, tmp_path, pw):
    repo = tmp_path / "repo"
    enc_init(repo, pw)
    src = tree(btrfs_dir / "src")
    cli("backup", "-r", repo, "--password-file", pw, src, check_rc=0)
    second = tmp_path / "pw2"
    second.write_text("another password\n")
    third = tmp_path / "pw3"
    third.write_text("a third one\n")
    cli("key", "add", "-r", repo, "--password-file", pw, "--new-password-file", second,
        "--kdf-n", "16384", check_rc=0)
    assert len(list((repo / "keys").iterdir())) == 2
    for p in (pw, second):
        cli("snapshots", "-r", repo, "--password-file", p, check_rc=0)
    cli("key", "passwd", "-r", repo, "--password-file", second, "--new-password-file", third,
        "--kdf-n", "16384", check_rc=0)
    cli("snapshots", "-r", repo, "--password-file", second, check_rc=7)
    cli("snapshots", "-r", repo, "--password-file", third, check_rc=0)
    listing = cli("key", "list", "-r", repo, "--password-file", third, check_rc=0).out
    ids = [ln.lstrip("* ").split()[0] for ln in listing.splitlines()]
    mine = [ln.lstrip("* ").split()[0] for ln in listing.splitlines() if ln.startswith("*")]
    other = [i for i in ids if i not in mine]
    r = cli("key", "remove", "-r", repo, "--password-file", third, mine[0], check_rc=2)
    assert "this password opened" in r.err
    cli("key", "remove", "-r", repo, "--password-file", third, other[0], check_rc=0)
    cli("snapshots", "-r", repo, "--password-file", pw, check_rc=7)
    r = cli("key", "remove", "-r", repo, "--password-file", third, mine[0], check_rc=2)
    assert len(list((repo / "keys").iterdir())) == 1


@pytest.mark.parametrize("kind", ["data", "index", "snapshots", "keys"])
def test_a_flipped_bit_in_any_object_is_found_and_refused(btrfs_dir, tmp_path, pw, kind):
    repo = tmp_path / "repo"
    enc_init(repo, pw)
    src = tree(btrfs_dir / "src")
    cli("backup", "-r", repo, "--password-file", pw, src, check_rc=0)
    victim = max((f for f in (repo / kind).rglob("*") if f.is_file()),
                 key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    if kind == "keys":  # another valid base64 digit inside the wrapped key
        at = data.index(b'"data":"') + 20
        data[at] = ord("B") if data[at] != ord("B") else ord("C")
    else:
        data[len(data) // 3] ^= 0x04
    victim.write_bytes(bytes(data))
    cmd = ["check", "--read-data"] if kind != "keys" else ["snapshots"]
    r = cli(*cmd, "-r", repo, "--password-file", pw, check_rc=7 if kind == "keys" else 3)
    if kind != "keys":
        assert victim.name[:16] in r.err, r.err
    dest = btrfs_dir / "dest"
    r = cli("restore", "-r", repo, "--password-file", pw, "latest", dest)
    assert r.returncode in (3, 7), r
    assert not (dest / DIR_NAME / "disk.img").exists()  # never a wrong byte under a final name


def test_a_second_host_dedups_against_the_first(btrfs_dir, xfs_dir, tmp_path, pw):
    repo = tmp_path / "repo"
    enc_init(repo, pw)
    a = btrfs_dir / "a"
    b = xfs_dir / "b"
    a.mkdir()
    b.mkdir()
    write_random(a / "golden.img", 8 * MiB, 7)
    with open(a / "golden.img", "rb") as f, open(b / "golden.img", "wb") as g:
        g.write(f.read())
    write_random(b / "own.bin", 1 * MiB, 8)
    s1 = cli_json("backup", "--json", "-r", repo, "--password-file", pw, "--host", "a", a)
    s2 = cli_json("backup", "--json", "-r", repo, "--password-file", pw, "--host", "b", b)
    assert s1["added_bytes"] == 8 * MiB
    assert s2["added_bytes"] == 1 * MiB, s2  # the golden image's blobs were there
    snaps = json.loads(cli("snapshots", "--json", "-r", repo, "--password-file", pw).out)
    assert sorted(s["hostname"] for s in snaps) == ["a", "b"]
