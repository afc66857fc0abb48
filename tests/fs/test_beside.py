"""Restoring beside what is on disk (issue 30, cloneaware/restore/beside.py):
one clone restored next to its family takes its own bytes, not its whole
size; --share-with clones from files anywhere on DEST's filesystem; and
nothing is trusted by name or by an earlier hash.  Space is judged by
statfs on fresh loopback filesystems, contents by hashing the restored
tree."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from helpers.cli import assert_one_line_error, cli, cli_json
from helpers.space import Usage

from cloneaware.restore import Restore
from cloneaware.restore.beside import ShareIndex
from cloneaware.restore.select import Selection
from cloneaware.testing import make_family, reflink_copy, rewrite_blocks, write_random

pytestmark = pytest.mark.root

MiB = 1 << 20
BASE = 32 * MiB


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def family(fs):
    """A golden image and three clones, each with 2% of its 64 KiB blocks
    rewritten (640 KiB of its own), on a fresh filesystem."""
    return make_family(fs.path / "fam", base_size=BASE, clones=3, change=0.02,
                       small_files=3, sparse=False)


def own_bytes(fam, i: int) -> int:
    """The bytes clone ``i`` has that the golden image has not (64 KiB blocks)."""
    n = 0
    with open(fam["base"], "rb") as a, open(fam["clones"][i], "rb") as b:
        while True:
            x, y = a.read(64 << 10), b.read(64 << 10)
            if not x and not y:
                return n
            n += len(y) if x != y else 0


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
@pytest.mark.parametrize("source", ["archive", "repository"])
def test_one_clone_restored_beside_its_family_takes_its_own_bytes(loopfs, tmp_path, kind,
                                                                   source):
    """The family restored, one clone deleted, then restored alone with
    --include: by statfs it takes at most its own bytes plus 10% (the space
    it had before it was lost, plus 10% of its own bytes; it was its whole
    32 MiB more: the restore staged the golden image again, or fetched every
    blob, to clone from), and it is the clone, byte for byte."""
    src_fs = loopfs(kind, 1 << 30)
    fam = family(src_fs)
    want = sha(fam["clones"][1])
    own = own_bytes(fam, 1)
    assert 0 < own < BASE // 10
    if source == "archive":
        what = [tmp_path / "fam.cla"]
        cli("backup", "-o", what[0], fam["root"], check_rc=0)
    else:
        repo = tmp_path / "repo"
        cli("init", "-r", repo, check_rc=0)
        cli("backup", "-r", repo, fam["root"], check_rc=0)
        what = ["-r", repo, "latest"]
    dest_fs = loopfs(kind, 1 << 30)
    cli("restore", *what, dest_fs.path, check_rc=0)
    gone = dest_fs.path / "fam" / "images" / "clone1.img"
    # measured from before the loss: XFS frees an unlinked file's blocks
    # in the background, so a baseline taken after it could miss them
    with Usage(dest_fs.path) as u:
        gone.unlink()
        r = cli_json("restore", "--json", *what, "--include", "fam/images/clone1.img",
                     "--force", dest_fs.path)
    assert sha(gone) == want
    assert u.delta <= 0.10 * own, (u.delta, own, r)  # its own bytes, given back, plus 10%
    assert r["beside_bytes"] >= BASE - own - MiB, r


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_share_with_clones_from_a_golden_image_anywhere_on_the_filesystem(loopfs, tmp_path,
                                                                         kind):
    """A clone's backup restored next to a golden image that was never in
    it: with --share-with GOLDEN it takes its own bytes plus 10% by statfs;
    without, its whole size.  --share-with a directory does the same."""
    fs = loopfs(kind, 1 << 30)
    golden = fs.path / "golden.img"
    write_random(golden, BASE, 3)
    clone = fs.path / "src" / "guest.img"
    clone.parent.mkdir()
    reflink_copy(golden, clone)
    own = rewrite_blocks(clone, 0.02, 7)
    want = sha(clone)
    arch = tmp_path / "guest.cla"
    cli("backup", "-o", arch, clone.parent, check_rc=0)
    with Usage(fs.path) as plain:
        cli("restore", arch, fs.path / "plain", check_rc=0)
    with Usage(fs.path) as shared:
        r = cli_json("restore", "--json", "--share-with", golden, arch, fs.path / "d1")
    with Usage(fs.path) as tree:
        cli("restore", "--share-with", fs.path / "plain", arch, fs.path / "d2", check_rc=0)
    assert sha(fs.path / "d1" / "src" / "guest.img") == want
    assert sha(fs.path / "d2" / "src" / "guest.img") == want
    assert plain.delta >= BASE, plain.delta
    assert shared.delta <= 1.10 * own, (shared.delta, own, r)
    assert tree.delta <= 1.10 * own + MiB, tree.delta  # the whole of plain/ matches
    assert r["beside_bytes"] >= BASE - own - MiB and r["share_read_bytes"] == BASE, r


def test_share_with_verifies_what_it_cloned(reflink_dir, tmp_path):
    """A --share-with file rewritten after it was read (its index says it
    holds the bytes; it no longer does): the restored file is still the
    stored one, byte for byte, the differing ranges written.  Trusting the
    index would restore the rewritten bytes."""
    golden = reflink_dir / "golden.img"
    write_random(golden, 4 * MiB, 3)
    src = reflink_dir / "src"
    src.mkdir()
    reflink_copy(golden, src / "guest.img")
    want = sha(src / "guest.img")
    arch = tmp_path / "guest.cla"
    cli("backup", "-o", arch, src, check_rc=0)
    idx = ShareIndex.build([str(golden)], str(reflink_dir / "d"))
    assert idx.stats.chunks == 64
    rewrite_blocks(golden, 0.5, 9)  # after the index was made
    s = Restore(str(arch), str(reflink_dir / "d"), share=idx).run()
    idx.close()
    assert sha(reflink_dir / "d" / "src" / "guest.img") == want
    assert s.reuse_differing_bytes >= MiB, s
    assert s.beside_bytes + s.reuse_differing_bytes == 4 * MiB, s


@pytest.mark.parametrize("source", ["archive", "repository"])
def test_a_left_out_file_changed_in_dest_is_not_trusted(reflink_dir, tmp_path, source):
    """The golden image in DEST was edited since the restore (same name,
    same size): the clone restored beside it is still its stored self; only
    what still matches is cloned."""
    fam = make_family(reflink_dir / "fam", base_size=4 * MiB, clones=1, change=0.05,
                      small_files=0, sparse=False)
    want = sha(fam["clones"][0])
    if source == "archive":
        what = [tmp_path / "fam.cla"]
        cli("backup", "-o", what[0], fam["root"], check_rc=0)
    else:
        cli("init", "-r", tmp_path / "repo", check_rc=0)
        cli("backup", "-r", tmp_path / "repo", fam["root"], check_rc=0)
        what = ["-r", tmp_path / "repo", "latest"]
    dest = reflink_dir / "dest"
    cli("restore", *what, dest, check_rc=0)
    (dest / "fam" / "images" / "clone0.img").unlink()
    rewrite_blocks(dest / "fam" / "images" / "base.img", 0.25, 11)
    edited = sha(dest / "fam" / "images" / "base.img")
    r = cli_json("restore", "--json", *what, "--include", "fam/images/clone0.img", "--force",
                 dest)
    assert sha(dest / "fam" / "images" / "clone0.img") == want
    assert sha(dest / "fam" / "images" / "base.img") == edited  # left as it was
    assert r["reuse_differing_bytes"] >= MiB // 2 and r["beside_bytes"] >= MiB, r


def test_a_symlink_at_a_left_out_files_place_is_not_followed(reflink_dir, tmp_path):
    """The golden image's place in DEST is a symbolic link to a file outside
    DEST: the restore does not clone from (or read) what it points to."""
    fam = make_family(reflink_dir / "fam", base_size=2 * MiB, clones=1, change=0.05,
                      small_files=0, sparse=False)
    want = sha(fam["clones"][0])
    arch = tmp_path / "fam.cla"
    cli("backup", "-o", arch, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    cli("restore", arch, dest, check_rc=0)
    images = dest / "fam" / "images"
    (images / "clone0.img").unlink()
    outside = reflink_dir / "outside.img"
    shutil.move(images / "base.img", outside)
    os.symlink(outside, images / "base.img")
    r = cli_json("restore", "--json", arch, "--include", "fam/images/clone0.img", "--force",
                 dest)
    assert sha(images / "clone0.img") == want
    assert r["beside_bytes"] == 0, r


def test_share_with_refusals(reflink_dir, loopfs, tmp_path):
    fam = make_family(reflink_dir / "fam", base_size=1 * MiB, clones=0, small_files=0,
                      sparse=False)
    arch = tmp_path / "a.cla"
    cli("backup", "-o", arch, fam["root"], check_rc=0)
    other = loopfs("ext4", 256 * MiB)
    write_random(other.path / "x.img", MiB, 1)
    line = assert_one_line_error(cli("restore", "--share-with", other.path / "x.img", arch,
                                     reflink_dir / "d"), 2)
    assert "not on the filesystem of" in line
    line = assert_one_line_error(cli("restore", "--share-with", reflink_dir / "nope", arch,
                                     reflink_dir / "d"), 2)
    assert "--share-with" in line and "No such file" in line
    line = assert_one_line_error(cli("restore", "--share-with", fam["base"], arch,
                                     "ssh://h/d"), 2)
    assert "--share-with needs a local DEST" in line
    assert not (reflink_dir / "d").exists()


def test_selection_left_out_blobs_name_where_dest_holds_them(tmp_path, reflink_dir):
    """Unit: a manifest's left-out files, by blob, at their path below DEST."""
    from cloneaware.repo.connect import opened
    from cloneaware.restore.beside import left_out_blobs

    fam = make_family(reflink_dir / "fam", base_size=2 * MiB, clones=1, change=0.5,
                      small_files=0, sparse=False)
    cli("init", "-r", tmp_path / "repo", check_rc=0)
    cli("backup", "-r", tmp_path / "repo", fam["root"], check_rc=0)
    with opened(str(tmp_path / "repo")) as r:
        data = r.manifest(r.find_all(["latest"])[0])
    got = left_out_blobs(data, Selection(["fam/images/clone0.img"]))
    assert got and {v[0] for v in got.values()} == {b"fam/images/base.img"}
    assert sorted(v[1] for v in got.values()) == [i * MiB for i in range(2)]
    assert all(v[2] == 0 and v[3] == MiB for v in got.values())  # each blob held whole
    assert left_out_blobs(data, Selection(["fam"])) == {}


def test_a_left_out_file_that_holds_only_the_end_of_a_blob(reflink_dir, tmp_path):
    """The left-out file holds the later bytes of a blob at its start (a
    range cloned at a shifted offset): the restore of the chosen file, which
    needs the blob from its byte 0, does not clone from before the left-out
    file's start (it raised OverflowError, a traceback), and is exact."""
    from cloneaware import native

    src = reflink_dir / "src"
    src.mkdir()
    write_random(src / "a.img", 1 * MiB, 4)  # first in the manifest: owns the blob
    with open(src / "b.img", "wb") as f:
        f.truncate(1 * MiB - (64 << 10))
    fa = os.open(src / "a.img", os.O_RDONLY)
    fb = os.open(src / "b.img", os.O_WRONLY)
    try:
        native.ficlonerange(fb, fa, 64 << 10, 1 * MiB - (64 << 10), 0)
    finally:
        os.close(fa)
        os.close(fb)
    want = sha(src / "a.img")
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    dest = reflink_dir / "dest"
    cli("restore", "-r", repo, "latest", dest, check_rc=0)
    (dest / "src" / "a.img").unlink()
    r = cli_json("restore", "--json", "-r", repo, "latest", "--include", "src/a.img",
                 "--force", dest)
    assert sha(dest / "src" / "a.img") == want
    assert r["written_bytes"] >= 1 * MiB, r
