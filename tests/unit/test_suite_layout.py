"""Rules of the test suite itself: the CLI is run one way, through
tests/helpers/cli.py, and no test module edits sys.path (the helpers are
imported as helpers.*, see tests/conftest.py)."""
from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
EXEMPT = {TESTS / "helpers" / "cli.py", Path(__file__).resolve()}

# the command itself, or the module imported to run it in-process
RUNS_THE_CLI = re.compile(r"""["']cloneaware\.cli["']|\b(from|import)\s+cloneaware\.cli\b"""
                          r"""|["']-m["']\s*,\s*["']cloneaware["']|\bcloneaware\.__main__\b"""
                          r"""|\[\s*["']cloneaware["']\s*,|CliRunner""")
EDITS_SYS_PATH = re.compile(r"sys\.path\.(insert|append|extend)\b|sys\.path\s*(\[.*\])?\s*\+?=")


def _lines(pattern: re.Pattern) -> list[str]:
    sources = sorted(p for p in TESTS.rglob("*.py") if p.resolve() not in EXEMPT)
    assert len(sources) > 20, sources  # the rules are looked for somewhere
    return [f"{p.relative_to(TESTS)}:{n}: {line.strip()}" for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]


def test_only_helpers_cli_knows_how_the_cli_is_run():
    assert _lines(RUNS_THE_CLI) == []


def test_no_test_edits_sys_path():
    assert _lines(EDITS_SYS_PATH) == []


def test_the_rules_see_what_they_forbid():
    for line in ('cmd = [sys.executable, "-P", "-m", "cloneaware.cli"]',
                 'cmd = [sys.executable, "-P", "-m", "cloneaware"]',
                 "from cloneaware.__main__ import main",
                 "from cloneaware.cli import app", 'subprocess.run(["cloneaware", "ls"])',
                 "launch = 'import sys; from cloneaware.cli import main; main()'"):
        assert RUNS_THE_CLI.search(line), line
    for line in ("sys.path.insert(0, str(TOP))", "sys.path[:0] = [d]", "sys.path += [d]"):
        assert EDITS_SYS_PATH.search(line), line
