#!/usr/bin/env python3
"""Write the cloneaware(1) man page, in roff, from the CLI's own command tree.

Run at package build time (debian/rules), so the page cannot drift from the
program it documents:

- every command, argument and option, with the text ``--help`` shows, comes
  from click's view of the typer app (``typer.main.get_command``);
- the exit codes come from ``cloneaware.errors.EXIT_CODES``;
- the description and the guarantees come from README.md;
- the examples are written here, and every command and option they use is
  checked against the CLI: an example that no longer parses stops the build.

    python3 tools/gen_manpage.py [-o cloneaware.1] [--readme README.md]

tests/unit/test_manpage.py checks that the page lists everything the CLI has.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import os
import re
import shlex
import sys
from pathlib import Path

import typer

PROG = "cloneaware"
TOP = Path(__file__).resolve().parent.parent

# (what it shows, command lines).  Options used here are checked against the CLI.
EXAMPLES: list[tuple[str, list[str]]] = [
    ("How much a directory of VM images occupies, how much of it is shared, and "
     "its five largest clone families:",
     ["cloneaware scan --families 5 /srv/vm"]),
    ("Back up a clone family (a golden image and its reflinked clones) into one "
     "archive that stores each shared extent once; then check every record and "
     "hash in it, and list it:",
     ["cloneaware backup -o /backups/vm.caw /srv/vm",
      "cloneaware verify /backups/vm.caw",
      "cloneaware ls /backups/vm.caw"]),
    ("Restore it onto Btrfs or XFS; the files appear as /srv/restore/vm/... and "
     "share their extents again, through reflinks:",
     ["cloneaware restore /backups/vm.caw /srv/restore"]),
    ("Restore it onto ext4, which cannot reflink: every file is restored whole, "
     "the shared data is copied, and the copied bytes are reported on standard "
     "error with the reason:",
     ["cloneaware restore /backups/vm.caw /mnt/ext4"]),
    ("Thin backup of one clone against its source: only what guest.img does not "
     "share with golden.img is stored, plus references into golden.img with the "
     "SHA-256 of each range.  Restoring it needs the base; the ranges cloned or "
     "copied from it are hashed and compared with the archive:",
     ["cloneaware backup --base /srv/vm/golden.img -o /backups/guest.caw /srv/vm/guest.img",
      "cloneaware restore --base /srv/vm/golden.img /backups/guest.caw /srv/restore"]),
    ("Back up to another host over ssh, writing the archive to standard output, "
     "and restore from there in one pass from standard input:",
     ["cloneaware backup -o - /srv/vm | ssh host 'cat > /backups/x.caw'",
      "ssh host 'cat /backups/x.caw' | cloneaware restore - /srv/restore"]),
    ("Run the jobs of /etc/cloneaware/cloneaware.toml (cloneaware.toml(5)): each a "
     "backup, forget by its policy, prune and check when due; check the file first; "
     "then let systemd run the job home every night:",
     ["cloneaware config check",
      "cloneaware run --metrics /var/lib/cloneaware/jobs.prom",
      "systemctl enable --now cloneaware@home.timer"]),
]

SEE_ALSO = ["cloneaware.toml(5)", "cp(1)", "filefrag(8)", "ssh(1)", "btrfs(8)", "xfs_io(8)",
            "ioctl_ficlonerange(2)", "ioctl_fideduperange(2)"]


# --- roff ---------------------------------------------------------------------

def esc(text: str) -> str:
    """Escape text for roff: backslashes, option dashes, a leading dot or quote."""
    text = text.replace("\\", "\\e")
    # dashes of options (-o, --base) and a lone "-" are minus signs, not hyphens
    text = re.sub(r"(?<![\w-])(--?)(?=[A-Za-z])",
                  lambda m: "\\-" * len(m.group(1)), text)
    text = re.sub(r"(?<!\S)-(?!\S)", r"\\-", text)
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def inline_md(text: str) -> str:
    """Markdown inline code to bold, the rest escaped."""
    parts = re.split(r"`([^`]*)`", text)
    out = []
    for i, part in enumerate(parts):
        out.append(f"\\fB{esc(part)}\\fR" if i % 2 else esc(part))
    return "".join(out)


def squash(text: str) -> str:
    """One paragraph of help text on one line, whitespace collapsed."""
    return re.sub(r"\s+", " ", text).strip()


def paragraphs(text: str) -> list[str]:
    text = inspect.cleandoc(text or "")
    return [squash(p) for p in re.split(r"\n\s*\n", text) if p.strip()]


# --- README sections ------------------------------------------------------------

def readme_sections(readme: Path) -> dict[str, str]:
    sections: dict[str, str] = {}
    name = None
    for line in readme.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^## (.+?)\s*$", line)
        if m:
            name = m.group(1)
            sections[name] = ""
        elif name is not None:
            sections[name] += line + "\n"
    return sections


def md_paragraphs(text: str) -> list[str]:
    return [squash(p) for p in re.split(r"\n\s*\n", text) if p.strip()]


def md_bullets(text: str) -> list[str]:
    items: list[str] = []
    for line in text.splitlines():
        if line.startswith("- "):
            items.append(line[2:])
        elif line.strip() and items:
            items[-1] += " " + line.strip()
    return [squash(i) for i in items]


# --- the command tree -------------------------------------------------------------

# Duck typing, not isinstance: recent typer releases carry their own copy of click.

def is_group(cmd) -> bool:
    return hasattr(cmd, "list_commands")


def is_argument(param) -> bool:
    return param.param_type_name == "argument"


def walk(cmd, ctx, path: list[str]):
    """Yield (path, command, context) for every command below the root, depth first."""
    if is_group(cmd):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            subctx = sub.context_class(sub, info_name=name, parent=ctx, **sub.context_settings)
            yield path + [name], sub, subctx
            yield from walk(sub, subctx, path + [name])


def root_command():
    from cloneaware.cli import app

    cmd = typer.main.get_command(app)
    return cmd, cmd.context_class(cmd, info_name=PROG, **cmd.context_settings)


def usage(cmd, ctx) -> str:
    return " ".join(cmd.collect_usage_pieces(ctx))


def option_names(cmd, ctx) -> set[str]:
    names: set[str] = set()
    for p in cmd.get_params(ctx):
        if p.param_type_name == "option":
            names.update(p.opts)
            names.update(p.secondary_opts)
    return names


def help_records(cmd, ctx):
    """(arguments, options): lists of (term, help) as --help shows them
    (cloneaware.cli.help_records: metavars, no types)."""
    from cloneaware.cli import help_records as cli_records

    return cli_records(cmd, ctx)


def check_examples(root, ctx) -> None:
    """Every cloneaware command line in EXAMPLES names real commands and options."""
    commands = {tuple(path): (sub, subctx) for path, sub, subctx in walk(root, ctx, [])}
    for _, lines in EXAMPLES:
        for line in lines:
            for segment in line.split("|"):
                words = shlex.split(segment)
                if not words or words[0] != PROG:
                    continue
                words = words[1:]
                path: list[str] = []
                while words and tuple(path + [words[0]]) in commands:
                    path.append(words.pop(0))
                if not path:
                    raise SystemExit(f"gen_manpage: example {line!r}: no such command")
                sub, subctx = commands[tuple(path)]
                known = option_names(sub, subctx)
                for w in words:
                    if w.startswith("-") and w != "-" and w.split("=")[0] not in known:
                        raise SystemExit(f"gen_manpage: example {line!r}: "
                                         f"{' '.join(path)} has no option {w}")


# --- the page ---------------------------------------------------------------------

def term_list(records) -> list[str]:
    out = []
    for term, text in records:
        out += [".TP", f"\\fB{esc(term)}\\fR" if term.startswith("-") else f"\\fI{esc(term)}\\fR"]
        out.append(esc(squash(text)) if text else "")
    return out


def render(readme: Path = TOP / "README.md", date: str | None = None) -> str:
    from cloneaware import __version__
    from cloneaware.errors import EXIT_CODES

    root, ctx = root_command()
    check_examples(root, ctx)
    sections = readme_sections(readme)
    for needed in ("Why", "Guarantees"):
        if needed not in sections:
            raise SystemExit(f"gen_manpage: {readme} has no '## {needed}' section")
    if date is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
                else datetime.datetime.now(datetime.UTC))
        date = when.strftime("%Y-%m-%d")

    root_help = paragraphs(root.help or "")
    summary = root_help[0].rstrip(".") if root_help else PROG
    summary = summary[0].lower() + summary[1:]
    commands = list(walk(root, ctx, []))

    out = [
        f'.\\" Generated by tools/gen_manpage.py from the {PROG} command line; do not edit.',
        f'.TH {PROG.upper()} 1 "{date}" "{PROG} {__version__}" "User Commands"',
        ".SH NAME",
        f"{PROG} \\- {esc(summary)}",
        ".SH SYNOPSIS",
        f".B {PROG}",
        f"{esc(usage(root, ctx))}",
    ]
    for path, sub, subctx in commands:
        if is_group(sub):
            continue
        out += [".br", f".B {PROG} {' '.join(path)}", esc(usage(sub, subctx))]

    out.append(".SH DESCRIPTION")
    for p in root_help:
        if not p.startswith("Exit codes:"):   # the EXIT STATUS section says it better
            out += [".PP", esc(p)]
    for p in md_paragraphs(sections["Why"]):
        out += [".PP", inline_md(p)]

    _, root_opts = help_records(root, ctx)
    out.append(".SH OPTIONS")
    out += [".PP", f"These come before the command, as in \\fB{PROG} \\-\\-version\\fR."]
    out += term_list(root_opts)

    out.append(".SH COMMANDS")
    for path, sub, subctx in commands:
        name = " ".join(path)
        out.append(f'.SS "{PROG} {esc(name)} {esc(usage(sub, subctx))}"')
        for p in paragraphs(sub.help or ""):
            out += [".PP", esc(p)]
        args, opts = help_records(sub, subctx)
        if args:
            out += [".PP", "Arguments:", ".RS"] + term_list(args) + [".RE"]
        if opts:
            out += [".PP", "Options:", ".RS"] + term_list(opts) + [".RE"]

    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_CODES.items():
        out += [".TP", f"\\fB{code}\\fR", esc(meaning[0].upper() + meaning[1:]) + "."]

    out.append(".SH EXAMPLES")
    for text, lines in EXAMPLES:
        out += [".PP", esc(text), ".PP", ".RS 4", ".nf"]
        out += [f"\\fB{esc(line)}\\fR" for line in lines]
        out += [".fi", ".RE"]

    out.append(".SH GUARANTEES")
    for item in md_bullets(sections["Guarantees"]):
        out += [".IP \\(bu 2", inline_md(item)]

    out += [".SH SEE ALSO", ",\n".join(
        f".BR {ref.split('(')[0]} ({ref.split('(')[1]}" for ref in SEE_ALSO)]
    return "\n".join(out) + "\n"


# --- cloneaware.toml(5), from docs/CONFIG.md -----------------------------------

def page_date(date: str | None) -> str:
    if date is not None:
        return date
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%d")


def render_config(doc: Path = TOP / "docs" / "CONFIG.md", date: str | None = None) -> str:
    """cloneaware.toml(5): docs/CONFIG.md as roff (its sections, paragraphs,
    tables as tagged paragraphs, indented blocks as literal text), so that
    the page and the normative document are one text."""
    from cloneaware import __version__

    out = [f'.TH CLONEAWARE.TOML 5 "{page_date(date)}" "cloneaware {__version__}" '
           '"File Formats"', ".SH NAME",
           "cloneaware.toml \\- the jobs of cloneaware run: backups, retention, checks, hooks"]
    blocks = re.split(r"\n\s*\n", doc.read_text(encoding="utf-8"))
    for block in blocks:
        lines = block.strip("\n").splitlines()
        if not lines or lines[0].startswith("# "):
            continue
        if lines[0].startswith("## "):
            out.append(f".SH {esc(lines[0][3:].replace('`', '').upper())}")
            lines = lines[1:]
            if not lines:
                continue
        if all(ln.startswith("    ") for ln in lines):
            out += [".PP", ".RS 4", ".nf", *(esc(ln[4:]) for ln in lines), ".fi", ".RE"]
        elif lines[0].startswith("|"):
            rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines
                    if not re.fullmatch(r"\|[-| ]+\|", ln.strip())]
            head, body = rows[0], rows[1:]
            for r in body:
                out += [".TP", inline_md(r[0])]
                rest = [f"{h}: {c}" if len(r) > 2 and i < len(r) - 2 else c
                        for i, (h, c) in enumerate(zip(head[1:], r[1:], strict=False))]
                out.append(inline_md("; ".join(rest)))
        elif lines[0].startswith("- "):
            for item in md_bullets("\n".join(lines)):
                out += [".IP \\(bu 2", inline_md(item)]
        else:
            out += [".PP", inline_md(squash(" ".join(lines)))]
    out += [".SH FILES", ".TP", "\\fB/etc/cloneaware/cloneaware.toml\\fR",
            "the configuration \\fBcloneaware run\\fR reads by default",
            ".TP", "\\fB/usr/share/doc/cloneaware/examples/cloneaware.toml.example\\fR",
            "a commented example",
            ".SH SEE ALSO", ".BR cloneaware (1),", ".BR systemd.timer (5),",
            ".BR journalctl (1)"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="-", help="where to write (default: stdout)")
    ap.add_argument("--readme", type=Path, default=TOP / "README.md")
    ap.add_argument("--date", help="the page's date (default: SOURCE_DATE_EPOCH, or today)")
    ap.add_argument("--config-page", action="store_true",
                    help="write cloneaware.toml(5) from docs/CONFIG.md instead")
    a = ap.parse_args(argv)
    page = render_config(date=a.date) if a.config_page else render(a.readme, a.date)
    if a.output == "-":
        sys.stdout.write(page)
    else:
        Path(a.output).write_text(page, encoding="utf-8")


if __name__ == "__main__":
    main()
