"""restore --dry-run says whether the restore fits (issue 31, item 12): the
bytes it would write beside the free space statfs gives for DEST's
filesystem; too many is said in one line and exit 4, as the restore itself
would end, and nothing is made.  A real small ext4 and a real archive and
repository."""
from __future__ import annotations

import json

import pytest
from helpers.cli import cli

from cloneaware.testing import write_random

pytestmark = pytest.mark.root


def test_a_dry_run_says_the_restore_would_not_fit(btrfs_dir, loopfs, tmp_path):
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "big", 64 << 20, 7)
    arch = tmp_path / "a.caw"
    cli("backup", "-o", arch, src, check_rc=0)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    small = loopfs("ext4", 40 << 20).path
    for args in ((arch,), ("-r", repo, "latest")):
        dest = small / "dest"
        r = cli("restore", "--dry-run", *args, dest)
        assert r.returncode == 4, str(r)
        assert r.err.startswith(f"cloneaware: {dest}: the restore would not fit: it writes "
                                "at least 64.0 MiB"), str(r)
        assert not dest.exists()
        d = json.loads(cli("restore", "--dry-run", "--json", *args, dest, check_rc=4).out)
        assert d["free_bytes"] < d["written_bytes"] == 64 << 20, d
        # where it fits, a dry run is as before
        d = json.loads(cli("restore", "--dry-run", "--json", *args, btrfs_dir / "d2",
                           check_rc=0).out)
        assert d["free_bytes"] > d["written_bytes"], d
