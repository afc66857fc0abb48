"""Reshare's run: the shared places of the input (an archive's REFs, a
manifest's BLOB ranges a place already holds) cut into pieces on a grid of
the source's offsets, gathered in windows, and deduped sorted by source,
many destinations per FIDEDUPERANGE call (docs/KERNEL.md D7)."""
from __future__ import annotations

import errno
import io
import os
import time
from collections.abc import Callable

from cloneaware import fsinfo, native
from cloneaware.archive import format as fmt
from cloneaware.archive.blobs import Coverage, Place
from cloneaware.archive.events import (
    BaseRefEvent,
    BlobEvent,
    EntryEvent,
    Handler,
    RefEvent,
    dispatch,
)
from cloneaware.archive.reader import Stream
from cloneaware.bookends import used_bytes
from cloneaware.errors import ArchiveError, BytesDiffer, UsageError
from cloneaware.reshare.files import DestFiles, Open, ReshareSummary, shared_length

#: pieces are cut on this grid of source offsets (and asked in one call each)
CHUNK = 8 << 20
#: a piece that differs is split in halves down to this size
MIN_SPLIT = 64 << 10
#: destinations per call (the kernel takes at most 127)
MAX_DESTS = 64
#: pieces collected before they are deduped
WINDOW = 1 << 16
#: files open at once (a window is deduped before more are opened)
FILES = 256
#: bytes of the pieces to come whose pages are asked for (POSIX_FADV_WILLNEED)
#: while a call compares: the kernel reads the pages it compares one by one,
#: without readahead, and a cold copy is deduped 3-4 times faster this way
READAHEAD = 128 << 20


class Reshare:
    """Reshare the files of DEST (``dest``: its path, for messages and to
    open it) as the events of an archive, a sharing map or a manifest say.
    ``dry_run``: ask the kernel nothing; count what would be asked."""

    def __init__(self, dest: str, dry_run: bool = False, progress=None,
                 warn: Callable[[str], None] | None = None):
        self.dest = dest
        self.dry_run = dry_run
        self.progress = progress
        self.warn = warn or (lambda msg: None)
        self.s = ReshareSummary(dry_run=dry_run)
        self.files = DestFiles(dest, self.s, self.warn)
        self.differing: dict[str, int] = {}
        self.window: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        self.pieces = 0
        self.hinted = False  # said where DEST must point

    @property
    def what(self) -> str:
        """What the input is: archive, sharing map or snapshot (for messages)."""
        return self.files.what

    # -- inputs ------------------------------------------------------------------

    def run_archive(self, f) -> ReshareSummary:
        """An archive or a sharing map (a binary file object, read front to back)."""
        stream = Stream(f, maps=True, decode=False, skip_data=True)
        return self._run(stream, _ArchivePlaces(self, stream))

    def run_manifest(self, manifest: bytes) -> ReshareSummary:
        """A repository snapshot's manifest: a BLOB range whose blob bytes an
        earlier range of the manifest holds shares with that range (the rule
        of archive/blobs.py's Coverage, by which a restore clones)."""
        self.files.what = "snapshot"
        stream = Stream(io.BytesIO(manifest), check_hashes=False)
        return self._run(stream, _ManifestPlaces(self))

    def entry(self, e: fmt.Entry) -> None:
        """An entry of the input: a regular file is counted; DEST checked."""
        self._top(e)
        if e.kind == fmt.K_REG:
            self.s.files += 1

    def _top(self, e: fmt.Entry) -> None:
        """Say once, at the first top-level name DEST lacks, where DEST must point."""
        root = self.files.tree.root
        if b"/" in e.path or root is None or self.hinted:
            return
        try:
            os.lstat(e.path, dir_fd=root)
        except FileNotFoundError:
            self.hinted = True
            name = os.fsdecode(e.path)
            self.warn(f"{self.files.where(e)} is missing: DEST must hold the {self.what}'s "
                      f"top-level names ({name}/...), as restore puts them")

    # -- the run -------------------------------------------------------------------

    def _run(self, stream: Stream, places: Handler) -> ReshareSummary:
        t0 = time.monotonic()
        fsinfo.forget()
        self.files.entries = stream.entries
        try:
            root = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"{self.dest}: no such directory") from None
        except NotADirectoryError:
            raise UsageError(f"{self.dest} is not a directory") from None
        self.files.tree.root = root
        self.files.root_dev = os.fstat(root).st_dev
        try:
            before = None if self.dry_run else used_bytes(root, self.dest)
            dispatch(places, stream.events())
            self._flush()
            if not self.dry_run:
                self._bookends(root)
            if before is not None:
                self.s.freed_bytes = before - used_bytes(root, self.dest)
        finally:
            self.files.close_all()
            self.files.tree.close()
            os.close(root)
        s = self.s
        s.warnings += [BytesDiffer(p, n) for p, n in sorted(self.differing.items())]
        s.seconds = time.monotonic() - t0
        return s

    def _bookends(self, root: int) -> None:
        """Rewrite what the dedupe left partly referenced, where that frees
        space (Btrfs; cloneaware/bookends.py)."""
        def open_file(eid) -> int | None:
            f = self.files.get(eid)
            return None if f is None or f.refused else f.fd

        def release() -> None:
            if len(self.files.open) > FILES:
                self.files.close_all()

        self.files.bookends.run(open_file, root, release)
        self.files.close_all()

    def place(self, sid: int, soff: int, did: int, doff: int, length: int) -> None:
        """B (``did`` at ``doff``) shares ``length`` bytes with A (``sid`` at ``soff``)."""
        s = self.s
        s.references += 1
        s.referenced_bytes += length
        if self.progress:
            self.progress.advance(length)
        opening = (sid not in self.files.open) + (did not in self.files.open and did != sid)
        if len(self.files.open) + opening > FILES or self.pieces >= WINDOW:
            self._flush()
        src, dst = self.files.get(sid), self.files.get(did)
        if src is None or dst is None:
            s.skipped_bytes += length
            return
        bs = dst.block
        if (soff - doff) % bs:
            s.unaligned_bytes += length
            return
        head = min((-doff) % bs, length)
        soff, doff, length = soff + head, doff + head, length - head
        at_eof = soff + length == src.entry.size and doff + length == dst.entry.size
        tail = 0 if at_eof else length % bs  # a tail that ends both files is shared (D10)
        length -= tail
        s.unaligned_bytes += head + tail
        while length > 0:
            n = min(length, CHUNK - soff % CHUNK)
            self.window.setdefault((sid, soff, n), []).append((did, doff))
            self.pieces += 1
            soff, doff, length = soff + n, doff + n, length - n

    # -- deduping --------------------------------------------------------------------

    def _flush(self) -> None:
        window, self.window, self.pieces = self.window, {}, 0
        keys = sorted(window)

        def cost(k: tuple[int, int, int]) -> int:
            return k[2] * (1 + len(window[k]))

        j = ahead = 0  # keys[i:j] have been asked for; ahead: their bytes
        for i, key in enumerate(keys):
            # the pages of the pieces after this one come in while it is compared
            while j < len(keys) and (j <= i or ahead + cost(keys[j]) <= READAHEAD):
                self._readahead(*keys[j], window[keys[j]])
                ahead += cost(keys[j])
                j += 1
            self._dedupe(*key, window[key])
            ahead -= cost(key)
        self.files.close_all()

    def _readahead(self, sid: int, soff: int, n: int, dests: list[tuple[int, int]]) -> None:
        """Start reading the pages a call will compare (the kernel reads them
        one at a time, without readahead, when it compares)."""
        if self.dry_run:
            return
        for eid, off in [(sid, soff), *dests]:
            f = self.files.open.get(eid)
            if f is not None and not f.refused:
                try:
                    os.posix_fadvise(f.fd, off, n, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass

    def _dedupe(self, sid: int, soff: int, n: int, dests: list[tuple[int, int]]) -> None:
        s = self.s
        src = self.files.open.get(sid)
        if src is None or src.refused:
            s.skipped_bytes += n * len(dests)
            return
        todo: list[tuple[Open, int, int]] = []
        for did, doff in dests:
            dst = self.files.open.get(did)
            if dst is None or dst.refused:
                s.skipped_bytes += n
                continue
            pre = shared_length(self.files.ext(src, True), soff, self.files.ext(dst, False),
                                doff, n)
            if pre:
                self.files.touched(dst)
            if pre == n:
                s.already_shared_bytes += n
                continue
            s.to_dedupe_bytes += n - pre
            todo.append((dst, doff, pre))
        if self.dry_run:
            s.already_shared_bytes += sum(pre for _, _, pre in todo)
            return
        for i in range(0, len(todo), MAX_DESTS):
            self._call(src, soff, n, todo[i:i + MAX_DESTS])

    def _call(self, src: Open, soff: int, n: int, batch: list[tuple[Open, int, int]]
              ) -> None:
        """One FIDEDUPERANGE of src's [soff, soff+n) into each (file, offset);
        ``pre``: bytes of that range they already shared."""
        s = self.s
        if src.refused:
            s.skipped_bytes += sum(n - pre for _, _, pre in batch)
            return
        try:
            got = native.fideduperange(src.fd, soff, n, [(d.fd, o) for d, o, _ in batch],
                                       src.where)
        except OSError as ex:
            if ex.errno in (errno.EIO, errno.ENOSPC, errno.ENOMEM):
                raise
            # the call as a whole failed: about the source (D3: it no longer
            # holds the range, it changed since it was checked), not fatal
            self.files.refuse(src, ex.errno or errno.EIO)
            src.refused = True
            self.files.unusable.add(src.entry.id)
            s.skipped_bytes += sum(n - pre for _, _, pre in batch)
            return
        s.dedupe_calls += 1
        differ: list[tuple[Open, int, int]] = []
        for (dst, doff, pre), r in zip(batch, got):
            if r.status == native.DEDUPE_SAME and r.bytes_deduped >= n:
                s.shared_bytes += n - pre
                s.already_shared_bytes += pre
                self.files.deduped_into(dst)
            elif r.status == native.DEDUPE_DIFFERS:
                differ.append((dst, doff, pre))
            elif r.status == native.DEDUPE_SAME:  # the kernel stopped short
                s.shared_bytes += max(r.bytes_deduped - pre, 0)
                s.skipped_bytes += n - max(r.bytes_deduped, pre)
                s.already_shared_bytes += pre
                self.files.deduped_into(dst)
            else:
                self.files.refuse(dst, -r.status)
                s.skipped_bytes += n - pre
                s.already_shared_bytes += pre
        if not differ:
            return
        half = (n // 2) // src.block * src.block
        if n <= MIN_SPLIT or half == 0:
            for dst, _doff, pre in differ:
                s.differing_bytes += n - pre
                s.already_shared_bytes += pre
                self.differing[dst.where] = self.differing.get(dst.where, 0) + n - pre
            return
        for off, m in ((0, half), (half, n - half)):
            sub = []
            for dst, doff, _pre in differ:
                pre = shared_length(self.files.ext(src, True), soff + off,
                                    self.files.ext(dst, False), doff + off, m)
                if pre == m:
                    s.already_shared_bytes += m
                else:
                    sub.append((dst, doff + off, pre))
            if sub:
                self._call(src, soff + off, m, sub)


class _ArchivePlaces(Handler):
    """The shared places of an archive or a sharing map: its REF records."""

    def __init__(self, rs: Reshare, stream: Stream):
        self.rs = rs
        self.stream = stream

    def on_entry(self, ev: EntryEvent) -> None:
        if self.stream.is_map:
            self.rs.files.what = "sharing map"
        self.rs.entry(ev.entry)

    def on_ref(self, ev: RefEvent) -> None:
        self.rs.place(ev.source.id, ev.source_offset, ev.file.entry.id, ev.offset, ev.length)

    def on_baseref(self, ev: BaseRefEvent) -> None:
        self.rs.s.base_bytes += ev.length

    def on_blob(self, ev: BlobEvent) -> None:
        raise ArchiveError("BLOB record in an archive file: only a repository's snapshot "
                           "manifest may hold them", ev.record)


class _ManifestPlaces(Handler):
    """The shared places of a manifest: BLOB ranges whose bytes an earlier
    range holds."""

    def __init__(self, rs: Reshare):
        self.rs = rs
        self.cov = Coverage()

    def on_entry(self, ev: EntryEvent) -> None:
        self.rs.entry(ev.entry)

    def on_blob(self, ev: BlobEvent) -> None:
        eid = ev.file.entry.id
        base = ev.offset - ev.blob_offset  # the blob's byte 0 in this file
        for lo, hi, place in self.cov.split(ev.blob_id, ev.blob_offset, ev.length):
            if place is None:
                self.cov.add(ev.blob_id, Place(0, eid, base, lo, hi))
            else:
                self.rs.place(place.entry, place.base + lo, eid, base + lo, hi - lo)
