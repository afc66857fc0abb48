"""What a backup did, in numbers and lists: the summary ``backup`` prints
and ``--json`` gives."""
from __future__ import annotations

from dataclasses import dataclass, field

from cloneaware.errors import FileChanged, FileSkipped, Warnings


@dataclass
class Summary:
    base: str | None = None
    base_referenced_bytes: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    #: entries left out by --exclude and --exclude-caches
    excluded: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0
    referenced_bytes: int = 0
    #: of referenced_bytes: compressed ranges referenced after their content
    #: hash matched the place they name
    checked_bytes: int = 0
    #: compressed ranges that named the same extent as an earlier place but
    #: held other bytes (part of an extent): stored
    check_mismatch_bytes: int = 0
    #: compressed ranges that named a range of the base, which could not be
    #: read to compare: stored (not counted as mismatches)
    base_unreadable_bytes: int = 0
    #: of stored_bytes: file bytes stored as the Btrfs compressed extents
    #: that hold them, as they are on disk (CODEC_BTRFS), and those extents' size
    encoded_stored_bytes: int = 0
    encoded_extent_bytes: int = 0
    hole_bytes: int = 0
    bytes_read: int = 0
    physical_bytes: int = 0
    archive_bytes: int = 0
    seconds: float = 0.0
    #: regular files saved as one instant's state by a clone, from a
    #: --snapshot, or read live (with the before/after check), and why
    captured_by_clone: int = 0
    captured_by_snapshot: int = 0
    #: repositories: bytes proved unchanged (by anchors, or the metadata rule)
    #: and not read; bytes new to the repository; the snapshot made
    unchanged_bytes: int = 0
    #: of files: those the files cache proved unchanged by their stat alone,
    #: never opened
    unopened_files: int = 0
    #: of files: small ones read ahead of their turn, in batches on a helper
    #: thread (backup/ahead.py)
    read_ahead_files: int = 0
    #: of files: larger ones cloned, and their first chunks read, ahead of
    #: their turn (backup/cloneahead.py)
    cloned_ahead_files: int = 0
    added_bytes: int = 0
    snapshot: str | None = None
    read_live: int = 0
    read_live_reasons: dict[str, int] = field(default_factory=dict)
    #: files skipped (FileSkipped), changed while read (FileChanged)
    warnings: Warnings = field(default_factory=Warnings)

    @property
    def changed(self) -> list[FileChanged]:
        return self.warnings.of(FileChanged)

    @property
    def skipped(self) -> list[FileSkipped]:
        return self.warnings.of(FileSkipped)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "warnings"}
        return {**d, "seconds": round(self.seconds, 3),
                **self.warnings.as_json(FileChanged, FileSkipped)}
