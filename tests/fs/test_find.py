"""``find`` (issue 32): every snapshot holding an entry a pattern matches,
with its type, size and mtime.  The oracle is what the test wrote each
night and what os.lstat said of it then, not a listing of ours."""
from __future__ import annotations

import datetime
import os

import pytest
from helpers.cli import cli, cli_json

pytestmark = pytest.mark.root


def test_find_names_each_snapshot_that_holds_a_match(btrfs_dir, tmp_path):
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = btrfs_dir / "home"
    (src / "bob" / "app").mkdir(parents=True)
    (src / "ann").mkdir()
    (src / "bob" / "app" / "app.log").write_bytes(b"one\n")
    (src / "ann" / "notes.txt").write_bytes(b"ann\n")
    os.link(src / "ann" / "notes.txt", src / "ann" / "notes-link.txt")
    want: list[tuple[str, str, str, int, int]] = []  # snapshot, path, type, size, mtime
    snaps = []
    for night in range(3):
        if night == 1:
            (src / "ann" / "app.log").write_bytes(b"ann's log, night one\n")
        if night == 2:
            (src / "bob" / "app" / "app.log").write_bytes(b"one\ntwo\n")
            os.utime(src / "bob" / "app" / "app.log", ns=(0, 1_700_000_000_123_456_789))
            (src / "ann" / "app.log").unlink()
        sid = cli_json("backup", "--json", "-r", repo, src)["snapshot"]
        snaps.append(sid)
        for dirpath, dirs, files in os.walk(src):
            for name in files + dirs:
                p = os.path.join(dirpath, name)
                rel = "home/" + os.path.relpath(p, src)
                st = os.lstat(p)
                kind = "dir" if name in dirs else "file"
                if rel.endswith("/notes.txt"):
                    kind = "hardlink"  # the second name of the inode in name order
                    # ("notes-link.txt" sorts first: '-' < '.'), the size its file's
                want.append((sid, rel, kind, 0 if kind == "dir" else st.st_size,
                             st.st_mtime_ns))

    def expect(pred):
        return sorted((s, p, k, n, m // 10**9) for s, p, k, n, m in want if pred(p))

    def got(*args):
        out = cli_json("find", "--json", "-r", repo, *args)
        return sorted((f["snapshot"], f["path"], f["type"], f["size"],
                       int(datetime.datetime.fromisoformat(f["mtime"]).timestamp()))
                      for f in out)

    assert got("app.log") == expect(lambda p: p.endswith("/app.log"))
    assert len(got("app.log")) == 4  # bob's three nights, ann's one
    assert got("home/ann/*") == expect(lambda p: p.startswith("home/ann/"))
    assert got("notes*.txt") == expect(lambda p: "notes" in p)
    assert got("app") == expect(lambda p: p == "home/bob/app")  # a directory, not below it
    newest = got("--newest", "1", "app.log")
    assert [x[0] for x in newest] == [snaps[-1]] and newest[0][3] == 8, newest
    assert newest[0][4] == 1_700_000_000  # its mtime as set

    r = cli("find", "-r", repo, "app.log", check_rc=0)
    lines = r.out.splitlines()
    assert len(lines) == 4 and all(ln.split()[0] in {s[:8] for s in snaps} for ln in lines), r.out
    assert lines[-1].endswith("  home/bob/app/app.log") and " 8  2023-11-14 22:13:20  " in \
        lines[-1], lines[-1]
    r = cli("find", "-r", repo, "--host", "no-such-host", "app.log", check_rc=0)
    assert r.out == "" and "nothing matches in 0 snapshots" in r.err, str(r)
    r = cli("find", "-r", repo, "*.nothing", check_rc=0)
    assert r.out == "" and "nothing matches in 3 snapshots" in r.err, str(r)
    r = cli("find", "-r", repo)
    assert r.returncode == 2, str(r)
    r = cli("find", "app.log")
    assert r.returncode == 2 and "-r REPO" in r.err, str(r)
