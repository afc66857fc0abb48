"""Restore manifests (a repository's snapshots, docs/REPOSITORY.md) whose
files are blob ranges: one as DEST/<name>, several as DEST/<id>/<name>,
sharing what they have in common.

Each manifest is fed to the receiver (restore/receiver.py) with the same
``Coverage`` (archive/blobs.py): a blob range is written once, at the first
place that needs it, in whichever manifest, and cloned from there after.
Where the bytes of a blob come from is a ``BlobSource``: the repository
for a restore, a recorder of the fetches for the planner that tells the
repository what to read ahead where the BLOB records alone cannot
(repo/restore.py: the receiver run with recording outputs), nothing for
a dry run."""
from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware.archive import thin
from cloneaware.archive.blobs import BlobSource, Coverage
from cloneaware.archive.catalog import read_footer, read_outline
from cloneaware.archive.events import dispatch
from cloneaware.archive.reader import Stream
from cloneaware.errors import UsageError
from cloneaware.listing import read_contents
from cloneaware.restore.beside import ShareIndex, left_out_blobs
from cloneaware.restore.directory import DirectoryOutput, Places
from cloneaware.restore.dryrun import RecordingOutput
from cloneaware.restore.output import RestoreSummary
from cloneaware.restore.receiver import Receiver
from cloneaware.restore.run import check_dest, check_dest_parents, refuse_existing
from cloneaware.restore.select import Selection, plan


@dataclass
class Manifest:
    """One manifest and where it goes."""

    data: bytes
    dest: str
    #: what -v prints before each path (several snapshots: b"<id>/")
    prefix: bytes = b""
    tops: set[bytes] = field(default_factory=set)
    #: files left out that a chosen hard link names
    stage: set[int] = field(default_factory=set)


class ManifestsRestore:
    """``manifests``: (bytes, name) in order; one is restored into DEST,
    several into DEST/<name>.  Options as for restore/run.py's Restore."""

    def __init__(self, manifests: list[tuple[bytes, str]], dest: str, force: bool = False,
                 progress=None, warn: Callable[[str], None] | None = None,
                 reshare_existing: bool = False, select: Selection | None = None,
                 listed: Callable[[bytes, bool], None] | None = None, dry_run: bool = False,
                 share: ShareIndex | None = None):
        several = len(manifests) > 1
        self.items = [Manifest(m, os.path.join(dest, name) if several else dest,
                               name.encode() + b"/" if several else b"")
                      for m, name in manifests]
        self.several = several
        self.force = force or reshare_existing
        self.progress = progress
        self.warn = warn or (lambda msg: None)
        self.reshare_existing = reshare_existing
        self.select = select or Selection()
        self.listed = listed
        self.dry_run = dry_run
        self.share = share

    def check(self) -> None:
        """What must hold before anything is written: each manifest's
        choice planned, something chosen, DEST usable, no existing name
        replaced without --force."""
        select = self.select
        for it in self.items:
            if select:  # one pass over each manifest's entries
                rows = read_contents(io.BytesIO(it.data), full=True).rows
                got = plan(select, [r.entry for r in rows if r.entry is not None])
                it.tops, it.stage = got.tops, got.stage
            else:
                it.tops = read_outline(io.BytesIO(it.data)).tops
        if select and not any(it.tops for it in self.items):
            raise UsageError(f"{select.what()} leaves nothing of the "
                             f"snapshot{'s' if self.several else ''} to restore")
        for it in self.items:
            (check_dest_parents if self.dry_run else check_dest)(it.dest)
            if select and not it.tops:
                continue
            refuse_existing(it.dest, it.tops, self.force)

    def stored_bytes(self) -> int:
        return sum(read_footer(io.BytesIO(it.data)).stored_bytes for it in self.items)

    def receive(self, blobs: BlobSource, record: bool = False) -> RestoreSummary:
        """Restore every manifest in order (``record``: into recording
        outputs, making nothing); the summary of all."""
        t0 = time.monotonic()
        total = RestoreSummary()
        cov = Coverage()
        places = Places()
        try:
            for owner, it in enumerate(self.items):
                s = RestoreSummary()
                out: DirectoryOutput | RecordingOutput
                if record:
                    out = RecordingOutput(it.dest, s, warn=self.warn)
                else:
                    out = DirectoryOutput(it.dest, s, self.force, self.warn,
                                          reshare_existing=self.reshare_existing,
                                          places=places, share=self.share)
                stream = Stream(io.BytesIO(it.data))
                listed = self.listed
                if listed is not None and it.prefix:
                    listed = _prefixed(listed, it.prefix)
                r = Receiver(out, stream.entries, _base_of(stream), self.select.fresh(),
                             it.stage, stage_referenced=False, progress=self.progress,
                             listed=listed, blobs=blobs, coverage=cov, owner=owner,
                             beside=left_out_blobs(it.data, self.select)
                             if self.select and not record else None)
                try:
                    dispatch(r, stream.events())
                    out.finish()
                except BaseException:
                    try:
                        out.fail()
                    finally:
                        with contextlib.suppress(Exception):  # the restore's own error is told
                            out.close()
                    raise
                out.close()
                total.add(s)
        finally:
            places.close()
        total.seconds = time.monotonic() - t0
        return total


def _base_of(stream: Stream) -> Callable[[], thin.Base | None]:
    """A manifest has no base; if a hostile one names one, the output says
    that the base is missing, as for a thin archive."""
    return lambda: stream.base


def _prefixed(listed: Callable[[bytes, bool], None], prefix: bytes
              ) -> Callable[[bytes, bool], None]:
    return lambda path, replaces: listed(prefix + path, replaces)
