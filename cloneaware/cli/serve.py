"""``cloneaware serve``: the remote end of ssh:// targets, on standard input
and output."""
from __future__ import annotations

from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, err, handled
from cloneaware.errors import EXIT_USAGE


@app.command(cls=Command)
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
        err(f"unknown operation {bad[0]!r} in --allow")
        raise typer.Exit(EXIT_USAGE)
    with handled():
        rc = server.serve(restrict or [], ops)
    raise typer.Exit(rc)
