"""Sharing maps (``scan --save-map``) and ``cloneaware reshare``: give a tree
copied by a tool that lost its sharing (rsync) the sharing back, with
FIDEDUPERANGE, from an archive, a sharing map or a repository snapshot, on
real Btrfs and XFS; and ``restore --reshare-existing``."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers.archivecraft import Craft
from helpers.cli import CliServer, assert_one_line_error, cli, cli_json
from helpers.nobody import NOBODY
from helpers.space import Usage, compsize
from helpers.treeutil import Snapshot, assert_close, assert_same_tree

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.archive.events import EntryEvent, RefEvent
from cloneaware.archive.reader import Stream
from cloneaware.display import human
from cloneaware.source.flags import FILE_EXTENT_DTYPE
from cloneaware.testing import (
    make_family,
    make_loopfs,
    reflink_copy,
    rewrite_blocks,
    write_random,
)

pytestmark = pytest.mark.root

KiB, MiB = 1 << 10, 1 << 20


def physical_bytes(*paths) -> int:
    """The union of the files' physical extents (cloneaware scan, in-process)."""
    from cloneaware.scan import scan

    res = scan([os.fsencode(p) for p in paths])
    assert not res.skipped, res.skipped
    return int(res.plan.totals.physical_bytes)


def refs_of(data: bytes) -> list[tuple]:
    """(path, offset, length, source path, source offset) of every REF."""
    out = []
    for ev in Stream(io.BytesIO(data), maps=True, decode=False).events():
        if isinstance(ev, RefEvent):
            out.append((ev.file.entry.path, ev.offset, ev.length, ev.source.path,
                        ev.source_offset))
    return out


def entries_of(data: bytes) -> list[tuple]:
    return [(ev.entry.kind, ev.entry.path, ev.entry.size)
            for ev in Stream(io.BytesIO(data), maps=True, decode=False).events()
            if isinstance(ev, EntryEvent)]


# --- sharing maps --------------------------------------------------------------------

def test_save_map_holds_the_archives_references_and_no_data(reflink_dir, tmp_path):
    """A sharing map has the references an archive of the same tree has, the
    same entries less symlinks, a few KiB for a family of 40 MiB, and is read
    by verify and ls but refused by restore (one line, exit 2, nothing made)."""
    fam = make_family(reflink_dir / "fam", base_size=8 * MiB, clones=4)
    os.symlink("images/base.img", fam["root"] / "link")
    os.link(fam["base"], fam["root"] / "hard")
    m = tmp_path / "fam.map"
    d = cli_json("scan", "--json", "--save-map", m, fam["root"])
    assert d["map"]["references"] > 0 and d["map"]["bytes"] == m.stat().st_size < 16 * KiB
    assert d["map"]["referenced_bytes"] > 4 * 7 * MiB, d
    arch = tmp_path / "fam.cla"
    b = cli_json("backup", "--json", "--compress", "none", "-o", arch, fam["root"])
    assert d["map"]["referenced_bytes"] == b["referenced_bytes"]
    mapped = m.read_bytes()
    assert mapped.startswith(fmt.MAP_MAGIC)
    archived = arch.read_bytes()
    assert refs_of(mapped) == refs_of(archived) != []
    assert entries_of(mapped) == [e for e in entries_of(archived) if e[0] != fmt.K_SYMLINK]
    # the first name in walk order holds the file, the later one links to it
    assert (fmt.K_HARDLINK, b"fam/images/base.img", 0) in entries_of(mapped)

    v = cli_json("verify", "--json", m)
    assert v["map"] is True and v["stored_bytes"] == 0 and v["ref_records"] > 0
    assert "sharing map is whole" in cli("verify", m, check_rc=0).out
    ls = cli_json("ls", "--json", m)
    assert ls["map"] is True and ls["stored_bytes"] == 0
    assert ls["referenced_bytes"] == d["map"]["referenced_bytes"]

    dest = tmp_path / "dest"
    for r in (cli("restore", m, dest), cli("restore", "-", dest, input=mapped)):
        line = assert_one_line_error(r, 2)
        assert "is a sharing map" in line and "no file data" in line, line
        assert not dest.exists()
    dest.mkdir()
    (dest / "fam").mkdir()  # the tree is there: still the map is what is refused
    line = assert_one_line_error(cli("restore", m, dest), 2)
    assert f"{m} is a sharing map" in line, line


def test_save_map_refusals(btrfs_dir, tmp_path):
    fam = make_family(btrfs_dir / "fam", base_size=1 * MiB, clones=1, small_files=2,
                      sparse=False)
    m = tmp_path / "m.map"
    m.write_bytes(b"precious")
    line = assert_one_line_error(cli("scan", "--save-map", m, fam["root"]), 2)
    assert "exists; use --force" in line and m.read_bytes() == b"precious"
    cli("scan", "--save-map", m, "--force", fam["root"], check_rc=0)
    assert m.read_bytes().startswith(fmt.MAP_MAGIC)
    line = assert_one_line_error(cli("scan", "--force", fam["root"]), 2)
    assert "--force is for --save-map" in line
    other = btrfs_dir / "other" / "fam"
    other.mkdir(parents=True)
    line = assert_one_line_error(cli("scan", "--save-map", tmp_path / "two.map",
                                     fam["root"], other), 2)
    assert "fam" in line and not (tmp_path / "two.map").exists()
    # scan alone still takes two PATHs of one basename
    cli("scan", fam["root"], other, check_rc=0)
    line = assert_one_line_error(cli("scan", "--save-map", tmp_path / "no" / "m.map",
                                     fam["root"]), 2)
    assert "no such directory" in line
    # to standard output: the map there, the report on standard error
    r = cli("scan", "--save-map", "-", fam["root"], check_rc=0)
    assert r.stdout.startswith(fmt.MAP_MAGIC) and "sharing map -" in r.err
    assert refs_of(r.stdout) == refs_of(m.read_bytes())


def _map_with(record: str) -> bytes:
    c = Craft(magic=fmt.MAP_MAGIC)
    c.dir(b"t")
    c.reg(b"t/a", 8192)
    if record == "DATA":
        c.data(0, b"x" * 8192)
    elif record == "BASEREF":
        c.baseref(0, 4096, 0, 0)
    c.end()
    return c.finish()


@pytest.mark.parametrize("record", ["DATA", "BASEREF"])
def test_a_map_that_holds_data_is_refused(tmp_path, record):
    m = tmp_path / "bad.map"
    m.write_bytes(_map_with(record))
    line = assert_one_line_error(cli("verify", m), 3)
    assert f"{record} record in a sharing map" in line, line
    good = tmp_path / "good.map"
    good.write_bytes(_map_with("none"))
    cli("verify", good, check_rc=0)


# --- reshare ----------------------------------------------------------------------------

def rsync(src, dest) -> None:
    """rsync -aSH: every byte written again, holes kept (-S), hard links kept (-H)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rsync", "-aSH", str(src), str(dest) + "/"], check=True)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        native.syncfs(fd)
    finally:
        os.close(fd)


def read_noatime(path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def ctimes(root) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_ctime_ns
    return out


def family(top, base_size: int = 16 * MiB, clones: int = 4) -> dict:
    fam = make_family(top / "fam", base_size=base_size, clones=clones, small_files=10)
    os.link(fam["base"], fam["root"] / "images" / "hardlinked.img")
    os.symlink("images/base.img", fam["root"] / "link")
    return fam


@pytest.mark.parametrize("source", ["map", "archive"])
def test_rsync_copy_gets_its_sharing_back(reflink_dir, tmp_path, source):
    """A family copied by rsync takes every logical byte; reshare brings it
    back to the source's physical usage (within 5%: here exactly), changes no
    byte, mode or time, and a second run finds everything already shared."""
    fam = family(reflink_dir / "src")
    src_phys = physical_bytes(fam["root"])
    given = tmp_path / ("fam.map" if source == "map" else "fam.cla")
    if source == "map":
        cli("scan", "--save-map", given, fam["root"], check_rc=0)
    else:
        cli("backup", "-o", given, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    with Usage(reflink_dir) as total:
        rsync(fam["root"], dest)
    assert total.delta > 4 * src_phys, (total.delta, src_phys)  # by df
    copied = physical_bytes(dest)
    assert copied > 4 * src_phys, (copied, src_phys)
    before, ct = Snapshot(dest), ctimes(dest)

    dry = cli_json("reshare", "--json", "--dry-run", "--from", given, dest)
    assert dry["dry_run"] and dry["shared_bytes"] == 0 and dry["dedupe_calls"] == 0
    assert dry["to_dedupe_bytes"] == dry["referenced_bytes"] > 4 * 15 * MiB, dry
    assert physical_bytes(dest) == copied

    with Usage(reflink_dir) as freed:
        r = cli_json("reshare", "--json", "--from", given, dest)
    # the judge, by df: the copy back to the source's physical size (+10%)
    assert total.delta + freed.delta <= 1.10 * src_phys, (total.delta, freed.delta, src_phys)
    assert_close(-freed.delta, r["freed_bytes"], 0.05, "freed, as reshare says and as df")
    assert r["skipped"] == r["refused"] == r["differing"] == [], r
    assert r["shared_bytes"] == r["to_dedupe_bytes"] == r["referenced_bytes"], r
    assert r["already_shared_bytes"] == r["differing_bytes"] == r["unaligned_bytes"] == 0
    assert r["times_restored"] == 0, r  # docs/KERNEL.md D8: the kernel moved none
    assert_close(physical_bytes(dest), src_phys, 0.05, "after reshare")
    assert physical_bytes(dest) == src_phys
    assert_same_tree(before, Snapshot(dest))
    assert ctimes(dest) == ct

    again = cli_json("reshare", "--json", "--from", given, dest)
    assert again["already_shared_bytes"] == again["referenced_bytes"], again
    assert again["shared_bytes"] == again["dedupe_calls"] == 0, again
    out = cli("reshare", "--from", given, dest, check_rc=0).out
    assert "already shared" in out and f"{dest} from {given}" in out


def test_edited_file_keeps_its_edit_and_is_reported(reflink_dir, tmp_path):
    """Bytes edited in the copy after it was made differ from their source:
    the kernel leaves them alone, reshare counts them (the 64 KiB around the
    edit, not the whole 8 MiB piece) and names the file, exit 1."""
    fam = family(reflink_dir / "src", clones=2)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    with Usage(reflink_dir) as total:  # the copy, the edit, reshare
        rsync(fam["root"], dest)
        edited = dest / "fam" / "images" / "clone1.img"
        data = bytearray(edited.read_bytes())
        offsets = [100, 5 * MiB + 12345, 13 * MiB]
        for off in offsets:
            data[off] ^= 0xFF
        fd = os.open(edited, os.O_WRONLY)
        try:
            for off in offsets:
                os.pwrite(fd, bytes([data[off]]), off)
            os.fsync(fd)
        finally:
            os.close(fd)
        before = Snapshot(dest)
        r = cli("reshare", "--json", "--from", m, dest, check_rc=1)
    d = r.json()
    assert [x["path"] for x in d["differing"]] == [str(edited)], d
    # each edited byte costs one 64 KiB piece that differs (unless a rewritten
    # block of the clone, not a reference, held it)
    assert 0 < d["differing_bytes"] <= len(offsets) * 64 * KiB, d
    assert d["differing"][0]["bytes"] == d["differing_bytes"]
    assert d["shared_bytes"] == d["referenced_bytes"] - d["differing_bytes"], d
    assert f"{edited}: {d['differing_bytes']} bytes differ" in r.err
    assert_same_tree(before, Snapshot(dest))
    assert read_noatime(edited) == bytes(data)
    expect = physical_bytes(fam["root"]) + d["differing_bytes"]
    assert total.delta <= 1.10 * expect, (total.delta, expect)  # by df
    assert_close(physical_bytes(dest), expect, 0.01, "shared all but the edits")


def test_missing_resized_and_replaced_files_are_skipped_and_listed(reflink_dir, tmp_path):
    fam = family(reflink_dir / "src", clones=5)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    rsync(fam["root"], dest)
    img = dest / "fam" / "images"
    (img / "clone0.img").unlink()
    with open(img / "clone1.img", "ab") as f:
        f.write(b"longer")
    (img / "clone2.img").unlink()
    os.symlink("clone3.img", img / "clone2.img")
    (img / "clone4.img").unlink()
    (img / "clone4.img").mkdir()
    before = Snapshot(dest)
    r = cli("reshare", "--json", "--from", m, dest, check_rc=1)
    d = r.json()
    size = 16 * MiB
    assert sorted((x["path"], x["reason"]) for x in d["skipped"]) == [
        (str(img / "clone0.img"), "missing"),
        (str(img / "clone1.img"), f"{size + 6} bytes; the sharing map says {size}"),
        (str(img / "clone2.img"), "a symlink, not a file"),
        (str(img / "clone4.img"), "not a regular file"),
    ], d
    for x in d["skipped"]:
        assert f"{x['path']}: skipped: {x['reason']}" in r.err
    assert d["shared_bytes"] > 0.9 * size and d["skipped_bytes"] > 3.5 * size, d
    assert_same_tree(before, Snapshot(dest))
    # the one clone still there shares with the base again
    assert physical_bytes(img / "base.img", img / "clone3.img") < 1.1 * size


def test_one_call_dedupes_up_to_64_destinations(reflink_dir, tmp_path):
    """Pieces of one source range go in one call, with at most 64 destinations
    (the kernel takes 127, docs/KERNEL.md D7), and references are cut on an
    8 MiB grid of the source: 130 copies of a 1 MiB file take 3 calls
    (64 + 64 + 2), and 3 copies of a 20 MiB file 3 calls (8 + 8 + 4 MiB)."""
    src = reflink_dir / "src" / "many"
    src.mkdir(parents=True)
    write_random(src / "a000", 1 * MiB, 7)
    for i in range(1, 131):
        reflink_copy(src / "a000", src / f"a{i:03d}")
    write_random(src / "b0", 20 * MiB, 8)
    for i in range(1, 4):
        reflink_copy(src / "b0", src / f"b{i}")
    m = tmp_path / "many.map"
    cli("scan", "--save-map", m, src, check_rc=0)
    dest = reflink_dir / "dest"
    with Usage(reflink_dir) as u:
        rsync(src, dest)
        r = cli_json("reshare", "--json", "--from", m, dest)
    assert r["references"] == 133 and r["shared_bytes"] == (130 + 3 * 20) * MiB, r
    assert r["dedupe_calls"] == 3 + 3, r
    assert u.delta <= 1.10 * 21 * MiB, u.delta  # by df
    assert physical_bytes(dest) == 21 * MiB


@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_dest_that_cannot_dedupe_is_a_clear_error(request, btrfs_dir, tmp_path, kind):
    fam = family(btrfs_dir / "src", base_size=1 * MiB, clones=2)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = request.getfixturevalue(f"{kind}_dir") / "dest"
    rsync(fam["root"], dest)
    before = Snapshot(dest)
    for extra in ((), ("--dry-run",)):
        line = assert_one_line_error(cli("reshare", *extra, "--from", m, dest), 2)
        assert f"{dest}: its filesystem ({kind}) cannot dedupe" in line, line
    assert_same_tree(before, Snapshot(dest))


def test_bad_inputs_are_one_line_errors(btrfs_dir, tmp_path):
    fam = family(btrfs_dir / "src", base_size=1 * MiB, clones=1)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = btrfs_dir / "dest"
    rsync(fam["root"], dest)
    (tmp_path / "text").write_bytes(b"not an archive at all\n")
    (tmp_path / "cut.map").write_bytes(m.read_bytes()[:-30])
    cases = [
        (("reshare", dest), 2, "give --from ARCHIVE DEST"),
        (("reshare", "--from", m), 2, "Missing argument"),
        (("reshare", "--from", m, dest, dest), 2, "give --from ARCHIVE DEST"),
        (("reshare", "--from", tmp_path / "none.map", dest), 2, "no such archive"),
        (("reshare", "--from", tmp_path, dest), 2, "is a directory, not an archive"),
        (("reshare", "--from", m, btrfs_dir / "nodest"), 2, "no such directory"),
        (("reshare", "--from", m, m), 2, "is not a directory"),
        (("reshare", "--from", tmp_path / "text", dest), 3, "wrong magic"),
        (("reshare", "--from", tmp_path / "cut.map", dest), 3, "truncated"),
        (("reshare", "-r", tmp_path / "norepo", "latest", dest), 2, "no such repository"),
    ]
    for args, rc, want in cases:
        r = cli(*args)
        if want == "Missing argument":  # typer's own usage message, several lines
            assert r.returncode == 2 and want in r.err and "Traceback" not in r.err, str(r)
            continue
        line = assert_one_line_error(r, rc)
        assert want in line, (args, line)


def test_dest_that_is_the_tree_itself_gets_a_hint(btrfs_dir, tmp_path):
    """DEST must hold the top-level names (DEST/fam/...), as restore puts
    them; given the tree itself, every file is missing, and reshare says
    once where DEST must point."""
    fam = family(btrfs_dir / "src", base_size=1 * MiB, clones=1)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = btrfs_dir / "dest"
    rsync(fam["root"], dest)
    r = cli("reshare", "--from", m, dest / "fam", check_rc=1)
    hint = [ln for ln in r.err.splitlines() if "DEST must hold" in ln]
    assert hint == [f"cloneaware: {dest / 'fam' / 'fam'} is missing: DEST must hold the "
                    "sharing map's top-level names (fam/...), as restore puts them"], r.err


def test_from_standard_input(reflink_dir, tmp_path):
    fam = family(reflink_dir / "src", base_size=2 * MiB, clones=2)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    rsync(fam["root"], dest)
    r = cli("reshare", "--json", "--from", "-", dest, input=m.read_bytes(), check_rc=0).json()
    assert r["shared_bytes"] == r["referenced_bytes"] > 0
    assert physical_bytes(dest) == physical_bytes(fam["root"])


def test_symlinks_in_dest_are_never_followed(reflink_dir, tmp_path):
    """DEST's images directory swapped for a symlink to a copy outside DEST,
    and a file swapped for a symlink to another copy outside: the files
    outside are not deduped (their maps do not change), and reshare lists
    the places it did not follow."""
    fam = family(reflink_dir / "src", base_size=2 * MiB, clones=2)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest, outside = reflink_dir / "dest", reflink_dir / "outside"
    rsync(fam["root"], dest)
    rsync(fam["root"], outside)
    img = dest / "fam" / "images"
    os.rename(img, reflink_dir / "moved")
    os.symlink(outside / "fam" / "images", img)
    (dest / "fam" / "sparse.img").unlink()
    os.symlink(outside / "fam" / "sparse.img", dest / "fam" / "sparse.img")
    before = physical_bytes(outside)
    r = cli("reshare", "--json", "--from", m, dest, check_rc=1).json()
    reasons = {x["path"]: x["reason"] for x in r["skipped"]}
    assert reasons[str(img / "base.img")] == \
        "a directory on its path is a symlink or not a directory", r
    assert r["shared_bytes"] == 0 and physical_bytes(outside) == before


def test_times_that_moved_are_set_back(reflink_dir, tmp_path, monkeypatch):
    """No kernel here moves a time on dedupe (docs/KERNEL.md D8); a kernel
    that did is stood in for by a wrapper that stamps each destination's
    times after the real call: reshare sets atime and mtime back."""
    from cloneaware.reshare import run as reshare

    fam = family(reflink_dir / "src", base_size=2 * MiB, clones=2)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    rsync(fam["root"], dest)
    before = Snapshot(dest)
    real = native.fideduperange

    def stamping(src_fd, src_offset, length, dests, path=None):
        got = real(src_fd, src_offset, length, dests, path)
        for fd, _ in dests:
            os.utime(fd, ns=(1, 2))
        return got

    monkeypatch.setattr(reshare.native, "fideduperange", stamping)
    with open(m, "rb") as f:
        s = reshare.Reshare(str(dest)).run_archive(f)
    assert s.shared_bytes > 0 and s.times_restored == 2, s  # the two clones
    assert_same_tree(before, Snapshot(dest))


def test_as_another_user_files_it_may_not_dedupe_into_are_reported(nobody):
    """As uid 65534: the files it owns are deduped though opened read-only; a
    file of root's that it may read but not write answers EPERM and is listed
    as refused, one it may not read as skipped; the run goes on (exit 1)."""
    fs = make_loopfs(nobody.root, "btrfs", 256 * MiB)
    try:
        os.chmod(fs.path, 0o755)
        fam = family(fs.path / "src", base_size=2 * MiB, clones=3)
        m = fs.path / "fam.map"
        cli("scan", "--save-map", m, fam["root"], check_rc=0)
        os.chmod(m, 0o644)  # root's file, 0600 as every output: handed over to nobody
        dest = fs.path / "dest"
        rsync(fam["root"], dest)
        img = dest / "fam" / "images"
        for dirpath, dirnames, filenames in os.walk(dest):
            for n in dirnames + filenames:
                os.chown(os.path.join(dirpath, n), NOBODY, NOBODY, follow_symlinks=False)
        os.chown(img / "clone1.img", 0, 0)
        os.chmod(img / "clone1.img", 0o644)
        os.chown(img / "clone2.img", 0, 0)
        os.chmod(img / "clone2.img", 0o600)
        before = Snapshot(dest)
        r = nobody.run("reshare", "--json", "--from", m, dest)
        assert r.returncode == 1 and "Traceback" not in r.err, str(r)
        d = r.json()
        assert d["refused"] == [{"path": str(img / "clone1.img"), "reason":
                                 "dedupe not permitted: it needs root, the file's owner, or "
                                 "a user who may write the file"}], d
        assert d["skipped"] == [{"path": str(img / "clone2.img"),
                                 "reason": "Permission denied"}], d
        assert d["shared_bytes"] >= 2 * MiB * 0.9, d  # clone0 and the hard link's base
        # Btrfs's extent items are root's to read: the run says it could not look
        assert "needs CAP_SYS_ADMIN" in d["bookends"]["unchecked"], d
        assert d["bookends"]["extents_rewritten"] == 0, d
        assert_same_tree(before, Snapshot(dest))
        shared = physical_bytes(img / "base.img", img / "clone0.img")
        assert shared < 2.3 * MiB, shared
    finally:
        fs.unmount()


def _many_refs_map(path, n: int) -> int:
    """A sharing map of one file ``t/b`` with ``n`` references of 4 KiB into
    ``t/a``, every other block; returns the files' size."""
    size = n * 8192 + 8192
    c = Craft(magic=fmt.MAP_MAGIC)
    c.dir(b"t")
    c.reg(b"t/a", size, eflags=fmt.EF_REFERENCED)
    c.end()
    c.reg(b"t/b", size)
    for i in range(n):
        c.ref(i * 8192, 4096, 1, i * 8192 + 4096)
    c.end()
    path.write_bytes(c.finish())
    return size


@pytest.mark.slow
def test_memory_is_bounded_on_a_million_references(btrfs_dir, tmp_path):
    """A million references take no more memory than a thousand, give or
    take the window (64 Ki pieces): they are not kept.  (--dry-run: the same
    reading, cutting, grouping and FIEMAP checks, without a million calls.)"""
    rss = {}
    with CliServer() as srv:
        for n in (1000, 1_000_000):
            m = tmp_path / f"{n}.map"
            size = _many_refs_map(m, n)
            dest = btrfs_dir / f"d{n}"
            (dest / "t").mkdir(parents=True)
            for name in "ab":
                with open(dest / "t" / name, "wb") as f:
                    f.truncate(size)
            r = srv.run("reshare", "--json", "--dry-run", "--from", m, dest, check_rc=0,
                        timeout=300)
            d = r.json()
            assert d["references"] == n and d["to_dedupe_bytes"] == n * 4096, d
            rss[n] = r.maxrss_kib
    assert rss[1_000_000] - rss[1000] < 64 * 1024, rss


def test_small_windows_give_the_same_result(reflink_dir, tmp_path, monkeypatch):
    """Windows of 5 pieces and 4 open files (flushed, closed and reopened
    all the time) share what the default window shares."""
    from cloneaware.reshare import run as reshare

    fam = family(reflink_dir / "src", base_size=20 * MiB, clones=4)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    rsync(fam["root"], dest)
    before = Snapshot(dest)
    monkeypatch.setattr(reshare, "WINDOW", 5)
    monkeypatch.setattr(reshare, "FILES", 4)
    with open(m, "rb") as f:
        s = reshare.Reshare(str(dest)).run_archive(f)
    assert s.shared_bytes == s.referenced_bytes > 4 * 18 * MiB, s
    assert not (s.skipped or s.refused or s.differing), s
    assert physical_bytes(dest) == physical_bytes(fam["root"])
    assert_same_tree(before, Snapshot(dest))


def test_from_a_repository_snapshot(reflink_dir, tmp_path):
    """-r REPO SNAPSHOT DEST: the BLOB ranges of the manifest that name blob
    bytes seen earlier in it share with where they were seen
    (repo/restore.py Coverage); the copy gets the source's usage back."""
    fam = family(reflink_dir / "src", base_size=8 * MiB, clones=3)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    with Usage(reflink_dir) as total:
        rsync(fam["root"], dest)
        before = Snapshot(dest)
        r = cli_json("reshare", "--json", "-r", repo, "latest", dest)
    assert total.delta <= 1.10 * physical_bytes(fam["root"]), total.delta  # by df
    assert r["shared_bytes"] == r["referenced_bytes"] > 3 * 7 * MiB, r
    assert not (r["skipped"] or r["refused"] or r["differing"]), r
    assert physical_bytes(dest) == physical_bytes(fam["root"])
    assert_same_tree(before, Snapshot(dest))
    # the other spellings: --from SNAPSHOT, and the repository from the environment
    again = cli_json("reshare", "--json", "-r", repo, "--from", "latest", dest)
    assert again["already_shared_bytes"] == again["referenced_bytes"], again
    env = {**os.environ, "CLONEAWARE_REPOSITORY": str(repo)}
    out = cli("reshare", "latest", dest, env=env, check_rc=0).out
    assert f"{dest} from snapshot " in out and "already shared" in out, out
    line = assert_one_line_error(cli("reshare", "-r", repo, dest), 2)
    assert "give -r REPO SNAPSHOT DEST" in line
    line = assert_one_line_error(cli("reshare", "-r", repo, "nosuch", dest))
    assert "nosuch" in line, line
    # and a sharing map is no archive to make a snapshot of
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    line = assert_one_line_error(cli("backup", "-r", repo, "--from-archive", m), 2)
    assert f"{m} is a sharing map" in line, line


# --- the space the filesystem gives back (statfs, compsize) --------------------------

def _rsync_family(loopfs, kind: str) -> tuple[dict, int, Path, Path, int]:
    """The issue's family on a fresh filesystem of its own (a 32 MiB golden
    image, 5 clones with 2% rewritten in 64 KiB blocks, small files), its
    sharing map, and an rsync -aSHAX copy on another fresh filesystem.
    Returns the family, its used space (statfs delta), the map, DEST, and
    the copy's used space."""
    src_fs, dest_fs = loopfs(kind, 1 << 30), loopfs(kind, 1 << 30)
    with Usage(src_fs.path) as u:
        fam = make_family(src_fs.path / "fam", base_size=32 * MiB, clones=5, change=0.02,
                          small_files=10, sparse=False)
    m = src_fs.path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    dest = dest_fs.path / "dest"
    with Usage(dest_fs.path) as c:
        dest.mkdir()
        subprocess.run(["rsync", "-aSHAX", str(fam["root"]), str(dest) + "/"], check=True)
    return fam, u.delta, m, dest, c.delta


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_reshare_gives_back_the_space_df_shows(loopfs, kind):
    """The rsync'd family takes 6x the source's space; after reshare the
    filesystem's own count (statfs, and compsize on Btrfs, which counts an
    extent whole while any block of it is referenced) is within 1.10x of the
    source's.  On Btrfs that needs the clones' own extents, left referenced
    in 2% of their blocks, rewritten and released; the summary's freed
    figure is the filesystem's; the tree's contents and times unchanged."""
    fam, src_used, m, dest, copied = _rsync_family(loopfs, kind)
    assert copied > 4.5 * src_used, (copied, src_used)
    before = Snapshot(dest)
    with Usage(dest) as u:
        r = cli("reshare", "--json", "--from", m, dest, check_rc=0).json()
    after = copied + u.delta
    assert after <= 1.10 * src_used, (after, src_used, r)
    assert_close(r["freed_bytes"], -u.delta, 0.02, "freed, as the summary says")
    assert_same_tree(before, Snapshot(dest))
    b = r["bookends"]
    if kind == "btrfs":
        assert b["extents_rewritten"] >= 5 and b["kept"] == {}, b
        assert b["rewritten_bytes"] <= 0.03 * 5 * 32 * MiB, b  # the clones' 2%, once
        assert compsize(dest) <= 1.10 * compsize(fam["root"])
    else:
        assert b["partly_referenced"] == 0, b  # XFS releases block by block
    out = cli("reshare", "--from", m, dest, check_rc=0).out  # again: nothing left to do
    assert "the filesystem's used space fell by" in out, out


def test_reshare_rewrites_a_remainder_that_ends_inside_a_block(loopfs, tmp_path):
    """A clone whose own bytes are a block in the middle and its last,
    partial block (an edited tail): that tail can move only to a copy that
    ends where it does (docs/KERNEL.md D10), so it gets a file of its own;
    the clone's old extent is released all the same (statfs), and every
    byte and time is as it was."""
    src_fs, dest_fs = loopfs("btrfs", 512 * MiB), loopfs("btrfs", 512 * MiB)
    top = src_fs.path / "t"
    top.mkdir()
    size = 8 * MiB + 1234
    write_random(top / "base.img", size, 61)
    reflink_copy(top / "base.img", top / "clone.img")
    with open(top / "clone.img", "r+b") as f:
        f.seek(3 * MiB)
        f.write(os.urandom(64 * KiB))
        f.seek(size - 1234)
        f.write(os.urandom(1234))
    m = tmp_path / "t.map"
    cli("scan", "--save-map", m, top, check_rc=0)
    dest = dest_fs.path / "d"
    rsync(top, dest)
    before = Snapshot(dest)
    with Usage(dest) as u:
        r = cli("reshare", "--json", "--from", m, dest, check_rc=0).json()
    assert r["bookends"]["extents_rewritten"] == 1, r
    assert r["bookends"]["rewritten_bytes"] == 64 * KiB + 1234, r
    assert -u.delta >= 8 * MiB - 256 * KiB, (u.delta, r)
    assert_same_tree(before, Snapshot(dest))


def held_extents(path: Path) -> dict[int, int]:
    """The extents a file on Btrfs refers to only in part: their disk size
    by address (its EXTENT_DATA items)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = native.btrfs_file_extents(fd, os.fstat(fd).st_ino, path)
    finally:
        os.close(fd)
    items = np.frombuffer(raw, dtype=FILE_EXTENT_DTYPE)
    out = {}
    for bytenr in set(items["disk_bytenr"].tolist()) - {0}:
        mine = items[items["disk_bytenr"] == bytenr]
        spans = sorted(zip(mine["offset"].tolist(), (mine["offset"] + mine["num_bytes"]).tolist()))
        covered, end = 0, 0
        for a, z in spans:
            covered += max(0, z - max(a, end))
            end = max(end, z)
        if covered < int(mine["ram_bytes"][0]):
            out[bytenr] = int(mine["disk_num_bytes"][0])
    return out


def _held_in_part(path: Path) -> int:
    return sum(held_extents(path).values())


def test_reshare_keeps_extents_a_file_outside_dest_holds(loopfs):
    """A file outside DEST that clones the first 4 MiB of a clone holds the
    clone's extent: no rewrite in DEST frees it, so none is written; the
    summary says why it was kept, and the outside file is untouched."""
    fam, src_used, m, dest, copied = _rsync_family(loopfs, "btrfs")
    outside = dest.parent / "kept-by-hand.img"
    with open(dest / "fam" / "images" / "clone0.img", "rb") as a, open(outside, "wb") as b:
        native.ficlonerange(b.fileno(), a.fileno(), 0, 4 * MiB, 0)
    want = outside.read_bytes()
    held = _held_in_part(outside)
    r = cli("reshare", "--json", "--from", m, dest, check_rc=0).json()
    b = r["bookends"]
    # As rsync lays a clone out on a quiet machine, one 32 MiB extent, of
    # which the outside file holds the first 4 MiB: 32 MiB kept, the other
    # four clones' extents rewritten.  Under load rsync's writes are flushed
    # in pieces and a clone is a dozen extents; then the extents kept for
    # the outside file are those it holds in part, whatever their number,
    # and some small pieces are not worth rewriting.
    kept = dict(b["kept"])
    assert kept.pop("held by files outside the tree (or a snapshot)", 0) == held, (b, held)
    assert set(kept) <= {"rewriting them would write more than it frees"}, b  # small pieces
    assert b["extents_rewritten"] >= 4, b  # at least one a clone
    assert b["extents_rewritten"] + len(held_extents(outside)) <= b["partly_referenced"], b
    assert outside.read_bytes() == want
    out = cli("reshare", "--from", m, dest, check_rc=0).out
    assert f"kept {human(held)} of partly shared extents: held by files outside" in out, out


# --- restore --reshare-existing ------------------------------------------------------

def _day2(fam: dict) -> None:
    """What changes overnight: 2% of the base and of each clone rewritten in
    64 KiB blocks, one small file grown, one shrunk, a new one."""
    rewrite_blocks(fam["base"], 0.02, 7)
    for i, c in enumerate(fam["clones"]):
        rewrite_blocks(c, 0.02, 200 + i)
    with open(fam["root"] / "etc" / "conf003", "ab") as f:
        f.write(b"more=1\n")
    with open(fam["root"] / "etc" / "conf009", "r+b") as f:
        f.truncate(7)
    write_random(fam["root"] / "etc" / "new.bin", 100 * KiB, 9)


def test_restore_reshare_existing_writes_only_what_changed(reflink_dir, tmp_path):
    """Day 2's archive restored over day 1's restore: every stored range is
    cloned from the file already at its name and read back, and only the
    64 KiB slices that changed are written; the result is day 2's tree,
    exactly, with the source's physical usage, like a plain restore --force
    that writes everything."""
    fam = family(reflink_dir / "src", base_size=16 * MiB, clones=3)
    day1, day2 = tmp_path / "day1.cla", tmp_path / "day2.cla"
    cli("backup", "-o", day1, fam["root"], check_rc=0)
    _day2(fam)
    cli("backup", "-o", day2, fam["root"], check_rc=0)
    want = Snapshot(fam["root"])
    plain, reuse = reflink_dir / "plain", reflink_dir / "reuse"
    for d in (plain, reuse):
        cli("restore", day1, d, check_rc=0)
    p = cli_json("restore", "--json", "--force", day2, plain)
    r = cli_json("restore", "--json", "--reshare-existing", day2, reuse)
    assert p["reused_bytes"] == p["reuse_differing_bytes"] == 0
    stored = p["written_bytes"]
    assert r["reused_bytes"] + r["reuse_differing_bytes"] <= stored
    assert r["written_bytes"] == stored - r["reused_bytes"], r
    # what changed: 2% of four 16 MiB images, and the small files
    assert r["written_bytes"] <= 0.03 * 4 * 16 * MiB + 128 * KiB, r
    assert r["reused_bytes"] > 0.8 * stored, r
    for d in (plain, reuse):
        assert_same_tree(want, Snapshot(d / "fam"))
        assert physical_bytes(d) == physical_bytes(fam["root"])
    out = cli("restore", "--reshare-existing", day2, reuse, check_rc=0).out
    assert "reused" in out and "of the copy already there" in out, out


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_restore_reshare_existing_takes_the_change_and_no_more(loopfs, tmp_path, kind):
    """By statfs on fresh filesystems: day 2 restored over day 1 with
    --reshare-existing adds at most the change plus 10%, and leaves DEST no
    bigger than a fresh restore of day 2 (plus 10%).  Day 2 rewrote 20 MiB
    in the middle of a 32 MiB database file: on Btrfs the old copy's extent
    would stay whole for the 12 MiB the new file clones from it, unless those
    are rewritten and the extent released."""
    src_fs = loopfs(kind, 1 << 30)
    fam = make_family(src_fs.path / "fam", base_size=16 * MiB, clones=2, change=0.02,
                      small_files=5, sparse=False)
    db = fam["root"] / "db.img"
    write_random(db, 32 * MiB, 5)
    day1, day2 = tmp_path / "day1.cla", tmp_path / "day2.cla"
    cli("backup", "-o", day1, fam["root"], check_rc=0)
    with open(db, "r+b") as f:
        f.seek(8 * MiB)
        f.write(os.urandom(20 * MiB))
    cli("backup", "-o", day2, fam["root"], check_rc=0)
    fresh_fs, dest_fs = loopfs(kind, 1 << 30), loopfs(kind, 1 << 30)
    with Usage(fresh_fs.path) as fresh:
        cli("restore", day2, fresh_fs.path / "d", check_rc=0)
    restored = dest_fs.path / "d" / "fam" / "db.img"
    with Usage(dest_fs.path) as total:
        cli("restore", day1, dest_fs.path / "d", check_rc=0)
        old_extents = _extents(restored) if kind == "btrfs" else 0
        with Usage(dest_fs.path) as step:
            r = cli_json("restore", "--json", "--reshare-existing", day2, dest_fs.path / "d")
    assert step.delta <= 1.10 * 20 * MiB, (step.delta, r)
    assert total.delta <= 1.10 * fresh.delta, (total.delta, fresh.delta, r)
    assert_same_tree(Snapshot(fam["root"]), Snapshot(dest_fs.path / "d" / "fam"))
    if kind == "btrfs":
        # Judged against the layout found, by Btrfs's own EXTENT_DATA items:
        # what the new file still refers to only in part is what the summary
        # says was not worth rewriting, nothing else is kept, and something
        # was released.  On a quiet machine day 1's file is one 32 MiB
        # extent, released whole; a sync by another process while it was
        # written lays it out in pieces, some kept as too small to pay.
        held = held_extents(restored)
        kept = dict(r["bookends_kept"])
        assert kept.pop("rewriting them would write more than it frees", 0) == \
            sum(held.values()), (r, held)
        assert not kept, r
        assert r["bookend_released_bytes"] > 0 and r["bookend_rewritten_bytes"] <= 13 * MiB, r
        if old_extents == 1:
            assert r["bookend_released_bytes"] >= 32 * MiB, r


def _extents(path: Path) -> int:
    """How many extents a file on Btrfs refers to (its EXTENT_DATA items)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = native.btrfs_file_extents(fd, os.fstat(fd).st_ino, path)
    finally:
        os.close(fd)
    return len(set(np.frombuffer(raw, dtype=FILE_EXTENT_DTYPE)["disk_bytenr"].tolist()) - {0})


def test_restore_reshare_existing_never_follows_a_symlink(reflink_dir, tmp_path):
    """A symlink at a file's name is not cloned from (its target, outside
    DEST, is left alone); the file is restored from the archive's bytes."""
    fam = family(reflink_dir / "src", base_size=2 * MiB, clones=1)
    arch = tmp_path / "a.cla"
    cli("backup", "-o", arch, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    cli("restore", arch, dest, check_rc=0)
    outside = reflink_dir / "outside.img"
    os.rename(dest / "fam" / "images" / "base.img", outside)
    os.symlink(outside, dest / "fam" / "images" / "base.img")
    before = physical_bytes(outside)
    r = cli_json("restore", "--json", "--reshare-existing", arch, dest)
    assert r["written_bytes"] >= 2 * MiB, r  # base.img, from the archive
    assert_same_tree(Snapshot(fam["root"]), Snapshot(dest / "fam"))
    assert physical_bytes(outside, dest / "fam" / "images" / "base.img") == before + 2 * MiB


def test_restore_reshare_existing_refusals(btrfs_dir, tmp_path):
    fam = family(btrfs_dir / "src", base_size=1 * MiB, clones=1)
    m = tmp_path / "fam.map"
    cli("scan", "--save-map", m, fam["root"], check_rc=0)
    line = assert_one_line_error(cli("restore", "--reshare-existing", m, btrfs_dir / "d"), 2)
    assert "is a sharing map" in line
    line = assert_one_line_error(cli("restore", "--reshare-existing", m, "ssh://h/d"), 2)
    assert "--reshare-existing needs a local DEST" in line


def test_restore_reshare_existing_from_a_repository(reflink_dir, tmp_path):
    """Repository snapshots reuse the old copy the same way (BLOB data)."""
    fam = family(reflink_dir / "src", base_size=8 * MiB, clones=2)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, fam["root"], check_rc=0)
    dest = reflink_dir / "dest"
    cli("restore", "-r", repo, "latest", dest, check_rc=0)
    _day2(fam)
    cli("backup", "-r", repo, fam["root"], check_rc=0)
    r = cli_json("restore", "--json", "-r", repo, "--reshare-existing", "latest", dest)
    assert r["reused_bytes"] > 0.8 * (r["reused_bytes"] + r["written_bytes"]), r
    assert_same_tree(Snapshot(fam["root"], atime=False), Snapshot(dest / "fam"))
    # at least as much sharing as a fresh restore of the snapshot makes (on XFS
    # that is less than the source's: a matter of the repository's, not of
    # reshare; reusing the old copy keeps some of its sharing)
    fresh = reflink_dir / "fresh"
    with Usage(reflink_dir) as fresh_usage:
        cli("restore", "-r", repo, "latest", fresh, check_rc=0)
    assert physical_bytes(dest) <= physical_bytes(fresh) * 1.01
    # by df: DEST is no larger than the fresh restore (removing it gives back
    # at most what the fresh one took, plus 10%)
    with Usage(reflink_dir) as gone:
        shutil.rmtree(dest)
    assert -gone.delta <= 1.10 * fresh_usage.delta + 256 * KiB, (gone.delta, fresh_usage.delta)
