"""One exception class per condition, each with its exit code.  The
operation that fails decides which to raise; the CLI turns each into one
line on stderr and its exit code, and the Python API raises them as they
are.  An ``OSError`` that reaches the CLI is an I/O failure (exit 4) and is
printed with its path."""
from __future__ import annotations

EXIT_OK = 0
EXIT_WARNINGS = 1      # finished, but files were skipped, changed while read, not exact
EXIT_USAGE = 2         # bad arguments or paths (typer uses 2 as well)
EXIT_ARCHIVE = 3       # archive damaged, truncated, hostile or of a newer version
EXIT_IO = 4            # the job could not finish: I/O error, no space, permission denied
EXIT_BASE = 5          # thin restore: base missing or different from the backup
EXIT_LOCKED = 6        # the repository is locked by another command, or our lock was lost
EXIT_KEY = 7           # wrong password, or no key in the repository opens it
EXIT_INTERRUPTED = 130  # SIGINT or SIGTERM

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_WARNINGS: "finished with warnings: files skipped, unreadable or changed while read",
    EXIT_USAGE: "bad usage: wrong arguments, missing paths, existing target without --force",
    EXIT_ARCHIVE: "the archive or repository is damaged, truncated, hostile or of a newer "
                  "format",
    EXIT_IO: "an I/O error stopped the job (no space, permission denied, ...)",
    EXIT_BASE: "thin restore: the base is missing or differs from the backup",
    EXIT_LOCKED: "the repository is locked by another command (see cloneaware unlock), or "
                 "this command's lock could not be refreshed and it stopped",
    EXIT_KEY: "wrong password: no key of the repository opens with it",
    EXIT_INTERRUPTED: "interrupted by SIGINT or SIGTERM; nothing half-written was left",
}


class CloneawareError(Exception):
    """A failure the job cannot go on from (the default: exit 4)."""

    exit_code = EXIT_IO


class UsageError(CloneawareError):
    """The command line or a path given on it is wrong: nothing was done."""

    exit_code = EXIT_USAGE


class ArchiveError(CloneawareError):
    """The archive is damaged, hostile or not an archive; ``offset`` is where."""

    exit_code = EXIT_ARCHIVE

    def __init__(self, message: str, offset: int | None = None):
        self.offset = offset
        #: the message without its offset (to quote inside another one)
        self.reason = message
        if offset is not None:
            message = f"{message} (at archive offset {offset})"
        super().__init__(message)


class TruncatedArchive(ArchiveError):
    """The archive ends before its footer."""


class SharingMapGiven(UsageError):
    """A sharing map (``scan --save-map``) was given where an archive with
    data is needed: it holds no file data."""

    def __init__(self, name: str | None = None):
        self.name = name
        super().__init__(f"{name + ' is' if name else 'this is'} a sharing map (written by "
                         "cloneaware scan --save-map): it holds no file data to restore; "
                         "give it to cloneaware reshare --from")


class BaseMismatch(CloneawareError):
    """A thin restore's base is missing, or its bytes differ from the backup."""

    exit_code = EXIT_BASE


class RepositoryError(CloneawareError):
    """The repository is damaged, hostile, not a repository or of a newer format."""

    exit_code = EXIT_ARCHIVE


class RepositoryLocked(CloneawareError):
    """Another command holds a lock that this one cannot share."""

    exit_code = EXIT_LOCKED


class LockLost(CloneawareError):
    """This command's lock could not be refreshed for so long that another
    command could soon take it as stale: the command stopped before it
    wrote or deleted anything more (docs/REPOSITORY.md, "Locks")."""

    exit_code = EXIT_LOCKED


class WrongPassword(CloneawareError):
    """No key object of the repository opens with the password given."""

    exit_code = EXIT_KEY


class RemoteError(CloneawareError):
    """The other end of an ssh:// target failed; ``exit_code`` is the one it
    reported (or 4 when the connection itself failed)."""

    def __init__(self, message: str, exit_code: int = EXIT_IO):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(CloneawareError):
    """SIGINT or SIGTERM arrived; temporary files were removed on the way out."""

    exit_code = EXIT_INTERRUPTED


def describe_oserror(e: OSError) -> str:
    name = e.filename
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    msg = e.strerror or str(e)
    return f"{name}: {msg}" if name else msg
