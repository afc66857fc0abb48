"""tools/gen_manpage.py: the man page lists every command, argument, option and
exit code the CLI has, its examples use only options that exist, and groff
reads it without a warning.  The page is generated at package build time, so
these tests are what keeps the generator complete as the CLI grows."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.cli import cli

from cloneaware.errors import EXIT_CODES

TOP = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_manpage", TOP / "tools" / "gen_manpage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


@pytest.fixture(scope="module")
def page() -> str:
    return gen.render(TOP / "README.md", date="2000-01-01")


def _commands():
    root, ctx = gen.root_command()
    return root, ctx, list(gen.walk(root, ctx, []))


def _section(page: str, name: str) -> str:
    m = re.search(rf"^\.SH {re.escape(name)}\n(.*?)(?=^\.SH |\Z)", page, re.S | re.M)
    assert m, f"no {name} section"
    return m.group(1)


def test_every_command_has_its_own_subsection(page):
    _, _, commands = _commands()
    assert {" ".join(p) for p, _, _ in commands} >= {"scan", "backup", "restore", "ls", "verify"}
    subsections = re.findall(r'^\.SS "cloneaware (.+?) \[OPTIONS\]', page, re.M)
    assert subsections == [" ".join(p) for p, _, _ in commands]
    synopsis = _section(page, "SYNOPSIS")
    for path, cmd, _ in commands:
        if not gen.is_group(cmd):  # a group's commands stand in the synopsis, not it
            assert f".B cloneaware {' '.join(path)}\n" in synopsis


def test_the_commands_come_in_the_order_of_a_job():
    """The order of ``--help`` and of the page: cloneaware/cli/__init__.py
    imports the command modules in it (a group comes after the commands)."""
    _, _, commands = _commands()
    assert [" ".join(p) for p, _, _ in commands] == [
        "scan", "backup", "restore", "reshare", "ls", "find", "dump", "mount", "diff", "verify",
        "init", "snapshots", "tag", "stats", "forget", "prune", "check", "repair", "unlock", "copy",
        "export", "run", "config", "serve",
        "key", "key list", "key add", "key remove", "key passwd",
        "anchors", "anchors list", "anchors drop"]


def test_every_option_and_argument_is_listed(page):
    root, ctx, commands = _commands()
    sections = {(): _section(page, "OPTIONS")}
    body = _section(page, "COMMANDS")
    chunks = re.split(r'^\.SS "cloneaware ', body, flags=re.M)[1:]
    for path, _, _ in commands:
        name = " ".join(path)
        sections[tuple(path)] = next(c for c in chunks if c.startswith(name + " "))
    for path, cmd, cctx in [((), root, ctx)] + [(tuple(p), c, x) for p, c, x in commands]:
        text = sections[path]
        for param in cmd.get_params(cctx):
            if getattr(param, "hidden", False):
                continue
            if param.param_type_name == "option":
                for opt in param.opts + param.secondary_opts:
                    assert gen.esc(opt) in text, f"{' '.join(path) or 'cloneaware'}: {opt}"
                assert gen.esc(gen.squash(param.help or ""))[:40] in text
            else:
                shown = (param.metavar or param.name).lower()
                assert shown in text.lower(), f"{' '.join(path)}: argument {shown}"


def _help_options(args: list[str]) -> set[str]:
    r = cli(*args, "--help", check_rc=0,
            env=dict(os.environ, COLUMNS="250", TERMINAL_WIDTH="250"))
    usage, _, rest = r.out.partition("Options")
    found = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", rest.split("Commands")[0]))
    assert "--help" in found, f"no options found in the help screen\n{r}"
    return found


def test_the_help_screens_show_nothing_the_page_lacks(page):
    """What ``cloneaware [COMMAND] --help`` prints, as a user reads it."""
    _, _, commands = _commands()
    for path in [[]] + [p for p, _, _ in commands]:
        for opt in _help_options(path):
            assert gen.esc(opt) in page, f"cloneaware {' '.join(path)} --help shows {opt}"


#: what typer shows when left alone (issue 21, defect 16): types and braces
TYPER_NOISE = re.compile(r"<(?:str|bool|int|float|path|list\[|int range|float range)[^>]*>"
                         r"|\{[A-Za-z_ .|]+\}")


def _help(args: list[str], columns: int = 250) -> str:
    return cli(*args, "--help", check_rc=0,
               env=dict(os.environ, COLUMNS=str(columns), TERMINAL_WIDTH=str(columns))).out


def test_no_types_or_braces_in_the_page_or_the_help_screens(page):
    assert TYPER_NOISE.search("Usage: x [OPTIONS] {paths}... <list[str]> --n <int range>")
    found = TYPER_NOISE.findall(page)
    assert not found, found
    _, _, commands = _commands()
    for path in [[]] + [p for p, _, _ in commands]:
        text = _help(path)
        found = TYPER_NOISE.findall(text)
        assert not found, f"cloneaware {' '.join(path)} --help: {found}\n{text}"
        assert "╭" not in text and "│" not in text, text  # no rich panels


def test_help_paragraphs_are_not_broken_where_the_docstring_was(page):
    """Each paragraph of a command's text is filled to the width click
    formats for (78 columns): no line ends early where the docstring had a
    newline; and no markup eats bracketed words like [user@]."""
    _, _, commands = _commands()
    for path, _cmd, _ in commands:
        text = _help(path)
        body = text.split("\n\n", 1)[1].split("\nArguments:")[0].split("\nOptions:")[0]
        for block in body.split("\n\n"):
            lines = [ln for ln in block.splitlines() if ln.strip()]
            for line, nxt in zip(lines, lines[1:]):
                assert len(line) + 1 + len(nxt.split()[0]) > 78, \
                    f"cloneaware {' '.join(path)} --help: a line ends early: {line!r}\n{text}"
    assert "ssh://[user@]host[:port]/path" in _help(["restore"])


def test_exit_codes(page):
    status = _section(page, "EXIT STATUS")
    for code in EXIT_CODES:
        assert f".TP\n\\fB{code}\\fR\n" in status


def test_examples_and_guarantees(page):
    examples = _section(page, "EXAMPLES")
    for needle in ("backup \\-o", "\\-\\-base", "ssh", "ext4", "restore"):
        assert needle in examples
    assert _section(page, "GUARANTEES").count(".IP") >= 3


def test_an_example_with_an_unknown_option_stops_the_build(monkeypatch):
    monkeypatch.setattr(gen, "EXAMPLES", [("bad", ["cloneaware backup --no-such-option x"])])
    with pytest.raises(SystemExit, match="no-such-option"):
        gen.render(TOP / "README.md", date="2000-01-01")


def test_no_markup_escapes_leak_into_the_page(page):
    # typer with rich escapes "[default: ...]" as "\\[default: ...]" in its help records
    assert "\\e[" not in page
    assert "[required]" in page


def test_help_records_drop_rich_escapes():
    """The records as Debian 13's typer hands them out (issue 34: the page in
    the .deb showed \\[default: 4; 1<=x<=64]): the escapes are dropped."""
    import click

    class Escaping(click.Option):
        def get_help_record(self, ctx):
            term, text = super().get_help_record(ctx)
            return term, text.replace("[", "\\[")

    cmd = click.Command("x", params=[Escaping(["--n"], default=4, show_default=True,
                                              help="How many.")])
    _, opts = gen.help_records(cmd, click.Context(cmd))
    assert opts[0] == ("--n INTEGER", "How many.  [default: 4]"), opts


def test_roff_escaping():
    assert gen.esc("use --base or -o - here") == "use \\-\\-base or \\-o \\- here"
    assert gen.esc(".dot first\n'quote") == "\\&.dot first\n\\&'quote"
    assert gen.esc("clone-aware a\\b") == "clone-aware a\\eb"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_groff_reads_it_without_warnings(page, tmp_path):
    f = tmp_path / "cloneaware.1"
    f.write_text(page)
    res = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(f)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr
