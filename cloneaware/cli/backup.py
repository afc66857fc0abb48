"""``cloneaware backup``: PATHs into an archive (a file, standard output,
ssh://, or a sparse thin backup) or into a new snapshot of a repository
(of PATHs, or of an archive file with --from-archive)."""
from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from cloneaware.cli.common import Command, app, err, handled, human, lister, progress, report, say
from cloneaware.cli.options import (
    NoProgressOpt,
    PasswordOpt,
    QuietOpt,
    RepoOpt,
    RetryLockOpt,
    RshOpt,
    S3ConnOpt,
    S3EndpointOpt,
    env_repo,
    opened,
)
from cloneaware.errors import UsageError


@app.command(cls=Command)
def backup(
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="[PATH]...",
        help="Files and directories; each is stored under its basename.")] = None,
    output: Annotated[str | None, typer.Option(
        "-o", "--output", metavar="ARCHIVE",
        help="Archive file, or - for standard output.")] = None,
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    host: Annotated[str | None, typer.Option(
        "--host", metavar="NAME",
        help="Repository: the host name recorded in the snapshot (default: this "
        "host's).")] = None,
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", metavar="TAG", help="Repository: a tag for the snapshot (repeatable).")] = None,
    parent: Annotated[str | None, typer.Option(
        "--parent", metavar="SNAPSHOT",
        help="Repository: take this snapshot (id, unique prefix, or latest) as the one to "
        "compare with, instead of the one this host wrote last of these PATHs (which is "
        "all a backup trusts by itself).")] = None,
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
    atime: Annotated[bool, typer.Option(
        "--atime", help="In a repository, keep each entry's access time (a restore then "
        "sets it back).  Without it a snapshot records the modification time there, as "
        "Borg and tar do: access times change on every read (a directory's on every "
        "backup), and would make every night store its whole manifest again.  Archives "
        "(-o) always keep them.")] = False,
    no_progress: NoProgressOpt = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Read, hash and compress as a backup would, and report what it "
        "would store; write no archive, and nothing to a repository (no blob, snapshot or "
        "anchor: only the shared lock every reading command takes).")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Refuse to start (exit 2) if a PATH does not exist, instead of "
        "backing up the others and exiting 1.")] = False,
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
    the next backup reads only what no longer shares its blocks with it.

    Every kind of inode is kept, sockets and FIFOs as inodes (never opened);
    a PATH that does not exist is skipped with a warning (exit 1)."""
    from cloneaware.backup import ArchiveSink, Backup, SparseSink
    from cloneaware.backup.sinks import Discard, Sink, file_output
    from cloneaware.patterns import Exclusions, read_list
    from cloneaware.remote import client

    with handled(as_json, to_stderr=output == "-" and not dry_run):
        if output is not None and repo:
            raise UsageError("give -o ARCHIVE or -r REPO, not both")
        paths = list(paths or [])
        for fl in files_from or []:
            paths += read_list(fl, "--files-from")
        patterns = list(exclude or [])
        for fl in exclude_from or []:
            patterns += read_list(fl, "--exclude-from")
        on_stdout = output == "-" and not dry_run  # the archive
        common: dict[str, Any] = dict(compress=compress, one_file_system=one_fs, warn=err,
                      point_in_time=not no_pit, snapshot=snapshot,
                      exclude=Exclusions(patterns, exclude_caches),
                      listed=lister(verbose, quiet, on_stdout or as_json), dry_run=dry_run,
                      strict=strict)
        if output is None:
            repo = env_repo(repo)
            if not repo:
                raise UsageError("give -o ARCHIVE or -r REPO (or set CLONEAWARE_REPOSITORY)")
            from cloneaware.repo.tag import check_tag

            for t in tag or []:
                check_tag(t)
            _backup_repo(paths, repo, host, tag or [], from_archive, password_file,
                         s3_endpoint, connections, compress, as_json, base, sparse,
                         rsh, no_pit, common, dry_run, parent, atime)
            return
        if from_archive is not None or host is not None or tag or parent is not None \
                or atime:
            raise UsageError("--from-archive, --host, --tag and --atime are for repositories "
                             "(-r); an archive keeps access times")
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
        with progress(True, None, "backup") as prog:
            s = Backup(paths, sink, base=base, progress=prog, **common).run()
        d = s.as_dict()
        d["dry_run"] = dry_run
        if as_json:
            say(json.dumps(d, indent=2), to_stderr=on_stdout)
        elif not on_stdout:
            report(
                ("dry run, nothing written: " if dry_run else "")
                + f"{s.files} files, {human(s.logical_bytes)} logical, "
                f"{human(s.physical_bytes)} physical; stored {human(s.stored_bytes)}, "
                f"referenced {human(s.referenced_bytes)}, "
                + (f"in the base {human(s.base_referenced_bytes)}, " if base else "")
                + f"holes {human(s.hole_bytes)}; "
                + (f"{s.excluded} entries excluded; " if s.excluded else "")
                + f"archive {'would be ' if dry_run else ''}{human(s.archive_bytes)} in "
                f"{s.seconds:.1f} s\n"
                f"point in time: {s.captured_by_clone} files cloned, "
                f"{s.captured_by_snapshot} from a snapshot, {s.read_live} read live"
                + (" (" + ", ".join(f"{n} {r}" for r, n in s.read_live_reasons.items()) + ")"
                   if s.read_live else ""))
        if s.warnings.exit_code():
            raise typer.Exit(s.warnings.exit_code())


def _backup_repo(paths, repo, host, tags, from_archive, password_file, s3_endpoint,
                 connections, compress, as_json, base, sparse, rsh, no_pit, common,
                 dry_run, parent=None, atime=False) -> None:
    """backup -r REPO: a new snapshot."""
    from cloneaware.backup import Backup
    from cloneaware.backup.workers import parse_compress
    from cloneaware.repo.sink import RepositorySink
    from cloneaware.repo.transfer import import_archive

    if base is not None or sparse:
        raise UsageError("--base and --sparse make thin archives (-o), not snapshots")
    _codec, level = parse_compress(compress)
    with opened(repo, password_file, rsh, s3_endpoint, connections,
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
                                                  connections, err)
                except SharingMapGiven:
                    raise SharingMapGiven(from_archive) from None
            d = {"snapshot": snap.id, **counts}
            if as_json:
                say(json.dumps(d, indent=2))
            else:
                report(f"snapshot {snap.short_id} of {from_archive}: {d['files']} "
                       f"files, added {human(d['added_bytes'])}")
            return
        if not paths:
            raise UsageError("give the PATHs to back up")
        sink = RepositorySink(r, paths, host, tags, level, connections, err,
                              anchors=not no_pit, dry_run=dry_run, parent_spec=parent,
                              atime=atime)
        with progress(True, None, "backup") as prog:
            s = Backup(paths, sink, progress=prog, **common).run()
    d = s.as_dict()
    d["dry_run"] = dry_run
    if as_json:
        say(json.dumps(d, indent=2))
    else:
        report(
            ("dry run, nothing written: " if dry_run else f"snapshot {(s.snapshot or '')[:8]}: ")
            + f"{s.files} files, {human(s.logical_bytes)} "
            f"logical; read {human(s.bytes_read)}, unchanged {human(s.unchanged_bytes)} "
            f"(not read), {'would add' if dry_run else 'added'} {human(s.added_bytes)} to "
            f"the repository in {s.seconds:.1f} s")
    if s.warnings.exit_code():
        raise typer.Exit(s.warnings.exit_code())
