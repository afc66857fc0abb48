"""backup --dry-run and restore --dry-run (what would be stored or made,
nothing touched), -q/--quiet (no summary, warnings still said) and
-v/--verbose (each entry as it is stored or made), as restic, Borg, tar and
rsync users expect them (issue 21).  On real filesystems, against what the
same command does without --dry-run."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error, cli, cli_json

from cloneaware.errors import EXIT_ARCHIVE, EXIT_USAGE
from cloneaware.testing import reflink_copy, rewrite_blocks, write_random

pytestmark = pytest.mark.root


def state(*tops: Path) -> dict[str, tuple]:
    """Everything below ``tops`` (the tops too) as it is: kind, size, mode,
    modification time, and a file's bytes.  Equal before and after: nothing
    was made, removed or written there, not even a directory's mtime."""
    out: dict[str, tuple] = {}
    for top in tops:
        if not os.path.lexists(top):
            out[str(top)] = ("absent",)
            continue
        for root, dirs, files in os.walk(top):
            for n in [".", *dirs, *files]:
                p = os.path.join(root, n)
                st = os.lstat(p)
                data = open(p, "rb").read() if os.path.isfile(p) and not \
                    os.path.islink(p) else None
                times = (st.st_mtime_ns, st.st_ctime_ns)
                if p.endswith("/locks/."):
                    # a repository's locks directory: the shared lock every reading
                    # command takes was made and removed there
                    times = ()
                out[os.path.normpath(p)] = (st.st_mode, st.st_size, *times, data)
    return out


def mount_top(p: Path) -> Path:
    p = p.resolve()
    while not os.path.ismount(p):
        p = p.parent
    return p


@pytest.fixture
def tree(btrfs_dir) -> Path:
    """A clone family, a hard link, a symlink, an empty directory."""
    t = btrfs_dir / "tree"
    (t / "vm").mkdir(parents=True)
    (t / "etc" / "empty").mkdir(parents=True)
    write_random(t / "vm" / "golden.img", 4 << 20, 1)
    for i in range(2):
        reflink_copy(t / "vm" / "golden.img", t / "vm" / f"guest{i}.img")
        rewrite_blocks(t / "vm" / f"guest{i}.img", 0.1, 10 + i)
    (t / "etc" / "conf").write_bytes(b"conf\n")
    os.link(t / "etc" / "conf", t / "etc" / "conf.link")
    os.symlink("conf", t / "etc" / "conf.sym")
    return t


def ls_paths(arch) -> list[str]:
    return [e["path"] for e in cli_json("ls", "--json", arch)["entries"]]


SAME_KEYS = ("files", "dirs", "symlinks", "hardlinks", "logical_bytes", "stored_bytes",
             "referenced_bytes", "hole_bytes", "physical_bytes", "archive_bytes")


# --- backup --dry-run -------------------------------------------------------------------

def test_backup_dry_run_into_an_archive_writes_nothing_and_says_what_a_backup_stores(
        tree, btrfs_dir):
    out = btrfs_dir / "out"
    out.mkdir()
    before = state(tree, out)
    dry = cli_json("backup", "--dry-run", "--json", "-o", out / "a.caw", tree)
    assert dry["dry_run"] is True
    assert state(tree, out) == before  # no archive, no temporary file, no clone left
    # standard output stays free: nothing of an archive goes there
    r = cli("backup", "--dry-run", "-o", "-", tree, check_rc=0)
    assert r.stdout.startswith(b"dry run, nothing written: 4 files"), str(r)
    real = cli_json("backup", "--json", "-o", out / "a.caw", tree)
    assert real["dry_run"] is False
    assert {k: dry[k] for k in SAME_KEYS} == {k: real[k] for k in SAME_KEYS}
    assert real["archive_bytes"] == os.path.getsize(out / "a.caw")
    # the target is checked as a backup checks it
    line = assert_one_line_error(cli("backup", "--dry-run", "-o", out / "a.caw", tree),
                                 EXIT_USAGE)
    assert "a.caw exists; use --force" in line, line
    cli("backup", "--dry-run", "--force", "-o", out / "a.caw", tree, check_rc=0)
    assert os.path.getsize(out / "a.caw") == real["archive_bytes"]
    line = assert_one_line_error(cli("backup", "--dry-run", "--base", tree / "vm" / "golden.img",
                                     "--sparse", "-o", out / "s.img",
                                     tree / "vm" / "guest0.img"), EXIT_USAGE)
    assert "--dry-run does not take --sparse" in line, line


def test_backup_dry_run_into_a_repository_reads_as_a_backup_and_adds_nothing(tree, btrfs_dir):
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, tree, check_rc=0)
    rewrite_blocks(tree / "vm" / "guest1.img", 0.1, 99)
    write_random(tree / "etc" / "new", 1 << 20, 7)
    anchors = mount_top(btrfs_dir) / ".cloneaware-anchors"
    before = state(repo, anchors, tree)
    dry = cli_json("backup", "--dry-run", "--json", "-r", repo, tree)
    # no blob, manifest, snapshot, index or lock left; the anchors of the last
    # backup are the ones the next one proves with, untouched, and none is added
    assert state(repo, anchors, tree) == before
    assert dry["dry_run"] is True and dry["snapshot"] is None
    assert len(cli_json("snapshots", "--json", "-r", repo)) == 1
    real = cli_json("backup", "--json", "-r", repo, tree)
    # what the dry run said is what the backup did: read only what changed, and
    # add it (proved by the same anchors)
    for k in ("files", "bytes_read", "unchanged_bytes", "added_bytes", "logical_bytes"):
        assert dry[k] == real[k], (k, dry[k], real[k])
    assert 1 << 20 <= real["added_bytes"] < 2 << 20, real
    assert real["unchanged_bytes"] > 8 << 20, real
    r = cli("backup", "--dry-run", "-r", repo, tree, check_rc=0)
    assert r.stdout.startswith(b"dry run, nothing written: 5 files"), str(r)
    assert b"would add 0 B to the repository" in r.stdout, str(r)


# --- restore --dry-run ------------------------------------------------------------------

RESTORE_KEYS = ("files", "dirs", "symlinks", "hardlinks", "specials", "left_out",
                "logical_bytes", "written_bytes", "hole_bytes")


def assert_same_plan(dry: dict, real: dict) -> None:
    assert {k: dry[k] for k in RESTORE_KEYS} == {k: real[k] for k in RESTORE_KEYS}, (dry, real)
    # what a restore cannot clone (another filesystem) it copies
    assert dry["reflinked_bytes"] == real["reflinked_bytes"] + real["copied_bytes"], (dry, real)


def test_restore_dry_run_makes_nothing_and_says_what_a_restore_makes(tree, btrfs_dir,
                                                                     xfs_dir):
    arch = btrfs_dir / "a.caw"
    cli("backup", "-o", arch, tree, check_rc=0)
    for dest in (btrfs_dir / "dest", xfs_dir / "dest"):
        for how in ("file", "pipe"):
            src, data = (arch, None) if how == "file" else ("-", arch.read_bytes())
            dry = cli("restore", "--dry-run", "--json", "-v", src, dest, input=data,
                      check_rc=0)
            assert not os.path.lexists(dest), how  # not even DEST is made
            d = cli_json("restore", "--dry-run", "--json", src, dest, input=data)
            assert d["dry_run"] is True
            # -v with --json: the paths on stderr, the JSON alone on stdout
            # (the free space of DEST's filesystem moves with the other tests)
            assert {**dry.json(), "seconds": 0, "free_bytes": 0} == \
                {**d, "seconds": 0, "free_bytes": 0}
            dry_paths = dry.stderr.decode().splitlines()
            assert dry_paths == ls_paths(arch), dry_paths
        real = cli("restore", "--json", "-v", arch, dest, check_rc=0)
        assert_same_plan(d, real.json())
        assert real.stderr.decode().splitlines() == dry_paths
        # DEST is checked as a restore checks it, and left as it is
        before = state(dest)
        line = assert_one_line_error(cli("restore", "--dry-run", arch, dest), EXIT_USAGE)
        assert f"{dest}/tree exists; use --force" in line, line
        r = cli("restore", "--dry-run", "-v", "--force", arch, dest, check_rc=0)
        lines = r.stdout.decode().splitlines()
        assert "tree/vm/golden.img  (replaces what is there)" in lines, lines
        assert "tree/vm" in lines, lines  # a directory is merged into, not replaced
        assert state(dest) == before


def test_restore_dry_run_with_include_and_of_snapshots(tree, btrfs_dir):
    arch = btrfs_dir / "a.caw"
    cli("backup", "-o", arch, tree, check_rc=0)
    args = ("--include", "tree/vm/guest1.img", "--include", "tree/etc/conf.link")
    d = cli_json("restore", "--dry-run", "--json", *args, arch, btrfs_dir / "d1")
    real = cli_json("restore", "--json", *args, arch, btrfs_dir / "d1")
    assert_same_plan(d, real)
    assert d["left_out"] > 0 and d["files"] == 1 and d["hardlinks"] == 1, d
    line = assert_one_line_error(cli("restore", "--dry-run", "--include", "nosuch", arch,
                                     btrfs_dir / "d2"), EXIT_USAGE)
    assert "leaves nothing of the archive to restore" in line, line
    # a pipe cannot say beforehand which file a chosen hard link needs: as a restore
    r = cli("restore", "--dry-run", "--include", "tree/etc/conf.link", "-", btrfs_dir / "d3",
            input=arch.read_bytes())
    assert r.returncode == 1 and b"not restored: the file it is a hard link to" in r.stderr, \
        str(r)

    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    s1 = cli_json("backup", "--json", "-r", repo, tree)["snapshot"]
    rewrite_blocks(tree / "vm" / "guest0.img", 0.2, 5)
    s2 = cli_json("backup", "--json", "-r", repo, tree)["snapshot"]
    before = state(repo)
    for snaps in ([s2], [s1, s2]):
        dest = btrfs_dir / f"r{len(snaps)}"
        dry = cli("restore", "--dry-run", "--json", "-v", "-r", repo, *snaps, dest,
                  check_rc=0)
        assert not os.path.lexists(dest)
        real = cli("restore", "--json", "-v", "-r", repo, *snaps, dest, check_rc=0)
        assert_same_plan(dry.json(), real.json())
        # the blobs the snapshots share are written once and reflinked after
        assert dry.json()["reflinked_bytes"] > 0
        assert dry.stderr.decode().splitlines() == real.stderr.decode().splitlines()
        if len(snaps) == 2:
            assert f"{s1[:8]}/tree/vm/golden.img" in dry.stderr.decode().splitlines()
    d = cli_json("restore", "--dry-run", "--json", "-r", repo, "--strip-components", "2",
                 "--include", "tree/vm", s1, btrfs_dir / "r3")
    real = cli_json("restore", "--json", "-r", repo, "--strip-components", "2",
                    "--include", "tree/vm", s1, btrfs_dir / "r3")
    assert_same_plan(d, real)
    assert state(repo) == before


# --- -q and -v --------------------------------------------------------------------------

def test_quiet_says_nothing_but_warnings_and_errors(tree, btrfs_dir):
    arch = btrfs_dir / "a.caw"
    for args in (["backup", "-q", "-o", arch, tree], ["verify", "-q", arch],
                 ["restore", "--quiet", arch, btrfs_dir / "d"]):
        r = cli(*args, check_rc=0)
        assert (r.stdout, r.stderr) == (b"", b""), str(r)
    # the summary is what -q leaves out (so that the test above can fail)
    assert cli("verify", arch, check_rc=0).stdout.startswith(b"archive is whole")
    # a warning is still said, and the exit code still tells
    r = cli("restore", "-q", "--base", tree / "vm" / "golden.img", arch, btrfs_dir / "d2",
            check_rc=0)
    assert r.stdout == b"" and r.stderr == \
        b"cloneaware: --base given, but this archive is not a thin backup\n", str(r)
    bad = btrfs_dir / "bad.caw"
    data = bytearray(arch.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(data)
    line = assert_one_line_error(cli("verify", "-q", bad), EXIT_ARCHIVE)
    assert str(bad) in line or "offset" in line, line
    # --json is asked for by name: -q does not take it away
    assert cli_json("verify", "-q", "--json", arch)["entries"] == 10
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    for args in (["backup", "-q", "-r", repo, tree], ["check", "-q", "-r", repo],
                 ["forget", "-q", "--keep-last", "1", "-r", repo], ["prune", "-q", "-r", repo],
                 ["restore", "-q", "-r", repo, "latest", btrfs_dir / "d3"]):
        r = cli(*args, check_rc=0)
        assert (r.stdout, r.stderr) == (b"", b""), str(r)
    line = assert_one_line_error(cli("backup", "-q", "-v", "-o", btrfs_dir / "x.caw", tree),
                                 EXIT_USAGE)
    assert "give -q or -v, not both" in line, line


def test_verbose_lists_each_entry_as_it_is_stored_and_made(tree, btrfs_dir):
    arch = btrfs_dir / "a.caw"
    r = cli("backup", "-v", "-o", arch, tree, check_rc=0)
    lines = r.stdout.decode().splitlines()
    want = ls_paths(arch)
    assert len(want) == 10 and lines[:len(want)] == want, lines
    assert lines[len(want)].startswith("4 files"), lines  # then the summary
    # the archive on stdout: the paths go to stderr
    r = cli("backup", "-v", "-o", "-", tree, check_rc=0)
    assert r.stderr.decode().splitlines() == want, str(r)
    (btrfs_dir / "b.caw").write_bytes(r.stdout)
    assert ls_paths(btrfs_dir / "b.caw") == want
    r = cli("restore", "-v", "--strip-components", "1", arch, btrfs_dir / "d", check_rc=0)
    lines = r.stdout.decode().splitlines()
    assert lines[:-1] == [p[len("tree/"):] for p in want if p != "tree"], lines
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    r = cli("backup", "-v", "-r", repo, tree, check_rc=0)
    assert r.stdout.decode().splitlines()[:-1] == want, str(r)


def test_restore_dry_run_agrees_on_thin_sparse_links_and_subvolumes(btrfs_dir, xfs_dir):
    """The cases a restore handles apart: a thin backup (its base's ranges are
    cloned), the sparse form (its own ranges are cloned from it), a hard link
    to a file left out that a chosen clone shares with (staged, from a pipe
    too), Btrfs subvolumes (made again on Btrfs, directories elsewhere), and
    a DEST below a file."""
    t = btrfs_dir / "t"
    for d in ("a", "b", "c"):
        (t / d).mkdir(parents=True)
    write_random(t / "a" / "golden.img", 2 << 20, 1)
    reflink_copy(t / "a" / "golden.img", t / "b" / "guest.img")
    rewrite_blocks(t / "b" / "guest.img", 0.2, 2)
    os.link(t / "a" / "golden.img", t / "c" / "link")
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(t / "vol")], check=True)
    (t / "vol" / "f").write_bytes(b"in a subvolume\n")
    arch = btrfs_dir / "t.caw"
    cli("backup", "-o", arch, t, check_rc=0)

    def both(args: list, dest: Path, input=None, rc=0) -> None:
        dry = cli("restore", "--dry-run", "--json", *args, dest, input=input, check_rc=rc)
        assert not os.path.lexists(dest)
        real = cli("restore", "--json", *args, dest, input=input, check_rc=rc)
        assert_same_plan(dry.json(), real.json())
        for k in ("base_bytes", "subvolumes", "not_exact"):
            assert dry.json()[k] == real.json()[k], (k, dry.json(), real.json())

    both([arch], btrfs_dir / "d1")  # the subvolume made again
    both([arch], xfs_dir / "d2", rc=1)  # a directory, said
    sel = ["--include", "t/b", "--include", "t/c"]
    both([*sel, "-"], btrfs_dir / "d3", input=arch.read_bytes())
    both([*sel, arch], btrfs_dir / "d4")
    g, c = t / "a" / "golden.img", t / "b" / "guest.img"
    thin = btrfs_dir / "thin.caw"
    cli("backup", "--base", g, "-o", thin, c, check_rc=0)
    both(["--base", g, thin], btrfs_dir / "d5")
    both(["--base", g, thin], xfs_dir / "d6")
    sparse = btrfs_dir / "guest.thin"
    cli("backup", "--base", g, "--sparse", "-o", sparse, c, check_rc=0)
    both(["--base", g, sparse], btrfs_dir / "d7")
    (btrfs_dir / "file").write_bytes(b"")
    for dry in (["--dry-run"], []):
        line = assert_one_line_error(cli("restore", *dry, arch, btrfs_dir / "file" / "sub"),
                                     EXIT_USAGE)
        assert "not a directory (or a component of it is not)" in line, line


def test_backup_dry_run_snapshot_leaves_what_a_killed_backup_left(btrfs_dir):
    """A real backup --snapshot deletes the snapshot a killed one left; a dry
    run leaves it for the next real run."""
    vol = btrfs_dir / "vol"
    subprocess.run(["btrfs", "-q", "subvolume", "create", str(vol)], check=True)
    write_random(vol / "f", 1 << 20, 3)
    stale = btrfs_dir / ".cloneaware-snapshot-999999-deadbeef"
    subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(vol), str(stale)],
                   check=True)
    s = cli_json("backup", "--dry-run", "--json", "--snapshot", "-o", btrfs_dir / "a.caw", vol)
    assert s["captured_by_snapshot"] == 1 and stale.exists()
    assert not (btrfs_dir / "a.caw").exists()
    cli("backup", "--snapshot", "-o", btrfs_dir / "a.caw", vol, check_rc=0)
    assert not stale.exists()
