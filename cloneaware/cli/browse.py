"""What reads an archive or a snapshot without restoring it: ``ls``,
``find``, ``diff`` and ``verify``."""
from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, handled, human, progress, report
from cloneaware.cli.options import (
    HostSelOpt,
    JsonOpt,
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
    repo_for,
)
from cloneaware.errors import UsageError


@app.command("ls", cls=Command)
def ls_cmd(
    targets: Annotated[list[str], typer.Argument(
        metavar="ARCHIVE [PATH] | SNAPSHOT [PATH]",
        help="An archive file (- for standard input, or ssh://[user@]host[:port]/path), or "
        "with -r a snapshot (id, unique prefix, or latest); PATH: only the entries it "
        "matches, as restore --include matches them (a path as ls shows it, or a glob: "
        "home/*/app.log, *.img), and what is below a directory it matches.")],
    long: Annotated[bool, typer.Option(
        "-l", "--long", help="Mode, owner and group (numbers, as stored), size, mtime (UTC), "
        "and what a link points at, as ls -l shows them (read from each entry's record: "
        "still no file data).")] = False,
    as_json: JsonOpt = False,
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
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

    with handled(as_json):
        if not 1 <= len(targets) <= 2:
            raise UsageError("give one ARCHIVE and at most one PATH (or -r REPO, one "
                             "SNAPSHOT and at most one PATH)")
        repo = repo_for(targets, repo)
        sub = targets[1] if len(targets) == 2 else None
        snap_info = None
        if repo:
            with opened(repo, password_file, rsh, s3_endpoint,
                        lock="shared", operation="ls") as r:
                snap = choose(r, targets[:1], host, path, tag)[0]
                c = read_contents(io.BytesIO(r.manifest(snap)), long)
                snap_info = snap.to_json()
        else:
            f = _open_archive_any(targets[0], rsh)
            try:
                c = read_contents(f, long)
            finally:
                f.close()
        rows = c.under(sub, f"snapshot {snap_info['short_id']}" if snap_info else
                       "the archive")
        b = c.base
        if as_json:
            typer.echo(json.dumps({**({"snapshot": snap_info} if snap_info else {}),
                                   **contents_json(c, rows, long)}, indent=2))
            return
        if snap_info:
            typer.echo(f"snapshot {snap_info['id']} of {snap_info['hostname']} at "
                       f"{snap_info['time'][:19]}Z: {', '.join(snap_info['paths'])}")
        if c.is_map:
            typer.echo(f"sharing map: no data, {human(c.ref_bytes)} referenced "
                       "(cloneaware reshare --from uses it)")
        if b is not None:
            typer.echo(f"thin backup: needs the base {os.fsdecode(b.path)!r} "
                       f"({len(b.files)} files)")
            for bf in b.files:
                name = display.show(os.path.join(b.path, bf.path) if bf.path else b.path)
                typer.echo(f"  base file {name} ({human(bf.size)}, {bf.size} bytes)")
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


@app.command("find", cls=Command)
def find_cmd(
    patterns: Annotated[list[str], typer.Argument(
        metavar="PATTERN...", help="What to look for, as restore --include takes it: a name "
        "at any depth (app.log, *.conf), or a path as ls shows it (home/*/app.log).")],
    repo: RepoOpt = None,
    newest: Annotated[int | None, typer.Option(
        "--newest", min=1, metavar="N", help="Look in the N newest snapshots only.")] = None,
    as_json: JsonOpt = False,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Every snapshot holding an entry a PATTERN matches: one line each, with
    the snapshot, its time, the entry's type, size and mtime (UTC), oldest
    snapshot first.  From the manifests' indexes: no file data is read."""
    from cloneaware import display
    from cloneaware.archive import format as fmt
    from cloneaware.cli.common import err
    from cloneaware.repo.find import find
    from cloneaware.repo.snapshots import Filter

    with handled(as_json):
        if not repo:
            raise UsageError("find looks in a repository: give -r REPO")
        with opened(repo, password_file, rsh, s3_endpoint,
                    lock="shared", operation="find") as r:
            snaps = Filter.of(host, path, tag).apply(r.snapshots())
            if newest is not None:
                snaps = snaps[-newest:]
            found = list(find(r, snaps, patterns))
        if as_json:
            typer.echo(json.dumps([{
                "snapshot": f.snapshot.id, "time": f.snapshot.data["time"],
                "hostname": f.snapshot.hostname, "path": display.show(f.path),
                "path_b64": display.b64(f.path), "type": fmt.KIND_NAMES[f.kind],
                "size": f.size, "mtime": display.when_rfc3339(f.mtime_ns)} for f in found],
                indent=2))
        else:
            for f in found:
                t = f.snapshot.data["time"][:19].replace("T", " ")
                typer.echo(f"{f.snapshot.short_id}  {t}  "
                           f"{fmt.KIND_NAMES[f.kind]:<8} {f.size:>14}  "
                           f"{display.when(f.mtime_ns)}  {display.show(f.path)}")
        if not found:
            err(f"nothing matches in {len(snaps)} snapshots")


@app.command(cls=Command)
def dump(
    targets: Annotated[list[str], typer.Argument(
        metavar="SNAPSHOT PATH | ARCHIVE PATH", help="With -r a snapshot (id, unique prefix, "
        "or latest), else an archive file; and the path of one of its entries as ls shows "
        "it.")],
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Write one entry of a snapshot (or of an archive file) to standard output
    without restoring it: a file's bytes as they are (holes as zeros); a
    directory with what is below it (or a symlink, a device) as a pax tar
    stream that GNU tar extracts with its modes, numeric owners, times,
    links, files with holes as sparse files and, with --xattrs, xattrs.
    Sockets are left out (tar cannot hold them)."""
    import sys

    from cloneaware.archive.tarout import dump_archive
    from cloneaware.cli.common import err
    from cloneaware.repo.dump import dump as dump_entry

    with handled():
        if len(targets) != 2:
            raise UsageError("give one SNAPSHOT (with -r REPO) or ARCHIVE, and the PATH of "
                             "one entry")
        repo = repo_for(targets, repo)
        if sys.stdout.isatty():
            raise UsageError("standard output is a terminal: send it to a file or a pipe "
                             "(cloneaware dump ... > FILE, or | tar -x)")
        if not repo:
            arc = _archive_file(targets[0], "dump")
            res = dump_archive(arc, targets[1], sys.stdout.buffer, warn=err)
            sys.stdout.buffer.flush()
            if res.skipped:
                from cloneaware.errors import EXIT_WARNINGS

                raise typer.Exit(EXIT_WARNINGS)
            return
        with opened(repo, password_file, rsh, s3_endpoint, lock="shared",
                    operation="dump") as r:
            snap = choose(r, targets[:1], host, path, tag)[0]
            res = dump_entry(r, snap, targets[1], sys.stdout.buffer, warn=err)
            sys.stdout.buffer.flush()
        if res.skipped:
            from cloneaware.errors import EXIT_WARNINGS

            raise typer.Exit(EXIT_WARNINGS)


@app.command(cls=Command)
def mount(
    targets: Annotated[list[str], typer.Argument(
        metavar="[ARCHIVE] MOUNTPOINT", help="With -r: the directory to mount the repository "
        "on; else an archive file and the directory to mount it on.")],
    repo: RepoOpt = None,
    allow_other: Annotated[bool, typer.Option(
        "--allow-other", help="Let other users than the one who mounted read the tree (as "
        "its modes allow; needs user_allow_other in /etc/fuse.conf unless root).")] = False,
    cache_mib: Annotated[int, typer.Option(
        "--cache", min=8, metavar="MIB", help="Blobs kept in memory for reads, in MiB.")]
    = 256,
    versions: Annotated[bool, typer.Option(
        "--versions", help="Add versions/PATH/: for each path of any snapshot, every "
        "distinct version it had (by content; a link by its target), each named as the "
        "first snapshot that holds it is in snapshots/ (every manifest is read once, when "
        "versions/ is first looked in).")] = False,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Mount the repository's snapshots (or an archive file's entries) as a
    read-only filesystem (FUSE), and
    serve it until it is unmounted (fusermount3 -u MOUNTPOINT) or SIGINT,
    SIGTERM or SIGHUP comes, which unmount it; exit 0 then.  The tree:
    snapshots/TIME-ID/ (each snapshot's entries as ls shows them),
    hosts/HOST/TIME-ID and hosts/HOST/latest (links), tags/TAG/TIME-ID and
    tags/TAG/latest (links), ids/ID (links), and
    latest (a link to the newest snapshot); with --versions, versions/PATH/.
    Only what is looked at is read:
    a snapshot's manifest when its directory is, a file's blobs when it is
    read.  A file whose data cannot be read gives EIO, and the reason is
    said on stderr.  The repository stays locked (shared) while mounted, so
    prune waits for it.  Needs pyfuse3 (Debian: python3-pyfuse3)."""
    from cloneaware.cli.common import err
    from cloneaware.cli.options import env_repo
    from cloneaware.mount import fuse
    from cloneaware.mount.tree import ArchiveSource, RepositorySource, Tree
    from cloneaware.repo.snapshots import Filter

    with handled():
        repo = repo or (env_repo(None) if len(targets) == 1 else None)
        if len(targets) != (1 if repo else 2):
            raise UsageError("give -r REPO and one MOUNTPOINT, or an ARCHIVE and a MOUNTPOINT")
        where = targets[-1]
        if not os.path.isdir(where):
            raise UsageError(f"{where}: the mount point is not a directory")
        if os.path.ismount(where):
            raise UsageError(f"{where}: something is mounted there already")
        fuse.available()
        if not repo:
            archive = _archive_file(targets[0], "mount")
            src = ArchiveSource(archive)
            try:
                tree = Tree(src, None, err, cache_bytes=cache_mib << 20)
                try:
                    err(f"{archive} mounted on {where}: fusermount3 -u {where} or Ctrl-C to "
                        "unmount")
                    fuse.serve(tree, where, allow_other, err)
                finally:
                    tree.close()
            finally:
                src.close()
            err(f"unmounted {where}: {tree.blobs.fetched} data records read")
            return
        with opened(repo, password_file, rsh, s3_endpoint, lock="shared",
                    operation="mount") as r:
            snaps = Filter.of(host, path, tag).apply(r.snapshots())
            tree = Tree(RepositorySource(r), snaps, err, cache_bytes=cache_mib << 20,
                        versions=versions)
            try:
                err(f"{len(snaps)} snapshots mounted on {where}: fusermount3 -u {where} or "
                    "Ctrl-C to unmount")
                fuse.serve(tree, where, allow_other, err)
            finally:
                tree.close()
            err(f"unmounted {where}: {tree.manifests_read} manifests and "
                f"{tree.blobs.fetched} blobs read")


@app.command(cls=Command)
def diff(
    targets: Annotated[list[str], typer.Argument(
        metavar="ARCHIVE_A ARCHIVE_B | SNAPSHOT_A SNAPSHOT_B",
        help="Two archives (files, - for one of them on standard input, or ssh://), or with "
        "-r two snapshots (ids, unique prefixes, or latest).")],
    as_json: JsonOpt = False,
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
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

    with handled(as_json):
        if len(targets) != 2:
            raise UsageError("give two archives (or -r REPO and two snapshots)")
        if targets.count("-") > 1:
            raise UsageError("only one of the two can be standard input")
        repo = repo_for(targets, repo)
        if repo:
            with opened(repo, password_file, rsh, s3_endpoint,
                        lock="shared", operation="diff") as r:
                a, b = (read_contents(io.BytesIO(r.manifest(s)), True, blobs=True)
                        for s in choose(r, targets, host, path, tag))
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
            return human(x.size) if x.kind == fmt.K_REG else fmt.KIND_NAMES[x.kind]

        for c in changes:
            if c.old is None:
                assert c.new is not None
                typer.echo(f"+ {display.show(c.path)} ({size(c.new)})")
            elif c.new is None:
                typer.echo(f"- {display.show(c.path)} ({size(c.old)})")
            else:
                sizes = (f"{size(c.old)} -> {size(c.new)}" if size(c.old) != size(c.new)
                         else size(c.new))
                what = (f"{w} {c.values[w][0]} -> {c.values[w][1]}" if w in c.values else w
                        for w in c.what)
                typer.echo(f"M {display.show(c.path)} ({sizes}; {', '.join(what)})")
        n = tally(changes)
        typer.echo(f"{n['added']} added, {n['removed']} removed, {n['changed']} changed")


def _archive_file(where: str, command: str) -> str:
    """An archive that ``command`` reads at random: a file, not standard
    input or ssh:// (read whole by ls, verify and diff instead)."""
    if where == "-" or where.startswith("ssh://") or not os.path.isfile(where):
        raise UsageError(f"{where}: {command} reads an archive where it needs to: give an "
                         "archive file (not standard input or ssh://), or -r REPO")
    return where


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


def _summary_line(d: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items())


@app.command(cls=Command)
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

    with handled(as_json):
        if client.is_url(archive):  # read whole from the other host (issue 21, defect 14)
            f, sparse_fd = client.open_remote_archive(archive, rsh), None
        else:
            f, sparse_fd = open_any(archive)
        try:
            with progress(True, stored_total(f), "verify") as prog:
                counts = check_all(f, archive, sparse_fd, prog)
        finally:
            f.close()
            if sparse_fd is not None:
                os.close(sparse_fd)
        is_map = counts.get("map", False)
        if as_json:
            typer.echo(json.dumps(counts, indent=2))
        else:
            report(f"{'sharing map' if is_map else 'archive'} is whole: "
                   f"{_summary_line({k: v for k, v in counts.items() if k != 'map'})}")
            if sparse_fd is not None:
                report(f"sparse thin backup: {counts['sparse_ranges']} ranges of its own "
                       f"data ({human(counts['sparse_bytes'])}) checked in {archive}")
            if "base" in counts:
                report(f"thin backup: restoring it needs the base {counts['base']!r} "
                       f"({counts['base_files']} files); their bytes are checked at "
                       "restore")
