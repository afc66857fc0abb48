"""The ``cloneaware`` command: a thin typer layer over the Python API.  It
parses the arguments, chooses inputs and outputs (a file, -, ssh://,
--sparse, a repository) and hands them to the library; it prints what the
library returns.  Whatever a library caller would need too (choosing
snapshots, making a repository, what --json says of a listing) is in the
library.

One module per command group, each registering its commands on the one
``app`` of common.py:

- common.py: the app and its plain help, output, ``handled`` (every error
  as one line and its exit code, errors.py), signals;
- options.py: the options several commands share, and ``opened``, the one
  way a command opens, locks and closes a repository;
- scan.py, backup.py, restore.py, reshare.py: those commands;
- browse.py: ls, diff, verify;
- repo.py: init, snapshots, forget, prune, check, unlock, export;
- jobs.py: run, config (the nightly job of a configuration file);
- serve.py: serve; keys.py: the ``key`` group.

They are imported below in the order ``--help`` and the man page list the
commands (a group such as ``key`` comes after the commands, wherever it is
added).  Each command imports what it needs inside its function, so that
``--version``, ``--help`` and a restore do not load the backup side, numpy
or rich: that is the only reason for imports inside functions here.
"""
from __future__ import annotations

import signal
import sys

from cloneaware.cli import common
from cloneaware.cli.common import (
    app,
    err,
    exit_now,
    help_records,
    json_error,
    raise_interrupt,
    raise_lock_lost,
)
from cloneaware.errors import EXIT_INTERRUPTED, Interrupted

# isort: off
# the commands, in the order of --help and of the man page
from cloneaware.cli import scan, backup, restore, reshare, browse, repo, jobs, serve, keys, anchors  # noqa: F401,E501
# isort: on

__all__ = ["app", "help_records", "main"]


#: the soft limit of open descriptors a command raises itself to, at most
NOFILE = 65536


def raise_nofile() -> None:
    """The soft limit of open descriptors raised to the hard one (at most
    NOFILE), as the Go runtime does for restic and Kopia: the restore's
    descriptor caches are bounded (docs/DESIGN.md, "descriptors"), but a
    restore of several snapshots with a local repository's pack
    directories, --share-with and --include comes near the 1,024 of the
    usual default, and the kernel's limit is what is there to use.  A
    limit that cannot be raised is left as it is.  The commands started
    (ssh, a nightly job's hooks) inherit the raised limit, as they would a
    raised ``ulimit -n``."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(hard, NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            pass


def main() -> None:
    """The command line.  From here on SIGINT and SIGTERM raise Interrupted,
    which every command turns into one line and exit 130 (with its temporary
    files removed on the way out); outside a command (parsing, the imports a
    command makes first) the same line and code come from here."""
    signal.signal(signal.SIGINT, raise_interrupt)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGUSR1, raise_lock_lost)
    try:
        try:
            # one malloc arena for the main thread, one for every other: a
            # thread per arena (glibc's default) kept 10 to 15% more memory
            # at the peak.  (Imported here, where a signal during the import
            # is one line too: the man page is made from this package before
            # the native extension is built.)
            from cloneaware import native

            native.arena_max(2)
            native.trim_every(1.0)
            raise_nofile()
            app()
        except SystemExit:
            if common.signalled is not None:  # its exception was lost on the way: honour it
                raise Interrupted(common.signalled) from None
            raise
    except (Interrupted, KeyboardInterrupt) as e:
        msg = str(e) if isinstance(e, Interrupted) else "interrupted by SIGINT"
        err(msg)
        if "--json" in sys.argv[1:]:
            json_error(msg, EXIT_INTERRUPTED)
        exit_now(EXIT_INTERRUPTED)
