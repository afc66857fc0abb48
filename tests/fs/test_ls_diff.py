"""ls as a backup tool's users expect it (issue 21): ``ls -l`` (mode, owner,
size, mtime, link target), ``ls ARCHIVE PATH`` for a subtree, ``ls`` from a
pipe (a full read); and ``diff`` of two archives or two snapshots: added,
removed and changed entries, with sizes.  On real filesystems, against
os.lstat of the source."""
from __future__ import annotations

import os
import re
import stat

import pytest
from helpers.cli import assert_one_line_error, cli, cli_json

from cloneaware.display import when
from cloneaware.errors import EXIT_USAGE
from cloneaware.testing import reflink_copy, write_random

pytestmark = pytest.mark.root


@pytest.fixture
def tree(btrfs_dir):
    t = btrfs_dir / "tree"
    (t / "sub" / "deeper").mkdir(parents=True)
    write_random(t / "big.img", 2 << 20, 1)
    reflink_copy(t / "big.img", t / "sub" / "clone.img")
    (t / "keep.txt").write_bytes(b"keep\n")
    (t / "sub" / "deeper" / "note").write_bytes(b"note\n" * 10)
    os.symlink("keep.txt", t / "link")
    os.link(t / "keep.txt", t / "sub" / "hard")
    os.chmod(t / "keep.txt", 0o640)
    os.chown(t / "sub" / "deeper" / "note", 1234, 5678)
    os.utime(t / "keep.txt", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    return t


def test_ls_long(tree, tmp_path):
    arch = tmp_path / "a.caw"
    cli("backup", "-o", arch, tree, check_rc=0)
    out = cli("ls", "-l", arch, check_rc=0).out.splitlines()
    by_path = {ln.split(None, 6)[6].split(" -> ")[0].split(" link to ")[0]: ln for ln in out}
    assert len(by_path) == 9, out
    for rel in ("", "big.img", "keep.txt", "link", "sub", "sub/deeper/note"):
        p = tree / rel if rel else tree
        st = os.lstat(p)
        name = "tree/" + rel if rel else "tree"
        f = by_path[name].split()
        assert f[0] == stat.filemode(st.st_mode), (name, by_path[name])
        assert (int(f[1]), int(f[2])) == (st.st_uid, st.st_gid)
        if stat.S_ISREG(st.st_mode):
            assert int(f[3]) == st.st_size
        assert " ".join(f[4:6]) == when(st.st_mtime_ns)
    assert by_path["tree/link"].endswith("tree/link -> keep.txt")
    assert by_path["tree/sub/hard"].endswith("tree/sub/hard link to tree/keep.txt")
    assert by_path["tree/sub/hard"].split()[3] == "5"  # the linked file's size
    js = cli_json("ls", "-l", "--json", arch)["entries"]
    keep = next(e for e in js if e["path"] == "tree/keep.txt")
    assert (keep["mode"], keep["mtime_ns"]) == ("0640", 1_600_000_000_123_456_789)
    assert keep["mtime"] == "2020-09-13T12:26:40.123456789Z"


def test_ls_a_subtree_and_from_a_pipe(tree, tmp_path):
    arch = tmp_path / "a.caw"
    cli("backup", "-o", arch, tree, check_rc=0)
    whole = cli_json("ls", "--json", arch)["entries"]
    sub = cli_json("ls", "--json", arch, "tree/sub/")["entries"]
    assert [e["path"] for e in sub] == [e["path"] for e in whole
                                        if e["path"] == "tree/sub"
                                        or e["path"].startswith("tree/sub/")]
    assert [e["path"] for e in cli_json("ls", "--json", arch, "tree/keep.txt")["entries"]] \
        == ["tree/keep.txt"]
    r = cli("ls", arch, "tree/nope")
    assert assert_one_line_error(r, EXIT_USAGE) == \
        "cloneaware: tree/nope: no entry of the archive matches it"
    # from a pipe: the same listing, by a full read
    with open(arch, "rb") as f:
        piped = cli("ls", "--json", "-", stdin=f, check_rc=0).json()
    assert piped["entries"] == whole
    with open(arch, "rb") as f:
        piped_long = cli("ls", "-l", "-", "tree/sub", stdin=f, check_rc=0).out
    assert piped_long == cli("ls", "-l", arch, "tree/sub", check_rc=0).out


def test_ls_long_of_a_snapshot(tree, btrfs_dir):
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, tree, check_rc=0)
    out = cli("ls", "-l", "-r", repo, "latest", "tree/sub/deeper", check_rc=0).out
    lines = out.splitlines()[1:]  # after the snapshot's line
    assert [ln.split()[-1] for ln in lines] == ["tree/sub/deeper", "tree/sub/deeper/note"]
    assert lines[1].split()[1:4] == ["1234", "5678", "50"]


def _change(tree):
    """Between two backups: one file added, one removed, one grown, one
    chmod'ed, one rewritten in place with its size and mtime kept."""
    (tree / "new.txt").write_bytes(b"new\n")
    os.unlink(tree / "link")
    with open(tree / "sub" / "deeper" / "note", "ab") as f:
        f.write(b"more\n")
    os.chmod(tree / "keep.txt", 0o600)
    st = os.stat(tree / "big.img")
    with open(tree / "big.img", "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(4096))
    os.utime(tree / "big.img", ns=(st.st_atime_ns, st.st_mtime_ns))


def test_diff_of_two_archives(tree, tmp_path):
    a, b = tmp_path / "a.caw", tmp_path / "b.caw"
    cli("backup", "-o", a, tree, check_rc=0)
    _change(tree)
    cli("backup", "-o", b, tree, check_rc=0)
    d = cli_json("diff", "--json", a, b)
    got = {c["path"]: (c["change"], c["what"]) for c in d["changes"]}
    # entries only: big.img, rewritten with its size and mtime kept, is not seen
    # (a snapshot's blobs are: see below); the directory's mtime changed
    assert got == {"tree": ("changed", ["mtime"]),
                   "tree/new.txt": ("added", []),
                   "tree/link": ("removed", []),
                   "tree/keep.txt": ("changed", ["mode"]),
                   "tree/sub/hard": ("changed", ["mode"]),  # the same inode
                   "tree/sub/deeper/note": ("changed", ["size", "mtime"])}, got
    assert (d["added"], d["removed"], d["changed"]) == (1, 1, 4)
    # old and new values of what a person reads as one (issue 31, item 13)
    values = {c["path"]: c["values"] for c in d["changes"]}
    assert values["tree/keep.txt"] == {"mode": {"old": "0640", "new": "0600"}}, values
    note = values["tree/sub/deeper/note"]
    assert note["size"] == {"old": "50", "new": "55"} and set(note) == {"size", "mtime"}
    assert note["mtime"]["old"] < note["mtime"]["new"], note
    out = cli("diff", a, b, check_rc=0).out.splitlines()
    assert "+ tree/new.txt (4 B)" in out and "- tree/link (symlink)" in out, out
    assert "M tree/sub/hard (hardlink; mode 0640 -> 0600)" in out, out
    assert any(re.fullmatch(r"M tree \(dir; mtime \S+Z -> \S+Z\)", ln) for ln in out), out
    assert any(re.fullmatch(r"M tree/sub/deeper/note \(50 B -> 55 B; size 50 -> 55, "
                            r"mtime \S+Z -> \S+Z\)", ln) for ln in out), out
    assert out[-1] == "1 added, 1 removed, 4 changed"
    # one of them from a pipe (read whole); the same answer
    assert cli_json("diff", "--json", a, "-", input=b.read_bytes()) == d
    assert cli("diff", a, a, check_rc=0).out == "0 added, 0 removed, 0 changed\n"
    line = assert_one_line_error(cli("diff", a), EXIT_USAGE)
    assert "give two archives" in line


def test_diff_of_two_snapshots_sees_content(tree, btrfs_dir):
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    first = cli_json("backup", "--json", "-r", repo, tree)["snapshot"]
    _change(tree)
    cli("backup", "-r", repo, tree, check_rc=0)
    d = cli_json("diff", "--json", "-r", repo, first[:8], "latest")
    got = {c["path"]: c["what"] for c in d["changes"]}
    assert got["tree/big.img"] == ["content"], got
    assert got["tree/keep.txt"] == ["mode"] and got["tree/new.txt"] == [], got
