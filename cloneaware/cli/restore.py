"""``cloneaware restore``: an archive (a file, standard input, ssh://) or
snapshots of a repository into DEST; with DEST ssh://, the other host
restores."""
from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, err, handled, human, lister, progress, report, say
from cloneaware.cli.options import (
    HostSelOpt,
    NoProgressOpt,
    PasswordOpt,
    PathSelOpt,
    QuietOpt,
    RepoOpt,
    RetryLockOpt,
    RshOpt,
    S3ConnOpt,
    S3EndpointOpt,
    TagSelOpt,
    choose,
    opened,
    repo_for,
)
from cloneaware.errors import EXIT_IO, EXIT_WARNINGS, UsageError


@app.command(cls=Command)
def restore(
    targets: Annotated[list[str], typer.Argument(
        metavar="ARCHIVE DEST | SNAPSHOT... DEST",
        help="An archive file (- for standard input) and the directory to restore into; "
        "with -r, one or more snapshots (ids, unique prefixes, or latest) and DEST.")],
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
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
    share_with: Annotated[list[str] | None, typer.Option(
        "--share-with", metavar="PATH", help="Files or trees on DEST's filesystem to share "
        "with (repeatable): read once first, and every restored range whose 64 KiB chunks "
        "one of them holds is cloned from it, read back and compared, so a VM image "
        "restored next to its golden image takes only its own bytes.  A restore with "
        "--include does this by itself with the snapshot's own files already at their "
        "place in DEST.")] = None,
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
    from cloneaware.restore.beside import ShareIndex
    from cloneaware.restore.select import Selection

    with handled(as_json):
        select = Selection(include or [], strip)
        listed = lister(verbose, quiet, as_json)
        repo = repo_for(targets, repo)
        share = None
        if share_with and targets and not dry_run and not client.is_url(targets[-1]):
            share = ShareIndex.build(share_with, targets[-1])
        if repo:
            if len(targets) < 2:
                raise UsageError("give SNAPSHOT... DEST")
            s = _restore_repo(targets[:-1], targets[-1], repo, password_file, s3_endpoint,
                              connections, rsh, force or reshare_existing, base, trust_base,
                              reshare_existing, select, listed, dry_run, share,
                              (host, path, tag))
            _restore_report(s, as_json, dry_run, targets[-1])
            return
        if host is not None or path or tag:
            raise UsageError("--host, --path and --tag choose snapshots of a repository (-r)")
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
            if share_with:
                raise UsageError("--share-with needs a local DEST")
            if trust_base:
                raise UsageError("--trust-base needs a local DEST: the other host hashes "
                                 "every byte it clones from its base")
            st = client.push_restore(archive, dest, force, base, False, rsh)
            d = st.get("summary", {})
            if as_json:
                say(json.dumps(d, indent=2))
            else:
                report(f"{dest}: {d.get('files', 0)} files, wrote "
                       f"{human(d.get('written_bytes', 0))}, reflinked "
                       f"{human(d.get('reflinked_bytes', 0))}, copied "
                       f"{human(d.get('copied_bytes', 0))} on the remote host")
            if d.get("not_exact"):
                raise typer.Exit(EXIT_WARNINGS)
            return
        src = client.open_remote_archive(archive, rsh) if client.is_url(archive) else archive
        try:
            with progress(not dry_run, None, "restore") as prog:
                s = Restore(src, dest, force=force, progress=prog, warn=err, base=base,
                            trust_base=trust_base, reshare_existing=reshare_existing,
                            select=select, listed=listed, dry_run=dry_run, share=share).run()
            if share is not None:
                s.share_read_bytes = share.stats.bytes_read
                share.close()
        finally:
            if not isinstance(src, str):
                src.close()
        _restore_report(s, as_json, dry_run, dest)


def _restore_repo(specs, dest, repo, password_file, s3_endpoint, connections, rsh, force,
                  base, trust_base, reshare_existing=False, select=None, listed=None,
                  dry_run=False, share=None, filters=(None, None, None)):
    from cloneaware.repo.restore import restore_snapshots

    if base is not None or trust_base:
        raise UsageError("--base and --trust-base are for thin archives")
    with opened(repo, password_file, rsh, s3_endpoint, connections,
                lock="shared", operation="restore") as r:
        host, paths, tags = filters
        chosen = choose(r, specs, host, paths, tags, unique=True)
        with progress(not dry_run, None, "restore") as prog:
            s = restore_snapshots(r, chosen, dest, dry_run=dry_run, force=force,
                                  progress=prog, warn=err,
                                  reshare_existing=reshare_existing, select=select,
                                  listed=listed, share=share)
    if share is not None:
        s.share_read_bytes = share.stats.bytes_read
        share.close()
    return s


def _free_bytes(dest: str) -> int | None:
    """Free bytes (an unprivileged writer's) of the filesystem DEST is or
    would be made on; None for a remote DEST or one that cannot be asked."""
    from cloneaware.remote import client

    if client.is_url(dest):
        return None
    p = os.path.abspath(dest)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _restore_report(s, as_json: bool, dry_run: bool = False, dest: str = "") -> None:
    d = s.as_dict()
    short = False  # a dry run whose writes would not fit in DEST's free space
    if dry_run:
        d["dry_run"] = True
        free = _free_bytes(dest)
        d["free_bytes"] = free
        short = free is not None and s.written_bytes > free
        for w in s.not_exact:  # a restore says these as it goes
            err(str(w))
    if as_json:
        say(json.dumps(d, indent=2))
    elif dry_run:
        report(
            f"dry run, nothing written: {s.files} files, {human(s.logical_bytes)} logical: "
            f"would write {human(s.written_bytes)}, reflink {human(s.reflinked_bytes)} "
            f"(or copy, where DEST cannot clone), holes {human(s.hole_bytes)}"
            + (f"; from the base {human(s.base_bytes)}" if s.base_bytes else "")
            + (f"; left out {s.left_out} entries" if s.left_out else ""))
    else:
        report(
            f"{s.files} files, {human(s.logical_bytes)} logical: wrote "
            f"{human(s.written_bytes)}, reflinked {human(s.reflinked_bytes)}, "
            f"copied {human(s.copied_bytes)}, holes {human(s.hole_bytes)}"
            + (f"; from the base {human(s.base_bytes)}, verified "
               f"{human(s.verified_bytes)}" if s.base_bytes else "")
            + (f"; reused {human(s.reused_bytes)} of the copy already there "
               f"({human(s.reuse_differing_bytes)} differed, written)"
               if s.reused_bytes else "")
            + (f"; shared {human(s.beside_bytes)} with files already on the filesystem "
               f"(cloned, read back equal)" if s.beside_bytes else "")
            + (f"; {human(s.reuse_differing_bytes)} cloned from them differed, written"
               if s.reuse_differing_bytes and not s.reused_bytes else "")
            + (f"; read {human(s.share_read_bytes)} of --share-with"
               if s.share_read_bytes else "")
            + (f"; rewrote {human(s.bookend_rewritten_bytes)} of the old copy's partly "
               f"used extents, releasing {human(s.bookend_released_bytes)}"
               if s.bookend_released_bytes else "")
            + (f"; left out {s.left_out} entries" if s.left_out else "") + " "
            f"in {s.seconds:.1f} s")
    if s.copied_bytes:
        why = ", ".join(f"{human(n)} ({r})" for r, n in s.copy_reasons.items())
        err(f"copied instead of reflinked: {why}")
    if s.not_exact:
        err(f"{len(s.not_exact)} entries not restored exactly")
    if s.damaged:
        files = len({w.path for w in s.damaged})
        err(f"{len(s.damaged)} ranges of {files} files could not be had from the repository"
            "; those files are not restored (named above), everything else is (run cloneaware "
            "check --read-data)")
    if short:
        err(f"{dest}: the restore would not fit: it writes at least {human(s.written_bytes)}"
            f" (reflinks aside), and the filesystem has {human(d['free_bytes'])} free")
        raise typer.Exit(EXIT_IO)
    if s.warnings.exit_code():
        raise typer.Exit(s.warnings.exit_code())
