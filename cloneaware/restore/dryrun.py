"""``restore --dry-run``: the restore's own receiver (restore/receiver.py)
with an output that records what would be made in DEST, and how each
file's bytes would get there (written, reflinked, from the base, holes).

Nothing in DEST is made or changed, not even DEST itself; the checks a
restore makes before it writes fail the same way (restore/run.py makes
them for both).  An archive file's DATA records are sought over, not read;
a pipe is read whole (its records checked, not its data hashes); a
repository's manifests are read, and no blob is fetched.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.blobs import Place
from cloneaware.archive.events import FileState
from cloneaware.errors import Damaged, NotExact
from cloneaware.fsinfo import BTRFS_MAGIC
from cloneaware.restore.base import open_base
from cloneaware.restore.output import RestoreSummary
from cloneaware.restore.subvol import describe


class RecordingOutput:
    """An ``Output`` that makes nothing.  ``base``: --base, checked as a
    restore checks it; ``sparse``: the archive is a sparse thin backup (its
    own ranges would be cloned from its file)."""

    def __init__(self, dest: str, summary: RestoreSummary | None = None,
                 base: str | None = None, warn: Callable[[str], None] | None = None,
                 sparse: bool = False):
        self.s = summary if summary is not None else RestoreSummary()
        self.dest = dest
        self.base = base
        self.warn = warn or (lambda msg: None)
        self.sparse = sparse
        self.entries: list[fmt.Entry] = []
        self.made_ids: set[int] = set()
        self.subvols: set[int] = set()  # subvolumes made again (Btrfs)
        self.btrfs = False

    def begin(self, base: thin.Base | None, entries: list[fmt.Entry]) -> None:
        self.entries = entries
        if base is not None:
            open_base(base, self.base).close()  # there, and of the sizes it had
        elif self.base is not None:
            self.warn("--base given, but this archive is not a thin backup")
        self.btrfs = on_btrfs(self.dest)

    def made(self, eid: int) -> bool:
        return eid in self.made_ids

    def replaces(self, e: fmt.Entry) -> bool:
        where = os.path.join(os.fsencode(self.dest), e.path)
        return os.path.lexists(where) and not (e.kind == fmt.K_DIR and os.path.isdir(where))

    def damaged(self, e: fmt.Entry, why: str) -> None:
        self.s.warnings.append(Damaged(os.fsdecode(e.path), why))

    def not_exact(self, e: fmt.Entry, why: str) -> None:
        self.s.warnings.append(NotExact(os.fsdecode(e.path), why))

    def mkdir(self, e: fmt.Entry) -> None:
        self.made_ids.add(e.id)
        if not e.subvol:
            return
        what = describe(e, lambda i: self.entries[i].path)
        if not self.btrfs:
            self.not_exact(e, f"{what}: restored as a plain directory (the destination is "
                           "not Btrfs)")
            return
        self.s.subvolumes += 1
        self.subvols.add(e.id)
        if e.subvol & fmt.SV_SNAPSHOT and e.origin not in self.subvols:
            self.not_exact(e, f"{what}: restored as a subvolume of its own, not as a snapshot "
                           "(its origin was not restored before it)")

    def open_file(self, e: fmt.Entry, staged: bool, beside: bytes | None = None) -> None:
        self.made_ids.add(e.id)

    def write_beside(self, path: bytes, src_offset: int, offset: int, data) -> bool:
        return False  # counted as written: a dry run reads nothing in DEST

    def write(self, offset: int, length: int, data, extent=None) -> None:
        self.s.written_bytes += length

    def clone_entry(self, src: fmt.Entry, src_offset: int, length: int, offset: int) -> None:
        self.s.reflinked_bytes += length

    def clone_place(self, place: Place, src_offset: int, length: int, offset: int) -> None:
        self.s.reflinked_bytes += length

    def clone_base(self, bf: thin.BaseFile, base_offset: int, length: int, offset: int
                   ) -> None:
        self.s.reflinked_bytes += length  # copied where the base is on another filesystem

    def clone_external(self, offset: int, length: int, record: int) -> None:
        self.s.reflinked_bytes += length

    def end_file(self, st: FileState) -> None:
        pass

    def hardlink(self, e: fmt.Entry) -> None:
        self.made_ids.add(e.id)

    def special(self, e: fmt.Entry) -> bool:
        self.made_ids.add(e.id)
        return True

    def finish(self) -> None:
        pass

    def fail(self) -> None:
        pass

    def close(self) -> None:
        pass


def on_btrfs(dest: str) -> bool:
    """Whether DEST (or, if it is not there yet, where it would be made) is
    on Btrfs: there a subvolume is made again, elsewhere a directory."""
    p = os.path.abspath(dest)
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return native.fstatfs(fd, p)[0] == BTRFS_MAGIC
    finally:
        os.close(fd)
