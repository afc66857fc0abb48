"""The options several commands take, written once (-r, --password-file,
--rsh, --s3-endpoint, --s3-connections, -q, --no-progress), and the
repository they name: ``env_repo`` and ``repo_for`` choose it, ``opened``
opens, locks and closes it for every command that works on one."""
from __future__ import annotations

import os
from typing import Annotated

import typer

from cloneaware.cli.common import (
    no_progress_cb,
    on_lock_lost,
    quiet_cb,
    repository_warning,
    retry_lock_cb,
)

RepoOpt = Annotated[str | None, typer.Option(
    "-r", "--repo", metavar="REPO",
    help="The repository: a directory, ssh://[user@]host[:port]/path, or "
    "s3://BUCKET/PREFIX (default: $CLONEAWARE_REPOSITORY).")]
PasswordOpt = Annotated[str | None, typer.Option(
    "--password-file", metavar="FILE",
    help="Read the repository's password from the first line of this file "
    "(else $CLONEAWARE_PASSWORD_FILE, $CLONEAWARE_PASSWORD, or a prompt).")]
NoProgressOpt = Annotated[bool, typer.Option(
    "--no-progress", callback=no_progress_cb,
    help="No progress bar on standard error (there is one only on a terminal).")]
RetryLockOpt = Annotated[str | None, typer.Option(
    "--retry-lock", metavar="DURATION", callback=retry_lock_cb,
    help="If the repository is locked by another command, try again until it is "
    "free or DURATION (30s, 5m, 2h) has passed, instead of exiting 6 at once.")]
QuietOpt = Annotated[bool, typer.Option(
    "-q", "--quiet", callback=quiet_cb,
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


def opened(url: str | None, password_file: str | None = None, rsh: str | None = None,
           s3_endpoint: str | None = None, connections: int = 4, lock: str | None = None,
           operation: str = ""):
    """The repository, opened, locked (``lock``: None, "shared" or
    "exclusive") and closed by repo/connect.py ``opened``; a lost lock stops
    the main thread wherever it is (common.on_lock_lost); what it passes over
    (an object that does not decode, a lock left behind, ...) is said on
    stderr and makes the command's exit status 1 (common.repository_warning)."""
    from cloneaware.cli.common import flags
    from cloneaware.repo import connect

    return connect.opened(url, password_file, rsh, s3_endpoint, connections, lock, operation,
                          on_lost=on_lock_lost, warn=repository_warning,
                          retry_lock=flags.retry_lock)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Say what would go; change "
                                         "nothing.")]


def env_repo(repo: str | None) -> str | None:
    """-r REPO, else $CLONEAWARE_REPOSITORY."""
    return repo if repo else os.environ.get("CLONEAWARE_REPOSITORY") or None


def repo_for(args: list[str], repo: str | None) -> str | None:
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


HostSelOpt = Annotated[str | None, typer.Option(
    "--host", metavar="NAME",
    help="With -r: choose among this host's snapshots (latest: its last).")]
PathSelOpt = Annotated[list[str] | None, typer.Option(
    "--path", metavar="PATH",
    help="With -r: choose among the snapshots whose PATHs include PATH (repeatable: "
    "all of them).")]
TagSelOpt = Annotated[list[str] | None, typer.Option(
    "--tag", metavar="TAG[,TAG...]",
    help="With -r: choose among the snapshots that hold TAG (a,b: both; repeated: "
    "either).")]


def choose(r, specs: list[str], host: str | None, paths: list[str] | None,
           tags: list[str] | None, unique: bool = False) -> list:
    """The snapshots ``specs`` name (ids, prefixes, latest) among those the
    filters leave (``unique``: each once, as Repository.find_all); where
    'latest' chose among several backup sets (hosts and PATHs), which one
    it chose is said on stderr (not with -q)."""
    from cloneaware.cli.common import err, flags
    from cloneaware.repo.snapshots import Filter, chosen

    snaps = r.snapshots()
    filt = Filter.of(host, paths, tags)
    out = r.find_all(specs, snaps, filt) if unique else \
        [r.find(spec, snaps, filt=filt) for spec in specs]
    if "latest" in specs and not flags.quiet and \
            len({(s.hostname, tuple(s.paths)) for s in snaps}) > 1:
        err(chosen(r.find("latest", snaps, filt=filt)))
    return out
