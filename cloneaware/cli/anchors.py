"""``cloneaware anchors``: the anchor sets backups keep on this host's
filesystems, listed with what each pins, and dropped (a group of its own
under the app)."""
from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, handled, human, report, say
from cloneaware.cli.options import JsonOpt, RshOpt, S3EndpointOpt

anchors_app = typer.Typer(
    help="The anchors backups keep on this host's filesystems (what makes the next backup "
    "read only what changed): list them with the space they pin, drop them.",
    rich_markup_mode=None, no_args_is_help=True)
app.add_typer(anchors_app, name="anchors")

PathsArg = Annotated[list[str] | None, typer.Argument(
    metavar="[PATH]...", help="Look on the filesystems of these paths (and those mounted "
    "below them); default: every mounted filesystem.")]


def _age(ns: int | None) -> str:
    if ns is None:
        return "never"
    d = max(0, time.time_ns() - ns) / 1e9
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= n:
            return f"{d / n:.0f}{unit} ago"
    return f"{d:.0f}s ago"


def _line(it) -> str:
    s = it.set
    pin = "?" if it.pinned is None else \
        human(it.pinned.bytes) + ("" if it.pinned.exact else " or more")
    where = s.location or "(a repository named before cloneaware kept where)"
    gone = {"no": "  [repository gone]", "yes": "", "unknown": ""}[it.repository]
    return (f"{s.repo_id[:8]}/{s.key}  {pin} pinned by {s.anchors} anchors, renewed "
            f"{_age(s.time_ns)}  {where}  {s.host or '?'}:{','.join(s.paths or ['?'])}{gone}"
            f"\n    {s.path.decode(errors='replace')}")


@anchors_app.command("list", cls=Command)
def anchors_list(paths: PathsArg = None, as_json: JsonOpt = False) -> None:
    """List the anchor sets: their repository and backup set, when a backup last renewed
    them, and the space each pins (what dropping it gives back: measured from the extents
    only its anchors hold, by the Btrfs extent tree where this user may search it, else
    by FIEMAP's shared flag, then a lower bound)."""
    from cloneaware.source.anchorsets import survey, tops_for

    with handled(as_json):
        found = survey(tops_for(paths))
        if as_json:
            say(json.dumps([it.as_dict() for it in found], indent=2))
            return
        for it in found:
            say(_line(it))
        total = sum(it.pinned.bytes for it in found if it.pinned is not None)
        report(f"{len(found)} anchor sets pin {human(total)}")


@anchors_app.command("drop", cls=Command)
def anchors_drop(
    paths: PathsArg = None,
    repository_id: Annotated[list[str] | None, typer.Option(
        "--repository-id", metavar="ID", help="The sets of this repository (its id or a "
        "unique prefix, as list shows it; repeatable).")] = None,
    repo: Annotated[str | None, typer.Option(
        "-r", "--repo", metavar="REPO", help="The sets of the repository at REPO (its id "
        "is read from its config; nothing else is opened).")] = None,
    older_than: Annotated[str | None, typer.Option(
        "--older-than", metavar="AGE", help="Sets no backup has renewed for AGE (30d, 12h, "
        "2w).")] = None,
    gone: Annotated[bool, typer.Option(
        "--gone", help="Sets whose repository is no longer at the local path it was "
        "backed up to (others are not checked from here).")] = False,
    every: Annotated[bool, typer.Option("--all", help="Every set found.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be dropped; "
                                          "drop nothing.")] = False,
    rsh: RshOpt = None,
    s3_endpoint: S3EndpointOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop anchor sets (the criteria given narrow one another), giving back the space
    they pin.  The next backup of each set reads its files once; nothing in any
    repository changes."""
    from cloneaware.source.anchorsets import choose, drop, parse_age, survey, tops_for

    with handled(as_json):
        ids = list(repository_id or [])
        if repo is not None:
            ids.append(_repo_id(repo, rsh, s3_endpoint))
        age = parse_age(older_than) if older_than is not None else None
        found = survey(tops_for(paths))
        chosen = choose(found, ids, age, gone, every)
        n = 0 if dry_run else drop(chosen)
        freed = sum(it.pinned.bytes for it in chosen if it.pinned is not None)
        if as_json:
            say(json.dumps({"dry_run": dry_run, "dropped": n,
                            "sets": [it.as_dict() for it in chosen],
                            "pinned_bytes": freed}, indent=2))
            return
        for it in chosen:
            say(("would drop " if dry_run else "dropped ") + _line(it))
        report(f"{'would drop' if dry_run else 'dropped'} {len(chosen) if dry_run else n} "
               f"anchor sets, which pinned {human(freed)}")


def _repo_id(url: str, rsh, s3_endpoint) -> str:
    from cloneaware.repo import format as rf
    from cloneaware.repo.connect import open_backend

    backend = open_backend(url, rsh=rsh, s3={"endpoint": s3_endpoint})
    try:
        return rf.Config.decode(backend.read("config", limit=rf.CONFIG_MAX), url).id
    finally:
        backend.close()
