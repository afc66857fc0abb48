"""One exception class per condition, each with its exit code.  The
operation that fails decides which to raise; the CLI turns each into one
line on stderr and its exit code, and the Python API raises them as they
are.  An ``OSError`` that reaches the CLI is an I/O failure (exit 4) and is
printed with its path.

Conditions a job goes on after are warnings, typed the same way (Borg's
helpers/errors.py has both): one class per condition, each with its exit
code and the summary list it is reported under, collected in a
``Warnings``; a job's exit status is the highest code among them."""
from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

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
    EXIT_WARNINGS: "finished with warnings: files skipped, unreadable or changed while read, "
                   "a PATH that does not exist",
    EXIT_USAGE: "bad usage: wrong arguments, no PATH that exists (or one missing with "
                "--strict), existing target without --force",
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


class StillRetained(CloneawareError):
    """An object under S3 Object Lock retention: it cannot be deleted yet
    (forget and prune keep it, and say so)."""

    exit_code = EXIT_ARCHIVE

    def __init__(self, message: str, until: float):
        super().__init__(message)
        self.until = until


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


# --- warnings: what a job went on after -------------------------------------------

class JobWarning:
    """Something about one path that a job reported and went on after."""

    exit_code: ClassVar[int] = EXIT_WARNINGS
    #: the list of the summary (and of --json) it is reported under
    key: ClassVar[str] = "warnings"
    __slots__ = ("path", "reason")

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {self.reason!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and (other.path, other.reason) == (self.path,
                                                                            self.reason)

    def __hash__(self) -> int:
        return hash((type(self), self.path, self.reason))

    def __iter__(self) -> Iterator:
        """(path, reason), as the lists of pairs these replace were read."""
        return iter((self.path, self.reason))

    def as_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


class FileSkipped(JobWarning):
    """A file or directory not backed up (unreadable, of no kind an archive
    holds, excluded by an error)."""

    key = "skipped"

    def __str__(self) -> str:
        return f"skipped {self.path}: {self.reason}"


class FileChanged(JobWarning):
    """A file that changed (or vanished) while the backup read it: stored as
    read, and nothing else shares from it."""

    key = "changed"


class NotExact(JobWarning):
    """An entry restored, but not exactly (an owner, xattr, flag, device,
    subvolume), or not restored at all, said why."""

    key = "not_exact"


class Damaged(JobWarning):
    """A file not restored because bytes of it could not be had (a damaged
    or missing pack, a blob in no index), the rest of the restore going on;
    the job exits 3 at its end."""

    key = "damaged"
    exit_code = EXIT_ARCHIVE


class ReshareSkipped(JobWarning):
    """A file reshare could not use (missing, of another size or kind)."""

    key = "skipped"

    def __str__(self) -> str:
        return f"{self.path}: skipped: {self.reason}"


class DedupeRefused(JobWarning):
    """A file the kernel would not dedupe into or from."""

    key = "refused"

    def __str__(self) -> str:
        return f"{self.path}: not reshared: {self.reason}"


class BytesDiffer(JobWarning):
    """Bytes of a file that differ from the place they were to share with
    (edited since the copy): left alone.  ``reason`` is how many."""

    key = "differing"

    def __init__(self, path: str, nbytes: int):
        super().__init__(path, f"{nbytes} bytes differ from the place they share with; "
                         "left alone")
        self.nbytes = nbytes

    def as_dict(self) -> dict:
        return {"path": self.path, "bytes": self.nbytes}

    def __iter__(self) -> Iterator:
        return iter((self.path, self.nbytes))


class Warnings(list):
    """The warnings of one job, in the order they came."""

    def of(self, cls: type[JobWarning]) -> list:
        return [w for w in self if isinstance(w, cls)]

    def exit_code(self) -> int:
        """The job's exit status from its warnings (0 if none)."""
        return max((w.exit_code for w in self), default=EXIT_OK)

    def as_json(self, *classes: type[JobWarning]) -> dict[str, list[dict]]:
        """Each of ``classes``' list, by its key, for --json (present even
        when empty)."""
        return {c.key: [w.as_dict() for w in self.of(c)] for c in classes}
