"""Sharing maps (``scan --save-map``) and ``cloneaware reshare``: give a tree
copied by a tool that lost its sharing (rsync) the sharing back, with
FIDEDUPERANGE, from an archive, a sharing map or a repository snapshot, on
real Btrfs and XFS; and ``restore --reshare-existing``."""
from __future__ import annotations

import io
import os

import pytest
from helpers.archivecraft import Craft
from helpers.cli import assert_one_line_error, cli, cli_json

from cloneaware.archive import format as fmt
from cloneaware.archive.events import EntryEvent, RefEvent
from cloneaware.archive.reader import Stream
from cloneaware.testing import make_family

pytestmark = pytest.mark.root

KiB, MiB = 1 << 10, 1 << 20


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
