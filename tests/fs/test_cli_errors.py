"""How the command line fails, as a new user meets it (issue 21): signals
at any moment, a closed stderr, unreadable and empty paths, a directory
given as an archive, --json on failure, and messages that name the user's
paths, never cloneaware's temporary files.  Each case is run as a user runs
it, on a real filesystem."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from helpers.cli import assert_one_line_error, cli, cli_popen, finished
from helpers.nobody import NOBODY
from helpers.treeutil import read_whole

from cloneaware.errors import EXIT_ARCHIVE, EXIT_IO, EXIT_USAGE, EXIT_WARNINGS
from cloneaware.testing import make_loopfs

pytestmark = pytest.mark.root


def _caught(pid: int) -> int:
    """The signals process PID catches (SigCgt of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except FileNotFoundError:
        pass
    return 0


def _many_files(top, n: int = 30000) -> None:
    for d in range(n // 100):
        sub = top / f"d{d:03d}"
        sub.mkdir(parents=True)
        for i in range(100):
            (sub / f"f{i:03d}").write_bytes(b"x" * (i + 1))


def _interrupt(args: list, delay: float, after_handler: bool):
    """Start ``cloneaware ARGS``, send SIGINT DELAY seconds after it was
    spawned, or (after_handler) after cloneaware's first code installed its
    handlers (SIGTERM caught, which the interpreter alone does not do)."""
    p = cli_popen(*args)
    t0 = time.monotonic()
    if after_handler:
        while not _caught(p.pid) & (1 << (signal.SIGTERM - 1)):
            assert time.monotonic() - t0 < 30 and p.poll() is None, "cloneaware never started"
            time.sleep(0.001)
        t0 = time.monotonic()
    time.sleep(max(0.0, delay - (time.monotonic() - t0)))
    started = bool(_caught(p.pid) & (1 << (signal.SIGTERM - 1)))
    p.send_signal(signal.SIGINT)
    r = finished(p, args, timeout=60, traceback_ok=not started)
    r.started = started  # type: ignore[attr-defined]
    # the job was over before the signal came (a warm cache makes the scan
    # quicker than the first, cold run that timed it): nothing to interrupt
    r.over = r.returncode == 0 and started  # type: ignore[attr-defined]
    return r


def test_defect_6_sigint_at_any_moment_of_scan_is_one_line_and_130(btrfs_dir):
    """Defect 6: SIGINT at 0.05 s gave a 16-line traceback (typer's import),
    later rc 130 with no message (typer's own KeyboardInterrupt handler).
    Now every moment, from the first line of cloneaware that runs to the
    walk and the map, gives the same one line and 130."""
    _many_files(btrfs_dir / "tree")
    args = ["scan", btrfs_dir / "tree"]
    t = time.monotonic()
    r = finished(cli_popen(*args), args, check_rc=0, timeout=120)
    whole = time.monotonic() - t
    assert whole > 0.8, f"the scan took {whole:.2f} s: too fast to interrupt in its middle"
    cases = [(0.05, False)] + [(d, True) for d in (0, 0.005, 0.02, 0.05, 0.1, 0.2)] \
        + [(whole * f, True) for f in (0.3, 0.5, 0.7)]
    interrupted = 0
    for delay, after in cases:
        r = _interrupt(args, delay, after)
        if not r.started:
            # still in the interpreter's own start-up (site and its .pth
            # files, under load): before any line of cloneaware, not ours
            continue
        where = f"SIGINT {delay:.3f} s after {'the handlers' if after else 'spawn'}"
        if r.over and r.out.startswith("files "):
            continue  # finished, its whole report printed, before the signal came
        assert r.returncode == 130, f"{where}\n{r}"
        assert r.err == "cloneaware: interrupted by SIGINT\n", f"{where}\n{r}"
        interrupted += 1
    assert interrupted >= 5, f"only {interrupted} of {len(cases)} runs were interrupted"


def _tree_with_warnings(top, missing: int = 12):
    """Files, and PATHs that do not exist (each skipped with a warning, exit
    1): the tree and the arguments to back up."""
    top.mkdir(parents=True)
    for i in range(20):
        (top / f"file{i:02d}").write_bytes(os.urandom(4096 * (i + 1)))
    return top, [top] + [top.parent / f"missing{i:02d}" for i in range(missing)]


def test_defect_7_a_stderr_nobody_reads_does_not_kill_the_backup(btrfs_dir, tmp_path):
    """Defect 7: with its stderr (and stdout) on a pipe whose reader is gone,
    the first warning killed the backup (exit 4, no message, no archive).
    Now the warnings are lost, the backup completes, exit 1 for them."""
    tree, paths = _tree_with_warnings(btrfs_dir / "tree")
    arch = tmp_path / "a.caw"
    r, w = os.pipe()
    os.close(r)
    try:
        args = ["backup", "-o", arch, *paths]
        res = finished(cli_popen(*args, stdout=w, stderr=w), args, timeout=120)
    finally:
        os.close(w)
    assert res.returncode == EXIT_WARNINGS, str(res)
    assert read_whole(arch) == 1 + 20 and sorted(os.listdir(tmp_path)) == ["a.caw"]


def test_defect_7_b_backup_piped_into_head(btrfs_dir, tmp_path):
    """``cloneaware backup ... 2>&1 | head -3``: head reads three lines and
    exits; the rest of the warnings and the summary have no reader."""
    tree, paths = _tree_with_warnings(btrfs_dir / "tree", missing=40)
    arch = tmp_path / "a.caw"
    args = ["backup", "-o", arch, *paths]
    p = cli_popen(*args, stderr=subprocess.STDOUT)
    lines = [p.stdout.readline() for _ in range(3)]
    p.stdout.close()
    assert all(b"skipped" in ln for ln in lines), lines
    p.wait(timeout=120)
    assert p.returncode == EXIT_WARNINGS
    assert read_whole(arch) == 1 + 20


def test_defect_13_json_on_failure_is_an_error_object(btrfs_dir, tmp_path):
    """Defect 13: --json printed nothing on stdout when a command failed.
    Now every command with --json prints {"ok": false, "error", "exit"},
    for cloneaware's own errors and for click's usage errors alike; the
    error also stays on stderr as one line."""
    tree = btrfs_dir / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"data\n" * 1000)
    good = tmp_path / "good.caw"
    cli("backup", "-o", good, tree, check_rc=0)
    truncated = tmp_path / "truncated.caw"
    truncated.write_bytes(good.read_bytes()[:-100])
    damaged = tmp_path / "damaged.caw"
    b = bytearray(good.read_bytes())
    b[len(b) // 2] ^= 0xFF
    damaged.write_bytes(bytes(b))
    missing = btrfs_dir / "missing"
    cases = [
        (["scan", "--json", missing], EXIT_USAGE),
        (["backup", "--json", "-o", tmp_path / "x.caw", missing], EXIT_USAGE),
        (["backup", "--json", "-r", missing, tree], EXIT_USAGE),
        (["restore", "--json", missing, tmp_path / "d1"], EXIT_USAGE),
        (["restore", "--json", truncated, tmp_path / "d2"], EXIT_ARCHIVE),
        (["ls", "--json", truncated], EXIT_ARCHIVE),
        (["verify", "--json", damaged], EXIT_ARCHIVE),
        (["snapshots", "--json", "-r", missing], EXIT_USAGE),
        (["forget", "--json", "-r", missing, "--keep-last", "1"], EXIT_USAGE),
        (["prune", "--json", "-r", missing], EXIT_USAGE),
        (["check", "--json", "-r", missing], EXIT_USAGE),
        (["export", "--json", "-r", missing, "latest", "-o", tmp_path / "e.caw"], EXIT_USAGE),
        (["ls", "--json"], EXIT_USAGE),  # click: a missing argument
        (["scan", "--json", "--families", "-1", tree], EXIT_USAGE),  # click: a bad value
    ]
    for args, rc in cases:
        r = cli(*args)
        assert r.returncode == rc, str(r)
        obj = json.loads(r.stdout)
        assert set(obj) == {"ok", "error", "exit"} and obj["ok"] is False, str(r)
        assert obj["exit"] == rc and obj["error"], str(r)
        if args[1:] not in (["--json"],) and "--families" not in args:
            assert_one_line_error(r, rc)
            assert r.err.strip() == f"cloneaware: {obj['error']}", str(r)
    # with the archive on stdout, the error object goes where the summary goes
    r = cli("backup", "--json", "-o", "-", missing)
    assert r.returncode == EXIT_USAGE and r.stdout == b"", str(r)
    assert json.loads(r.err.splitlines()[-1])["exit"] == EXIT_USAGE


@pytest.fixture
def small_archive(btrfs_dir, tmp_path):
    src = btrfs_dir / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(b"x" * 100000)
    (src / "sub" / "g").write_bytes(b"g\n")
    os.symlink("f", src / "link")
    a = tmp_path / "a.caw"
    cli("backup", "-o", a, src, check_rc=0)
    return src, a


def test_defect_9_misuse_is_a_usage_error_naming_the_path(small_archive, tmp_path):
    """Defect 9: a directory as the archive was exit 4 for restore and 3 for
    ls; a file as DEST was "File exists", exit 4; empty paths gave messages
    without one.  Now all are exit 2 and one line naming what was given."""
    src, a = small_archive
    d = tmp_path / "dest"
    cases = [
        (["restore", "/tmp", d], "/tmp: is a directory, not an archive"),
        (["ls", "/tmp"], "/tmp: is a directory, not an archive"),
        (["verify", "/tmp"], "/tmp: is a directory, not an archive"),
        (["restore", a, "/etc/passwd"], "/etc/passwd: exists and is not a directory"),
        (["restore", a, "/etc/passwd/x"], "/etc/passwd/x: not a directory"),
        (["restore", a, ""], "an empty path was given as DEST"),
        (["restore", "", d], "an empty path was given as the archive"),
        (["ls", ""], "an empty path was given as the archive"),
        (["backup", "-o", "", src], "an empty path was given as the archive (-o)"),
        (["backup", "-o", tmp_path / "x.caw", ""], "an empty PATH was given"),
        (["scan", ""], "an empty PATH was given"),
        (["backup", "--base", "", "-o", tmp_path / "y.caw", src],
         "an empty path was given as --base"),
    ]
    for args, msg in cases:
        r = cli(*args)
        line = assert_one_line_error(r, EXIT_USAGE)
        assert line == f"cloneaware: {msg}" or line.startswith(f"cloneaware: {msg}"), str(r)
    assert not d.exists() and sorted(os.listdir(tmp_path)) == ["a.caw"]


def test_defect_10_messages_name_the_users_paths_not_temporary_files(small_archive, tmp_path,
                                                                       nobody):
    """Defect 10: a restore onto a read-only filesystem said
    ".cloneaware-0-cf963c48.tmp: Read-only file system"; a backup to a
    directory the user may not write to named the archive's temporary file.
    Now every message names DEST/... or the archive as the user gave them."""
    src, a = small_archive
    rofs = make_loopfs(tmp_path, "tmpfs", 1 << 20, mount_options="ro")
    try:
        closed = nobody.root / "closed"
        closed.mkdir()
        os.chmod(closed, 0o555)
        mine = nobody.root / "mine"
        mine.mkdir()
        os.chown(mine, NOBODY, NOBODY)
        nsrc = mine / "src"
        nsrc.mkdir()
        os.chown(nsrc, NOBODY, NOBODY)
        (nsrc / "f").write_bytes(b"y" * 100000)
        na = mine / "a.caw"
        cli("backup", "-o", na, nsrc, check_rc=0)
        os.chmod(na, 0o644)
        cases = [
            (cli, ["restore", a, rofs.path], f"{rofs.path}/tree: Read-only file system"),
            (cli, ["restore", a, rofs.path / "sub"], f"{rofs.path}/sub: Read-only file system"),
            (cli, ["backup", "-o", rofs.path / "x.caw", src],
             f"{rofs.path}/x.caw: Read-only file system"),
            (cli, ["backup", "--base", src / "f", "--sparse", "-o", rofs.path / "x.thin",
                   src / "f"], f"{rofs.path}/x.thin: Read-only file system"),
            (nobody.run, ["backup", "-o", closed / "cant.caw", nsrc],
             f"{closed}/cant.caw: Permission denied"),
            (nobody.run, ["restore", na, closed], f"{closed}/src: Permission denied"),
            (nobody.run, ["restore", na, closed / "d"], f"{closed}/d: Permission denied"),
        ]
        for run, args, msg in cases:
            r = run(*args)
            line = assert_one_line_error(r, EXIT_IO)
            assert line == f"cloneaware: {msg}", str(r)
            assert ".partial" not in line and ".cloneaware-" not in line
        assert sorted(os.listdir(closed)) == [] and os.listdir(rofs.path) == []
    finally:
        rofs.unmount()


def test_defect_8_a_path_that_cannot_be_read_at_all_is_fatal(nobody):
    """Defect 8: ``backup -o X /root`` as nobody said "skipped /root:
    Permission denied", wrote an empty archive and exited 1.  Now a PATH
    that cannot be read at all is exit 2, as a missing one is, and nothing
    is written; what cannot be read below a PATH is still skipped (exit 1)."""
    closed = nobody.root / "closed"  # like /root: 0700, root's
    (closed / "inside").mkdir(parents=True)
    (closed / "inside" / "f").write_bytes(b"secret\n")
    os.chmod(closed, 0o700)
    secret = nobody.root / "secret.txt"
    secret.write_bytes(b"secret\n")
    os.chmod(secret, 0o600)
    out = nobody.root / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    for path in (closed, secret):
        for cmd in (["backup", "-o", out / "x.caw", path], ["scan", path]):
            r = nobody.run(*cmd)
            line = assert_one_line_error(r, EXIT_USAGE)
            assert line == f"cloneaware: {path}: Permission denied (a PATH that cannot be read " \
                           "at all)", str(r)
    assert os.listdir(out) == []
    # one PATH readable, one not: still refused, nothing written
    ok = nobody.root / "ok"
    ok.mkdir()
    (ok / "f").write_bytes(b"fine\n")
    r = nobody.run("backup", "-o", out / "x.caw", ok, closed)
    assert_one_line_error(r, EXIT_USAGE)
    assert os.listdir(out) == []
    # below a readable PATH, the unreadable is skipped, as before
    os.rename(closed, ok / "closed")
    r = nobody.run("backup", "-o", out / "x.caw", ok)
    assert r.returncode == EXIT_WARNINGS and "skipped" in r.err, str(r)
    assert os.listdir(out) == ["x.caw"]
