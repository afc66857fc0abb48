"""Thin backups relative to a base (issue 4): only the derivative data is
stored, the rest is reflinked from the base at restore and then verified."""
import hashlib
import os

import pytest
from helpers.cli import cli, cli_json
from helpers.fsutil import spread_files

from cloneaware.testing import reflink_copy, rewrite_blocks, write_random

MiB = 1 << 20


def physical(*paths) -> int:
    return cli_json("scan", "--json", *paths)["totals"]["physical_bytes"]


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def usage_delta(fsdir, action) -> int:
    """Bytes of the filesystem used by action() (df-level, after sync)."""
    def used():
        os.sync()
        st = os.statvfs(fsdir)
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    before = used()
    action()
    return used() - before


@pytest.fixture
def clone_family(reflink_dir):
    base = reflink_dir / "golden.img"
    write_random(base, 128 * MiB, seed=21)
    clone = reflink_dir / "guest.img"
    reflink_copy(base, clone)
    rewrite_blocks(clone, 0.03, seed=22)
    return reflink_dir, base, clone


def test_thin_archive_is_derivative_data_and_restores_by_reflink(clone_family):
    d, base, clone = clone_family
    arch = d / "guest.caw"
    b = cli_json("backup", "--json", "--base", base, "-o", arch, clone)
    size = clone.stat().st_size
    assert arch.stat().st_size < 0.10 * size
    assert b["base_referenced_bytes"] > 0.9 * size
    ls = cli_json("ls", "--json", arch)
    assert ls["base"]["path"] == str(base)
    assert ls["base"]["files"] == [{"path": "", "size": size}]
    assert "thin backup" in cli("verify", arch, check_rc=0).out

    out = d / "out"
    restored = {}

    def restore():
        restored.update(cli_json("restore", "--json", "--base", base, arch, out))
    added = usage_delta(d, restore)
    assert sha(out / "guest.img") == sha(clone)
    assert restored["reflinked_bytes"] >= b["base_referenced_bytes"]
    assert restored["copied_bytes"] == 0
    assert restored["verified_bytes"] == b["base_referenced_bytes"]
    assert added < 0.10 * size, f"restore added {added} bytes of new data"


def test_thin_restore_needs_the_base_before_writing_anything(clone_family):
    d, base, clone = clone_family
    arch = d / "g.caw"
    cli("backup", "--base", base, "-o", arch, clone, check_rc=0)
    r = cli("restore", arch, d / "out", check_rc=5)
    assert "--base" in r.err
    assert not (d / "out").exists()
    r = cli("restore", "--base", d / "nothere.img", arch, d / "out", check_rc=5)
    assert "nothere.img" in r.err
    assert not (d / "out").exists()
    # from a pipe too: the BASE records come before any entry
    with open(arch, "rb") as f:
        cli("restore", "-", d / "out2", stdin=f, check_rc=5)
    assert not (d / "out2").exists()
    # a FIFO given as the base is refused at once, not waited on for a writer
    os.mkfifo(d / "fifo")
    r = cli("restore", "--base", d / "fifo", arch, d / "out3", check_rc=5, timeout=20)
    assert "not a regular file" in r.err, r.err
    assert not (d / "out3").exists()


def test_changed_base_block_fails_and_leaves_no_wrong_file(clone_family):
    d, base, clone = clone_family
    arch = d / "g.caw"
    cli("backup", "--base", base, "-o", arch, clone, check_rc=0)
    with open(base, "r+b") as f:  # one block the clone still shares
        f.seek(100 * 4096)
        f.write(b"\xff" * 4096)
    # pick a block shared by the clone: compare contents
    with open(base, "rb") as a, open(clone, "rb") as b_:
        a.seek(100 * 4096)
        b_.seek(100 * 4096)
        assert a.read(4096) != b_.read(4096)
    out = d / "out"
    r = cli("restore", "--base", base, arch, out, check_rc=5)
    assert "guest.img" in r.err and "differ" in r.err
    assert r.err.count("\n") == 1
    left = [p for p in out.rglob("*")] if out.exists() else []
    assert left == [], left  # no file, no temporary
    # --trust-base skips the check: documented, and the file is then wrong
    cli("restore", "--trust-base", "--base", base, arch, d / "trusting", check_rc=0)
    assert sha(d / "trusting" / "guest.img") != sha(clone)


def test_directory_base_with_clones_of_several_images(reflink_dir):
    d = reflink_dir
    base = d / "images"
    base.mkdir()
    (base / "sub").mkdir()
    write_random(base / "a.img", 16 * MiB, seed=31)
    write_random(base / "sub" / "b.img", 16 * MiB, seed=32)
    clones = d / "clones"
    clones.mkdir()
    reflink_copy(base / "a.img", clones / "a1.img")
    reflink_copy(base / "sub" / "b.img", clones / "b1.img")
    rewrite_blocks(clones / "a1.img", 0.05, seed=33)
    rewrite_blocks(clones / "b1.img", 0.05, seed=34)
    reflink_copy(clones / "b1.img", clones / "b2.img")  # shares b1's own data too
    arch = d / "c.caw"
    b = cli_json("backup", "--json", "--base", base, "-o", arch, clones)
    assert arch.stat().st_size < 0.2 * 48 * MiB
    assert b["referenced_bytes"] > 0  # b2 refers to b1 inside the archive
    ls = cli_json("ls", "--json", arch)
    assert sorted(f["path"] for f in ls["base"]["files"]) == ["a.img", "sub/b.img"]
    out = d / "out"
    cli("restore", "--base", base, arch, out, check_rc=0)
    for n in ("a1.img", "b1.img", "b2.img"):
        assert sha(out / "clones" / n) == sha(clones / n)
    # a base missing one of its files is refused before anything is written
    os.rename(base / "sub" / "b.img", base / "sub" / "gone.img")
    r = cli("restore", "--base", base, arch, d / "out2", check_rc=5)
    assert "sub/b.img" in r.err
    assert not (d / "out2").exists()


def test_sparse_form_costs_the_derivative_data_and_restores_without_copies(clone_family):
    d, base, clone = clone_family
    thin = d / "guest.thin"
    cli("backup", "--base", base, "--sparse", "-o", thin, clone, check_rc=0)
    size = clone.stat().st_size
    assert thin.stat().st_size == size  # a sparse file of the clone's size
    du = thin.stat().st_blocks * 512
    assert du < 0.06 * size, du  # about the 3% rewritten
    manifest = None
    try:
        manifest = os.getxattr(thin, "user.cloneaware.manifest")
    except OSError:
        manifest = (d / "guest.thin.cloneaware").read_bytes()
    assert manifest.startswith(b"\x89CLONEAW")
    # derivative data sits at its own offsets: where the clone differs from the base
    with open(thin, "rb") as t, open(clone, "rb") as c, open(base, "rb") as b:
        for off in range(0, size, 64 * 1024):
            t.seek(off)
            c.seek(off)
            b.seek(off)
            cb, bb, tb = c.read(4096), b.read(4096), t.read(4096)
            if cb != bb:
                assert tb == cb, off
    out = d / "out"
    r = cli_json("restore", "--json", "--base", base, thin, out)
    assert sha(out / "guest.img") == sha(clone)
    assert r["copied_bytes"] == 0 and r["written_bytes"] == 0
    assert r["reflinked_bytes"] == size
    assert physical(out / "guest.img", base, clone) == physical(base, clone)


def _golden_and_clone(d):
    g = d / "golden.img"
    write_random(g, 8 << 20, 11)
    c = d / "clone.img"
    reflink_copy(g, c)
    rewrite_blocks(c, 0.05, 12)
    return g, c


def test_defect_1_sparse_output_on_another_filesystem(btrfs_dir, xfs_dir, ext4_dir):
    """Defect 1: ``--sparse -o OUT`` with OUT on another filesystem failed
    with "Invalid cross-device link" (exit 4).  Now the derivative data is
    copied there (reflinked only where OUT shares the clone's filesystem),
    OUT is a sparse file of the clone's size, and it restores exactly."""
    g, c = _golden_and_clone(btrfs_dir)
    for where in (xfs_dir, ext4_dir):
        out = where / "clone.thin"
        s = cli_json("backup", "--json", "--base", g, "--sparse", "-o", out, c)
        assert s["base_referenced_bytes"] > 7 << 20 and s["stored_bytes"] < 1 << 20, s
        st = os.stat(out)
        assert st.st_size == c.stat().st_size and st.st_blocks * 512 < 2 << 20
        dest = where / "r"
        cli("restore", "--base", g, out, dest, check_rc=0)
        assert sha(dest / "clone.img") == sha(c)


def test_defect_2_ls_and_verify_read_a_sparse_thin_backup(btrfs_dir, xfs_dir):
    """Defect 2: ls and verify of a --sparse thin file said "wrong magic".
    Now they read its manifest, from the xattr or from the sidecar file;
    verify hashes the file's own data and finds a changed byte."""
    from cloneaware.errors import EXIT_ARCHIVE

    g, c = _golden_and_clone(btrfs_dir)
    out = xfs_dir / "clone.thin"
    cli("backup", "--base", g, "--sparse", "-o", out, c, check_rc=0)
    for form in ("xattr", "sidecar"):
        if form == "sidecar":  # as a filesystem that does not take the xattr has it
            (xfs_dir / "clone.thin.cloneaware").write_bytes(
                os.getxattr(out, "user.cloneaware.manifest"))
            os.removexattr(out, "user.cloneaware.manifest")
        listing = cli_json("ls", "--json", out)
        (e,) = listing["entries"]
        assert e["path"] == "clone.img" and e["size"] == c.stat().st_size, listing
        assert e["base_referenced_bytes"] > 7 << 20 and listing["base"]["path"] == str(g)
        v = cli_json("verify", "--json", out)
        assert v["sparse_bytes"] == e["stored_bytes"] > 0 and v["sparse_ranges"] >= 1, v
    # a byte of the clone's own data changed in the sparse file: verify says where
    fd = os.open(out, os.O_RDWR)
    try:
        pos = os.lseek(fd, 0, os.SEEK_DATA)
        b = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b[0] ^ 1]), pos)
    finally:
        os.close(fd)
    r = cli("verify", out, check_rc=EXIT_ARCHIVE)
    assert f"cloneaware: {out}: bytes " in r.err and "differ" in r.err, str(r)


def test_sparse_form_hashes_the_bytes_it_holds(btrfs_dir):
    """Issue 29: the sparse form hashed the clone's derivative data on one
    read and copied it into the sparse file on another, so a clone written
    between the two (read live, --no-point-in-time) left a manifest whose
    SHA-256 described other bytes than the sparse file held: verify and
    restore refused a backup that had exited 0 or 1.  Now each range is
    hashed as the sparse file holds it after the copy."""
    import multiprocessing

    base = btrfs_dir / "golden.img"
    write_random(base, 16 * MiB, seed=41)
    clone = btrfs_dir / "guest.img"
    reflink_copy(base, clone)
    rewrite_blocks(clone, 1.0, seed=42)  # all of it derivative data
    stop = multiprocessing.Event()

    def scribble() -> None:  # rewrites the clone, block after block, until told
        fd = os.open(clone, os.O_WRONLY)
        blocks = (16 * MiB) // (64 << 10)
        i = 0
        while not stop.is_set():
            os.pwrite(fd, os.urandom(64 << 10), (i % blocks) * (64 << 10))
            i += 7
        os.close(fd)

    writer = multiprocessing.Process(target=scribble)
    writer.start()
    try:
        out = btrfs_dir / "guest.thin"
        runs = []
        for _ in range(3):
            r = cli("backup", "--force", "--no-point-in-time", "--base", base, "--sparse",
                    "-o", out, clone)
            assert r.returncode in (0, 1), str(r)
            runs.append(r.returncode)
            cli("verify", out, check_rc=0)
    finally:
        stop.set()
        writer.join(10)
    assert 1 in runs, f"the clone was never seen changing while read: {runs}"


def test_a_base_of_more_files_than_a_process_may_hold_open(reflink_dir, monkeypatch):
    """A base directory of 1,500 files (a golden tree and a reflinked copy
    of it, one file changed): each base file is checked before anything is
    written, then opened again as the restore clones from it, the last used
    kept open.  Opened all at once and kept, the restore stopped at the
    1,024 descriptors a process may hold by default, said as a base file
    missing (exit 5).  The tree comes back exact, its files sharing the
    base's blocks (statfs: the restore takes a small part of their bytes)."""
    import threading

    d = reflink_dir
    base, copy = d / "golden", d / "copy"
    n, size = 1500, 16384
    spread_files(base, n, size, 41)
    for p in sorted(base.rglob("f*")):
        q = copy / p.relative_to(base)
        q.parent.mkdir(parents=True, exist_ok=True)
        reflink_copy(p, q)
    with open(copy / "d00" / "f0000", "r+b") as f:
        f.write(b"changed")
    arch = d / "t.caw"
    cli("backup", "--base", base, "-o", arch, copy, check_rc=0)
    assert arch.stat().st_size < 0.1 * n * size
    out = d / "out"
    nofile = ["prlimit", "--nofile=1024:1024", "--"]  # a default process's, hard limit too
    grew = usage_delta(d, lambda: cli("restore", "--base", base, arch, out, check_rc=0,
                                      prefix=nofile))
    for p in sorted(copy.rglob("f*")):
        assert sha(out / "copy" / p.relative_to(copy)) == sha(p), p
    assert grew < 0.25 * n * size, grew

    # a base file replaced after the check is refused when it is opened again
    from cloneaware.archive import thin
    from cloneaware.archive.reader import Stream
    from cloneaware.errors import BaseMismatch
    from cloneaware.restore.base import BaseFiles, open_base

    with open(arch, "rb") as f:
        stream = Stream(f)
        for _ in stream.events():
            break
        tb = stream.base
    assert isinstance(tb, thin.Base)
    monkeypatch.setattr(BaseFiles, "KEEP", 1)
    files = open_base(tb, str(base))
    try:
        victim = next(bf for bf in tb.files if bf.path == b"d01/f0001")
        assert victim is not tb.files[-1]  # not the one file kept open (KEEP 1)
        os.rename(base / "d01" / "f0031", base / "d01" / "f0001")  # same size, another inode
        with pytest.raises(BaseMismatch, match="changed or replaced during the restore"):
            files.fd(victim.number)
        # a FIFO in a base file's place is refused, not waited on for a writer
        fifo = next(bf for bf in tb.files if bf.path == b"d02/f0002")
        (base / "d02" / "f0002").unlink()
        os.mkfifo(base / "d02" / "f0002")
        said: list[BaseException] = []

        def ask():
            try:
                files.fd(fifo.number)
            except BaseException as e:
                said.append(e)

        t = threading.Thread(target=ask)
        t.start()
        t.join(10)
        blocked = t.is_alive()
        if blocked:  # let it go: a writer opens the FIFO
            os.close(os.open(base / "d02" / "f0002", os.O_WRONLY | os.O_NONBLOCK))
            t.join()
        assert not blocked, "opening a base file waited on a FIFO"
        assert len(said) == 1 and isinstance(said[0], BaseMismatch), said
        assert "not a regular file" in str(said[0])
    finally:
        files.close()
        files.close()  # twice: nothing closed again
