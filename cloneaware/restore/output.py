"""What a restore makes, as an interface: the receiver (restore/receiver.py)
decides which entries are made and where their bytes come from, and tells
an ``Output``.  ``DirectoryOutput`` (restore/directory.py) makes them in
DEST; ``RecordingOutput`` (restore/dryrun.py) only counts and lists them,
so that ``restore --dry-run`` is the restore's own logic with another end,
as ``btrfs receive --dump`` is to ``btrfs receive`` (and Kopia's restore
walks into directory, tar or zip outputs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.blobs import Place
from cloneaware.archive.events import FileState
from cloneaware.errors import Damaged, NotExact, Warnings


@dataclass
class RestoreSummary:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    #: Btrfs subvolumes (and snapshots) made again
    subvolumes: int = 0
    #: entries --include and --strip-components left out
    left_out: int = 0
    logical_bytes: int = 0
    written_bytes: int = 0
    reflinked_bytes: int = 0
    copied_bytes: int = 0
    base_bytes: int = 0
    #: of written_bytes: written as the Btrfs compressed extents they were
    #: stored as (BTRFS_IOC_ENCODED_WRITE), not compressed again
    encoded_written_bytes: int = 0
    verified_bytes: int = 0
    #: --reshare-existing: stored bytes cloned from the copy already in DEST
    #: and read back equal (not written); cloned, found to differ, written
    reused_bytes: int = 0
    reuse_differing_bytes: int = 0
    #: stored bytes cloned from files already on DEST's filesystem (the
    #: snapshot's own files at their place in DEST, --share-with) and read
    #: back equal (restore/beside.py); --share-with files read to index them
    beside_bytes: int = 0
    share_read_bytes: int = 0
    #: --reshare-existing on Btrfs: the old copies' extents the new files
    #: refer to in part, rewritten so that they are released, and what was
    #: kept and why (cloneaware/bookends.py)
    bookend_rewritten_bytes: int = 0
    bookend_released_bytes: int = 0
    bookends_kept: dict[str, int] = field(default_factory=dict)
    hole_bytes: int = 0
    #: repositories: blobs fetched outside the planned order (read at once,
    #: not ahead: a restore that does this often is slow, and says so)
    unplanned_fetches: int = 0
    seconds: float = 0.0
    copy_reasons: dict[str, int] = field(default_factory=dict)
    owners_skipped: bool = False
    #: entries not restored exactly (NotExact)
    warnings: Warnings = field(default_factory=Warnings)

    @property
    def not_exact(self) -> list[NotExact]:
        return self.warnings.of(NotExact)

    @property
    def damaged(self) -> list[Damaged]:
        return self.warnings.of(Damaged)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "warnings"}
        return {**d, "seconds": round(self.seconds, 3),
                **self.warnings.as_json(NotExact, Damaged)}

    def add(self, other: RestoreSummary) -> None:
        """Sum ``other`` into this one (several snapshots restored in one run)."""
        for k, v in other.__dict__.items():
            mine = getattr(self, k)
            if isinstance(v, bool):
                setattr(self, k, mine or v)
            elif isinstance(v, (int, float)):
                setattr(self, k, mine + v)
            elif isinstance(v, list):
                mine.extend(v)
            elif isinstance(v, dict):
                for rk, rv in v.items():
                    mine[rk] = mine.get(rk, 0) + rv


class Output(Protocol):
    """The entries of one archive or manifest, in archive order.  Paths are
    below DEST (after --strip-components); a regular file's bytes come
    between ``open_file`` and ``end_file``."""

    #: the summary the output adds its counts to (shared with the receiver)
    s: RestoreSummary

    def begin(self, base: thin.Base | None, entries: list[fmt.Entry]) -> None:
        """Before the first entry: DEST (and a thin archive's base) opened
        or checked.  ``entries``: the archive's entries so far, by id (the
        list grows as the archive is read)."""

    def replaces(self, e: fmt.Entry) -> bool:
        """Whether making ``e`` replaces something in DEST (for -v)."""

    def made(self, eid: int) -> bool:
        """Whether entry ``eid`` was made (or staged): a hard link to it,
        or a clone from it, can be made."""

    def mkdir(self, e: fmt.Entry) -> None: ...

    def open_file(self, e: fmt.Entry, staged: bool, beside: bytes | None = None) -> None:
        """A regular file begins; ``staged``: left out by --include, made
        only to clone or link from, and removed at the end; ``beside``:
        where a staged file would be in DEST (a copy there is cloned from)."""

    def write_beside(self, path: bytes, src_offset: int, offset: int, data: Any) -> bool:
        """Stored bytes that a file left out of this restore holds at
        ``src_offset``, if DEST has it at ``path``: cloned from there and
        verified (restore/beside.py).  False if not: the caller writes."""

    def write(self, offset: int, length: int, data: Any, extent: Any = None) -> None:
        """Stored bytes (``data`` None in a dry run); ``extent``: the Btrfs
        compressed extent they were stored as."""

    def clone_entry(self, src: fmt.Entry, src_offset: int, length: int, offset: int) -> None:
        """Bytes of an earlier regular file of this restore (a REF)."""

    def clone_place(self, place: Place, src_offset: int, length: int, offset: int) -> None:
        """Bytes written earlier at a blob's place (possibly in another
        snapshot restored in the same run)."""

    def clone_base(self, bf: thin.BaseFile, base_offset: int, length: int, offset: int
                   ) -> None: ...

    def clone_external(self, offset: int, length: int, record: int) -> None:
        """Bytes at the same offset of a sparse thin backup's own file."""

    def end_file(self, st: FileState) -> None:
        """The file's records are complete: verify, name it (or stage it)."""

    def hardlink(self, e: fmt.Entry) -> None: ...

    def special(self, e: fmt.Entry) -> bool:
        """A symlink, FIFO or device; False if it could not be made."""

    def not_exact(self, e: fmt.Entry, why: str) -> None: ...

    def damaged(self, e: fmt.Entry, why: str) -> None:
        """Bytes of the file being restored could not be had (Damaged)."""

    def finish(self) -> None:
        """Every entry is in: names, directory metadata, syncs."""

    def fail(self) -> None:
        """The restore failed: keep what can be kept for a retry."""

    def close(self) -> None: ...
