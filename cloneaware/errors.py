"""Exceptions with their exit codes.  The CLI turns each into one line on
stderr and its exit code; the Python API raises them."""
from __future__ import annotations

EXIT_OK = 0
EXIT_WARNINGS = 1      # finished, but files were skipped or changed while read
EXIT_USAGE = 2         # bad arguments or paths (typer uses 2 as well)
EXIT_ARCHIVE = 3       # archive damaged, truncated, hostile or of a newer version
EXIT_RESTORE = 4       # restore or backup could not finish: I/O error, no space, ...
EXIT_BASE = 5          # thin restore: base missing or different from the backup
EXIT_INTERRUPTED = 130  # SIGINT or SIGTERM

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_WARNINGS: "finished with warnings: files skipped, unreadable or changed while read",
    EXIT_USAGE: "bad usage: wrong arguments, missing paths, existing target without --force",
    EXIT_ARCHIVE: "the archive is damaged, truncated, hostile or of a newer format",
    EXIT_RESTORE: "an I/O error stopped the job (no space, permission denied, ...)",
    EXIT_BASE: "thin restore: the base is missing or differs from the backup",
    EXIT_INTERRUPTED: "interrupted by SIGINT or SIGTERM; nothing half-written was left",
}


class CloneawareError(Exception):
    exit_code = EXIT_RESTORE


class UsageError(CloneawareError):
    exit_code = EXIT_USAGE


class ArchiveError(CloneawareError):
    """The archive is damaged or not an archive.  ``offset`` is where."""

    exit_code = EXIT_ARCHIVE

    def __init__(self, message: str, offset: int | None = None):
        self.offset = offset
        if offset is not None:
            message = f"{message} (at archive offset {offset})"
        super().__init__(message)


class TruncatedArchive(ArchiveError):
    pass


class BaseMismatch(CloneawareError):
    exit_code = EXIT_BASE


class Interrupted(CloneawareError):
    exit_code = EXIT_INTERRUPTED


def describe_oserror(e: OSError) -> str:
    name = e.filename
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    msg = e.strerror or str(e)
    return f"{name}: {msg}" if name else msg
