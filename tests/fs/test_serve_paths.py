"""``cloneaware serve`` checks a path against --restrict-to-path, then opens
it.  Between the two, a user who can write inside the allowed tree may swap
a directory on the path for a symlink that leads out.  The server must open
every component beneath the allowed root with O_NOFOLLOW, so the swap makes
the request fail instead of writing outside.  The race is made deterministic
by swapping right after the check, in process (no ssh needed: the ssh
transport is tested in test_remote.py)."""
from __future__ import annotations

import io
import json
import os

import pytest

from cloneaware.backup import backup
from cloneaware.remote.client import PROTOCOL
from cloneaware.serve import Server
from cloneaware.testing import reflink_copy


@pytest.fixture
def tree(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(20000))
    arch = tmp_path / "a.caw"
    backup([str(src)], str(arch), compress="none")
    return allowed, outside, arch.read_bytes()


def request(srv: Server, op: str, path, body: bytes) -> tuple[int, dict]:
    line = json.dumps({"v": PROTOCOL, "op": op, "path": str(path)}).encode() + b"\n"
    out = io.BytesIO()
    rc = srv.handle(io.BufferedReader(io.BytesIO(line + body)), out)
    return rc, json.loads(out.getvalue().splitlines()[0])


def swap_after_check(monkeypatch, allowed, outside):
    check = Server._inside

    def racing(self, path):
        real = check(self, path)
        os.rename(allowed / "sub", allowed / "sub.old")
        os.symlink(outside, allowed / "sub")
        return real
    monkeypatch.setattr(Server, "_inside", racing)


@pytest.mark.parametrize("op,name", [("restore", "dst"), ("restore", "new/deeper/dst"),
                                     ("put", "x.caw")])
def test_symlink_swapped_in_after_the_check_does_not_lead_out(tree, monkeypatch, op, name):
    allowed, outside, body = tree
    swap_after_check(monkeypatch, allowed, outside)
    rc, reply = request(Server([str(allowed)], [op]), op, allowed / "sub" / name, body)
    assert rc != 0 and reply["ok"] is False, reply
    assert "Too many levels of symbolic links" in reply["error"] \
        or "Not a directory" in reply["error"], reply
    assert os.listdir(outside) == []
    assert os.listdir(allowed / "sub.old") == []


@pytest.mark.parametrize("name", ["sub/dst", "new/deeper/dst"])
def test_restore_op_creates_dest_beneath_the_root(tree, name):
    """The same requests without the swap: DEST and its missing parents are
    created, and the tree is restored."""
    allowed, outside, body = tree
    rc, reply = request(Server([str(allowed)], ["restore"]), "restore", allowed / name, body)
    assert rc == 0 and reply["ok"] is True, reply
    assert os.listdir(allowed / name) == ["src"]
    assert len((allowed / name / "src" / "f").read_bytes()) == 20000
    assert os.listdir(outside) == []


@pytest.fixture
def thin(reflink_dir):
    """A thin archive of a reflink clone of ``allowed/sub/base.img`` (the
    base), and a file outside the allowed tree with the very same bytes."""
    allowed, outside = reflink_dir / "allowed", reflink_dir / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    data = os.urandom(256 << 10)
    base = allowed / "sub" / "base.img"
    base.write_bytes(data)
    (outside / "base.img").write_bytes(data)
    clone = reflink_dir / "clone.img"
    reflink_copy(base, clone)
    with open(clone, "r+b") as f:
        f.seek(128 << 10)
        f.write(os.urandom(128 << 10))
    arch = reflink_dir / "t.caw"
    backup([str(clone)], str(arch), compress="none", base=str(base))
    return allowed, outside, base, arch.read_bytes()


def _restore_request(srv: Server, dest, body: bytes, **fields) -> tuple[int, dict]:
    line = json.dumps({"v": PROTOCOL, "op": "restore", "path": str(dest),
                       **fields}).encode() + b"\n"
    out = io.BytesIO()
    rc = srv.handle(io.BufferedReader(io.BytesIO(line + body)), out)
    return rc, json.loads(out.getvalue().splitlines()[0])


def test_base_swapped_for_a_symlink_after_the_check_is_not_followed(thin, monkeypatch):
    """Issue 35: the base of a push-restore was checked as a string, then
    opened with a plain open() that follows symlinks: a directory on its
    path swapped for a symlink in between had the server read a file
    outside its allowed tree.  Now the base is opened beneath the root,
    one component at a time, without following any."""
    allowed, outside, base, body = thin
    check = Server._inside

    def racing(self, path):
        real = check(self, path)
        if path == str(base):  # the base's path, once checked: swapped
            os.rename(allowed / "sub", allowed / "sub.old")
            os.symlink(outside, allowed / "sub")
        return real
    monkeypatch.setattr(Server, "_inside", racing)
    rc, reply = _restore_request(Server([str(allowed)], ["restore"]), allowed / "dst", body,
                                 base=str(base))
    assert rc != 0 and reply["ok"] is False, reply
    assert "Too many levels of symbolic links" in reply["error"] \
        or "Not a directory" in reply["error"], reply
    assert not (allowed / "dst" / "clone.img").exists()


def test_trust_base_is_never_taken_from_a_client(thin):
    """A client may not ask the server to skip hashing what it clones from
    its base: with the base changed since the backup, the restore is refused
    (exit 5), --trust-base or not."""
    allowed, _outside, base, body = thin
    with open(base, "r+b") as f:
        f.write(b"\0" * 4096)
    rc, reply = _restore_request(Server([str(allowed)], ["restore"]), allowed / "dst", body,
                                 base=str(base), trust_base=True)
    assert rc == 5 and reply["ok"] is False, reply
    assert "differ" in reply["error"], reply
    assert not (allowed / "dst" / "clone.img").exists()
