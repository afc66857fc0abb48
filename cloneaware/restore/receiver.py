"""The restore's decisions, as a handler of the event protocol
(archive/events.py): which entries are made and where (``restore
--include``, ``--strip-components``), which left-out files are staged to
clone or link from, where each range of a file's bytes comes from
(stored, an earlier file, the base, the sparse file, a blob written
earlier), and what is counted.  What is made, and how, is the
``Output``'s (restore/output.py): DEST for a restore, a record for a dry
run, so both follow this one logic."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.blobs import BlobSource, Coverage, Place
from cloneaware.archive.events import (
    BaseRefEvent,
    BlobEvent,
    DataEvent,
    EndEvent,
    EntryEvent,
    ExternalEvent,
    Handler,
    RefEvent,
)
from cloneaware.errors import ArchiveError, RepositoryError
from cloneaware.restore.output import Output
from cloneaware.restore.select import Selection


class Receiver(Handler):
    """Feeds one archive's (or manifest's) events to ``out``.

    ``stage_ids``: files left out that a chosen hard link names (known from
    a seekable archive beforehand); ``stage_referenced``: a left-out file
    whose bytes chosen files share is staged too (an archive; a manifest's
    blobs come from ``blobs`` instead).  ``blobs`` and ``coverage``: the
    source of a manifest's BLOB ranges and the places written so far (shared
    by the manifests restored together); ``owner``: this manifest's number
    among them.  ``listed(path, replaces)``: -v, each path as it is made.
    ``beside``: blob id -> where a file this restore leaves out holds it
    below DEST (restore/beside.py ``left_out_blobs``), cloned from there if
    DEST has it."""

    def __init__(self, out: Output, entries: list[fmt.Entry], base: Callable[[], thin.Base | None],
                 select: Selection | None = None, stage_ids: set[int] | None = None,
                 stage_referenced: bool = True, progress=None,
                 listed: Callable[[bytes, bool], None] | None = None,
                 blobs: BlobSource | None = None, coverage: Coverage | None = None,
                 owner: int = 0,
                 beside: dict[bytes, tuple[bytes, int, int, int]] | None = None):
        self.out = out
        self.s = out.s
        self.entries = entries
        self.base = base
        self.select = select or Selection()
        self.stage_ids = stage_ids or set()
        self.stage_referenced = stage_referenced
        self.progress = progress
        self.listed = listed
        self.blobs = blobs
        self.coverage = coverage if coverage is not None else Coverage()
        self.owner = owner
        self.beside = beside or {}
        self.begun = False
        #: an entry was chosen (--include): a choice that takes nothing is an error
        self.took_any = False
        #: directories left out, made if something below them is chosen
        self.unmade_dirs: dict[bytes, fmt.Entry] = {}
        #: the records of the current file are passed over (left out, not staged)
        self.skipping = False
        self.staged = False  # the current file is staged, not restored
        self.filled = 0  # bytes of the current file given so far (the rest are holes)
        self.cur: fmt.Entry | None = None
        #: the blobs the current file is a place of, and whether bytes of it
        #: could not be had (it is then not restored, and no place)
        self.cur_bids: list[bytes] = []
        self.cur_damaged = False

    # -- entries --------------------------------------------------------------------

    def on_entry(self, ev: EntryEvent) -> None:
        e = ev.entry
        if not self.begun:
            self.out.begin(self.base(), self.entries)
            self.begun = True
        if self.select:
            to = self.select.mapped(e.path) if self.select.take(e.path, e.kind) else None
            if to is None:
                self._not_taken(e)
                return
            self.took_any = True
            if e.kind == fmt.K_HARDLINK and not self.out.made(e.link):
                # its file was left out and not staged: only a seekable
                # archive says beforehand which files a chosen link needs
                self.s.left_out += 1
                self.out.not_exact(e, "not restored: the file it is a hard link to was left "
                                   "out (from a pipe; restore from the archive file to get it)")
                return
            self._make_ancestors(e.path)
            if to != e.path:
                e = dataclasses.replace(e, path=to)
        self._make(e)

    def _not_taken(self, e: fmt.Entry) -> None:
        """An entry --include or --strip-components leaves out: a directory
        is remembered (it is made if something below it is); a file that
        chosen files share with or link to is staged."""
        self.s.left_out += 1
        if e.kind == fmt.K_DIR:
            self.unmade_dirs[e.path] = e
        elif e.kind == fmt.K_REG:
            if (e.eflags & fmt.EF_REFERENCED and self.stage_referenced) \
                    or e.id in self.stage_ids:
                self._begin_file(e, staged=True, beside=self.select.mapped(e.path))
            else:
                self.skipping = True

    def _make_ancestors(self, path: bytes) -> None:
        """The directories above a chosen entry that were left out: made now."""
        up = path.rpartition(b"/")[0]
        chain = []
        while up and up in self.unmade_dirs:
            chain.append(up)
            up = up.rpartition(b"/")[0]
        for a in reversed(chain):
            d = self.unmade_dirs.pop(a)
            to = self.select.mapped(a)
            if to is not None:
                self.s.left_out -= 1
                self._make(d if to == a else dataclasses.replace(d, path=to))

    def _make(self, e: fmt.Entry) -> None:
        s = self.s
        if e.kind == fmt.K_DIR:
            self.out.mkdir(e)
            s.dirs += 1
        elif e.kind == fmt.K_REG:
            self._begin_file(e, staged=False)
        elif e.kind == fmt.K_HARDLINK:
            self.out.hardlink(e)
            s.hardlinks += 1
        elif self.out.special(e):
            if e.kind == fmt.K_SYMLINK:
                s.symlinks += 1
            else:
                s.specials += 1
        if self.listed is not None:
            self.listed(e.path, self.out.replaces(e))

    def _begin_file(self, e: fmt.Entry, staged: bool, beside: bytes | None = None) -> None:
        self.cur_bids, self.cur_damaged = [], False
        self.out.open_file(e, staged, beside)
        self.cur, self.staged, self.filled = e, staged, 0

    # -- a file's bytes -------------------------------------------------------------------

    def _advance(self, n: int) -> None:
        self.filled += n
        if self.progress:
            self.progress.advance(n)

    def on_data(self, ev: DataEvent) -> None:
        if self.skipping:
            return
        self.out.write(ev.offset, ev.length, ev.data, ev.extent)
        self._advance(ev.length)

    def on_ref(self, ev: RefEvent) -> None:
        if self.skipping:
            return
        self.out.clone_entry(ev.source, ev.source_offset, ev.length, ev.offset)
        self._advance(ev.length)

    def on_baseref(self, ev: BaseRefEvent) -> None:
        if self.skipping:
            return
        self.out.clone_base(ev.base_file, ev.base_offset, ev.length, ev.offset)
        self.s.base_bytes += ev.length
        self._advance(ev.length)

    def on_external(self, ev: ExternalEvent) -> None:
        if self.skipping:
            return
        self.out.clone_external(ev.offset, ev.length, ev.record)
        self._advance(ev.length)

    def on_blob(self, ev: BlobEvent) -> None:
        """A range of a blob: cloned from where its bytes were written
        already, written where they were not (and a place from then on)."""
        if self.blobs is None:
            raise ArchiveError("BLOB record in an archive file: only a repository's snapshot "
                               "manifest may hold them", ev.record)
        if self.skipping:  # a file --include leaves out
            return
        assert self.cur is not None
        bid = ev.blob_id
        try:
            size = self.blobs.size(bid, os.fsdecode(self.cur.path))
        except RepositoryError as e:  # in no index: a hole, and the restore goes on
            self._damaged(ev.offset, ev.length, e)
            return
        if ev.blob_offset + ev.length > size:
            raise ArchiveError(f"the manifest asks for bytes {ev.blob_offset}-"
                               f"{ev.blob_offset + ev.length} of blob {bid.hex()[:16]}, which "
                               f"has {size} (hostile or damaged manifest)", ev.record)
        base = ev.offset - ev.blob_offset  # where the blob's byte 0 falls in this file
        data = None
        there = self.beside.get(bid)
        for lo, hi, place in self.coverage.split(bid, ev.blob_offset, ev.length):
            if place is not None:
                self.out.clone_place(place, place.base + lo, hi - lo, base + lo)
            else:
                if data is None:
                    try:
                        data = self.blobs.get(bid)
                    except RepositoryError as e:  # damaged: a hole, never a place to clone
                        self._damaged(base + lo, hi - lo, e)
                        continue
                piece = None if data is None else memoryview(data)[lo:hi]
                # only a part the left-out file holds (never before its start)
                if there is None or piece is None or not there[2] <= lo < hi <= there[3] \
                        or not self.out.write_beside(there[0], there[1] + lo, base + lo, piece):
                    self.out.write(base + lo, hi - lo, piece)
                if not self.cur_damaged:
                    self.coverage.add(bid, Place(self.owner, self.cur.id, base, lo, hi))
                    self.cur_bids.append(bid)
            self._advance(hi - lo)

    def _damaged(self, offset: int, length: int, e: RepositoryError) -> None:
        """Bytes of the current file that could not be had: the file is not
        restored, nor a place to clone from, and is named (Damaged: the job
        exits 3 at its end, the rest restored)."""
        assert self.cur is not None
        if not self.cur_damaged:  # nothing is to be cloned from it
            self.cur_damaged = True
            for bid in self.cur_bids:
                self.coverage.drop(bid, self.owner, self.cur.id)
        self.out.damaged(self.cur, f"not restored: bytes {offset}-{offset + length} could "
                                   f"not be had: {e}")

    def on_end(self, ev: EndEvent) -> None:
        if self.skipping:
            self.skipping = False
            return
        self.out.end_file(ev.file)
        e, self.cur = self.cur, None
        if not self.staged and e is not None:
            s = self.s
            s.files += 1
            s.logical_bytes += e.size
            s.hole_bytes += e.size - self.filled
