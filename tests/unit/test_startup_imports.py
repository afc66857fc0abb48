"""What the command line loads before it does anything: ``--version``,
``--help`` and a restore load neither numpy, nor rich, nor the backup side
(each command module of cloneaware/cli/ imports what its command needs
inside the command), so that they start fast and a restore needs no more
than it uses.  Python itself lists what it imports
(PYTHONPROFILEIMPORTTIME)."""
from __future__ import annotations

import os

import pytest
from helpers.cli import cli

HEAVY = ("numpy", "rich", "cloneaware.backup", "cloneaware.index", "cloneaware.scan",
         "cloneaware.source", "cloneaware.repo")


def imported(*args, check_rc: int = 0) -> set[str]:
    r = cli(*args, check_rc=check_rc, env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"))
    return {line.rpartition("|")[2].strip() for line in r.err.splitlines()
            if line.startswith("import time:")}


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY))


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["restore", "--help"]])
def test_version_and_help_load_nothing_heavy(args):
    modules = imported(*args)
    assert "cloneaware.cli.common" in modules  # the listing is what it seems
    assert heavy(modules) == []


def test_a_restore_loads_neither_numpy_nor_rich_nor_the_backup_side(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(b"x" * 100_000)
    cli("backup", "-q", "-o", tmp_path / "a.caw", tmp_path / "tree", check_rc=0)
    modules = imported("restore", "-q", "--no-progress", tmp_path / "a.caw", tmp_path / "dest")
    assert "cloneaware.restore" in modules
    assert heavy(modules) == []
    assert (tmp_path / "dest" / "tree" / "f").read_bytes() == b"x" * 100_000
