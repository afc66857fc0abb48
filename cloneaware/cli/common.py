"""What every command of the command line shares: the typer ``app`` they
are registered on and its plain help (``Command``, ``help_records``, which
tools/gen_manpage.py reads too); their output (``err``, ``say``,
``report``, ``lister``, ``progress``, ``human``) and the state -q and
--no-progress set; ``handled``, which turns every error into one line and
its exit code (errors.py), and --json's error object; and the answers to
signals: SIGINT and SIGTERM raise Interrupted, SIGUSR1 raises the LockLost
of a lock lost on its monitor thread.

Nothing here imports a command module (cli/__init__.py does, in the order
of ``--help``), nor, at import, numpy, rich or the backup side.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import typer
from typer.core import TyperCommand

from cloneaware import __version__
from cloneaware.errors import (
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_OK,
    EXIT_WARNINGS,
    CloneawareError,
    Interrupted,
    UsageError,
    describe_oserror,
)

EXIT_HELP = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."


# --- the app and its help ------------------------------------------------------------

def _arg_usage(p) -> str:
    """An argument as the usage line and the help show it: the metavar it
    was given (every argument here has one), never a type or braces."""
    if p.metavar:
        return p.metavar
    name = p.name.upper() + ("..." if p.nargs != 1 else "")
    return name if p.required else f"[{name}]"


def help_records(cmd, ctx) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(arguments, options) of a command as (term, text), as --help and the
    man page (tools/gen_manpage.py) show them: an option with its metavar
    (none for a flag), an argument by its metavar; no types."""
    args, opts = [], []
    for p in cmd.get_params(ctx):
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            args.append((_arg_usage(p), (p.help or "") + ("  [required]" if p.required
                                                         else "")))
        else:
            rec = p.get_help_record(ctx)
            if rec is not None:
                opts.append((unescape(rec[0]), unescape(rec[1])))
    return args, opts


def unescape(text: str) -> str:
    """Help text as written: typer releases that render with rich (Debian
    13's among them) escape the brackets of ``[default: 4]`` as rich markup
    (``\\[default: 4]``) in the records they hand out; plain help and the
    man page would show the backslash (issue 34)."""
    return text.replace("\\[", "[")


class Command(TyperCommand):
    """Plain help (defect 16 of issue 21): the usage line and the arguments
    by their metavars, not typer's ``{paths}...`` and ``<list[str]>``."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        rv = [self.options_metavar] if self.options_metavar else []
        rv += [_arg_usage(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return rv

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        """A usage error found by click itself (a missing argument, a bad
        value) gets the --json error object too."""
        given = list(args)  # click's parser consumes the list
        try:
            return super().parse_args(ctx, args)
        except Exception as e:
            if "--json" in given and hasattr(e, "format_message") and hasattr(e, "exit_code"):
                json_error(e.format_message(), e.exit_code)
            raise

    def format_options(self, ctx, formatter) -> None:
        args, opts = help_records(self, ctx)
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)


app = typer.Typer(
    name="cloneaware",
    help="Clone-aware backup and restore for reflink filesystems (Btrfs, XFS).\n\n"
    + EXIT_HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # plain click help: no rich panels, no markup eating "[user@]", paragraphs
    # rewrapped to the terminal instead of broken where the docstring was
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_cb(value: bool) -> None:
    if value:
        from cloneaware.archive.format import READ_VERSIONS, WRITE_VERSION

        typer.echo(f"cloneaware {__version__}")
        typer.echo(f"archive format: writes {WRITE_VERSION}, reads "
                   + ", ".join(str(v) for v in READ_VERSIONS))
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version_cb, is_eager=True,
                                          help="Print the version and the archive "
                                          "format versions, then exit.")] = False,
) -> None:
    # each invocation starts from the defaults
    flags.show_progress, flags.quiet, flags.retry_lock = True, False, 0.0


# --- output -------------------------------------------------------------------------

def _write(stream_name: str, text: str) -> None:
    """Write to sys.stdout or sys.stderr, best effort: a reader that went
    away (``2>&1 | head -3``) or a closed descriptor must not stop a job
    that is still running or has already committed (defect 7 of issue 21);
    the stream is replaced by /dev/null and the job goes on."""
    stream = getattr(sys, stream_name)
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        try:
            setattr(sys, stream_name, open(os.devnull, "w"))
        except OSError:
            pass


def err(msg: str) -> None:
    _write("stderr", f"cloneaware: {msg}\n")


def say(text: str, to_stderr: bool = False) -> None:
    """A line of a job's report: on stdout (stderr when stdout carries the
    archive), best effort like err."""
    _write("stderr" if to_stderr else "stdout", text + "\n")


@dataclass
class Flags:
    """What -q and --no-progress set for one invocation (the app's callback
    puts the defaults back first)."""

    show_progress: bool = True  # --no-progress and -q clear it
    quiet: bool = False  # -q: no report of a job that went well
    retry_lock: float = 0.0  # --retry-lock: seconds to wait for a locked repository


flags = Flags()


def no_progress_cb(value: bool) -> bool:
    if value:
        flags.show_progress = False
    return value


def quiet_cb(value: bool) -> bool:
    if value:
        flags.quiet = True
        flags.show_progress = False
    return value


def parse_duration(text: str) -> float:
    """Seconds of a duration as restic writes them: 90s, 5m, 2h, 1h30m (a
    bare number is seconds)."""
    import re

    t = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        return float(t)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", t)
    if not t or parts is None:
        raise typer.BadParameter(f"{text!r} is not a duration (like 30s, 5m, 2h or 1h30m)")
    h, m, sec = (int(x or 0) for x in parts.groups())
    return float(h * 3600 + m * 60 + sec)


def retry_lock_cb(value: str | None) -> str | None:
    if value is not None:
        flags.retry_lock = parse_duration(value)
    return value


def report(text: str, to_stderr: bool = False) -> None:
    """A job's human summary (not its --json, not a warning): left out by -q."""
    if not flags.quiet:
        say(text, to_stderr)


def lister(verbose: bool, quiet: bool, to_stderr: bool):
    """-v: a callback printing each entry's path as ls shows it, on stdout
    (stderr when stdout carries the archive or JSON)."""
    if not verbose:
        return None
    if quiet:
        raise UsageError("give -q or -v, not both")
    from cloneaware.display import show

    return lambda path, replaces=False: say(
        show(path) + ("  (replaces what is there)" if replaces else ""), to_stderr)


def progress(enabled: bool, total: int | None, label: str):
    """The progress bar of a job, shown only on a terminal and without -q
    or --no-progress."""
    from cloneaware.progress import Progress

    return Progress(enabled=enabled and flags.show_progress and sys.stderr.isatty(),
                    total=total, label=label)


def human(n: float) -> str:
    """A number of bytes as the reports show it (display.human)."""
    from cloneaware import display

    return display.human(n)


# --- errors and signals -------------------------------------------------------------

def json_error(message: str, code: int, to_stderr: bool = False) -> None:
    """--json on failure (defect 13 of issue 21): an object a program can
    tell from a summary, on stdout (stderr when stdout carries the archive)."""
    say(json.dumps({"ok": False, "error": message, "exit": code}), to_stderr)


#: the repository warned (it passed over a damaged object, a lock was left
#: behind...): a command that otherwise went well ends with exit 1
_repository_warned = False


def repository_warning(msg: str) -> None:
    global _repository_warned
    _repository_warned = True
    err(msg)


@contextmanager
def handled(as_json: bool = False, to_stderr: bool = False) -> Iterator[None]:
    """Map exceptions to one line and an exit code, and with ``as_json`` an
    error object too.  SIGINT and SIGTERM arrive as Interrupted (main
    installs the handlers), never as a KeyboardInterrupt that typer would
    turn into a silent exit."""

    def fail(message: str, code: int, e: BaseException | None = None) -> None:
        for note in getattr(e, "__notes__", ()):  # what else it left (a lock, say)
            message += f"; {note}"
        err(message)
        if as_json:
            json_error(message, code, to_stderr)

    try:
        yield
        if _repository_warned:
            raise typer.Exit(EXIT_WARNINGS)
    except Interrupted as e:
        fail(str(e), EXIT_INTERRUPTED, e)
        exit_now(EXIT_INTERRUPTED)
    except CloneawareError as e:
        fail(str(e), e.exit_code, e)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        fail("interrupted by SIGINT", EXIT_INTERRUPTED, e)
        exit_now(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not our error to report twice
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        raise typer.Exit(EXIT_IO) from None
    except OSError as e:
        fail(describe_oserror(e), EXIT_IO, e)
        raise typer.Exit(EXIT_IO) from None


def exit_now(code: int) -> None:
    """Leave at once after a signal: the job has removed its temporary files
    on the way out; worker threads still compressing a chunk are not waited
    for."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


#: the interruption a signal asked for, kept in case the exception its
#: handler raised never reaches a command: CPython discards an exception
#: raised while it runs certain callbacks (a weakref callback of the import
#: machinery, seen here once in about 30 SIGINTs during start-up), and the
#: job would then finish as if no signal had come
signalled: str | None = None


def raise_interrupt(signum, frame):
    global signalled
    signalled = f"interrupted by {signal.Signals(signum).name}"
    raise Interrupted(signalled)


#: the LockLost that SIGUSR1 raises in the main thread (set by on_lock_lost)
_lock_lost: list[Exception] = []


def on_lock_lost(error: Exception) -> None:
    """Called on the lock's monitor thread: the main thread may be blocked in
    a read or a wait, so it is sent SIGUSR1, whose handler raises the error
    there."""
    _lock_lost[:] = [error]
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)


def raise_lock_lost(signum, frame):
    if _lock_lost:
        raise _lock_lost.pop()
