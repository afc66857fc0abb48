"""Faults while running (issue 6), on real loopback filesystems.

- ENOSPC during restore (tmpfs of limited size, then remounted bigger; ext4
  filled with ballast, then the ballast deleted): exit 4, one line naming the
  file, no temporary files, files already restored complete and correct; a
  second run with --force finishes the job exactly.
- ENOSPC while writing the archive: exit 4, no archive and no partial file.
- EIO (XFS shut down mid-job) writing the archive, reading the source and
  restoring: exit 4, one line naming the file; nothing wrong under a final
  name; a rerun finishes the restore.
- SIGINT and SIGTERM during backup and restore: exit 130 promptly with a
  message, nothing half-written under a final name, no temporary or partial
  files.  SIGKILL during backup: whatever is left is never taken for a whole
  archive.
- A source file rewritten, truncated, grown or deleted while it is read:
  reported in Summary.changed with its path (exit 1 from the CLI), every
  other file of the same backup restores exactly.
- Unreadable source files as a non-root user, FIFOs (never opened), sockets
  (skipped, said), a tree 1500 directories deep, 100,000 files (peak memory
  measured), restore as a non-root user (owners skipped and said once).
"""
from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers.archivecraft import diff_states, file_sha, temp_files, tree_state
from helpers.cli import Result, assert_one_line_error, cli, cli_popen, finished
from helpers.nobody import NOBODY

from cloneaware.testing import (
    make_loopfs,
    reflink_copy,
    rewrite_blocks,
    write_letters,
    write_random,
)
from cloneaware.testing import timeout as scaled

pytestmark = pytest.mark.root

MiB = 1 << 20
EXIT_WARNINGS, EXIT_ARCHIVE, EXIT_RESTORE, EXIT_INTERRUPTED = 1, 3, 4, 130


def _assert_same(src, dst, **kw) -> None:
    a, b = tree_state(src, **kw), tree_state(dst, **kw)
    assert a == b, "restored tree differs:\n" + "\n".join(diff_states(a, b))


def _assert_final_files_correct(src: Path, top: Path, allow_temp: bool = False) -> int:
    """Every regular file under a final name in ``top`` equals the source
    file of the same name; returns how many there are."""
    n = 0
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file() or (allow_temp and f.startswith(".cloneaware-")):
                continue
            assert not f.startswith(".cloneaware-"), p
            s = src / p.relative_to(top)
            assert s.is_file(), f"{p} has no source"
            assert p.stat().st_size == s.stat().st_size and file_sha(p) == file_sha(s), \
                f"{p} is under its final name with wrong content"
            n += 1
    return n


def _small_family(root: Path, big: int = 8 * MiB, seed: int = 1) -> Path:
    """fam/a00..a19 (small, restored first: a directory's own entries come
    before its subdirectories'), three big files of which one is a partly
    rewritten reflink clone, a hard link, a symlink, a subdirectory."""
    fam = root / "fam"
    (fam / "z_sub").mkdir(parents=True)
    for i in range(20):
        (fam / f"a{i:02d}").write_bytes(b"line %d\n" % i * (50 * i + 1))
    write_random(fam / "big1.bin", big, seed)
    reflink_copy(fam / "big1.bin", fam / "big2.bin")
    rewrite_blocks(fam / "big2.bin", 0.1, seed + 1)
    write_random(fam / "big3.bin", big, seed + 2)
    os.link(fam / "a03", fam / "hard")
    os.symlink("big1.bin", fam / "sym")
    for i in range(3):
        (fam / "z_sub" / f"s{i}").write_bytes(b"sub %d\n" % i)
    return fam


# --- ENOSPC -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_archive(loopfs_session):
    """A ~24 MiB family on this worker's Btrfs and its archive (no compression)."""
    from cloneaware.testing import _shared_fs

    fs = _shared_fs(loopfs_session, "btrfs")
    top = fs.path / f"faults-{os.getpid()}-{secrets.token_hex(4)}"
    top.mkdir()
    try:
        fam = _small_family(top / "src")
        arch = top / "fam.cla"
        r = cli("backup", "--compress", "none", "-o", arch, fam)
        assert r.returncode == 0, str(r)
        yield fam, arch
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _restore_until_full(fam: Path, arch: Path, dest: Path) -> None:
    r = cli("restore", arch, dest)
    line = assert_one_line_error(r, EXIT_RESTORE)
    assert "No space left" in line, line
    assert os.fsdecode(dest) in line and ".bin" in line, f"the file is not named: {line}"
    assert not temp_files(dest), temp_files(dest)
    n = _assert_final_files_correct(fam, dest / "fam")
    assert n >= 20, f"only {n} files restored before the disk filled"
    assert not (dest / "fam" / "big3.bin").exists()


def test_enospc_restore_tmpfs_then_remount_and_rerun(family_archive, loopfs):
    fam, arch = family_archive
    fs = loopfs("tmpfs", size=12 * MiB)
    dest = fs.path / "dest"
    _restore_until_full(fam, arch, dest)
    subprocess.run(["mount", "-o", "remount,size=256M", str(fs.path)], check=True)
    r = cli("restore", "--force", arch, dest)
    assert r.returncode == 0, str(r)
    _assert_same(fam, dest / "fam")
    assert not temp_files(dest)


def test_enospc_restore_ext4_then_free_space_and_rerun(family_archive, loopfs):
    fam, arch = family_archive
    fs = loopfs("ext4", size=64 * MiB)
    st = os.statvfs(fs.path)
    ballast = fs.path / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, st.f_bfree * st.f_frsize - 12 * MiB)
    finally:
        os.close(fd)
    dest = fs.path / "dest"
    _restore_until_full(fam, arch, dest)
    ballast.unlink()
    r = cli("restore", "--force", arch, dest)
    assert r.returncode == 0, str(r)
    _assert_same(fam, dest / "fam")
    assert not temp_files(dest)


def test_enospc_writing_the_archive(btrfs_dir, loopfs):
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "big.bin", 16 * MiB, 3)
    (src / "small").write_bytes(b"small\n")
    fs = loopfs("tmpfs", size=4 * MiB)
    out = fs.path / "out.cla"
    r = cli("backup", "--compress", "none", "-o", out, src)
    line = assert_one_line_error(r, EXIT_RESTORE)
    assert "No space left" in line, line
    assert os.listdir(fs.path) == [], f"left behind: {os.listdir(fs.path)}"
    assert "out.cla" in line, f"the archive is not named: {line}"


# --- EIO: the filesystem fails under a running job ----------------------------------------
# XFS shut down with ``xfs_io -x -c 'shutdown -f'`` (the log flushed first),
# as fstests does: from then on every operation on it returns EIO.

def _shutdown(fs) -> None:
    subprocess.run(["xfs_io", "-x", "-c", "shutdown -f", str(fs.path)], check=True)


def _remount(fs) -> None:
    subprocess.run(["umount", str(fs.path)], check=True)
    subprocess.run(["mount", "-t", "xfs", "-o", fs.options, str(fs.image), str(fs.path)],
                   check=True)


def _backup_until(src: Path, out: Path, cond, what: str) -> subprocess.Popen:
    p = cli_popen("backup", "--compress", "zstd:12", "-o", out, src)
    try:
        _wait_for(cond, 120, what, p)
    except BaseException:
        p.kill()
        p.wait()
        raise
    return p


def test_eio_writing_the_archive(slow_source, loopfs):
    """The archive's filesystem fails mid-backup: exit 4, one line naming the
    archive; after a remount there is nothing under the archive's name, and
    any partial file left is refused as truncated."""
    _top, src = slow_source
    fs = loopfs("xfs", size=300 * MiB)
    out = fs.path / "a.cla"
    p = _backup_until(src, out, lambda: any((fs.path / n).stat().st_size > 0
                                             for n in _partials(fs.path)), "archive bytes")
    _shutdown(fs)
    line = assert_one_line_error(finished(p, ["backup"]), EXIT_RESTORE)
    assert "Input/output error" in line and os.fsdecode(out) in line, line
    _remount(fs)
    assert not out.exists()
    for name in _partials(fs.path):  # empty, or a torso: never taken for an archive
        line = assert_one_line_error(cli("verify", fs.path / name), EXIT_ARCHIVE)
        assert "truncated" in line or "empty file" in line, line


def test_eio_reading_the_source(slow_source, loopfs, tmp_path):
    """The source's filesystem fails mid-backup: exit 4, one line naming the
    source file that could not be read, no archive."""
    _top, slow = slow_source
    fs = loopfs("xfs", size=300 * MiB)
    src = fs.path / "src"
    shutil.copytree(slow, src)
    fs.sync()
    out = tmp_path / "a.cla"
    p = _backup_until(src, out, lambda: any((tmp_path / n).stat().st_size > 0
                                             for n in _partials(tmp_path)), "archive bytes")
    _shutdown(fs)
    line = assert_one_line_error(finished(p, ["backup"]), EXIT_RESTORE)
    assert "Input/output error" in line, line
    assert line.startswith(f"cloneaware: {src}/f"), f"the source file is not named: {line}"
    assert os.listdir(tmp_path) == []


def test_eio_during_restore(family_archive, loopfs):
    """DEST's filesystem fails mid-restore: exit 4, one line naming the file;
    after a remount every file under its final name is complete and correct,
    and a second run with --force finishes the job exactly."""
    fam, arch = family_archive
    fs = loopfs("xfs", size=300 * MiB)
    dest = fs.path / "dest"
    data = arch.read_bytes()
    p = cli_popen("restore", "-", dest, stdin=subprocess.PIPE)
    try:
        cut = len(data) * 3 // 5   # past the small files, inside the big ones
        p.stdin.write(data[:cut])
        p.stdin.flush()
        # the small files are complete (in a new directory under a temporary
        # name, named after a syncfs) and a big one is being written
        _wait_for(lambda: sum(len(f) for _, _, f in os.walk(dest)) >= 22, 60,
                  "the small files", p)
        _shutdown(fs)
        # the restore may read all of it (it reads ahead on a thread) or stop
        # reading; either way stdin is done with (communicate() would flush a
        # closed file again and fail)
        with contextlib.suppress(BrokenPipeError):
            p.stdin.write(data[cut:])
        with contextlib.suppress(BrokenPipeError):
            p.stdin.close()
        p.stdin = None
        r = finished(p, ["restore"])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    line = assert_one_line_error(r, EXIT_RESTORE)
    assert "Input/output error" in line and os.fsdecode(dest) in line, line
    _remount(fs)
    # Names come only after a syncfs, so none is on data that missed the disk
    # (before batches, a00..a19 came back under their names full of zeros).
    # The temporary files the dead filesystem kept are removed by the rerun.
    stale = temp_files(dest)
    (dest / "fam").mkdir(parents=True, exist_ok=True)
    _assert_final_files_correct(fam, dest / "fam", allow_temp=True)
    r = cli("restore", "--force", arch, dest)
    assert r.returncode == 0, str(r)
    _assert_same(fam, dest / "fam")
    assert not temp_files(dest)
    if stale:
        assert "left by an interrupted restore" in r.stderr.decode(), r.stderr


# --- signals ------------------------------------------------------------------------------

def _wait_for(pred, timeout: float, what: str, proc=None) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read().decode(errors='replace')}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _partials(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.endswith(".partial")]


@pytest.fixture(scope="module")
def slow_source(loopfs_session):
    """48 MiB of compressible data: minutes of work for zstd level 19."""
    from cloneaware.testing import _shared_fs

    fs = _shared_fs(loopfs_session, "btrfs")
    top = fs.path / f"slow-{os.getpid()}-{secrets.token_hex(4)}"
    src = top / "src"
    src.mkdir(parents=True)
    for i in range(3):
        write_letters(src / f"f{i}.txt", 16 * MiB, 40 + i)
    yield top, src
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_signal_during_backup(slow_source, sig):
    top, src = slow_source
    outdir = top / f"out-{sig.name}"
    outdir.mkdir()
    out = outdir / "a.cla"
    # level 19 takes seconds per 4 MiB chunk (a user's Ctrl-C lands while
    # workers compress); SIGKILL waits for bytes on disk, level 12 gets there sooner
    level = "zstd:12" if sig == signal.SIGKILL else "zstd:19"
    p = cli_popen("backup", "--compress", level, "-o", out, src)
    def started():
        # SIGKILL: wait until bytes reach the disk, so that a real torso is left
        return any(sig != signal.SIGKILL or (outdir / n).stat().st_size > 0
                   for n in _partials(outdir))

    try:
        _wait_for(started, 120, "the partial archive", p)
        if sig != signal.SIGKILL:
            time.sleep(0.5)
        assert p.poll() is None, "the backup finished before the signal"
        t0 = time.monotonic()
        p.send_signal(sig)
        try:
            _out, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 20 s after {sig.name}") from None
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not out.exists(), "an interrupted backup left an archive under its final name"
    if sig == signal.SIGKILL:
        # nothing could be cleaned up: what is left must never pass for whole
        assert _partials(outdir), "SIGKILL left no partial archive to check"
        for name in _partials(outdir):
            r = cli("verify", outdir / name)
            line = assert_one_line_error(r, EXIT_ARCHIVE)
            assert "truncated" in line, line
            r = cli("restore", outdir / name, outdir / "dest")
            line = assert_one_line_error(r, EXIT_ARCHIVE)
            assert "truncated" in line, line
        return
    r = Result(["backup"], p.returncode, _out, err)
    line = assert_one_line_error(r, EXIT_INTERRUPTED)
    assert "interrupt" in line, line
    assert took < 5, f"took {took:.1f} s to stop after {sig.name}"
    assert _partials(outdir) == [], "the partial archive was left behind"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_restore(family_archive, ext4_dir, sig):
    """Restore from a pipe that the test feeds: stop feeding in the middle of
    a big file, wait until its temporary file exists, then signal."""
    fam, arch = family_archive
    data = arch.read_bytes()
    dest = ext4_dir / "dest"
    p = cli_popen("restore", "-", dest, stdin=subprocess.PIPE)
    try:
        half = len(data) * 6 // 10
        p.stdin.write(data[:half])
        p.stdin.flush()
        def big_tmp():
            for t in temp_files(dest):
                try:
                    if os.path.getsize(t) > 0:
                        return True
                except FileNotFoundError:  # renamed into place meanwhile
                    pass
            return False

        _wait_for(big_tmp, 60, "a temporary file", p)
        time.sleep(0.2)
        assert p.poll() is None
        t0 = time.monotonic()
        p.send_signal(sig)
        end = time.monotonic() + 30
        while p.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        took = time.monotonic() - t0
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    r = Result(["restore", "-"], p.returncode, out, err)
    line = assert_one_line_error(r, EXIT_INTERRUPTED)
    assert "interrupt" in line, line
    assert took < 5, f"took {took:.1f} s to stop after {sig.name}"
    assert not temp_files(dest), temp_files(dest)
    n = _assert_final_files_correct(fam, dest / "fam")
    assert n >= 20
    assert (dest / "fam" / "big1.bin").exists()
    assert not (dest / "fam" / "big3.bin").exists()


# --- a source that changes while it is read -------------------------------------------------

class _Mutator:
    """A progress object for cloneaware.backup.Backup that changes a file
    after the n-th chunk has been written (advance() is called after each)."""

    def __init__(self, path: Path, action: str, after: int = 2):
        self.path = path
        self.action = action
        self.after = after
        self.calls = 0
        self.done = False

    def set_total(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self.calls += 1
        if self.calls != self.after or self.done:
            return
        self.done = True
        p = self.path
        if self.action == "rewrite":
            with open(p, "r+b") as f:
                f.seek(30 * MiB)
                f.write(random.Random(9).randbytes(MiB))
        elif self.action == "truncate":
            os.truncate(p, 10 * MiB)
        elif self.action == "grow":
            with open(p, "ab") as f:
                f.write(random.Random(9).randbytes(4 * MiB))
        elif self.action == "delete":
            p.unlink()
        else:
            raise ValueError(self.action)


@pytest.mark.parametrize("pit", [False, True], ids=["live", "clone"])
@pytest.mark.parametrize("action", ["rewrite", "truncate", "grow", "delete"])
def test_file_changes_while_backed_up(btrfs_dir, action, pit):
    """Read live, the change is detected and reported; read from its
    point-in-time clone, the file is stored as it was when cloned."""
    from cloneaware.backup import ArchiveSink, Backup
    from cloneaware.backup.sinks import file_output

    fam = btrfs_dir / "src" / "fam"
    (fam / "z_other").mkdir(parents=True)
    victim = fam / "a_victim.bin"  # the first file written
    write_random(victim, 40 * MiB, 11)
    write_random(fam / "b_clone_src.bin", 4 * MiB, 12)
    reflink_copy(fam / "b_clone_src.bin", fam / "c_clone.bin")
    for i in range(5):
        (fam / "z_other" / f"s{i}").write_bytes(b"other %d\n" % i * 100)
    os.symlink("b_clone_src.bin", fam / "d_sym")
    arch = btrfs_dir / "a.cla"
    before = file_sha(victim)
    mut = _Mutator(victim, action)
    sink = ArchiveSink(file_output(str(arch)), str(arch))
    s = Backup([str(fam)], sink, compress="none", progress=mut, point_in_time=pit).run()
    assert mut.done
    changed = [p for p, _why in s.changed]
    if pit:
        assert changed == [] and s.captured_by_clone == 3, (s.changed, s.captured_by_clone)
    else:
        assert any(p.endswith("a_victim.bin") for p in changed), s.changed
        assert len(changed) == 1, s.changed
    dest = btrfs_dir / "dest"
    r = cli("restore", arch, dest)
    assert r.returncode == 0, str(r)
    if pit:
        assert file_sha(dest / "fam" / "a_victim.bin") == before
    want = tree_state(fam, root_meta=action != "delete")
    got = tree_state(dest / "fam", root_meta=action != "delete")
    for t in (want, got):
        t.pop(b"a_victim.bin", None)
    assert want == got, "\n".join(diff_states(want, got))


def test_file_changes_while_backed_up_cli_exit_1(btrfs_dir):
    """Through the CLI: a thread rewrites one file the whole time the backup
    runs; the backup says so, naming it, and exits 1."""
    fam = btrfs_dir / "src" / "fam"
    fam.mkdir(parents=True)
    busy = fam / "busy.bin"
    write_random(busy, 8 * MiB, 21)
    write_random(fam / "quiet.bin", 2 * MiB, 22)
    (fam / "note").write_bytes(b"note\n")
    stop = threading.Event()

    def churn():
        rng = random.Random(5)
        fd = os.open(busy, os.O_WRONLY)
        try:
            while not stop.is_set():
                os.pwrite(fd, rng.randbytes(4096), rng.randrange(2048) * 4096)
                time.sleep(0.001)
        finally:
            os.close(fd)

    th = threading.Thread(target=churn, daemon=True)
    th.start()
    try:
        time.sleep(0.05)
        arch = btrfs_dir / "a.cla"
        r = cli("backup", "--no-point-in-time", "--compress", "zstd:3", "-o", arch, fam)
    finally:
        stop.set()
        th.join()
    assert "Traceback" not in r.err
    assert r.returncode == EXIT_WARNINGS, str(r)
    assert "busy.bin" in r.err, str(r)
    dest = btrfs_dir / "dest"
    r2 = cli("restore", arch, dest)
    assert r2.returncode == 0, str(r2)
    want, got = tree_state(fam), tree_state(dest / "fam")
    for t in (want, got):
        t.pop(b"busy.bin")
        t.pop(b"")
    assert want == got, "\n".join(diff_states(want, got))


# --- running as a user other than root (the fixture: helpers/nobody.py) ---------------

def test_unreadable_source_files_as_non_root(nobody):
    fam = nobody.root / "src" / "fam"
    (fam / "sub" / "closed").mkdir(parents=True)
    (fam / "ok1").write_bytes(b"readable one\n" * 100)
    (fam / "secret").write_bytes(b"secret\n")
    os.chmod(fam / "secret", 0)
    (fam / "sub" / "ok2").write_bytes(b"readable two\n")
    (fam / "sub" / "closed" / "inside").write_bytes(b"inside\n")
    os.chmod(fam / "sub" / "closed", 0)
    write_random(fam / "sub" / "z_after.bin", 3 * MiB, 31)
    outdir = nobody.root / "out"
    outdir.mkdir()
    os.chown(outdir, NOBODY, NOBODY)
    arch = outdir / "a.cla"
    r = nobody.run("backup", "--compress", "zstd", "-o", arch, fam)
    assert "Traceback" not in r.err, str(r)
    assert r.returncode == EXIT_WARNINGS, str(r)
    assert "secret" in r.err and "Permission denied" in r.err, str(r)
    assert "closed" in r.err, str(r)
    dest = nobody.root / "dest"
    r = cli("restore", arch, dest)
    assert r.returncode == 0, str(r)
    want = tree_state(fam)  # as root: the closed directory can be listed
    got = tree_state(dest / "fam")
    # the closed directory itself is stored, not what nobody could not list
    del want[b"secret"], want[b"sub/closed/inside"]
    assert want == got, "\n".join(diff_states(want, got))


def test_restore_as_non_root_skips_owners_once(nobody):
    fam = nobody.root / "src" / "fam"
    (fam / "sub").mkdir(parents=True)
    (fam / "ro").mkdir()
    spec = [("a", 0o640, 1234, 1234), ("b", 0o755, 0, 0), ("sub/c", 0o600, 4321, 100),
            ("d", 0o000, 1234, 5678), ("ro/e", 0o444, 77, 77), ("sub/f", 0o4755, 1234, 1234)]
    for name, mode, uid, gid in spec:
        p = fam / name
        p.write_bytes(name.encode() * 1000)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
    os.symlink("a", fam / "link")
    os.lchown(fam / "link", 1234, 1234)
    os.chown(fam / "sub", 4321, 4321)
    os.chmod(fam / "sub", 0o750)
    os.chmod(fam / "ro", 0o555)
    os.chown(fam, 1234, 1234)
    arch = nobody.root / "a.cla"
    r = cli("backup", "-o", arch, fam)
    assert r.returncode == 0, str(r)
    os.chmod(arch, 0o644)
    destdir = nobody.root / "restore"
    destdir.mkdir()
    os.chown(destdir, NOBODY, NOBODY)
    dest = destdir / "dest"
    r = nobody.run("restore", arch, dest)
    assert "Traceback" not in r.err, str(r)
    assert r.returncode == 0, str(r)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    owner_lines = [ln for ln in lines if "owner" in ln]
    assert len(owner_lines) == 1, str(r)
    assert len(lines) == 1, f"more said than the owners: {r}"
    want = tree_state(fam, owners=False)
    got = tree_state(dest / "fam", owners=False)
    assert want == got, "\n".join(diff_states(want, got))
    for _dirpath, dirs, files in os.walk(dest):
        for n in dirs + files:
            assert os.lstat(os.path.join(_dirpath, n)).st_uid == NOBODY


def test_compressed_sharing_without_root_is_proved_by_reading(nobody):
    """A user cannot search Btrfs's tree (BTRFS_IOC_TREE_SEARCH_V2 needs
    CAP_SYS_ADMIN, docs/KERNEL.md F23): compressed clones are then shared
    after the content check, the backup says so once, and nothing fails."""
    fs = make_loopfs(nobody.root, "btrfs", 256 * MiB, mount_options="compress-force=zstd")
    try:
        os.chmod(fs.path, 0o755)
        fam = fs.path / "fam"
        fam.mkdir()
        line = b"a compressible line of a golden image %d\n"
        (fam / "golden.img").write_bytes(b"".join(line % i for i in range(40000)))
        for name in ("vm1.img", "vm2.img", "vm3.img"):
            reflink_copy(fam / "golden.img", fam / name)
        os.sync()
        size = (fam / "golden.img").stat().st_size
        out = fs.path / "out"
        out.mkdir()
        os.chown(out, NOBODY, NOBODY)
        arch = out / "a.caw"
        r = nobody.run("backup", "--json", "-o", arch, fam)
        assert r.returncode == 0, str(r)
        notes = [ln for ln in r.err.splitlines() if "proved by reading" in ln]
        assert len(notes) == 1 and "CAP_SYS_ADMIN" in notes[0], str(r)
        d = r.json()
        assert d["checked_bytes"] == 3 * size == d["referenced_bytes"], d
        assert d["stored_bytes"] == size, d
        r = nobody.run("scan", fam)
        assert r.returncode == 0 and "proved by reading" in r.err, str(r)
        # as root the same tree needs no reading of the clones
        r = cli("backup", "--json", "-o", fs.path / "root.caw", fam, check_rc=0)
        assert "proved by reading" not in r.err, str(r)
        d = r.json()
        assert d["checked_bytes"] == 0 and d["bytes_read"] == size, d
        assert d["encoded_stored_bytes"] == size, d  # stored as the extents on disk
        # a user cannot write encoded (CAP_SYS_ADMIN): the extents are
        # decompressed and written plainly, and the restore is whole
        os.chmod(fs.path / "root.caw", 0o644)
        r = nobody.run("restore", "--json", fs.path / "root.caw", out / "mine")
        assert r.returncode == 0, str(r)
        assert r.json()["encoded_written_bytes"] == 0 and r.json()["copied_bytes"] == 0
        want, got = tree_state(fam, owners=False), tree_state(out / "mine" / "fam", owners=False)
        assert want == got, "\n".join(diff_states(want, got))
        dest = nobody.root / "dest"
        cli("restore", arch, dest, check_rc=0)
        want, got = tree_state(fam), tree_state(dest / "fam")
        assert want == got, "\n".join(diff_states(want, got))
    finally:
        fs.unmount()


# --- odd kinds of files and odd shapes of trees ---------------------------------------------

def test_fifo_never_opened_and_socket_recorded(btrfs_dir):
    """Issue 31 item 4: a socket is an entry, so a home directory with one backs
    up with exit 0 and restores whole (the inode, made by mknod)."""
    fam = btrfs_dir / "src" / "fam"
    fam.mkdir(parents=True)
    fifo = fam / "fifo"
    os.mkfifo(fifo, 0o640)
    (fam / "file").write_bytes(b"file\n")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dfd = os.open(fam, os.O_RDONLY | os.O_DIRECTORY)
    try:  # the real path is longer than a socket address may be
        sock.bind(f"/proc/self/fd/{dfd}/sock")
    finally:
        os.close(dfd)
    assert stat.S_ISSOCK(os.lstat(fam / "sock").st_mode)
    os.chmod(fam / "sock", 0o741)
    os.chown(fam / "sock", 1234, 5678)
    os.utime(fam / "sock", ns=(1_600_000_000_000_000_000, 1_500_000_000_123_456_789))
    opened = []
    stop = threading.Event()

    def watch():
        # opening a FIFO for writing without blocking succeeds only while
        # someone has it open for reading
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.0005)
                continue
            opened.append(time.monotonic())
            os.close(fd)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        arch = btrfs_dir / "a.cla"
        r = cli("backup", "-o", arch, fam, timeout=60)
    finally:
        stop.set()
        th.join()
        sock.close()
    assert "Traceback" not in r.err, str(r)
    assert r.returncode == 0, str(r)
    assert not opened, "the backup opened the FIFO for reading"
    assert "sock" not in r.err, str(r)
    r = cli("ls", "-l", arch, timeout=60)
    assert any(ln.startswith("srwxr----x") and ln.endswith("fam/sock")
               for ln in r.out.splitlines()), r.out
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0, timeout=60)
    r = cli("backup", "-r", repo, fam, timeout=60)
    assert r.returncode == 0 and "sock" not in r.err, str(r)
    want = tree_state(fam)
    assert stat.S_ISSOCK(dict(want[b"sock"])["type"]), want[b"sock"]
    for n, source in enumerate(((arch,), ("-r", repo, "latest"))):
        dest = btrfs_dir / f"dest{n}"
        r = cli("restore", *source, dest, timeout=60)
        assert r.returncode == 0, str(r)
        st = os.lstat(dest / "fam" / "fifo")
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        st = os.lstat(dest / "fam" / "sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o741
        got = tree_state(dest / "fam")
        assert want == got, "\n".join(diff_states(want, got))


DEPTH = 1500


def test_very_deep_tree(btrfs_dir):
    try:
        _very_deep_tree(btrfs_dir)
    finally:
        # shutil.rmtree recurses once per level: GNU rm does not
        subprocess.run(["rm", "-rf", "--one-file-system", str(btrfs_dir / "src"),
                        str(btrfs_dir / "dest")], check=False)


def _very_deep_tree(btrfs_dir):
    fam = btrfs_dir / "src" / "deep"
    fam.mkdir(parents=True)
    fd = os.open(fam, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(DEPTH):
            os.mkdir("a", 0o755, dir_fd=fd)
            if i % 100 == 0:
                f = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
                os.write(f, b"level %d\n" % i)
                os.close(f)
            nfd = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(f, b"the bottom\n")
        os.close(f)
    finally:
        os.close(fd)
    bottom = b"deep" + b"/a" * DEPTH + b"/bottom"
    assert len(bottom) < 4096
    arch = btrfs_dir / "deep.cla"
    r = cli("backup", "-o", arch, fam)
    assert r.returncode == 0, str(r)
    r = cli("ls", arch)
    assert r.returncode == 0 and bottom in r.stdout, str(r)[:2000]
    dest = btrfs_dir / "dest"
    r = cli("restore", arch, dest)
    assert r.returncode == 0, str(r)
    want, got = tree_state(fam), tree_state(dest / "deep")
    assert len(want) == DEPTH + 2 + DEPTH // 100
    assert want == got, "\n".join(diff_states(want, got))


def _peak_rss_kib(*args) -> tuple[Result, int]:
    """Run the CLI under GNU time; its peak resident set size in KiB."""
    with tempfile.NamedTemporaryFile("r") as t:
        r = cli(*args, prefix=["/usr/bin/time", "-f", "%M", "-o", t.name], timeout=scaled(900))
        return r, int(t.read().split()[-1])


@pytest.mark.slow
def test_100k_files_memory(loopfs):
    if not os.path.exists("/usr/bin/time"):
        pytest.skip("GNU time is needed to measure one process's peak memory")
    fs = loopfs("tmpfs", size=1 << 30, mount_options="nr_inodes=400k")
    fam = fs.path / "src" / "many"
    n = 100_000
    for d in range(100):
        sub = fam / f"d{d:02d}"
        sub.mkdir(parents=True)
        for i in range(1000):
            (sub / f"f{i:03d}").write_bytes(b"%d/%d\n" % (d, i))
    arch = fs.path / "many.cla"
    t0 = time.monotonic()
    r, rss_b = _peak_rss_kib("backup", "-o", arch, fam)
    t1 = time.monotonic()
    assert r.returncode == 0, str(r)
    dest = fs.path / "dest"
    r, rss_r = _peak_rss_kib("restore", arch, dest)
    t2 = time.monotonic()
    assert r.returncode == 0, str(r)
    print(f"\n100,000 files: backup {t1 - t0:.1f} s, peak RSS {rss_b / 1024:.0f} MiB; "
          f"restore {t2 - t1:.1f} s, peak RSS {rss_r / 1024:.0f} MiB; archive "
          f"{arch.stat().st_size / MiB:.1f} MiB")
    count = 0
    rng = random.Random(1)
    for dirpath, _dirs, files in os.walk(dest / "many"):
        count += len(files)
        for f in rng.sample(files, min(5, len(files))):
            rel = Path(dirpath, f).relative_to(dest / "many")
            assert Path(dirpath, f).read_bytes() == (fam / rel).read_bytes()
    assert count == n
    for rss in (rss_b, rss_r):
        assert rss < 512 * 1024, f"peak RSS {rss / 1024:.0f} MiB for 100,000 files"


# --- a plain retry after a failed restore (issue 21, defect 5) ---------------------------

def _retry_plain(fam: Path, arch: Path, dest: Path, *extra) -> None:
    """The retry needs no --force: it goes on over what the failed run left
    (listed in DEST/.cloneaware-partial), and removes the list."""
    assert (dest / ".cloneaware-partial").exists(), os.listdir(dest)
    r = cli("restore", *extra, arch, dest)
    assert r.returncode == 0, str(r)
    _assert_same(fam, dest / "fam")
    assert not temp_files(dest) and sorted(os.listdir(dest)) == ["fam"]


def test_defect_5_retry_after_a_truncated_archive(family_archive, btrfs_dir):
    """Defect 5: a failed restore left its directories (drwx------) and a
    plain retry refused: "DEST/fam exists; use --force"."""
    fam, arch = family_archive
    dest = btrfs_dir / "dest"
    data = arch.read_bytes()
    r = cli("restore", "-", dest, input=data[:len(data) * 3 // 5])
    assert_one_line_error(r, EXIT_ARCHIVE)
    assert _assert_final_files_correct(fam, dest / "fam") >= 20
    _retry_plain(fam, arch, dest)


def test_defect_5_retry_after_enospc_without_force(family_archive, loopfs):
    fam, arch = family_archive
    fs = loopfs("tmpfs", size=12 * MiB)
    dest = fs.path / "dest"
    _restore_until_full(fam, arch, dest)
    subprocess.run(["mount", "-o", "remount,size=256M", str(fs.path)], check=True)
    _retry_plain(fam, arch, dest)


def test_defect_5_retry_after_sigint(family_archive, ext4_dir):
    fam, arch = family_archive
    data = arch.read_bytes()
    dest = ext4_dir / "dest"
    p = cli_popen("restore", "-", dest, stdin=subprocess.PIPE)
    try:
        p.stdin.write(data[:len(data) * 6 // 10])
        p.stdin.flush()
        _wait_for(lambda: any(os.path.getsize(t) > 0 for t in temp_files(dest)
                              if os.path.exists(t)), 60, "a temporary file", p)
        p.send_signal(signal.SIGINT)
        r = finished(p, ["restore", "-"], timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert_one_line_error(r, EXIT_INTERRUPTED)
    _retry_plain(fam, arch, dest)


def test_defect_5_retry_after_a_wrong_base(btrfs_dir):
    """A thin archive restored against a base that changed since: exit 5;
    with the right base, a plain retry."""
    fam = _small_family(btrfs_dir / "src")
    base = btrfs_dir / "golden.bin"
    reflink_copy(fam / "big1.bin", base)
    arch = btrfs_dir / "thin.caw"
    r = cli("backup", "--base", base, "-o", arch, fam)
    assert r.returncode == 0, str(r)
    wrong = btrfs_dir / "wrong.bin"
    write_random(wrong, base.stat().st_size, 99)
    dest = btrfs_dir / "dest"
    r = cli("restore", "--base", wrong, arch, dest)
    assert_one_line_error(r, 5)
    _retry_plain(fam, arch, dest, "--base", base)


def test_defect_5_what_a_failed_run_did_not_make_is_still_refused(family_archive, btrfs_dir):
    """Only the failed run's own entries are gone over: a fam that was in
    DEST before is refused without --force, as ever, and stays."""
    fam, arch = family_archive
    dest = btrfs_dir / "dest"
    (dest / "fam").mkdir(parents=True)
    (dest / "fam" / "mine").write_bytes(b"the user's\n")
    data = arch.read_bytes()
    r = cli("restore", "-", dest, input=data[:len(data) // 2])
    line = assert_one_line_error(r, 2)
    assert "fam exists; use --force" in line
    assert not (dest / ".cloneaware-partial").exists()
    r = cli("restore", arch, dest)
    assert_one_line_error(r, 2)
    assert os.listdir(dest / "fam") == ["mine"]
