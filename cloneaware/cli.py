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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

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
def _handled() -> Iterator[None]:
    """Map exceptions to one line and an exit code."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except Interrupted as e:
        _err(str(e))
        _exit_now(EXIT_INTERRUPTED)
    except CloneawareError as e:
        _err(str(e))
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted by SIGINT")
        _exit_now(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not our error to report twice
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        raise typer.Exit(EXIT_IO) from None
    except OSError as e:
        _err(describe_oserror(e))
        raise typer.Exit(EXIT_IO) from None
    finally:
        signal.signal(signal.SIGTERM, old)


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
    from cloneaware.index.scan import scan as do_scan

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
            if t.encoded_candidate_bytes:
                rows.append(("compressed, same extent as an earlier file "
                              "(shared if the content matches)",
                              _human(t.encoded_candidate_bytes)))
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


def _summary_line(d: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items())


@app.command()
def backup(
    paths: Annotated[list[str], typer.Argument(help="Files and directories; each is stored "
                                               "under its basename.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Archive file, or - for "
                                        "standard output.")],
    compress: Annotated[str, typer.Option("--compress", help="none, zstd or zstd:LEVEL.")]
    = "zstd",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing archive.")]
    = False,
    cross: Annotated[bool, typer.Option("--cross-filesystems",
                                        help="Descend into other mounted filesystems.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout "
                                          "(stderr when the archive goes to stdout).")] = False,
    base: Annotated[str | None, typer.Option(
        "--base", help="Thin backup: store only what PATHs do not share with BASE (a file or "
        "a directory), plus references into BASE with the SHA-256 of each range.")] = None,
    rsh: Annotated[str | None, typer.Option(
        "--rsh", help="Command to reach an ssh:// target (default: $CLONEAWARE_RSH or ssh).")]
    = None,
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
) -> None:
    """Back up PATHs into one archive that stores each shared extent once.

    Each file larger than 64 KiB is first cloned (a reflink, where the filesystem
    can) and read from the clone, so a file being written is saved as one
    instant's state."""
    from cloneaware.backup import ArchiveSink, Backup, SparseSink
    from cloneaware.backup.sinks import file_output
    from cloneaware.remote import client

    with _handled():
        if sparse:
            sink: ArchiveSink | SparseSink = SparseSink(output, paths, base, force)
        elif client.is_url(output):
            client.parse_url(output)
            sink = ArchiveSink(lambda: client.RemoteOutput(output, force, rsh), output)
        else:
            sink = ArchiveSink(file_output(output, force),
                               "standard output" if output == "-" else output)
        with _progress(True, None, "backup") as prog:
            s = Backup(paths, sink, compress=compress, base=base,
                       one_file_system=not cross, progress=prog, warn=_err,
                       point_in_time=not no_pit, snapshot=snapshot).run()
        d = s.as_dict()
        d["changed"] = [{"path": p, "reason": r} for p, r in s.changed]
        d["skipped"] = [{"path": p, "reason": r} for p, r in s.skipped]
        out = sys.stderr if output == "-" else sys.stdout
        if as_json:
            out.write(json.dumps(d, indent=2) + "\n")
        elif output != "-":
            out.write(
                f"{s.files} files, {_human(s.logical_bytes)} logical, "
                f"{_human(s.physical_bytes)} physical; stored {_human(s.stored_bytes)}, "
                f"referenced {_human(s.referenced_bytes)}, "
                + (f"in the base {_human(s.base_referenced_bytes)}, " if base else "")
                + f"holes {_human(s.hole_bytes)}; "
                f"archive {_human(s.archive_bytes)} in {s.seconds:.1f} s\n"
                f"point in time: {s.captured_by_clone} files cloned, "
                f"{s.captured_by_snapshot} from a snapshot, {s.read_live} read live"
                + (" (" + ", ".join(f"{n} {r}" for r, n in s.read_live_reasons.items()) + ")"
                   if s.read_live else "") + "\n")
        if s.changed or s.skipped:
            raise typer.Exit(EXIT_WARNINGS)


@app.command()
def restore(
    archive: Annotated[str, typer.Argument(help="Archive file, or - for standard input.")],
    dest: Annotated[str, typer.Argument(help="Directory to restore into (created if "
                                        "missing).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing entries of the "
                                        "same name.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    base: Annotated[str | None, typer.Option(
        "--base", help="Where the base of a thin backup is.  Its ranges are reflinked when "
        "BASE and DEST share a filesystem, copied otherwise, and then hashed in the restored "
        "file and compared with the archive.")] = None,
    trust_base: Annotated[bool, typer.Option(
        "--trust-base", help="Skip hashing the bytes cloned from the base (saves reading "
        "them; a base changed since the backup then goes unnoticed).  Off by default.")]
    = False,
    rsh: Annotated[str | None, typer.Option(
        "--rsh", help="Command to reach an ssh:// archive or DEST (default: $CLONEAWARE_RSH "
        "or ssh).")] = None,
) -> None:
    """Restore an archive into DEST, re-creating shared extents with reflinks.

    ARCHIVE may be ssh://[user@]host[:port]/path (read from that host); DEST may be
    ssh://[user@]host[:port]/path (the other host restores, with its own reflinks)."""
    from cloneaware.remote import client
    from cloneaware.restore import Restore

    with _handled():
        if client.is_url(dest):
            if client.is_url(archive):
                raise UsageError("give a local ARCHIVE or a local DEST, not two ssh:// URLs")
            st = client.push_restore(archive, dest, force, base, trust_base, rsh)
            d = st.get("summary", {})
            if as_json:
                typer.echo(json.dumps(d, indent=2))
            else:
                typer.echo(f"{dest}: {d.get('files', 0)} files, wrote "
                           f"{_human(d.get('written_bytes', 0))}, reflinked "
                           f"{_human(d.get('reflinked_bytes', 0))}, copied "
                           f"{_human(d.get('copied_bytes', 0))} on the remote host")
            if d.get("not_exact"):
                raise typer.Exit(EXIT_WARNINGS)
            return
        src = client.open_remote_archive(archive, rsh) if client.is_url(archive) else archive
        try:
            with _progress(True, None, "restore") as prog:
                s = Restore(src, dest, force=force, progress=prog, warn=_err, base=base,
                            trust_base=trust_base).run()
        finally:
            if not isinstance(src, str):
                src.close()
        d = s.as_dict()
        d["not_exact"] = [{"path": p, "reason": r} for p, r in s.not_exact]
        if as_json:
            typer.echo(json.dumps(d, indent=2))
        else:
            typer.echo(
                f"{s.files} files, {_human(s.logical_bytes)} logical: wrote "
                f"{_human(s.written_bytes)}, reflinked {_human(s.reflinked_bytes)}, "
                f"copied {_human(s.copied_bytes)}, holes {_human(s.hole_bytes)}"
                + (f"; from the base {_human(s.base_bytes)}, verified "
                   f"{_human(s.verified_bytes)}" if s.base_bytes else "") + " "
                f"in {s.seconds:.1f} s")
        if s.copied_bytes:
            why = ", ".join(f"{_human(n)} ({r})" for r, n in s.copy_reasons.items())
            _err(f"copied instead of reflinked: {why}")
        if s.not_exact:
            _err(f"{len(s.not_exact)} entries not restored exactly")
            raise typer.Exit(EXIT_WARNINGS)


@app.command("ls")
def ls_cmd(
    archive: Annotated[str, typer.Argument(help="Archive file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the entries of an archive from its index, reading no file data."""
    from cloneaware.archive import format as fmt
    from cloneaware.archive.reader import open_archive, read_index

    with _handled():
        f = open_archive(archive)
        if not f.seekable():
            raise UsageError("ls needs a seekable archive file (use verify for a pipe)")
        with f:
            listing = read_index(f)
        items, footer, b = listing.items, listing.footer, listing.base
        if as_json:
            typer.echo(json.dumps({
                "version": listing.header.version,
                "tool": listing.header.tool,
                "base": None if b is None else {
                    "path": os.fsdecode(b.path),
                    "kind": "dir" if b.kind == fmt.BASE_DIR else "file",
                    "files": [{"path": os.fsdecode(x.path), "size": x.size} for x in b.files]},
                "entries": [{"id": i.id, "type": fmt.KIND_NAMES[i.kind],
                             "path": os.fsdecode(i.path), "size": i.size,
                             "stored_bytes": i.stored_bytes, "referenced_bytes": i.ref_bytes,
                             "base_referenced_bytes": i.base_ref_bytes}
                            for i in items],
                "stored_bytes": footer.stored_bytes,
                "referenced_bytes": footer.ref_bytes,
                "base_referenced_bytes": footer.base_ref_bytes,
            }, indent=2))
            return
        if b is not None:
            typer.echo(f"thin backup: needs the base {os.fsdecode(b.path)!r} "
                       f"({len(b.files)} files)")
            for x in b.files:
                typer.echo(f"  base file {os.fsdecode(x.path) or '.'} ({x.size} bytes)")
        typer.echo(f"{'type':<8} {'size':>14} {'stored':>14} {'referenced':>14} "
                   + (f"{'in base':>14} " if b is not None else "") + " path")
        for i in items:
            p = os.fsdecode(i.path)
            if not p.isprintable():
                p = repr(p)
            typer.echo(f"{fmt.KIND_NAMES[i.kind]:<8} {i.size:>14} {i.stored_bytes:>14} "
                       f"{i.ref_bytes:>14} "
                       + (f"{i.base_ref_bytes:>14} " if b is not None else "") + f" {p}")


@app.command()
def verify(
    archive: Annotated[str, typer.Argument(help="Archive file, or - for standard input.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Check every record and every data hash; write nothing.  Exit 0 only if
    the archive is whole."""
    import time

    from cloneaware.archive.events import BaseRefEvent, DataEvent, EntryEvent, RefEvent
    from cloneaware.archive.reader import Stream, open_archive

    with _handled():
        t0 = time.monotonic()
        f = open_archive(archive)
        counts: dict[str, Any] = {
            "entries": 0, "data_records": 0, "ref_records": 0, "stored_bytes": 0,
            "referenced_bytes": 0, "base_ref_records": 0, "base_referenced_bytes": 0}
        stream = Stream(f)
        with _progress(True, None, "verify") as prog:
            for ev in stream.events():
                if isinstance(ev, EntryEvent):
                    counts["entries"] += 1
                elif isinstance(ev, DataEvent):
                    counts["data_records"] += 1
                    counts["stored_bytes"] += len(ev.data)
                    prog.advance(len(ev.data))
                elif isinstance(ev, RefEvent):
                    counts["ref_records"] += 1
                    counts["referenced_bytes"] += ev.length
                elif isinstance(ev, BaseRefEvent):
                    counts["base_ref_records"] += 1
                    counts["base_referenced_bytes"] += ev.length
        counts["seconds"] = time.monotonic() - t0
        if stream.base is not None:
            counts["base"] = os.fsdecode(stream.base.path)
            counts["base_files"] = len(stream.base.files)
        if as_json:
            typer.echo(json.dumps(counts, indent=2))
        else:
            typer.echo(f"archive is whole: {_summary_line(counts)}")
            if stream.base is not None:
                typer.echo(f"thin backup: restoring it needs the base {counts['base']!r} "
                           f"({counts['base_files']} files); their bytes are checked at "
                           "restore")


@app.command()
def serve(
    restrict: Annotated[list[str] | None, typer.Option(
        "--restrict-to-path", help="Serve only paths under this directory (repeatable).")]
    = None,
    allow: Annotated[str, typer.Option(
        "--allow", help="Operations to serve, comma-separated: put (receive archives), get "
        "(send archives), restore (restore into a directory here).")] = "put,get,restore",
) -> None:
    """The remote end of ssh:// targets; speaks on stdin/stdout.  Meant as a forced
    command: command="cloneaware serve --restrict-to-path /backups" in authorized_keys."""
    from cloneaware.remote import client, server

    ops = [o.strip() for o in allow.split(",") if o.strip()]
    bad = [o for o in ops if o not in client.OPS]
    if bad:
        _err(f"unknown operation {bad[0]!r} in --allow")
        raise typer.Exit(EXIT_USAGE)
    with _handled():
        rc = server.serve(restrict or [], ops)
    raise typer.Exit(rc)


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
