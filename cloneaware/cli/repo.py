"""The commands on a repository as a whole: ``init``, ``snapshots``,
``forget``, ``prune``, ``check``, ``unlock`` and ``export``."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, err, flags, handled, human, report, say
from cloneaware.cli.options import (
    DryRunOpt,
    HostSelOpt,
    JsonOpt,
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
    env_repo,
    opened,
)
from cloneaware.errors import UsageError


@app.command(cls=Command)
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
    object_lock: Annotated[int | None, typer.Option(
        "--object-lock", metavar="DAYS", help="s3:// only: a bucket with S3 Object Lock, every "
        "object but locks put with DAYS of retention (2 to 36500), which prune extends; run "
        "prune at least every DAYS/2 days.")] = None,
    lock_mode: Annotated[str, typer.Option(
        "--lock-mode", metavar="MODE", help="With --object-lock: compliance (no one can "
        "shorten it) or governance (an account with the right can).")] = "compliance",
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Make a new, empty repository (the directory or bucket prefix must be empty)."""
    from cloneaware.repo.connect import create
    from cloneaware.repo.keys import Password

    with handled():
        url = env_repo(repo)
        if not url:
            raise UsageError("give -r REPO (or set CLONEAWARE_REPOSITORY)")
        pw = Password(password_file, confirm=True)
        password = pw("new password: ") if encrypt else None
        if not encrypt and pw.given:
            raise UsageError("a password was given, but not --encrypt")
        lock = None
        if object_lock is not None:
            from cloneaware.repo import format as rf

            if not rf.LOCK_DAYS_MIN <= object_lock <= rf.LOCK_DAYS_MAX:
                raise UsageError(f"--object-lock {object_lock}: from {rf.LOCK_DAYS_MIN} to "
                                 f"{rf.LOCK_DAYS_MAX} days (prune extends the retention when "
                                 "half of it is left, so it must run at least every DAYS/2 "
                                 "days)")
            if lock_mode not in rf.LOCK_MODES:
                raise UsageError(f"--lock-mode {lock_mode!r}: compliance or governance")
            lock = (object_lock, lock_mode)
        config = create(url, password, rsh, s3_endpoint, grid=grid << 10,
                        pack_size=pack_size << 20, kdf_n=kdf_n, lock=lock)
        typer.echo(f"made {'an encrypted' if encrypt else 'an unencrypted'} repository "
                   f"{config.id[:8]} at {url}"
                   + (f", every object retained {config.lock_days} days ({config.lock_mode}); "
                      f"run prune at least every {config.lock_days // 2} days to extend it"
                      if config.lock_days else ""))


@app.command(cls=Command)
def snapshots(
    repo: RepoOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """List the snapshots of a repository, oldest first (those --host, --path
    and --tag leave)."""
    from cloneaware.repo.snapshots import Filter

    with handled(as_json):
        with opened(env_repo(repo), password_file, rsh, s3_endpoint) as r:
            snaps = Filter.of(host, path, tag).apply(r.snapshots())
        if as_json:
            typer.echo(json.dumps([s.to_json() for s in snaps], indent=2))
            return
        enc = "encrypted" if r.crypto.encrypted else "not encrypted"
        typer.echo(f"repository {r.config.id[:8]} ({enc}), {len(snaps)} snapshots")
        typer.echo(f"{'id':<8}  {'time (UTC)':<19}  {'host':<16}  {'tags':<12}  paths")
        for s in snaps:
            typer.echo(f"{s.short_id:<8}  {s.data['time'][:19].replace('T', ' '):<19}  "
                       f"{s.hostname:<16}  {','.join(s.tags):<12}  {', '.join(s.paths)}")


@app.command(cls=Command)
def tag(
    specs: Annotated[list[str] | None, typer.Argument(
        metavar="[SNAPSHOT...]", help="Snapshots (ids, unique prefixes, latest); none: all "
        "that --host, --path and --tag leave.")] = None,
    add: Annotated[list[str] | None, typer.Option(
        "--add", metavar="TAG", help="Add TAG (repeatable).")] = None,
    remove: Annotated[list[str] | None, typer.Option(
        "--remove", metavar="TAG", help="Remove TAG (repeatable).")] = None,
    set_to: Annotated[list[str] | None, typer.Option(
        "--set", metavar="TAG", help="Make the tags exactly these (repeatable; --set '' "
        "clears them).")] = None,
    repo: RepoOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag_sel: TagSelOpt = None,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """Add, remove or set the tags of snapshots.  A snapshot with other tags is
    a new snapshot object, so its id changes (the new ids are printed); its
    time, PATHs and data stay, and the host that wrote it goes on from it as
    its parent (its next backup reads only what changed).  The repository is
    locked exclusively, as forget locks it: an append-only client cannot
    retag."""
    from cloneaware.repo.snapshots import Filter
    from cloneaware.repo.tag import retag

    with handled(as_json):
        if not add and not remove and set_to is None:
            raise UsageError("give --add, --remove or --set")
        if set_to is not None and (add or remove):
            raise UsageError("--set replaces the tags: not with --add or --remove")
        sets = None if set_to is None else [t for t in set_to if t]
        with opened(env_repo(repo), password_file, rsh, s3_endpoint,
                    lock="exclusive", operation="tag") as r:
            filt = Filter.of(host, path, tag_sel)
            snaps = r.find_all(specs, filt=filt) if specs else filt.apply(r.snapshots())
            res = retag(r, snaps, add or [], remove or [], sets, dry_run)
        if as_json:
            typer.echo(json.dumps({
                "changed": [{"old": o.id, "new": n.id or None, "tags": n.tags}
                            for o, n in res.changed],
                "unchanged": [s.id for s in res.unchanged], "dry_run": dry_run}, indent=2))
            return
        for o, n in res.changed:
            report(f"{o.short_id} -> {n.short_id or '(new id)'}  tags: "
                   f"{','.join(n.tags) or '(none)'}")
        verb = "would retag" if dry_run else "retagged"
        report(f"{verb} {len(res.changed)} snapshots, {len(res.unchanged)} already so")


@app.command(cls=Command)
def stats(
    specs: Annotated[list[str] | None, typer.Argument(
        metavar="[SNAPSHOT...]", help="Snapshots to describe (ids, unique prefixes, or "
        "latest); none: the repository's totals only.")] = None,
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
    as_json: JsonOpt = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
) -> None:
    """What the repository stores (packs, blobs, stored and raw bytes) and, of
    each SNAPSHOT: its entries and logical bytes, what a restore onto Btrfs
    or XFS writes (the rest is cloned), the stored bytes of the blobs it
    names, and of those no other snapshot names (what forgetting it frees,
    once pruned).  No file data is read."""
    from cloneaware.repo.stats import stats as repo_stats

    with handled(as_json):
        with opened(env_repo(repo), password_file, rsh, s3_endpoint,
                    lock="shared", operation="stats") as r:
            chosen = choose(r, specs, host, path, tag, unique=True) if specs else []
            res = repo_stats(r, chosen)
        if as_json:
            d = dict(res.__dict__)
            d["chosen"] = [c.__dict__ for c in res.chosen]
            typer.echo(json.dumps(d, indent=2))
            return
        typer.echo(f"repository: {res.snapshots} snapshots, {res.packs} packs "
                   f"({human(res.pack_bytes)}), {res.blobs} blobs: {human(res.stored_bytes)} "
                   f"stored of {human(res.raw_bytes)}")
        for c in res.chosen:
            typer.echo(f"snapshot {c.id[:8]}: {c.files} files, {c.dirs} directories, "
                       f"{c.others} others; {human(c.logical_bytes)} logical, a restore "
                       f"writes {human(c.restore_write_bytes)} (the rest cloned); {c.blobs} "
                       f"blobs, {human(c.stored_bytes)} stored, of which "
                       f"{human(c.unique_stored_bytes)} ({c.unique_blobs} blobs) in no other "
                       "snapshot")


@app.command(cls=Command)
def forget(
    specs: Annotated[list[str] | None, typer.Argument(
        metavar="[SNAPSHOT...]", help="Snapshots to remove (ids, unique prefixes, or latest), "
        "instead of a --keep policy.")] = None,
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    keep_last: Annotated[int, typer.Option("--keep-last", min=0, metavar="N",
                                           help="Keep the N newest snapshots.")] = 0,
    keep_hourly: Annotated[int, typer.Option("--keep-hourly", min=0, metavar="N",
                                             help="Keep the newest of each of N hours.")] = 0,
    keep_daily: Annotated[int, typer.Option("--keep-daily", min=0, metavar="N",
                                            help="Keep the newest of each of N days.")] = 0,
    keep_weekly: Annotated[int, typer.Option("--keep-weekly", min=0, metavar="N",
                                             help="Keep the newest of each of N weeks.")] = 0,
    keep_monthly: Annotated[int, typer.Option("--keep-monthly", min=0, metavar="N",
                                              help="Keep the newest of each of N months.")] = 0,
    keep_yearly: Annotated[int, typer.Option("--keep-yearly", min=0, metavar="N",
                                             help="Keep the newest of each of N years.")] = 0,
    keep_tag: Annotated[list[str] | None, typer.Option(
        "--keep-tag", metavar="TAG", help="Keep every snapshot tagged TAG (repeatable: any of "
        "them).")] = None,
    keep_within: Annotated[str | None, typer.Option(
        "--keep-within", metavar="DURATION", help="Keep every snapshot taken within DURATION "
        "of the newest (30s, 90m, 12h, 7d, 2w; m is minutes).")] = None,
    group: Annotated[str, typer.Option(
        "--group-by", metavar="FIELDS", help="Apply the --keep options per group of snapshots "
        "alike in these: host, paths, tags, comma-separated ('' for one group of all).")]
    = "host,paths",
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
    do_prune: Annotated[bool, typer.Option("--prune", help="Then prune.")] = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    connections: S3ConnOpt = 4,
    quiet: QuietOpt = False,
) -> None:
    """Remove snapshots: those named, or those the --keep options do not keep in
    each group of snapshots of the same host and PATHs (--group-by: other
    fields; days, weeks and months in UTC); --host, --path and --tag limit
    either to the snapshots they leave."""
    from cloneaware.repo.forget import Policy, group_by
    from cloneaware.repo.forget import forget as forget_snapshots
    from cloneaware.repo.prune import prune as prune_repo
    from cloneaware.repo.snapshots import Filter

    with handled(as_json):
        by = group_by(group)
        within = 0
        if keep_within is not None:
            from cloneaware.config import parse_interval

            try:
                secs = parse_interval(keep_within)
            except ValueError as e:
                raise UsageError(f"--keep-within: {e}") from None
            if secs is None:
                raise UsageError("--keep-within: give a duration, not never")
            within = int(secs * 1e9)
        policy = Policy(keep_last, keep_daily, keep_weekly, keep_monthly, within,
                        hourly=keep_hourly, yearly=keep_yearly, tags=tuple(keep_tag or ()))
        with opened(env_repo(repo), password_file, rsh, s3_endpoint, connections,
                    lock="exclusive", operation="forget") as r:
            res = forget_snapshots(r, policy, dry_run,
                                   filt=Filter.of(host, path, tag), named=specs, by=by)
            pr = prune_repo(r, dry_run, connections, err) if do_prune else None
        if as_json:
            typer.echo(json.dumps({**res.to_json(),
                                   "prune": None if pr is None else pr.__dict__}, indent=2))
            return
        verb = "would remove" if dry_run else "removed"
        for s, why in res.kept:
            report(f"keep   {s.short_id}  {s.data['time'][:19]}  {s.hostname}  "
                   f"({', '.join(why)})")
        for s in res.removed:
            report(f"remove {s.short_id}  {s.data['time'][:19]}  {s.hostname}")
        report(f"{verb} {len(res.removed)} snapshots, kept {len(res.kept)}")
        if pr is not None:
            _prune_report(pr, dry_run)


def _prune_report(pr, dry_run: bool) -> None:
    """One line that counts what prune did: every pack deleted, those that
    were in no index (left by an interrupted backup or prune) among them."""
    verb = "would delete" if dry_run else "deleted"
    orphans = f" ({pr.orphans_deleted} of them in no index)" if pr.orphans_deleted else ""
    strays = f", {pr.strays_deleted} stray files" if pr.strays_deleted else ""
    report(f"prune: {verb} {pr.packs_deleted + pr.orphans_deleted} packs{orphans}, repacked "
           f"{pr.packs_repacked}{strays}; {human(pr.bytes_before)} -> {human(pr.bytes_after)}")
    if pr.retained:
        report(f"prune: {pr.retained} objects are still retained by Object Lock: kept")
    lk = pr.object_lock
    if lk is not None:
        report(f"object lock: {lk['extended']} of {lk['checked']} objects' retention extended; "
               f"the next extension is due by {(lk['next_due'] or '?')[:16]} UTC (run prune "
               "before then)")


@app.command(cls=Command)
def prune(
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    connections: S3ConnOpt = 4,
    quiet: QuietOpt = False,
) -> None:
    """Delete the data no snapshot needs (repacking packs that are partly needed)."""
    from cloneaware.repo.prune import prune as prune_repo

    with handled(as_json):
        with opened(env_repo(repo), password_file, rsh, s3_endpoint, connections,
                    lock="exclusive", operation="prune") as r:
            pr = prune_repo(r, dry_run, connections, err)
        if as_json:
            typer.echo(json.dumps(pr.__dict__, indent=2))
        else:
            _prune_report(pr, dry_run)


@app.command(cls=Command)
def check(
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    read_data: Annotated[bool, typer.Option(
        "--read-data", help="Also read every pack and check every blob against its id.")]
    = False,
    read_data_subset: Annotated[str | None, typer.Option(
        "--read-data-subset", metavar="n/t|x%", help="As --read-data, but read only part n "
        "of t of the packs (by their names: parts 1 to t read each pack once), or x% of "
        "them at random.")] = None,
    as_json: JsonOpt = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Check that every object is sound and every snapshot finds every blob.
    Exit 0 if so, 3 with the problems named otherwise."""
    from cloneaware.errors import EXIT_ARCHIVE
    from cloneaware.repo.check import check as check_repo
    from cloneaware.repo.check import parse_subset

    with handled(as_json):
        subset = None
        if read_data_subset is not None:
            try:
                subset = parse_subset(read_data_subset)
            except ValueError as bad:
                raise UsageError(f"--read-data-subset: {bad}") from None
            read_data = True
        with opened(env_repo(repo), password_file, rsh, s3_endpoint,
                    lock="shared", operation="check") as r:
            res = check_repo(r, read_data, subset)
        enc = r.crypto.encrypted
        if as_json:
            typer.echo(json.dumps({**res.__dict__, "encrypted": enc, "ok": not res.errors},
                                  indent=2))
        else:
            report(f"repository {r.config.id[:8]} ({'encrypted' if enc else 'not encrypted'}"
                   f"): {res.snapshots} snapshots, {res.packs} packs, {res.blobs} blobs"
                   + (f", read {human(res.read_bytes)}"
                      + (f" ({res.read_packs} of {res.packs} packs: subset {read_data_subset})"
                         if subset is not None else "") if read_data else ""))
            for w in res.warnings:  # with -q, on stderr: a note may want doing
                if flags.quiet:
                    err(f"note: {w}")
                else:
                    report(f"note: {w}")
        for e in res.errors:
            err(e)
        if res.errors:
            err(f"{len(res.errors)} problems found")
            raise typer.Exit(EXIT_ARCHIVE)
        if not as_json:
            report("no problems found")


@app.command(cls=Command)
def repair(
    what: Annotated[str, typer.Argument(
        metavar="index|packs|snapshots", help="What to repair: index (rebuilt from the packs' "
        "own trailers), packs (the blobs of damaged packs that still decode salvaged), or "
        "snapshots (written again without the blobs that are lost).")],
    packs: Annotated[list[str] | None, typer.Argument(
        metavar="[PACK...]", help="packs: the damaged packs (ids or unique prefixes, as check "
        "names them); none: every pack is read to find them.")] = None,
    aside: Annotated[str | None, typer.Option(
        "--aside", metavar="DIR", help="packs: where each damaged pack's bytes are put (on "
        "this host) before it is removed; default ./cloneaware-damaged-ID.")] = None,
    forget: Annotated[bool, typer.Option(
        "--forget", help="snapshots: remove the old snapshots once written again, and those "
        "whose manifest is lost, and snapshot objects that do not decode.")] = False,
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    connections: S3ConnOpt = 4,
    quiet: QuietOpt = False,
) -> None:
    """Repair a damaged repository.  index: rebuild the index from the packs'
    own trailers (the index objects lost, damaged or out of date); the new
    index is written before the old one is deleted, and no blob is read.
    packs: read the packs (those named, else all), write the blobs of each
    damaged one that still decode into new packs, put its bytes aside in
    DIR on this host, remove it, and rebuild the index; what was lost with
    it is then in no index, check names the files that had it, and a new
    backup of the same source stores it again (the old snapshots are whole
    again).  snapshots: write each snapshot that names a lost blob again
    without it (those bytes read as zeros; each such file gets the xattr
    user.cloneaware.damaged saying how many bytes), tagged repaired, the old
    one kept unless --forget (a backup of the same source heals the old
    ones instead, if the source still has the files)."""
    import os

    from cloneaware.repo.repair import repair_index, repair_packs, repair_snapshots

    with handled(as_json):
        if what not in ("index", "packs", "snapshots"):
            raise UsageError(f"cannot repair {what!r}: 'index', 'packs' or 'snapshots'")
        if what != "packs" and (packs or aside):
            raise UsageError(f"repair {what} takes no PACK and no --aside")
        if what != "snapshots" and forget:
            raise UsageError("--forget is for repair snapshots")
        with opened(env_repo(repo), password_file, rsh, s3_endpoint, connections,
                    lock="exclusive", operation="repair") as r:
            if what == "packs":
                where = aside or os.path.abspath(f"cloneaware-damaged-{r.config.id[:8]}")
                pr = repair_packs(r, packs, where, dry_run, err, connections)
            elif what == "snapshots":
                sr = repair_snapshots(r, forget, dry_run, err, err)
            else:
                res = repair_index(r, dry_run, err)
        if what == "snapshots":
            if as_json:
                typer.echo(json.dumps({**sr.__dict__, "damaged_files": [
                    {"snapshot": a, "path": p, "bytes": n} for a, p, n in sr.damaged_files]},
                    indent=2))
                return
            for sid, p, n in sr.damaged_files:
                report(f"snapshot {sid[:8]}: {p}: {n} bytes lost")
            verb = "would write" if dry_run else "wrote"
            report(f"repair snapshots: {verb} {len(sr.rewritten)} snapshots again without what "
                   f"is lost ({len(sr.damaged_files)} files marked); {len(sr.unreadable)} "
                   f"with their manifest lost, {len(sr.bad_objects)} objects that do not "
                   f"decode; {len(sr.forgotten)} removed"
                   + ("" if forget or dry_run or not (sr.rewritten or sr.unreadable or
                                                     sr.bad_objects)
                      else " (--forget removes the old ones)"))
            return
        if what == "packs":
            if as_json:
                d = dict(pr.__dict__, index=None if pr.index is None else pr.index.__dict__)
                typer.echo(json.dumps(d, indent=2))
                return
            verb = "would salvage" if dry_run else "salvaged"
            report(f"repair packs: {pr.read} packs read, {len(pr.damaged)} damaged; {verb} "
                   f"{pr.salvaged} blobs ({human(pr.salvaged_bytes)}) into "
                   f"{pr.packs_written} new packs; {pr.elsewhere} held elsewhere too; "
                   f"{len(pr.lost)} lost")
            for path in pr.aside:
                report(f"  a damaged pack put aside: {path}")
            if pr.lost:
                report("the files that had a lost blob: cloneaware check -r REPO; a new "
                       "backup of their source stores them again")
            return
        if as_json:
            typer.echo(json.dumps(res.__dict__, indent=2))
            return
        verb = "would write" if dry_run else "wrote"
        report(f"repair index: {verb} an index of {res.packs} packs, {res.blobs} blobs, "
               f"from their trailers"
               + (f" ({res.kept_by_old_index} by the old index: their trailers do not "
                  "decode)" if res.kept_by_old_index else "")
               + f"; {'would remove' if dry_run else 'removed'} {res.index_removed} old "
               "index objects")


@app.command(cls=Command)
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

    with handled():
        with opened(env_repo(repo), password_file, rsh, s3_endpoint) as r:
            res = do_unlock(r, remove_all)
        for lk in res.kept:
            err(f"kept {lk.describe()}")
        typer.echo(f"removed {len(res.removed)} locks")


@app.command(cls=Command)
def copy(
    specs: Annotated[list[str] | None, typer.Argument(
        metavar="[SNAPSHOT...]", help="Snapshots to copy (ids, unique prefixes, or latest); "
        "none: every one the filters leave.")] = None,
    repo: RepoOpt = None,
    to: Annotated[str | None, typer.Option(
        "--to", metavar="REPO", help="The repository to copy into (a directory, ssh://, "
        "s3://).")] = None,
    to_password_file: Annotated[str | None, typer.Option(
        "--to-password-file", metavar="FILE", help="The password of the --to repository, if "
        "it is encrypted.")] = None,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    password_file: PasswordOpt = None,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    connections: S3ConnOpt = 4,
    quiet: QuietOpt = False,
) -> None:
    """Copy snapshots into another repository: each is exported and imported
    on the fly, so only what the other repository lacks is stored there, cut
    on its grid and sealed with its keys (plain to encrypted and back), with
    its sharing.  A copy keeps the snapshot's time, host, PATHs and tags;
    one copied before is not copied again, so a stopped copy is finished by
    running it again."""
    from cloneaware.repo.copy import copy as copy_snapshots
    from cloneaware.repo.snapshots import Filter

    with handled(as_json):
        if not to:
            raise UsageError("give the repository to copy into: --to REPO")
        with opened(env_repo(repo), password_file, rsh, s3_endpoint, connections,
                    lock="shared", operation="copy") as src, \
                opened(to, to_password_file, rsh, s3_endpoint, connections,
                       lock="shared", operation="copy") as dst:
            if src.config.id == dst.config.id:
                raise UsageError("--to names the repository copied from")
            snaps = choose(src, specs, host, path, tag, unique=True) if specs else \
                Filter.of(host, path, tag).apply(src.snapshots())
            res = copy_snapshots(src, dst, snaps, dry_run, connections=connections,
                                 warn=err, say=None if as_json else report)
        if as_json:
            typer.echo(json.dumps({"copied": [{"snapshot": a, "copy": b or None}
                                              for a, b in res.copied],
                                   "skipped": res.skipped, "added_bytes": res.added_bytes,
                                   "logical_bytes": res.logical_bytes, "how": res.how,
                                   "dry_run": dry_run},
                                  indent=2))
            return
        verb = "would copy" if dry_run else "copied"
        report(f"{verb} {len(res.copied)} snapshots {res.how} ({human(res.logical_bytes)} "
               f"logical, {human(res.added_bytes)} added), {len(res.skipped)} copied before")


@app.command(cls=Command)
def export(
    snapshot: Annotated[str, typer.Argument(metavar="SNAPSHOT",
                                            help="Snapshot id, unique prefix, or latest.")],
    output: Annotated[str, typer.Option("-o", "--output", metavar="ARCHIVE",
                                        help="Archive file, or - for "
                                        "standard output.")],
    repo: RepoOpt = None,
    retry_lock: RetryLockOpt = None,
    host: HostSelOpt = None,
    path: PathSelOpt = None,
    tag: TagSelOpt = None,
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

    with handled(as_json, to_stderr=output == "-"):
        _codec, level = parse_compress(compress)
        opener = file_output(output, force)
        with opened(env_repo(repo), password_file, rsh, s3_endpoint,
                    lock="shared", operation="export") as r:
            snap = choose(r, [snapshot], host, path, tag)[0]
            if r.crypto.encrypted:  # said even with -q: what leaves the encryption
                err(f"note: the repository is encrypted; "
                    f"{'standard output' if output == '-' else output} is not (an archive "
                    "holds every file's bytes in the clear; the file is its owner's "
                    "alone, mode 0600)")
            out = opener()
            try:
                d = do_export(r, snap, out, output, level)
                out.commit()
            except BaseException:
                out.abort()
                raise
        if as_json:
            say(json.dumps({"snapshot": snap.id, **d}, indent=2), to_stderr=output == "-")
        elif output != "-":
            say(f"snapshot {snap.short_id} -> {output}: {d['entries']} entries, stored "
                f"{human(d['stored_bytes'])}, referenced "
                f"{human(d['referenced_bytes'])}")
