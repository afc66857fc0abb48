"""Choosing what is backed up and what is restored (issue 21), as restic,
Borg, tar and rsync users expect: backup --exclude (gitignore-style),
--exclude-from, --files-from, --exclude-caches, --one-file-system (the
default); restore --include (sharing between restored parts kept) and
--strip-components; into archives and repositories alike."""
from __future__ import annotations

import os

import pytest
from helpers.cli import assert_one_line_error, cli, cli_json

from cloneaware.errors import EXIT_USAGE
from cloneaware.patterns import CACHEDIR_SIGNATURE
from cloneaware.testing import make_loopfs, reflink_copy, write_random

pytestmark = pytest.mark.root


def paths_in(arch) -> set[str]:
    return {e["path"] for e in cli_json("ls", "--json", arch)["entries"]}


@pytest.fixture
def tree(btrfs_dir):
    t = btrfs_dir / "tree"
    for d in ("vm", "src/cache", "src/build", "home/.cache/app", "logs"):
        (t / d).mkdir(parents=True)
    write_random(t / "vm" / "golden.img", 2 << 20, 1)
    reflink_copy(t / "vm" / "golden.img", t / "vm" / "guest.img")
    (t / "keep.txt").write_bytes(b"keep\n")
    (t / "scratch.tmp").write_bytes(b"tmp\n")
    (t / "src" / "main.c").write_bytes(b"int main;\n")
    (t / "src" / "main.o.tmp").write_bytes(b"x")
    (t / "src" / "cache" / "blob").write_bytes(b"cached\n")
    (t / "src" / "build" / "out").write_bytes(b"built\n")
    (t / "logs" / "cache").write_bytes(b"a file named cache\n")
    (t / "home" / ".cache" / "CACHEDIR.TAG").write_bytes(CACHEDIR_SIGNATURE + b"\n# a cache\n")
    (t / "home" / ".cache" / "app" / "data").write_bytes(b"cache data\n")
    (t / "home" / ".cache" / "junk").write_bytes(b"junk\n")
    (t / "home" / "notes").write_bytes(b"notes\n")
    (t / "home" / "fake-tag").mkdir()
    (t / "home" / "fake-tag" / "CACHEDIR.TAG").write_bytes(b"not the signature\n")
    (t / "home" / "fake-tag" / "kept").write_bytes(b"kept\n")
    return t


def test_exclude_patterns_gitignore_style(tree, tmp_path):
    arch = tmp_path / "a.caw"
    s = cli_json("backup", "--json", "-o", arch, "--exclude", "cache", "--exclude", "*.tmp",
                 "--exclude", f"{tree}/src/build", "--exclude", "tree/vm/guest.img", tree)
    got = paths_in(arch)
    for gone in ("tree/src/cache", "tree/src/cache/blob", "tree/logs/cache", "tree/scratch.tmp",
                 "tree/src/main.o.tmp", "tree/src/build", "tree/src/build/out",
                 "tree/vm/guest.img"):
        assert gone not in got, gone
    for kept in ("tree/keep.txt", "tree/src/main.c", "tree/vm/golden.img", "tree/logs",
                 "tree/home/.cache/junk"):
        assert kept in got, kept
    assert s["excluded"] == 6, s  # a directory counts once
    # a trailing / matches directories only: the file named cache stays
    arch2 = tmp_path / "b.caw"
    cli("backup", "-o", arch2, "--exclude", "cache/", tree, check_rc=0)
    got2 = paths_in(arch2)
    assert "tree/logs/cache" in got2 and "tree/src/cache" not in got2


def test_exclude_from_files_from_and_exclude_caches(tree, tmp_path):
    ex = tmp_path / "exclude.txt"
    ex.write_text("# build products\n*.tmp\n\nsrc/\n")
    lst = tmp_path / "files.txt"
    lst.write_text(f"{tree / 'home'}\n\n{tree / 'keep.txt'}\n")
    arch = tmp_path / "a.caw"
    cli("backup", "-o", arch, "--exclude-from", ex, "--files-from", lst, "--exclude-caches",
        tree / "vm", check_rc=0)
    got = paths_in(arch)
    assert got == {"vm", "vm/golden.img", "vm/guest.img", "keep.txt", "home", "home/notes",
                   "home/.cache", "home/.cache/CACHEDIR.TAG", "home/fake-tag",
                   "home/fake-tag/CACHEDIR.TAG", "home/fake-tag/kept"}, got
    r = cli("backup", "-o", tmp_path / "c.caw", "--exclude-from", tmp_path / "missing", tree)
    assert assert_one_line_error(r, EXIT_USAGE).endswith("missing: No such file or directory")
    r = cli("backup", "-o", tmp_path / "c.caw", "--exclude", "[oops", tree)
    assert "'[' without its ']'" in assert_one_line_error(r, EXIT_USAGE)


def test_exclude_into_a_repository(tree, btrfs_dir):
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, "--exclude", "*.tmp", "--exclude-caches", tree, check_rc=0)
    got = {e["path"] for e in cli_json("ls", "--json", "-r", repo, "latest")["entries"]}
    assert "tree/scratch.tmp" not in got and "tree/home/.cache/junk" not in got
    assert "tree/home/.cache/CACHEDIR.TAG" in got and "tree/keep.txt" in got


def test_one_file_system_is_the_default(btrfs_dir, tmp_path):
    top = btrfs_dir / "top"
    (top / "mnt").mkdir(parents=True)
    (top / "here").write_bytes(b"here\n")
    fs = make_loopfs(tmp_path, "tmpfs", 1 << 20)
    try:
        os.rmdir(top / "mnt")
        os.symlink(fs.path, top / "mnt-link")  # a symlink is stored, never followed
        (fs.path / "there").write_bytes(b"there\n")
        import subprocess

        (top / "mnt").mkdir()
        subprocess.run(["mount", "--bind", str(fs.path), str(top / "mnt")], check=True)
        try:
            for flags, inside in (([], False), (["--one-file-system"], False),
                                  (["--cross-filesystems"], True)):
                arch = tmp_path / f"x{len(flags)}{inside}.caw"
                cli("backup", "-o", arch, *flags, top, check_rc=0)
                got = paths_in(arch)
                assert "top/mnt" in got and "top/here" in got
                assert ("top/mnt/there" in got) == inside, (flags, got)
        finally:
            subprocess.run(["umount", str(top / "mnt")], check=True)
    finally:
        fs.unmount()


# --- restore --include and --strip-components --------------------------------------------

def files_under(d) -> dict[str, bytes]:
    """Every entry below D: a file's bytes, a directory as None."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs:
            out[os.path.relpath(os.path.join(root, n), d)] = None
        for n in files:
            out[os.path.relpath(os.path.join(root, n), d)] = open(os.path.join(root, n),
                                                                   "rb").read()
    return out


def physical(d) -> int:
    return cli_json("scan", "--json", d)["totals"]["physical_bytes"]


@pytest.fixture
def archive(tree, tmp_path):
    # a hard link: the archive's first name (tree/keep-link) is the file,
    # tree/src/main.c a HARDLINK entry naming it
    os.link(tree / "src" / "main.c", tree / "keep-link")
    a = tmp_path / "a.caw"
    cli("backup", "-o", a, tree, check_rc=0)
    return a


def test_restore_include_a_file_and_a_directory(tree, archive, btrfs_dir):
    dest = btrfs_dir / "dest"
    s = cli_json("restore", "--json", "--include", "tree/keep.txt", "--include", "tree/vm",
                 archive, dest)
    got = files_under(dest)
    assert set(got) == {"tree", "tree/keep.txt", "tree/vm", "tree/vm/golden.img",
                        "tree/vm/guest.img"}, sorted(got)
    for p in ("tree/keep.txt", "tree/vm/golden.img", "tree/vm/guest.img"):
        assert got[p] == (tree.parent / p).read_bytes(), p
    assert s["left_out"] > 0, s
    # the sharing between the restored parts is re-created: one image's blocks
    assert physical(dest / "tree" / "vm") == 2 << 20
    # the directories above what was chosen have their own metadata
    assert os.stat(dest / "tree").st_mtime_ns == os.stat(tree).st_mtime_ns


def test_restore_include_a_clone_without_the_file_it_shares_with(tree, archive, btrfs_dir,
                                                                  tmp_path):
    """guest.img's bytes are stored once, in golden.img (REF records): restored
    alone, it still gets them, and the staging directory is gone."""
    for how in ("file", "pipe"):
        dest = btrfs_dir / f"dest-{how}"
        args = ("--include", "tree/vm/guest.img")
        if how == "file":
            cli("restore", *args, archive, dest, check_rc=0)
        else:
            cli("restore", *args, "-", dest, input=archive.read_bytes(), check_rc=0)
        got = files_under(dest)
        assert set(got) == {"tree", "tree/vm", "tree/vm/guest.img"}, (how, sorted(got))
        assert got["tree/vm/guest.img"] == (tree / "vm" / "guest.img").read_bytes()
        assert physical(dest) == 2 << 20


def test_restore_include_a_hard_link_without_its_file(tree, archive, btrfs_dir):
    """From an archive file, a chosen hard link whose file is left out gets
    that file's data; from a pipe, which cannot say beforehand, it is listed
    as not restored (exit 1)."""
    kinds = {e["path"]: e["type"] for e in cli_json("ls", "--json", archive)["entries"]}
    assert kinds["tree/keep-link"] == "file" and kinds["tree/src/main.c"] == "hardlink", kinds
    dest = btrfs_dir / "dest"
    cli("restore", "--include", "tree/src/main.c", archive, dest, check_rc=0)
    got = files_under(dest)
    assert set(got) == {"tree", "tree/src", "tree/src/main.c"}, sorted(got)
    assert got["tree/src/main.c"] == b"int main;\n"
    dest2 = btrfs_dir / "dest2"
    r = cli("restore", "--include", "tree/src/main.c", "-", dest2, input=archive.read_bytes())
    assert r.returncode == 1, str(r)
    assert "tree/src/main.c: not restored: the file it is a hard link to was left out" \
        in r.stderr.decode(), str(r)
    assert not (dest2 / "tree" / "src" / "main.c").exists()
    # both names chosen: one file with two names again
    dest3 = btrfs_dir / "dest3"
    cli("restore", "--include", "tree/src", "--include", "tree/keep-link", "-", dest3,
        input=archive.read_bytes(), check_rc=0)
    assert os.stat(dest3 / "tree" / "src" / "main.c").st_ino == \
        os.stat(dest3 / "tree" / "keep-link").st_ino


def test_restore_strip_components(tree, archive, btrfs_dir):
    dest = btrfs_dir / "dest"
    cli("restore", "--strip-components", "1", archive, dest, check_rc=0)
    got = files_under(dest)
    assert "keep.txt" in got and "vm/guest.img" in got and "tree" not in got, sorted(got)
    assert got == {p[len("tree/"):]: b for p, b in files_under(tree.parent).items()
                   if p.startswith("tree/")}
    dest2 = btrfs_dir / "dest2"
    cli("restore", "--strip-components", "2", "--include", "tree/vm", archive, dest2,
        check_rc=0)
    assert set(files_under(dest2)) == {"golden.img", "guest.img"}
    assert physical(dest2) == 2 << 20


def test_restore_include_nothing_matched(archive, btrfs_dir):
    dest = btrfs_dir / "dest"
    for args in (["--include", "tree/nosuch"], ["--strip-components", "9"]):
        line = assert_one_line_error(cli("restore", *args, archive, dest), EXIT_USAGE)
        assert "leaves nothing of the archive to restore" in line, line
        assert not dest.exists()


def test_restore_include_from_a_repository(tree, btrfs_dir):
    repo = btrfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, tree, check_rc=0)
    dest = btrfs_dir / "dest"
    cli("restore", "-r", repo, "--include", "tree/vm/guest.img", "--include", "tree/home",
        "latest", dest, check_rc=0)
    got = files_under(dest)
    assert set(got) == {"tree", "tree/vm", "tree/vm/guest.img", "tree/home", "tree/home/notes",
                        "tree/home/.cache", "tree/home/.cache/CACHEDIR.TAG",
                        "tree/home/.cache/app", "tree/home/.cache/app/data",
                        "tree/home/.cache/junk", "tree/home/fake-tag",
                        "tree/home/fake-tag/CACHEDIR.TAG", "tree/home/fake-tag/kept"}, sorted(got)
    assert got["tree/vm/guest.img"] == (tree / "vm" / "guest.img").read_bytes()
    dest2 = btrfs_dir / "dest2"
    cli("restore", "-r", repo, "--strip-components", "2", "--include", "tree/vm", "latest",
        dest2, check_rc=0)
    assert set(files_under(dest2)) == {"golden.img", "guest.img"}
    assert physical(dest2) == 2 << 20
    line = assert_one_line_error(cli("restore", "-r", repo, "--include", "nosuch", "latest",
                                     btrfs_dir / "dest3"), EXIT_USAGE)
    assert "leaves nothing of the snapshot to restore" in line, line
