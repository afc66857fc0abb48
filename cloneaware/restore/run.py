"""Restore an archive: open it (a file, '-', a sparse thin backup's
manifest, or an open stream such as ssh://), make the checks that must
pass before anything is written, then feed its events to the receiver
(restore/receiver.py) with a directory output, or, for ``--dry-run``, a
recording one (restore/dryrun.py)."""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import cloneaware.restore.partial as partial
from cloneaware.archive.catalog import read_outline
from cloneaware.archive.events import dispatch
from cloneaware.archive.manifest import open_manifest
from cloneaware.archive.reader import Stream
from cloneaware.archive.records import open_archive
from cloneaware.errors import ArchiveError, SharingMapGiven, UsageError
from cloneaware.listing import read_contents
from cloneaware.restore.beside import ShareIndex
from cloneaware.restore.directory import DirectoryOutput
from cloneaware.restore.dryrun import RecordingOutput
from cloneaware.restore.output import RestoreSummary
from cloneaware.restore.receiver import Receiver
from cloneaware.restore.select import Selection, plan


class Restore:
    """Restore ``archive`` (a path, '-', or a binary file object, read and
    not closed) into ``dest``.  The options are DirectoryOutput's and
    Receiver's (``listed(path, replaces)``: -v); ``dry_run``: make nothing,
    report what would be made."""

    def __init__(self, archive, dest: str, force: bool = False, progress=None, warn=None,
                 base: str | None = None, trust_base: bool = False, open_dest=None,
                 reshare_existing: bool = False, select: Selection | None = None,
                 listed: Callable[[bytes, bool], None] | None = None, dry_run: bool = False,
                 open_base_at=None, share: ShareIndex | None = None):
        self.archive = archive
        self.dest = dest
        self.force = force or reshare_existing
        self.progress = progress
        self.warn = warn or (lambda msg: None)
        self.base = base
        self.trust_base = trust_base
        self.open_dest = open_dest
        self.open_base_at = open_base_at
        self.reshare_existing = reshare_existing
        self.select = select or Selection()
        self.listed = listed
        self.dry_run = dry_run
        self.share = share
        self.s = RestoreSummary()
        self.stage_ids: set[int] = set()

    def run(self) -> RestoreSummary:
        t0 = time.monotonic()
        if self.dry_run:
            check_dest_parents(self.dest)
        elif self.open_dest is None:
            check_dest(self.dest)
        path: str | None = self.archive if isinstance(self.archive, str) else None
        name = path if path not in (None, "-") else None
        sparse = open_manifest(name) if name is not None else None
        external_fd = None
        if path is None:
            f = self.archive
        elif sparse is not None:
            f, external_fd = sparse
        else:
            f = open_archive(path)
        try:
            out = self._output(external_fd)
            try:
                if name is not None:
                    self._precheck(f, out)
                self._receive(f, out, name)
            except BaseException:
                with contextlib.suppress(Exception):  # the restore's own error is the one to tell
                    out.close()
                raise
            out.close()
        finally:
            if name is not None:
                f.close()
            if external_fd is not None:
                os.close(external_fd)
        self.s.seconds = time.monotonic() - t0
        return self.s

    def _output(self, external_fd: int | None):
        if self.dry_run:
            return RecordingOutput(self.dest, self.s, self.base, self.warn,
                                   sparse=external_fd is not None)
        return DirectoryOutput(self.dest, self.s, self.force, self.warn, self.base,
                               self.trust_base, self.open_dest, self.reshare_existing,
                               external_fd, open_base_at=self.open_base_at, share=self.share)

    def _receive(self, f, out, name: str | None) -> None:
        if self.dry_run:  # the layout only: DATA records are sought over where they can be
            stream = Stream(f, check_hashes=False, decode=False, skip_data=True)
        else:
            stream = Stream(f, reuse_buffers=True)
        r = Receiver(out, stream.entries, lambda: stream.base, self.select.fresh(),
                     self.stage_ids, progress=self.progress, listed=self.listed)
        try:
            try:
                dispatch(r, stream.events())
            except SharingMapGiven:
                raise SharingMapGiven(name) from None
            if self.select and not r.took_any:
                raise UsageError(f"{self.select.what()} leaves nothing of the archive to "
                                 "restore")
            out.finish()
        except BaseException:
            out.fail()
            raise

    def _precheck(self, f, out) -> None:
        """On a seekable archive, before anything is written: a sharing map
        refused, the base opened and checked, the selection planned, and an
        existing top-level entry refused without --force."""
        try:
            if not f.seekable():
                return
            listing = read_outline(f)
            if listing.is_map:
                raise SharingMapGiven(self.archive)
            if self.progress:  # what the bar counts: every byte put in a file
                ft = listing.footer
                self.progress.set_total(ft.stored_bytes + ft.ref_bytes + ft.base_ref_bytes)
            tops = listing.tops
            if self.select:
                rows = read_contents(f, full=True).rows
                got = plan(self.select, [r.entry for r in rows if r.entry])
                self.stage_ids, tops = got.stage, got.tops
        except (ArchiveError, OSError):
            return  # the full read will report it with the offset
        finally:
            try:
                f.seek(0)
            except OSError:
                pass
        if listing.base is not None:
            if isinstance(out, DirectoryOutput):
                out.use_base(listing.base)
            else:
                out.begin(listing.base, [])
        if self.select and not tops:
            raise UsageError(f"{self.select.what()} leaves nothing of the archive to restore")
        refuse_existing(self.dest, tops, self.force)


def refuse_existing(dest: str, tops: set[bytes], force: bool) -> None:
    """A top-level name the restore would make that is already in DEST is
    refused without --force, unless a failed restore left it
    (restore/partial.py)."""
    if force:
        return
    left = partial.read(dest=dest)
    for top in sorted(tops - left):
        if os.path.lexists(os.path.join(os.fsencode(dest), top)):
            raise UsageError(f"{os.path.join(dest, os.fsdecode(top))} exists; "
                             "use --force to overwrite it")


def check_dest(dest: str) -> None:
    """Refuse a DEST that cannot be one before anything is read: an empty
    path, or something that is not a directory."""
    if not dest:
        raise UsageError("an empty path was given as DEST")
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise UsageError(f"{dest}: exists and is not a directory")


def check_dest_parents(dest: str) -> None:
    """check_dest, and what a restore would fail on when it makes DEST: a
    component above it that is not a directory (a dry run makes nothing,
    so it looks)."""
    check_dest(dest)
    p = os.path.abspath(dest)
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UsageError(f"{dest}: not a directory (or a component of it is not)")


def restore(archive, dest: str, **kw) -> RestoreSummary:
    return Restore(archive, dest, **kw).run()
