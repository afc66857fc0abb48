"""The ``cloneaware`` command: a thin typer layer over the Python API.

Every domain error becomes one line on stderr and its exit code (errors.py);
no traceback reaches a user.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Annotated

import typer

from cloneaware import __version__
from cloneaware.errors import (
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RESTORE,
    EXIT_USAGE,
    EXIT_WARNINGS,
    CloneawareError,
    Interrupted,
    describe_oserror,
)

EXIT_HELP = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."

app = typer.Typer(
    name="cloneaware",
    help="Clone-aware backup and restore for reflink filesystems (Btrfs, XFS).\n\n"
    + EXIT_HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _err(msg: str) -> None:
    sys.stderr.write(f"cloneaware: {msg}\n")
    sys.stderr.flush()


def _raise_interrupt(signum, frame):
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


@contextmanager
def _handled() -> Callable:
    """Map exceptions to one line and an exit code."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except CloneawareError as e:
        _err(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted by SIGINT")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not our error to report twice
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        raise typer.Exit(EXIT_RESTORE) from None
    except OSError as e:
        _err(describe_oserror(e))
        raise typer.Exit(EXIT_RESTORE) from None
    finally:
        signal.signal(signal.SIGTERM, old)


def _progress(enabled: bool, total: int | None, label: str):
    from cloneaware.progress import Progress

    return Progress(enabled=enabled and sys.stderr.isatty(), total=total, label=label)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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
    pass


@app.command()
def scan(
    paths: Annotated[list[str], typer.Argument(help="Files and directories to scan.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    families: Annotated[int, typer.Option("--families", min=0,
                                          help="Show the N largest clone families.")] = 0,
    cross: Annotated[bool, typer.Option("--cross-filesystems",
                                        help="Descend into other mounted filesystems.")] = False,
) -> None:
    """Report what PATHs occupy and how much of it is shared (reads no data)."""
    from cloneaware.scan import scan as do_scan

    with _handled():
        with _progress(not as_json, None, "scanning") as prog:
            res = do_scan(paths, one_file_system=not cross, progress=prog.advance)
        for path, reason in res.skipped:
            _err(f"skipped {os.fsdecode(path)}: {reason}")
        if as_json:
            typer.echo(json.dumps(res.to_json(families), indent=2))
        else:
            t = res.plan.totals
            rows = [
                ("files", f"{t.files}"),
                ("extents", f"{t.extents}"),
                ("logical", _human(t.logical_bytes)),
                ("data", _human(t.data_bytes)),
                ("physical", _human(t.physical_bytes)),
                ("shared", _human(t.shared_bytes)),
                ("shared outside the set", _human(t.external_shared_bytes)),
            ]
            if t.encoded_bytes:
                rows.append(("compressed (not counted as shared)", _human(t.encoded_bytes)))
            if t.physical_bytes:
                rows.append(("saving", f"{t.logical_bytes / t.physical_bytes:.2f}x"))
            w = max(len(k) for k, _ in rows)
            for k, v in rows:
                typer.echo(f"{k:<{w}}  {v}")
            if families:
                fams = res.plan.families()[:families]
                if fams:
                    typer.echo("\nclone families (largest first):")
                for fam in fams:
                    info = res.family_info(fam)
                    typer.echo(f"  {info['files']:>6} files  {_human(info['logical_bytes']):>10}"
                               f" logical  {_human(info['stored_bytes']):>10} own data"
                               f"  {info['first']} ...")
        if res.skipped:
            raise typer.Exit(EXIT_WARNINGS)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        _err("interrupted by SIGINT")
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
