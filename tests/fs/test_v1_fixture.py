"""A version 1 archive written by cloneaware 0.1.0 before format 2 existed
(tests/data/v1-tree.caw) must still restore exactly: the reader reads every
older version.  The tree: a 256 KiB random base.img, clone.img reflinked from
it with 8 bytes changed at 64 KiB, text.txt with an xattr and a hard link
sub/hard.txt, a symlink sub/link -> base.img, a 1 MiB sparse file with 3
bytes at 512 KiB; base.img and sub dated 2020-02-02."""
import datetime
import hashlib
import os
from pathlib import Path

from helpers.cli import cli, cli_json

DATA = Path(__file__).resolve().parent.parent / "data" / "v1-tree.caw"

SHA = {
    "base.img": "7ef8db372a5c7cb2cf46fefe87ed36e8b3e707247dcd78d38bae910ed64163f7",
    "clone.img": "3b736588ca1f0e565194e0766be1a55fa41c7080cb92572c04e813c3234329d6",
    "sub/hard.txt": "fab20648c4634d1614b4dc04f701934774ffb939cba4e6f22ae10867fe61984a",
    "sub/sparse": "78a4ab5ac671482b2c2672fff4872e81315cb6059c8114d6c0f93821d9cb1c7d",
    "text.txt": "fab20648c4634d1614b4dc04f701934774ffb939cba4e6f22ae10867fe61984a",
}


def test_v1_archive_lists_and_verifies():
    listing = cli_json("ls", "--json", DATA)
    assert listing["version"] == 1
    kinds = {e["path"]: e["type"] for e in listing["entries"]}
    assert kinds["v1src/sub/hard.txt"] == "hardlink"
    assert kinds["v1src/sub/link"] == "symlink"
    cli("verify", DATA, check_rc=0)


def test_v1_archive_restores_exactly(reflink_dir):
    dest = reflink_dir / "out"
    summary = cli_json("restore", "--json", DATA, dest)
    assert summary["reflinked_bytes"] > 0  # clone.img re-shares base.img
    root = dest / "v1src"
    for rel, sha in SHA.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == sha, rel
    assert os.readlink(root / "sub/link") == "base.img"
    assert (root / "text.txt").stat().st_ino == (root / "sub/hard.txt").stat().st_ino
    assert os.getxattr(root / "text.txt", "user.k") == b"v"
    assert os.stat(root / "sub/sparse").st_blocks * 512 < 64 << 10  # holes kept
    day = datetime.datetime.fromtimestamp((root / "sub").stat().st_mtime,
                                          datetime.UTC).date()
    assert day.isoformat() in ("2020-02-01", "2020-02-02")  # local midnight in any zone
    scan = cli_json("scan", "--json", root / "base.img", root / "clone.img")["totals"]
    assert scan["shared_bytes"] >= 2 * (192 << 10)
