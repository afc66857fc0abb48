"""``cloneaware reshare``: a tree that another tool copied gets back the
sharing that an archive, a sharing map or a snapshot records."""
from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, err, handled, human, progress, report
from cloneaware.cli.options import (
    HostSelOpt,
    NoProgressOpt,
    PasswordOpt,
    PathSelOpt,
    QuietOpt,
    RepoOpt,
    RetryLockOpt,
    RshOpt,
    S3EndpointOpt,
    TagSelOpt,
    choose,
    opened,
)
from cloneaware.errors import UsageError


def space_lines(res) -> list[str]:
    """What the filesystem gave back: the extents rewritten, those kept and
    why, and the used space as statfs (df) counts it."""
    b = res.bookends
    out = []
    if b.extents_rewritten:
        out.append(f"rewrote {human(b.rewritten_bytes)} still referenced in "
                   f"{b.extents_rewritten} partly shared extents, releasing "
                   f"{human(b.released_bytes)}")
    for why, n in sorted(b.kept.items()):
        out.append(f"kept {human(n)} of partly shared extents: {why}")
    if b.unchecked:
        out.append(f"partly shared extents not looked for: {b.unchecked}; df may show "
                   "less freed than was shared")
    if res.freed_bytes is not None:
        verb = "fell" if res.freed_bytes >= 0 else "rose"
        out.append(f"the filesystem's used space {verb} by {human(abs(res.freed_bytes))} "
                   "(statfs, as df shows it)")
    return out


@app.command(cls=Command)
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
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
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
    differ (edited since) are left alone and counted.  No file's contents or
    times change; files missing or of another size are skipped and listed.
    On Btrfs (as root), an extent left referenced only in part is rewritten
    where that frees more than it writes, so that the space is released; the
    summary says what the filesystem's used space fell by.  Exit 1 when files
    were skipped, refused or differ."""
    from cloneaware.reshare import Reshare

    with handled(as_json):
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
            with opened(repo, password_file, rsh, s3_endpoint,
                        lock="shared", operation="reshare") as r:
                snap = choose(r, [spec], host, path, tag)[0]
                manifest = r.manifest(snap)
            with progress(True, None, "reshare") as prog:
                rs = Reshare(dest, dry_run, prog, err)
                res = rs.run_manifest(manifest)
            what = f"snapshot {snap.short_id}"
        else:
            if source is None or len(targets) != 1:
                raise UsageError("give --from ARCHIVE DEST (or -r REPO SNAPSHOT DEST)")
            from cloneaware.archive.records import open_archive

            dest = targets[0]
            f = open_archive(source)
            try:
                with progress(True, None, "reshare") as prog:
                    rs = Reshare(dest, dry_run, prog, err)
                    res = rs.run_archive(f)
            finally:
                if f is not sys.stdin.buffer:
                    f.close()
            what = "standard input" if source == "-" else source
        for w in res.differing:
            err(f"{w.path}: {w.nbytes} bytes differ from the place they share with in the "
                f"{rs.what}; left alone")
        d = res.as_dict()
        if as_json:
            typer.echo(json.dumps(d, indent=2))
        else:
            verb = "would ask to dedupe" if dry_run else "shared"
            amount = res.to_dedupe_bytes if dry_run else res.shared_bytes
            report(
                f"{dest} from {what}: {res.files} files, {res.references} references to "
                f"{human(res.referenced_bytes)}; {verb} {human(amount)}, already shared "
                f"{human(res.already_shared_bytes)}"
                + ("" if dry_run else f", differing {human(res.differing_bytes)}")
                + f", unaligned {human(res.unaligned_bytes)}, skipped "
                f"{human(res.skipped_bytes)} ({len(res.skipped)} files skipped, "
                f"{len(res.refused)} refused) in {res.seconds:.1f} s"
                + (f"; {human(res.base_bytes)} in the thin backup's base not reshared"
                   if res.base_bytes else ""))
            for line in space_lines(res):
                report(line)
        if res.warnings.exit_code():
            raise typer.Exit(res.warnings.exit_code())
