"""The ``cloneaware`` command: a thin typer layer over the Python API.  It
chooses inputs and outputs (a file, -, ssh://, --sparse) and hands them to
the pipeline.

Every domain error becomes one line on stderr and its exit code (errors.py);
no traceback reaches a user.  Each command imports what it needs inside its
function, so that ``--version``, ``--help`` and a restore do not load the
backup side, numpy or rich: that is the only reason for imports inside
functions in this module.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from cloneaware import __version__
from cloneaware.errors import (
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WARNINGS,
    CloneawareError,
    Interrupted,
    UsageError,
    describe_oserror,
)

EXIT_HELP = "Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()) + "."

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
                opts.append(rec)
    return args, opts


class _Command(TyperCommand):
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
                _json_error(e.format_message(), e.exit_code)
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


def _err(msg: str) -> None:
    _write("stderr", f"cloneaware: {msg}\n")


def _say(text: str, to_stderr: bool = False) -> None:
    """A line of a job's report: on stdout (stderr when stdout carries the
    archive), best effort like _err."""
    _write("stderr" if to_stderr else "stdout", text + "\n")


#: the interruption a signal asked for, kept in case the exception its
#: handler raised never reaches a command: CPython discards an exception
#: raised while it runs certain callbacks (a weakref callback of the import
#: machinery, seen here once in about 30 SIGINTs during start-up), and the
#: job would then finish as if no signal had come
_signalled: str | None = None


def _raise_interrupt(signum, frame):
    global _signalled
    _signalled = f"interrupted by {signal.Signals(signum).name}"
    raise Interrupted(_signalled)


def _json_error(message: str, code: int, to_stderr: bool = False) -> None:
    """--json on failure (defect 13 of issue 21): an object a program can
    tell from a summary, on stdout (stderr when stdout carries the archive)."""
    _say(json.dumps({"ok": False, "error": message, "exit": code}), to_stderr)


@contextmanager
def _handled(as_json: bool = False, to_stderr: bool = False) -> Iterator[None]:
    """Map exceptions to one line and an exit code, and with ``as_json`` an
    error object too.  SIGINT and SIGTERM arrive as Interrupted (main
    installs the handlers), never as a KeyboardInterrupt that typer would
    turn into a silent exit."""

    def fail(message: str, code: int, e: BaseException | None = None) -> None:
        for note in getattr(e, "__notes__", ()):  # what else it left (a lock, say)
            message += f"; {note}"
        _err(message)
        if as_json:
            _json_error(message, code, to_stderr)

    try:
        yield
    except Interrupted as e:
        fail(str(e), EXIT_INTERRUPTED, e)
        _exit_now(EXIT_INTERRUPTED)
    except CloneawareError as e:
        fail(str(e), e.exit_code, e)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        fail("interrupted by SIGINT", EXIT_INTERRUPTED, e)
        _exit_now(EXIT_INTERRUPTED)
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


def _exit_now(code: int) -> None:
    """Leave at once after a signal: the job has removed its temporary files
    on the way out; worker threads still compressing a chunk are not waited
    for."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


_show_progress = True  # --no-progress and -q clear it
_quiet = False  # -q: no report of a job that went well


def _no_progress_cb(value: bool) -> bool:
    global _show_progress
    if value:
        _show_progress = False
    return value


def _quiet_cb(value: bool) -> bool:
    global _quiet, _show_progress
    if value:
        _quiet = True
        _show_progress = False
    return value


def _report(text: str, to_stderr: bool = False) -> None:
    """A job's human summary (not its --json, not a warning): left out by -q."""
    if not _quiet:
        _say(text, to_stderr)


def _lister(verbose: bool, quiet: bool, to_stderr: bool):
    """-v: a callback printing each entry's path as ls shows it, on stdout
    (stderr when stdout carries the archive or JSON)."""
    if not verbose:
        return None
    if quiet:
        raise UsageError("give -q or -v, not both")
    from cloneaware.display import show

    return lambda path, replaces=False: _say(
        show(path) + ("  (replaces what is there)" if replaces else ""), to_stderr)


def _progress(enabled: bool, total: int | None, label: str):
    from cloneaware.progress import Progress

    return Progress(enabled=enabled and _show_progress and sys.stderr.isatty(), total=total,
                    label=label)


def _human(n: float) -> str:
    from cloneaware.display import human

    return human(n)


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
    global _show_progress, _quiet
    _show_progress, _quiet = True, False  # each invocation starts from the defaults


@app.command(cls=_Command)
def scan(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...",
                                                help="Files and directories to scan.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    families: Annotated[int, typer.Option("--families", min=0, metavar="N",
                                          help="Show the N largest clone families.")] = 0,
    one_fs: Annotated[bool, typer.Option(
        "--one-file-system/--cross-filesystems",
        help="Stay on the filesystem of each PATH (the default), or descend into other "
        "mounted filesystems.")] = True,
    save_map: Annotated[str | None, typer.Option(
        "--save-map", metavar="MAP", help="Also write the sharing map of PATHs to MAP (- for "
        "standard output): which ranges share with which, and no data; give it to "
        "'cloneaware reshare --from MAP' on a copy of the tree.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing MAP.")]
    = False,
    no_progress: NoProgressOpt = False,
) -> None:
    """Report what PATHs occupy and how much of it is shared (reads no data)."""
    from cloneaware.scan import scan as do_scan

    with _handled(as_json, to_stderr=save_map == "-"):
        opener = None
        if save_map is not None:
            from cloneaware.backup.sinks import file_output

            opener = file_output(save_map, force)  # refuse a bad MAP before scanning
        elif force:
            raise UsageError("--force is for --save-map")
        with _progress(not as_json, None, "scanning") as prog:
            res = do_scan(paths, one_file_system=one_fs, progress=prog.advance,
                          tree=save_map is not None)
        for w in res.skipped:
            _err(str(w))
        for note in res.notes():
            _err(note)
        map_info = None
        if opener is not None and save_map is not None:
            from cloneaware.scan.sharemap import write_map

            out = opener()
            try:
                ms = write_map(res, out, "standard output" if save_map == "-" else save_map)
                out.commit()
            except BaseException:
                out.abort()
                raise
            map_info = {"path": save_map, **ms.as_dict()}
            if save_map != "-":
                map_info["bytes"] = os.path.getsize(save_map)
        # with the map on standard output, the report goes to standard error
        out_f = sys.stderr if save_map == "-" else sys.stdout

        def echo(msg: str = "") -> None:
            typer.echo(msg, file=out_f)

        if as_json:
            d = res.to_json(families)
            if map_info is not None:
                d["map"] = map_info
            echo(json.dumps(d, indent=2))
        else:
            t = res.plan.totals
            rows = [
                ("files", f"{t.files}"),
                ("extents", f"{t.extents}"),
                ("logical", _human(t.logical_bytes)),
                ("holes", _human(t.logical_bytes - t.data_bytes)),
                ("data", _human(t.data_bytes)),
                ("physical", _human(t.physical_bytes)),
                ("shared", _human(t.shared_bytes)),
                ("shared outside the set", _human(t.external_shared_bytes)),
            ]
            if t.encoded_bytes:
                rows.append(("compressed", _human(t.encoded_bytes)))
                rows.append(("compressed, shared exactly (extent items)",
                             _human(t.encoded_exact_bytes)))
            if t.encoded_candidate_bytes:
                rows.append(("compressed, same extent as an earlier file "
                              "(shared if the content matches)",
                              _human(t.encoded_candidate_bytes)))
            if t.physical_bytes:
                rows.append(("saving (data / physical)",
                             f"{t.data_bytes / t.physical_bytes:.2f}x"))
            if res.anchors.files:
                rows.append(("anchors of backups (.cloneaware-anchors)",
                             f"{res.anchors.files} files pin {_human(res.anchors.pinned_bytes)}"))
            w = max(len(k) for k, _ in rows)
            for k, v in rows:
                echo(f"{k:<{w}}  {v}")
            if families:
                fams = res.plan.families()[:families]
                if fams:
                    echo("\nclone families (largest first):")
                for fam in fams:
                    info = res.family_info(fam)
                    echo(f"  {info['files']:>6} files  {_human(info['logical_bytes']):>10}"
                         f" logical  {_human(info['stored_bytes']):>10} own data"
                         f"  {info['first']} ...")
            if map_info is not None:
                echo(f"\nsharing map {save_map}: {map_info['files']} files, "
                     f"{map_info['references']} references to "
                     f"{_human(map_info['referenced_bytes'])} shared"
                     + (f", {_human(map_info['bytes'])}" if "bytes" in map_info else "")
                     + (f"; {_human(map_info['unproved_bytes'])} of compressed ranges "
                        "left out (not proved shared without reading them)"
                        if map_info["unproved_bytes"] else ""))
        if res.skipped.exit_code():
            raise typer.Exit(res.skipped.exit_code())


# --- repository options, shared by the commands that take one ------------------------

RepoOpt = Annotated[str | None, typer.Option(
    "-r", "--repo", metavar="REPO",
    help="The repository: a directory, ssh://[user@]host[:port]/path, or "
    "s3://BUCKET/PREFIX (default: $CLONEAWARE_REPOSITORY).")]
PasswordOpt = Annotated[str | None, typer.Option(
    "--password-file", metavar="FILE",
    help="Read the repository's password from the first line of this file "
    "(else $CLONEAWARE_PASSWORD_FILE, $CLONEAWARE_PASSWORD, or a prompt).")]
NoProgressOpt = Annotated[bool, typer.Option(
    "--no-progress", callback=_no_progress_cb,
    help="No progress bar on standard error (there is one only on a terminal).")]
QuietOpt = Annotated[bool, typer.Option(
    "-q", "--quiet", callback=_quiet_cb,
    help="Print no summary and no progress bar; warnings and errors still go to "
    "standard error, and the exit code says how it went.")]
RshOpt = Annotated[str | None, typer.Option(
    "--rsh", metavar="CMD",
    help="Command to reach an ssh:// target (default: $CLONEAWARE_RSH or ssh).")]
S3EndpointOpt = Annotated[str | None, typer.Option(
    "--s3-endpoint", metavar="URL", help="The S3 endpoint URL for s3:// repositories (default: "
    "$CLONEAWARE_S3_ENDPOINT, $AWS_ENDPOINT_URL, or AWS).")]
S3ConnOpt = Annotated[int, typer.Option(
    "--s3-connections", min=1, max=64, metavar="N",
    help="Parallel uploads and downloads for s3:// and "
    "ssh:// repositories.")]


def _opened(url: str | None, password_file: str | None = None, rsh: str | None = None,
            s3_endpoint: str | None = None, connections: int = 4, lock: str | None = None,
            operation: str = ""):
    """The repository, opened, locked (``lock``: None, "shared" or
    "exclusive") and closed by repo/connect.py ``opened``; a lost lock stops
    the main thread wherever it is (_on_lock_lost), and a lock left behind
    is said on stderr."""
    from cloneaware.repo.connect import opened

    return opened(url, password_file, rsh, s3_endpoint, connections, lock, operation,
                  on_lost=_on_lock_lost, warn=_err)


#: the LockLost that SIGUSR1 raises in the main thread (set by _on_lock_lost)
_lock_lost: list[Exception] = []


def _on_lock_lost(error: Exception) -> None:
    """Called on the lock's monitor thread: the main thread may be blocked in
    a read or a wait, so it is sent SIGUSR1, whose handler raises the error
    there."""
    _lock_lost[:] = [error]
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)


def _raise_lock_lost(signum, frame):
    if _lock_lost:
        raise _lock_lost.pop()


def _env_repo(repo: str | None) -> str | None:
    """-r REPO, else $CLONEAWARE_REPOSITORY."""
    return repo if repo else os.environ.get("CLONEAWARE_REPOSITORY") or None


def _repo_for(args: list[str], repo: str | None) -> str | None:
    """restore and ls: the repository if -r was given, or if
    CLONEAWARE_REPOSITORY is set and the first argument is not an archive
    (an existing path, '-', or ssh://); else None (an archive)."""
    if repo:
        return repo
    env = os.environ.get("CLONEAWARE_REPOSITORY")
    first = args[0] if args else ""
    if not env or first == "-" or first.startswith("ssh://") or os.path.exists(first):
        return None
    return env


def _summary_line(d: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items())


@app.command(cls=_Command)
def backup(
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="[PATH]...",
        help="Files and directories; each is stored under its basename.")] = None,
    output: Annotated[str | None, typer.Option(
        "-o", "--output", metavar="ARCHIVE",
        help="Archive file, or - for standard output.")] = None,
    repo: RepoOpt = None,
    host: Annotated[str | None, typer.Option(
        "--host", metavar="NAME",
        help="Repository: the host name recorded in the snapshot (default: this "
        "host's).")] = None,
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", metavar="TAG", help="Repository: a tag for the snapshot (repeatable).")] = None,
    from_archive: Annotated[str | None, typer.Option(
        "--from-archive", metavar="ARCHIVE",
        help="Repository: make the snapshot of this archive file instead "
        "of PATHs.")] = None,
    password_file: PasswordOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    connections: S3ConnOpt = 4,
    compress: Annotated[str, typer.Option("--compress", metavar="SPEC",
                                          help="none, zstd or zstd:LEVEL.")]
    = "zstd",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing archive.")]
    = False,
    one_fs: Annotated[bool, typer.Option(
        "--one-file-system/--cross-filesystems",
        help="Stay on the filesystem of each PATH (the default: a mount point inside is "
        "stored, not what is mounted there; Btrfs subvolumes and snapshots of the same "
        "filesystem are always included), or descend into other mounted filesystems.")]
    = True,
    exclude: Annotated[list[str] | None, typer.Option(
        "--exclude", metavar="PATTERN",
        help="Leave out what matches (repeatable), gitignore-style: a name at any depth "
        "(cache, *.tmp), a path as ls shows it (tree/vm/*.img), or an absolute path on this "
        "host (/home/u/Downloads); a trailing / matches only directories.")] = None,
    exclude_from: Annotated[list[str] | None, typer.Option(
        "--exclude-from", metavar="FILE",
        help="Read --exclude patterns from FILE, one a line ('#' starts a comment line); "
        "repeatable.")] = None,
    files_from: Annotated[list[str] | None, typer.Option(
        "--files-from", metavar="FILE",
        help="Read more PATHs from FILE ('-': standard input), one a line; repeatable.")]
    = None,
    exclude_caches: Annotated[bool, typer.Option(
        "--exclude-caches", help="Leave out the content of directories that hold a "
        "CACHEDIR.TAG file (the directory and the tag are kept).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout "
                                          "(stderr when the archive goes to stdout).")] = False,
    base: Annotated[str | None, typer.Option(
        "--base", metavar="BASE",
        help="Thin backup: store only what PATHs do not share with BASE (a file or "
        "a directory), plus references into BASE with the SHA-256 of each range.")] = None,
    rsh: RshOpt = None,
    sparse: Annotated[bool, typer.Option(
        "--sparse", help="With --base and one clone file: write the thin backup as a sparse "
        "file of the clone's size (derivative data at its own offsets, holes elsewhere); "
        "references and hashes go in its user.cloneaware.manifest xattr, or in "
        "ARCHIVE.cloneaware when the xattr does not fit.")] = False,
    no_pit: Annotated[bool, typer.Option(
        "--no-point-in-time", help="Read files as they are instead of cloning each one "
        "first (a file written during the backup is then reported as changed, and may be "
        "torn).")] = False,
    snapshot: Annotated[bool, typer.Option(
        "--snapshot", help="Each PATH is a Btrfs subvolume: back it up from a read-only "
        "snapshot taken at the start (the whole tree as of one instant), deleted at the "
        "end.")] = False,
    no_progress: NoProgressOpt = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Read, hash and compress as a backup would, and report what it "
        "would store; write no archive, and nothing to a repository (no blob, snapshot or "
        "anchor: only the shared lock every reading command takes).")] = False,
    quiet: QuietOpt = False,
    verbose: Annotated[bool, typer.Option(
        "-v", "--verbose", help="Print the path of each entry as it is stored, as ls "
        "prints it, on standard output (standard error when standard output carries the "
        "archive or --json).")] = False,
) -> None:
    """Back up PATHs into one archive (-o) that stores each shared extent once,
    or as a new snapshot of a repository (-r) that stores only what changed.

    Each file larger than 64 KiB is first cloned (a reflink, where the filesystem
    can) and read from the clone, so a file being written is saved as one
    instant's state; in a repository the clone is kept as the file's anchor, and
    the next backup reads only what no longer shares its blocks with it."""
    from cloneaware.backup import ArchiveSink, Backup, SparseSink
    from cloneaware.backup.sinks import Discard, Sink, file_output
    from cloneaware.patterns import Exclusions, read_list
    from cloneaware.remote import client

    with _handled(as_json, to_stderr=output == "-" and not dry_run):
        if output is not None and repo:
            raise UsageError("give -o ARCHIVE or -r REPO, not both")
        paths = list(paths or [])
        for fl in files_from or []:
            paths += read_list(fl, "--files-from")
        patterns = list(exclude or [])
        for fl in exclude_from or []:
            patterns += read_list(fl, "--exclude-from")
        on_stdout = output == "-" and not dry_run  # the archive
        common: dict[str, Any] = dict(compress=compress, one_file_system=one_fs, warn=_err,
                      point_in_time=not no_pit, snapshot=snapshot,
                      exclude=Exclusions(patterns, exclude_caches),
                      listed=_lister(verbose, quiet, on_stdout or as_json), dry_run=dry_run)
        if output is None:
            repo = _env_repo(repo)
            if not repo:
                raise UsageError("give -o ARCHIVE or -r REPO (or set CLONEAWARE_REPOSITORY)")
            _backup_repo(paths, repo, host, tag or [], from_archive, password_file,
                         s3_endpoint, connections, compress, as_json, base, sparse,
                         rsh, no_pit, common, dry_run)
            return
        if from_archive is not None or host is not None or tag:
            raise UsageError("--from-archive, --host and --tag are for repositories (-r)")
        if not paths:
            raise UsageError("give the PATHs to back up")
        if sparse:
            if dry_run:
                raise UsageError("--dry-run does not take --sparse (it writes its file as it "
                                 "goes); try it without --sparse")
            sink: Sink = SparseSink(output, paths, base, force)
        elif client.is_url(output):
            client.parse_url(output)
            sink = ArchiveSink(Discard if dry_run else
                               lambda: client.RemoteOutput(output, force, rsh), output)
        else:
            sink = ArchiveSink(file_output(output, force, dry_run),
                               "standard output" if output == "-" else output)
        with _progress(True, None, "backup") as prog:
            s = Backup(paths, sink, base=base, progress=prog, **common).run()
        d = s.as_dict()
        d["dry_run"] = dry_run
        if as_json:
            _say(json.dumps(d, indent=2), to_stderr=on_stdout)
        elif not on_stdout:
            _report(
                ("dry run, nothing written: " if dry_run else "")
                + f"{s.files} files, {_human(s.logical_bytes)} logical, "
                f"{_human(s.physical_bytes)} physical; stored {_human(s.stored_bytes)}, "
                f"referenced {_human(s.referenced_bytes)}, "
                + (f"in the base {_human(s.base_referenced_bytes)}, " if base else "")
                + f"holes {_human(s.hole_bytes)}; "
                + (f"{s.excluded} entries excluded; " if s.excluded else "")
                + f"archive {'would be ' if dry_run else ''}{_human(s.archive_bytes)} in "
                f"{s.seconds:.1f} s\n"
                f"point in time: {s.captured_by_clone} files cloned, "
                f"{s.captured_by_snapshot} from a snapshot, {s.read_live} read live"
                + (" (" + ", ".join(f"{n} {r}" for r, n in s.read_live_reasons.items()) + ")"
                   if s.read_live else ""))
        if s.warnings.exit_code():
            raise typer.Exit(s.warnings.exit_code())


def _backup_repo(paths, repo, host, tags, from_archive, password_file, s3_endpoint,
                 connections, compress, as_json, base, sparse, rsh, no_pit, common,
                 dry_run) -> None:
    """backup -r REPO: a new snapshot."""
    from cloneaware.backup import Backup
    from cloneaware.backup.workers import parse_compress
    from cloneaware.repo.sink import RepositorySink
    from cloneaware.repo.transfer import import_archive

    if base is not None or sparse:
        raise UsageError("--base and --sparse make thin archives (-o), not snapshots")
    _codec, level = parse_compress(compress)
    with _opened(repo, password_file, rsh, s3_endpoint, connections,
                 lock="shared", operation="backup") as r:
        if from_archive is not None:
            if paths:
                raise UsageError("give --from-archive FILE or PATHs, not both")
            if dry_run:
                raise UsageError("--dry-run is for PATHs, not --from-archive")
            from cloneaware.archive.records import open_archive
            from cloneaware.errors import SharingMapGiven

            with open_archive(from_archive) as f:
                try:
                    snap, counts = import_archive(r, f, from_archive, host, tags, level,
                                                  connections, _err)
                except SharingMapGiven:
                    raise SharingMapGiven(from_archive) from None
            d = {"snapshot": snap.id, **counts}
            if as_json:
                _say(json.dumps(d, indent=2))
            else:
                _report(f"snapshot {snap.short_id} of {from_archive}: {d['files']} "
                     f"files, added {_human(d['added_bytes'])}")
            return
        if not paths:
            raise UsageError("give the PATHs to back up")
        sink = RepositorySink(r, paths, host, tags, level, connections, _err,
                              anchors=not no_pit, dry_run=dry_run)
        with _progress(True, None, "backup") as prog:
            s = Backup(paths, sink, progress=prog, **common).run()
    d = s.as_dict()
    d["dry_run"] = dry_run
    if as_json:
        _say(json.dumps(d, indent=2))
    else:
        _report(
            ("dry run, nothing written: " if dry_run else f"snapshot {(s.snapshot or '')[:8]}: ")
            + f"{s.files} files, {_human(s.logical_bytes)} "
            f"logical; read {_human(s.bytes_read)}, unchanged {_human(s.unchanged_bytes)} "
            f"(not read), {'would add' if dry_run else 'added'} {_human(s.added_bytes)} to "
            f"the repository in {s.seconds:.1f} s")
    if s.warnings.exit_code():
        raise typer.Exit(s.warnings.exit_code())


@app.command(cls=_Command)
def restore(
    targets: Annotated[list[str], typer.Argument(
        metavar="ARCHIVE DEST | SNAPSHOT... DEST",
        help="An archive file (- for standard input) and the directory to restore into; "
        "with -r, one or more snapshots (ids, unique prefixes, or latest) and DEST.")],
    repo: RepoOpt = None,
    password_file: PasswordOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    connections: S3ConnOpt = 4,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing entries of the "
                                        "same name.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    base: Annotated[str | None, typer.Option(
        "--base", metavar="BASE",
        help="Where the base of a thin backup is.  Its ranges are reflinked when "
        "BASE and DEST share a filesystem, copied otherwise, and then hashed in the restored "
        "file and compared with the archive.")] = None,
    trust_base: Annotated[bool, typer.Option(
        "--trust-base", help="Skip hashing the bytes cloned from the base (saves reading "
        "them; a base changed since the backup then goes unnoticed).  Off by default.")]
    = False,
    rsh: RshOpt = None,
    reshare_existing: Annotated[bool, typer.Option(
        "--reshare-existing", help="DEST already holds an older copy of the tree: clone "
        "each stored range from the file already at its name, read it back, and write only "
        "what differs, so identical data is neither written again nor stored twice until "
        "the rename (implies --force).")] = False,
    include: Annotated[list[str] | None, typer.Option(
        "--include", metavar="PATTERN", help="Restore only the entries PATTERN matches "
        "(repeatable; a directory comes whole), matched against the paths as ls shows them: "
        "tree/keep.txt, tree/vm, *.img.  The directories above them are made too, and the "
        "restored files still share what they shared.")] = None,
    strip: Annotated[int, typer.Option(
        "--strip-components", min=0, metavar="N", help="Drop the first N components of "
        "each path, as tar does; an entry with no more than N is not made.")] = 0,
    no_progress: NoProgressOpt = False,
    numeric_owner: Annotated[bool, typer.Option(
        "--numeric-owner", hidden=True,
        help="Accepted for tar's sake and ignored: owners are always restored by "
        "their numbers, which is all an archive holds.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Report what the restore would make and how its bytes would get "
        "there (written, reflinked, holes), from the entries alone (an archive file's "
        "index; a pipe is read whole; no blob is fetched); make and change nothing, not "
        "even DEST.  The checks of DEST are those of a restore.")] = False,
    quiet: QuietOpt = False,
    verbose: Annotated[bool, typer.Option(
        "-v", "--verbose", help="Print the path below DEST of each entry as it is made "
        "(with --dry-run: as it would be, and whether it replaces what is there), on "
        "standard output (standard error with --json).")] = False,
) -> None:
    """Restore an archive, or snapshots of a repository, into DEST, re-creating
    shared extents with reflinks.

    ARCHIVE may be ssh://[user@]host[:port]/path (read from that host); DEST may be
    ssh://[user@]host[:port]/path (the other host restores, with its own reflinks).
    One snapshot is restored as DEST/<name>, several as DEST/<short id>/<name>, and
    the data they have in common is written once."""
    from cloneaware.remote import client
    from cloneaware.restore import Restore
    from cloneaware.restore.select import Selection

    with _handled(as_json):
        select = Selection(include or [], strip)
        listed = _lister(verbose, quiet, as_json)
        repo = _repo_for(targets, repo)
        if repo:
            if len(targets) < 2:
                raise UsageError("give SNAPSHOT... DEST")
            s = _restore_repo(targets[:-1], targets[-1], repo, password_file, s3_endpoint,
                              connections, rsh, force or reshare_existing, base, trust_base,
                              reshare_existing, select, listed, dry_run)
            _restore_report(s, as_json, dry_run)
            return
        if len(targets) != 2:
            raise UsageError("give ARCHIVE DEST (or -r REPO SNAPSHOT... DEST)")
        archive, dest = targets
        if client.is_url(dest):
            if dry_run:
                raise UsageError("--dry-run needs a local DEST")
            if verbose:
                raise UsageError("-v needs a local DEST")
            if reshare_existing:
                raise UsageError("--reshare-existing needs a local DEST")
            if client.is_url(archive):
                raise UsageError("give a local ARCHIVE or a local DEST, not two ssh:// URLs")
            if select:
                raise UsageError("--include and --strip-components need a local DEST")
            st = client.push_restore(archive, dest, force, base, trust_base, rsh)
            d = st.get("summary", {})
            if as_json:
                _say(json.dumps(d, indent=2))
            else:
                _report(f"{dest}: {d.get('files', 0)} files, wrote "
                     f"{_human(d.get('written_bytes', 0))}, reflinked "
                     f"{_human(d.get('reflinked_bytes', 0))}, copied "
                     f"{_human(d.get('copied_bytes', 0))} on the remote host")
            if d.get("not_exact"):
                raise typer.Exit(EXIT_WARNINGS)
            return
        src = client.open_remote_archive(archive, rsh) if client.is_url(archive) else archive
        try:
            with _progress(not dry_run, None, "restore") as prog:
                s = Restore(src, dest, force=force, progress=prog, warn=_err, base=base,
                            trust_base=trust_base, reshare_existing=reshare_existing,
                            select=select, listed=listed, dry_run=dry_run).run()
        finally:
            if not isinstance(src, str):
                src.close()
        _restore_report(s, as_json, dry_run)


def _restore_repo(specs, dest, repo, password_file, s3_endpoint, connections, rsh, force,
                  base, trust_base, reshare_existing=False, select=None, listed=None,
                  dry_run=False):
    from cloneaware.repo.restore import restore_snapshots
    from cloneaware.repo.snapshots import find_all

    if base is not None or trust_base:
        raise UsageError("--base and --trust-base are for thin archives")
    with _opened(repo, password_file, rsh, s3_endpoint, connections,
                 lock="shared", operation="restore") as r:
        chosen = find_all(r.snapshots(), specs, where=r.where)
        with _progress(not dry_run, None, "restore") as prog:
            return restore_snapshots(r, chosen, dest, dry_run=dry_run, force=force,
                                     progress=prog, warn=_err,
                                     reshare_existing=reshare_existing, select=select,
                                     listed=listed)


def _restore_report(s, as_json: bool, dry_run: bool = False) -> None:
    d = s.as_dict()
    if dry_run:
        d["dry_run"] = True
        for w in s.not_exact:  # a restore says these as it goes
            _err(str(w))
    if as_json:
        _say(json.dumps(d, indent=2))
    elif dry_run:
        _report(
            f"dry run, nothing written: {s.files} files, {_human(s.logical_bytes)} logical: "
            f"would write {_human(s.written_bytes)}, reflink {_human(s.reflinked_bytes)} "
            f"(or copy, where DEST cannot clone), holes {_human(s.hole_bytes)}"
            + (f"; from the base {_human(s.base_bytes)}" if s.base_bytes else "")
            + (f"; left out {s.left_out} entries" if s.left_out else ""))
    else:
        _report(
            f"{s.files} files, {_human(s.logical_bytes)} logical: wrote "
            f"{_human(s.written_bytes)}, reflinked {_human(s.reflinked_bytes)}, "
            f"copied {_human(s.copied_bytes)}, holes {_human(s.hole_bytes)}"
            + (f"; from the base {_human(s.base_bytes)}, verified "
               f"{_human(s.verified_bytes)}" if s.base_bytes else "")
            + (f"; reused {_human(s.reused_bytes)} of the copy already there "
               f"({_human(s.reuse_differing_bytes)} differed, written)"
               if s.reused_bytes or s.reuse_differing_bytes else "")
            + (f"; left out {s.left_out} entries" if s.left_out else "") + " "
            f"in {s.seconds:.1f} s")
    if s.copied_bytes:
        why = ", ".join(f"{_human(n)} ({r})" for r, n in s.copy_reasons.items())
        _err(f"copied instead of reflinked: {why}")
    if s.not_exact:
        _err(f"{len(s.not_exact)} entries not restored exactly")
    if s.warnings.exit_code():
        raise typer.Exit(s.warnings.exit_code())


@app.command(cls=_Command)
def reshare(
    targets: Annotated[list[str], typer.Argument(
        metavar="DEST | SNAPSHOT DEST",
        help="The directory that holds the copied tree (the top-level names of the archive "
        "under it, as restore puts them); with -r, a snapshot (id, unique prefix, or latest) "
        "and DEST.")],
    source: Annotated[str | None, typer.Option(
        "--from", metavar="ARCHIVE|MAP", help="An archive, or a sharing map from 'scan "
        "--save-map' (- for standard input); with -r, the snapshot.")] = None,
    repo: RepoOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Ask the kernel nothing: say what would be deduped.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    no_progress: NoProgressOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Give a tree copied by another tool (rsync, tar, restic, ...) back the
    sharing the archive, sharing map or snapshot records, with FIDEDUPERANGE.

    For every shared range, the owner's bytes in DEST are deduped into the
    sharing place's bytes in DEST.  The kernel compares them first: ranges that
    differ (edited since) are left alone and counted.  Nothing in DEST is
    written, and no time changes; files missing or of another size are skipped
    and listed.  Exit 1 when files were skipped, refused or differ."""
    from cloneaware.reshare import Reshare

    with _handled(as_json):
        if repo is None and source is None and len(targets) == 2:
            repo = os.environ.get("CLONEAWARE_REPOSITORY") or None
        rs: Reshare
        if repo:
            if source is not None and len(targets) == 1:
                spec, dest = source, targets[0]
            elif source is None and len(targets) == 2:
                spec, dest = targets
            else:
                raise UsageError("give -r REPO SNAPSHOT DEST")
            with _opened(repo, password_file, rsh, s3_endpoint,
                         lock="shared", operation="reshare") as r:
                snap = r.find(spec)
                manifest = r.manifest(snap)
            with _progress(True, None, "reshare") as prog:
                rs = Reshare(dest, dry_run, prog, _err)
                res = rs.run_manifest(manifest)
            what = f"snapshot {snap.short_id}"
        else:
            if source is None or len(targets) != 1:
                raise UsageError("give --from ARCHIVE DEST (or -r REPO SNAPSHOT DEST)")
            from cloneaware.archive.records import open_archive

            dest = targets[0]
            f = open_archive(source)
            try:
                with _progress(True, None, "reshare") as prog:
                    rs = Reshare(dest, dry_run, prog, _err)
                    res = rs.run_archive(f)
            finally:
                if f is not sys.stdin.buffer:
                    f.close()
            what = "standard input" if source == "-" else source
        for w in res.differing:
            _err(f"{w.path}: {w.nbytes} bytes differ from the place they share with in the "
                 f"{rs.what}; left alone")
        d = res.as_dict()
        if as_json:
            typer.echo(json.dumps(d, indent=2))
        else:
            verb = "would ask to dedupe" if dry_run else "shared"
            amount = res.to_dedupe_bytes if dry_run else res.shared_bytes
            _report(
                f"{dest} from {what}: {res.files} files, {res.references} references to "
                f"{_human(res.referenced_bytes)}; {verb} {_human(amount)}, already shared "
                f"{_human(res.already_shared_bytes)}"
                + ("" if dry_run else f", differing {_human(res.differing_bytes)}")
                + f", unaligned {_human(res.unaligned_bytes)}, skipped "
                f"{_human(res.skipped_bytes)} ({len(res.skipped)} files skipped, "
                f"{len(res.refused)} refused) in {res.seconds:.1f} s"
                + (f"; {_human(res.base_bytes)} in the thin backup's base not reshared"
                   if res.base_bytes else ""))
        if res.warnings.exit_code():
            raise typer.Exit(res.warnings.exit_code())


@app.command("ls", cls=_Command)
def ls_cmd(
    targets: Annotated[list[str], typer.Argument(
        metavar="ARCHIVE [PATH] | SNAPSHOT [PATH]",
        help="An archive file (- for standard input, or ssh://[user@]host[:port]/path), or "
        "with -r a snapshot (id, unique prefix, or latest); PATH: only that entry and "
        "what is below it, named as ls shows it.")],
    long: Annotated[bool, typer.Option(
        "-l", "--long", help="Mode, owner and group (numbers, as stored), size, mtime (UTC), "
        "and what a link points at, as ls -l shows them (read from each entry's record: "
        "still no file data).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    repo: RepoOpt = None,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """List the entries of an archive from its index (reading no file data), or
    of a repository snapshot from its manifest.  An archive that cannot be
    sought (standard input, ssh://) is read whole.

    Names are shown so that they cannot be misread: bytes that are not UTF-8
    as \\xHH, other characters that are not printable as \\uXXXX, a
    backslash as \\\\; --json gives that as "path" and the bytes themselves,
    base64, as "path_b64"."""
    import io

    from cloneaware import display
    from cloneaware.archive import format as fmt
    from cloneaware.listing import contents_json, long_line, read_contents

    with _handled(as_json):
        if not 1 <= len(targets) <= 2:
            raise UsageError("give one ARCHIVE and at most one PATH (or -r REPO, one "
                             "SNAPSHOT and at most one PATH)")
        repo = _repo_for(targets, repo)
        sub = targets[1] if len(targets) == 2 else None
        snap_info = None
        if repo:
            with _opened(repo, password_file, rsh, s3_endpoint,
                         lock="shared", operation="ls") as r:
                snap = r.find(targets[0])
                c = read_contents(io.BytesIO(r.manifest(snap)), long)
                snap_info = snap.to_json()
        else:
            f = _open_archive_any(targets[0], rsh)
            try:
                c = read_contents(f, long)
            finally:
                f.close()
        rows = c.under(sub)
        b = c.base
        if as_json:
            typer.echo(json.dumps({**({"snapshot": snap_info} if snap_info else {}),
                                   **contents_json(c, rows, long)}, indent=2))
            return
        if snap_info:
            typer.echo(f"snapshot {snap_info['id']} of {snap_info['hostname']} at "
                       f"{snap_info['time'][:19]}Z: {', '.join(snap_info['paths'])}")
        if c.is_map:
            typer.echo(f"sharing map: no data, {_human(c.ref_bytes)} referenced "
                       "(cloneaware reshare --from uses it)")
        if b is not None:
            typer.echo(f"thin backup: needs the base {os.fsdecode(b.path)!r} "
                       f"({len(b.files)} files)")
            for bf in b.files:
                name = display.show(os.path.join(b.path, bf.path) if bf.path else b.path)
                typer.echo(f"  base file {name} ({_human(bf.size)}, {bf.size} bytes)")
        if long:
            for x in rows:
                typer.echo(long_line(x, c))
            return
        typer.echo(f"{'type':<8} {'size':>14} {'stored':>14} {'referenced':>14} "
                   + (f"{'in base':>14} " if b is not None else "") + " path")
        for x in rows:
            typer.echo(f"{fmt.KIND_NAMES[x.kind]:<8} {x.size:>14} {x.stored_bytes:>14} "
                       f"{x.ref_bytes:>14} "
                       + (f"{x.base_ref_bytes:>14} " if b is not None else "")
                       + f" {display.show(x.path)}")


@app.command(cls=_Command)
def diff(
    targets: Annotated[list[str], typer.Argument(
        metavar="ARCHIVE_A ARCHIVE_B | SNAPSHOT_A SNAPSHOT_B",
        help="Two archives (files, - for one of them on standard input, or ssh://), or with "
        "-r two snapshots (ids, unique prefixes, or latest).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    repo: RepoOpt = None,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """What changed from A to B: entries added (+), removed (-) and changed
    (M, with what changed: type, size, content, mode, owner, mtime, link
    target, hard link, device, xattrs, inode flags, subvolume), in path
    order, with their sizes.  From the entries' records alone (no file data
    read); snapshots also compare each file's blobs, so a file rewritten
    with the same size and mtime still shows as changed."""
    import io

    from cloneaware import display
    from cloneaware.archive import format as fmt
    from cloneaware.listing import compare, diff_json, read_contents, tally

    with _handled(as_json):
        if len(targets) != 2:
            raise UsageError("give two archives (or -r REPO and two snapshots)")
        if targets.count("-") > 1:
            raise UsageError("only one of the two can be standard input")
        repo = _repo_for(targets, repo)
        if repo:
            with _opened(repo, password_file, rsh, s3_endpoint,
                         lock="shared", operation="diff") as r:
                snaps = r.snapshots()
                a, b = (read_contents(io.BytesIO(r.manifest(r.find(t, snaps))), True,
                                      blobs=True) for t in targets)
        else:
            got = []
            for t in targets:
                f = _open_archive_any(t, rsh)
                try:
                    got.append(read_contents(f, True))
                finally:
                    f.close()
            a, b = got
        changes = compare(a, b)
        if as_json:
            typer.echo(json.dumps(diff_json(changes), indent=2))
            return

        def size(x) -> str:  # a file's size; what anything else is
            return _human(x.size) if x.kind == fmt.K_REG else fmt.KIND_NAMES[x.kind]

        for c in changes:
            if c.old is None:
                assert c.new is not None
                typer.echo(f"+ {display.show(c.path)} ({size(c.new)})")
            elif c.new is None:
                typer.echo(f"- {display.show(c.path)} ({size(c.old)})")
            else:
                sizes = (f"{size(c.old)} -> {size(c.new)}" if size(c.old) != size(c.new)
                         else size(c.new))
                typer.echo(f"M {display.show(c.path)} ({sizes}; {', '.join(c.what)})")
        n = tally(changes)
        typer.echo(f"{n['added']} added, {n['removed']} removed, {n['changed']} changed")


def _open_archive_any(where: str, rsh: str | None):
    """A readable file object of ARCHIVE for ls, verify and diff: a file (or
    the manifest of a sparse thin backup), standard input, or ssh:// (read
    whole from the other host: issue 21, defect 14)."""
    from cloneaware.archive.manifest import open_any
    from cloneaware.remote import client

    if client.is_url(where):
        return client.open_remote_archive(where, rsh)
    f, sparse_fd = open_any(where)
    if sparse_fd is not None:
        os.close(sparse_fd)
    return f


@app.command(cls=_Command)
def verify(
    archive: Annotated[str, typer.Argument(metavar="ARCHIVE",
                                           help="Archive file, - for standard input, or "
                                           "ssh://[user@]host[:port]/path.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    rsh: RshOpt = None,
    no_progress: NoProgressOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check every record and every data hash; write nothing.  Exit 0 only if
    the archive is whole.  ARCHIVE may be ssh://[user@]host[:port]/path: it is
    read from that host."""
    from cloneaware.archive.manifest import open_any
    from cloneaware.archive.verify import stored_total
    from cloneaware.archive.verify import verify as check_all
    from cloneaware.remote import client

    with _handled(as_json):
        if client.is_url(archive):  # read whole from the other host (issue 21, defect 14)
            f, sparse_fd = client.open_remote_archive(archive, rsh), None
        else:
            f, sparse_fd = open_any(archive)
        try:
            with _progress(True, stored_total(f), "verify") as prog:
                counts = check_all(f, archive, sparse_fd, prog)
        finally:
            f.close()
            if sparse_fd is not None:
                os.close(sparse_fd)
        is_map = counts.get("map", False)
        if as_json:
            typer.echo(json.dumps(counts, indent=2))
        else:
            _report(f"{'sharing map' if is_map else 'archive'} is whole: "
                    f"{_summary_line({k: v for k, v in counts.items() if k != 'map'})}")
            if sparse_fd is not None:
                _report(f"sparse thin backup: {counts['sparse_ranges']} ranges of its own "
                        f"data ({_human(counts['sparse_bytes'])}) checked in {archive}")
            if "base" in counts:
                _report(f"thin backup: restoring it needs the base {counts['base']!r} "
                        f"({counts['base_files']} files); their bytes are checked at "
                        "restore")

# --- repositories -----------------------------------------------------------------------

@app.command(cls=_Command)
def init(
    repo: RepoOpt = None,
    encrypt: Annotated[bool, typer.Option(
        "--encrypt", help="Encrypt everything stored (AES-256-GCM); the master key is "
        "wrapped by a password (scrypt).")] = False,
    password_file: PasswordOpt = None,
    grid: Annotated[int, typer.Option(
        "--grid", metavar="KIB", help="Blob grid in KiB: a power of two from 64 to 4096.")] = 1024,
    pack_size: Annotated[int, typer.Option(
        "--pack-size", metavar="MIB", help="Pack size to aim at, in MiB.")] = 16,
    kdf_n: Annotated[int, typer.Option(
        "--kdf-n", metavar="N", help="scrypt's N for the key (a power of two).")] = 1 << 17,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Make a new, empty repository (the directory or bucket prefix must be empty)."""
    from cloneaware.repo.connect import create
    from cloneaware.repo.keys import Password

    with _handled():
        url = _env_repo(repo)
        if not url:
            raise UsageError("give -r REPO (or set CLONEAWARE_REPOSITORY)")
        pw = Password(password_file, confirm=True)
        password = pw("new password: ") if encrypt else None
        if not encrypt and pw.given:
            raise UsageError("a password was given, but not --encrypt")
        config = create(url, password, rsh, s3_endpoint, grid=grid << 10,
                        pack_size=pack_size << 20, kdf_n=kdf_n)
        typer.echo(f"made {'an encrypted' if encrypt else 'an unencrypted'} repository "
                   f"{config.id[:8]} at {url}")


@app.command(cls=_Command)
def snapshots(
    repo: RepoOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    host: Annotated[str | None, typer.Option("--host", metavar="NAME",
                                                           help="Only this host's.")] = None,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """List the snapshots of a repository, oldest first."""
    from cloneaware.repo.snapshots import of_host

    with _handled(as_json):
        with _opened(_env_repo(repo), password_file, rsh, s3_endpoint) as r:
            snaps = of_host(r.snapshots(), host)
        if as_json:
            typer.echo(json.dumps([s.to_json() for s in snaps], indent=2))
            return
        enc = "encrypted" if r.crypto.encrypted else "not encrypted"
        typer.echo(f"repository {r.config.id[:8]} ({enc}), {len(snaps)} snapshots")
        typer.echo(f"{'id':<8}  {'time (UTC)':<19}  {'host':<16}  {'tags':<12}  paths")
        for s in snaps:
            typer.echo(f"{s.short_id:<8}  {s.data['time'][:19].replace('T', ' '):<19}  "
                       f"{s.hostname:<16}  {','.join(s.tags):<12}  {', '.join(s.paths)}")


@app.command(cls=_Command)
def forget(
    repo: RepoOpt = None,
    keep_last: Annotated[int, typer.Option("--keep-last", min=0, metavar="N",
                                           help="Keep the N newest snapshots.")] = 0,
    keep_daily: Annotated[int, typer.Option("--keep-daily", min=0, metavar="N",
                                            help="Keep the newest of each of N days.")] = 0,
    keep_weekly: Annotated[int, typer.Option("--keep-weekly", min=0, metavar="N",
                                             help="Keep the newest of each of N weeks.")] = 0,
    keep_monthly: Annotated[int, typer.Option("--keep-monthly", min=0, metavar="N",
                                              help="Keep the newest of each of N months.")] = 0,
    host: Annotated[str | None, typer.Option("--host", metavar="NAME",
                                                           help="Only this host's.")] = None,
    do_prune: Annotated[bool, typer.Option("--prune", help="Then prune.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go; change "
                                          "nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    connections: S3ConnOpt = 4,
    quiet: QuietOpt = False,
) -> None:
    """Remove snapshots, keeping those the --keep options name in each group of
    snapshots of the same host and PATHs."""
    from cloneaware.repo.forget import Policy
    from cloneaware.repo.forget import forget as forget_snapshots
    from cloneaware.repo.prune import prune as prune_repo

    with _handled(as_json):
        policy = Policy(keep_last, keep_daily, keep_weekly, keep_monthly)
        with _opened(_env_repo(repo), password_file, rsh, s3_endpoint, connections,
                     lock="exclusive", operation="forget") as r:
            res = forget_snapshots(r, policy, dry_run, host)
            pr = prune_repo(r, dry_run, connections, _err) if do_prune else None
        if as_json:
            typer.echo(json.dumps({**res.to_json(),
                                   "prune": None if pr is None else pr.__dict__}, indent=2))
            return
        verb = "would remove" if dry_run else "removed"
        for s, why in res.kept:
            _report(f"keep   {s.short_id}  {s.data['time'][:19]}  {s.hostname}  "
                    f"({', '.join(why)})")
        for s in res.removed:
            _report(f"remove {s.short_id}  {s.data['time'][:19]}  {s.hostname}")
        _report(f"{verb} {len(res.removed)} snapshots, kept {len(res.kept)}")
        if pr is not None:
            _prune_report(pr, dry_run)


def _prune_report(pr, dry_run: bool) -> None:
    verb = "would delete" if dry_run else "deleted"
    _report(f"prune: {verb} {pr.packs_deleted} packs, repacked {pr.packs_repacked}; "
            f"{_human(pr.bytes_before)} -> {_human(pr.bytes_after)}")


@app.command(cls=_Command)
def prune(
    repo: RepoOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go; change "
                                          "nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    connections: S3ConnOpt = 4,
    quiet: QuietOpt = False,
) -> None:
    """Delete the data no snapshot needs (repacking packs that are partly needed)."""
    from cloneaware.repo.prune import prune as prune_repo

    with _handled(as_json):
        with _opened(_env_repo(repo), password_file, rsh, s3_endpoint, connections,
                     lock="exclusive", operation="prune") as r:
            pr = prune_repo(r, dry_run, connections, _err)
        if as_json:
            typer.echo(json.dumps(pr.__dict__, indent=2))
        else:
            _prune_report(pr, dry_run)


@app.command(cls=_Command)
def check(
    repo: RepoOpt = None,
    read_data: Annotated[bool, typer.Option(
        "--read-data", help="Also read every pack and check every blob against its id.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Check that every object is sound and every snapshot finds every blob.
    Exit 0 if so, 3 with the problems named otherwise."""
    from cloneaware.errors import EXIT_ARCHIVE
    from cloneaware.repo.check import check as check_repo

    with _handled(as_json):
        with _opened(_env_repo(repo), password_file, rsh, s3_endpoint,
                     lock="shared", operation="check") as r:
            res = check_repo(r, read_data)
        enc = r.crypto.encrypted
        if as_json:
            typer.echo(json.dumps({**res.__dict__, "encrypted": enc, "ok": not res.errors},
                                  indent=2))
        else:
            _report(f"repository {r.config.id[:8]} ({'encrypted' if enc else 'not encrypted'}"
                    f"): {res.snapshots} snapshots, {res.packs} packs, {res.blobs} blobs"
                    + (f", read {_human(res.read_bytes)}" if read_data else ""))
            for w in res.warnings:  # with -q, on stderr: a note may want doing
                if _quiet:
                    _err(f"note: {w}")
                else:
                    _report(f"note: {w}")
        for e in res.errors:
            _err(e)
        if res.errors:
            _err(f"{len(res.errors)} problems found")
            raise typer.Exit(EXIT_ARCHIVE)
        if not as_json:
            _report("no problems found")


@app.command(cls=_Command)
def unlock(
    repo: RepoOpt = None,
    remove_all: Annotated[bool, typer.Option(
        "--remove-all", help="Remove every lock, live ones too (only when you know no "
        "command is running).")] = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Remove stale locks: those of processes gone from this host, and those of
    other hosts older than 30 minutes."""
    from cloneaware.repo.lock import unlock as do_unlock

    with _handled():
        with _opened(_env_repo(repo), password_file, rsh, s3_endpoint) as r:
            res = do_unlock(r, remove_all)
        for lk in res.kept:
            _err(f"kept {lk.describe()}")
        typer.echo(f"removed {len(res.removed)} locks")


@app.command(cls=_Command)
def export(
    snapshot: Annotated[str, typer.Argument(metavar="SNAPSHOT",
                                            help="Snapshot id, unique prefix, or latest.")],
    output: Annotated[str, typer.Option("-o", "--output", metavar="ARCHIVE",
                                        help="Archive file, or - for "
                                        "standard output.")],
    repo: RepoOpt = None,
    compress: Annotated[str, typer.Option("--compress", metavar="SPEC",
                                          help="none, zstd or zstd:LEVEL.")]
    = "zstd",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing archive.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Write a snapshot as an archive file: the portable form, with its sharing."""
    from cloneaware.backup.sinks import file_output
    from cloneaware.backup.workers import parse_compress
    from cloneaware.repo.transfer import export as do_export

    with _handled(as_json, to_stderr=output == "-"):
        _codec, level = parse_compress(compress)
        opener = file_output(output, force)
        with _opened(_env_repo(repo), password_file, rsh, s3_endpoint,
                     lock="shared", operation="export") as r:
            snap = r.find(snapshot)
            out = opener()
            try:
                d = do_export(r, snap, out, output, level)
                out.commit()
            except BaseException:
                out.abort()
                raise
        if as_json:
            _say(json.dumps({"snapshot": snap.id, **d}, indent=2), to_stderr=output == "-")
        elif output != "-":
            _say(f"snapshot {snap.short_id} -> {output}: {d['entries']} entries, stored "
                 f"{_human(d['stored_bytes'])}, referenced "
                 f"{_human(d['referenced_bytes'])}")


key_app = typer.Typer(help="Manage the passwords of an encrypted repository.",
                      rich_markup_mode=None,
                      no_args_is_help=True)
app.add_typer(key_app, name="key")


@contextmanager
def _key_repo(repo, password_file, rsh, s3_endpoint):
    """The repository, refused before any new password is asked for if it
    has no keys."""
    from cloneaware.repo.keys import require_encrypted

    with _opened(_env_repo(repo), password_file, rsh, s3_endpoint) as r:
        require_encrypted(r)
        yield r


@key_app.command("list", cls=_Command)
def key_list(repo: RepoOpt = None, password_file: PasswordOpt = None, rsh: RshOpt = None,
             s3_endpoint: S3EndpointOpt = None) -> None:
    """List the key objects (one per password)."""
    from cloneaware.repo.keys import key_list as list_keys

    with _handled():
        with _key_repo(repo, password_file, rsh, s3_endpoint) as r:
            found = list_keys(r)
        for k in found:
            typer.echo(f"{'*' if k.current else ' '} {k.short_id}  {k.created}  "
                       f"{k.username}@{k.hostname}  scrypt N={k.n}")


@key_app.command("add", cls=_Command)
def key_add(repo: RepoOpt = None, password_file: PasswordOpt = None, rsh: RshOpt = None,
            s3_endpoint: S3EndpointOpt = None,
            new_password_file: Annotated[str | None, typer.Option(
                "--new-password-file", metavar="FILE",
                help="The new password (else a prompt).")] = None,
            kdf_n: Annotated[int, typer.Option("--kdf-n", metavar="N",
                                               help="scrypt's N for the new key.")]
            = 1 << 17) -> None:
    """Add a password: a new key object for the same master key."""
    from cloneaware.repo import keys

    with _handled():
        with _key_repo(repo, password_file, rsh, s3_endpoint) as r:
            name = keys.add(r, keys.new_password(new_password_file), kdf_n)
        typer.echo(f"added key {name[5:13]}")


@key_app.command("remove", cls=_Command)
def key_remove(key_id: Annotated[str, typer.Argument(metavar="KEY_ID",
                                                     help="The key's id (or a prefix).")],
               repo: RepoOpt = None, password_file: PasswordOpt = None, rsh: RshOpt = None,
               s3_endpoint: S3EndpointOpt = None) -> None:
    """Remove a password's key object (never the one used, nor the last)."""
    from cloneaware.repo import keys

    with _handled():
        with _key_repo(repo, password_file, rsh, s3_endpoint) as r:
            name = keys.remove(r, key_id)
        typer.echo(f"removed key {name[5:13]}")


@key_app.command("passwd", cls=_Command)
def key_passwd(repo: RepoOpt = None, password_file: PasswordOpt = None, rsh: RshOpt = None,
               s3_endpoint: S3EndpointOpt = None,
               new_password_file: Annotated[str | None, typer.Option(
                   "--new-password-file", metavar="FILE",
                   help="The new password (else a prompt).")] = None,
               kdf_n: Annotated[int, typer.Option("--kdf-n", metavar="N",
                                                              help="scrypt's N.")] = 1 << 17
               ) -> None:
    """Change the password used: add a key for the new one, remove the old one."""
    from cloneaware.repo import keys

    with _handled():
        with _key_repo(repo, password_file, rsh, s3_endpoint) as r:
            name = keys.passwd(r, keys.new_password(new_password_file), kdf_n)
        typer.echo(f"changed the password: key {name[5:13]} replaces the old one")



@app.command(cls=_Command)
def serve(
    restrict: Annotated[list[str] | None, typer.Option(
        "--restrict-to-path", metavar="DIR",
        help="Serve only paths under this directory (repeatable).")]
    = None,
    allow: Annotated[str, typer.Option(
        "--allow", metavar="OPS",
        help="Operations to serve, comma-separated: put (receive archives), get "
        "(send archives), restore (restore into a directory here), repo (repositories "
        "here), repo-append (repositories, but nothing in them deleted or replaced except "
        "locks: a client cannot destroy its backups).")] = "put,get,restore,repo",
) -> None:
    """The remote end of ssh:// targets; speaks on stdin/stdout.  Meant as a forced
    command: command="cloneaware serve --restrict-to-path /backups" in authorized_keys."""
    from cloneaware import serve as server
    from cloneaware.remote import client

    ops = [o.strip() for o in allow.split(",") if o.strip()]
    bad = [o for o in ops if o not in client.OPS]
    if bad:
        _err(f"unknown operation {bad[0]!r} in --allow")
        raise typer.Exit(EXIT_USAGE)
    with _handled():
        rc = server.serve(restrict or [], ops)
    raise typer.Exit(rc)


def main() -> None:
    """The command line.  From here on SIGINT and SIGTERM raise Interrupted,
    which every command turns into one line and exit 130 (with its temporary
    files removed on the way out); outside a command (parsing, the imports a
    command makes first) the same line and code come from here."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGUSR1, _raise_lock_lost)
    try:
        try:
            app()
        except SystemExit:
            if _signalled is not None:  # its exception was lost on the way: honour it now
                raise Interrupted(_signalled) from None
            raise
    except (Interrupted, KeyboardInterrupt) as e:
        msg = str(e) if isinstance(e, Interrupted) else "interrupted by SIGINT"
        _err(msg)
        if "--json" in sys.argv[1:]:
            _json_error(msg, EXIT_INTERRUPTED)
        _exit_now(EXIT_INTERRUPTED)
