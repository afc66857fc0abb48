"""``cloneaware reshare``: give a tree copied by a tool that lost its sharing
(rsync, tar, restic, Borg, ``btrfs receive`` past its limits) the sharing
back, with FIDEDUPERANGE.

The input says which places share: the REF records of an archive or a
sharing map ("these bytes of B are those of A", docs/FORMAT.md), or, in a
repository snapshot's manifest, the BLOB ranges that name blob bytes seen
earlier in it (``archive/blobs.py`` Coverage, the rule a repository
restore clones by).  For each such place, the owner's range in DEST is deduped into
the place's range in DEST.  The kernel compares the bytes and shares them
only if they are identical (docs/KERNEL.md D1), so a file edited since the
copy keeps its edit and is counted as differing.

Nothing in DEST is written.  Every file is opened read-only beneath DEST,
one component at a time without following symlinks, and must be a regular
file of the size the input gives; any other is skipped and listed, and
the run goes on.  A read-only descriptor is all dedupe needs wherever it is
allowed at all (root, the owner, or a user who may write the file: D6);
where it is refused, that file is listed.  Times are compared when a file
is closed with those it had when it was opened, and set back if they moved
(no kernel moved them, D8; a ctime cannot be set back).

Batching and memory: each reference is cut into pieces on a grid of
``CHUNK`` bytes of the source's offsets.  Pieces are collected in a window
of at most ``WINDOW`` pieces and ``FILES`` open files, then deduped sorted
by source: pieces that name the same source range go in one call, with up
to ``MAX_DESTS`` destinations (the kernel takes 127, D7).  A piece that
differs is split in halves down to ``MIN_SPLIT`` bytes, so that an edited
byte costs at most that much sharing.  A range whose blocks the destination
already shares with the source (FIEMAP: the same physical addresses) is
counted as already shared and not asked again, so a second run is quick.
The kernel reads the pages it compares one at a time, so the pages of the
pieces to come are asked for ahead (POSIX_FADV_WILLNEED, up to
``READAHEAD`` bytes); that makes a cold copy 3 to 4 times faster.
Memory is the window, the reader's list of entries, and the lists of files
reported; not the references.
"""
from __future__ import annotations

import errno
import io
import os
import stat
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

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
from cloneaware.errors import (
    ArchiveError,
    BytesDiffer,
    DedupeRefused,
    ReshareSkipped,
    UsageError,
    Warnings,
)
from cloneaware.index.plan import data_ranges, is_own
from cloneaware.restore.tree import Tree
from cloneaware.source.mapping import extent_map

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

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: errnos after which a file is not asked again
_FINAL = {errno.EPERM, errno.EACCES, errno.ETXTBSY, errno.EROFS, errno.EOPNOTSUPP,
          errno.ENOTTY, errno.ENOSYS}


@dataclass
class ReshareSummary:
    dry_run: bool = False
    files: int = 0  # regular files in the input
    references: int = 0  # shared places read from the input
    referenced_bytes: int = 0
    #: bytes asked of the kernel (not already shared, aligned, in files usable)
    to_dedupe_bytes: int = 0
    shared_bytes: int = 0  # the kernel found them identical and shares them now
    already_shared_bytes: int = 0  # the same blocks already: not asked
    differing_bytes: int = 0  # the kernel found other bytes: left alone
    #: not on block boundaries alike in both files: cannot be deduped
    unaligned_bytes: int = 0
    #: of references whose file (either side) was skipped or refused
    skipped_bytes: int = 0
    #: references into the base of a thin archive (outside DEST): not reshared
    base_bytes: int = 0
    dedupe_calls: int = 0
    times_restored: int = 0
    seconds: float = 0.0
    #: files not used: missing, of another size or kind, not readable
    #: (ReshareSkipped); files the kernel would not dedupe into or from
    #: (DedupeRefused); files with bytes that differ from their source, and
    #: how many (BytesDiffer)
    warnings: Warnings = field(default_factory=Warnings)

    @property
    def skipped(self) -> list[ReshareSkipped]:
        return self.warnings.of(ReshareSkipped)

    @property
    def refused(self) -> list[DedupeRefused]:
        return self.warnings.of(DedupeRefused)

    @property
    def differing(self) -> list[BytesDiffer]:
        return self.warnings.of(BytesDiffer)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "warnings"}
        return {**d, **self.warnings.as_json(ReshareSkipped, DedupeRefused, BytesDiffer)}


class _Ext:
    """The plain extents of a file (those whose address locates bytes), as
    sorted lists: logical start, end, and physical - logical."""

    __slots__ = ("starts", "ends", "offs")

    def __init__(self, fd: int, size: int, where: str):
        d = data_ranges(extent_map(fd, size, where), size)
        d = d[~is_own(d["flags"], d["physical"])]
        self.starts = d["logical"].tolist()
        self.ends = (d["logical"] + d["length"]).tolist()
        self.offs = [p - lg for p, lg in zip(d["physical"].tolist(), self.starts)]


def shared_length(a: _Ext, s: int, b: _Ext, d: int, n: int) -> int:
    """Bytes of a's [s, s+n) that map the same physical bytes as b's [d, d+n)."""
    total = 0
    delta = d - s
    i = bisect_right(a.ends, s)
    while i < len(a.starts) and a.starts[i] < s + n:
        lo, hi = max(a.starts[i], s), min(a.ends[i], s + n)
        j = bisect_right(b.ends, lo + delta)
        while j < len(b.starts) and b.starts[j] < hi + delta:
            if b.offs[j] + delta == a.offs[i]:
                total += min(b.ends[j] - delta, hi) - max(b.starts[j] - delta, lo)
            j += 1
        i += 1
    return total


@dataclass(slots=True)
class _Open:
    entry: fmt.Entry
    fd: int
    st: os.stat_result  # when opened: the times to keep
    block: int
    where: str
    ext: _Ext | None = None
    dirty: bool = False  # deduped into since ext was taken
    refused: bool = False


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
        self.tree = Tree(dest)
        self.open: dict[int, _Open] = {}
        self.unusable: set[int] = set()  # entry ids skipped or refused for good
        self.reported: set[str] = set()
        self.differing: dict[str, int] = {}
        self.probed: dict[int, bool] = {}  # st_dev -> can dedupe
        self.window: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        self.pieces = 0
        self.entries: list[fmt.Entry] = []
        self.root_dev = 0
        self.what = "archive"
        self.hinted = False  # said where DEST must point

    # -- inputs ------------------------------------------------------------------

    def run_archive(self, f) -> ReshareSummary:
        """An archive or a sharing map (a binary file object, read front to back)."""
        stream = Stream(f, maps=True, decode=False, skip_data=True)
        return self._run(stream, _ArchivePlaces(self, stream))

    def run_manifest(self, manifest: bytes) -> ReshareSummary:
        """A repository snapshot's manifest: a BLOB range whose blob bytes an
        earlier range of the manifest holds shares with that range (the rule
        of archive/blobs.py's Coverage, by which a restore clones)."""
        self.what = "snapshot"
        stream = Stream(io.BytesIO(manifest), check_hashes=False)
        return self._run(stream, _ManifestPlaces(self))

    def entry(self, e: fmt.Entry) -> None:
        """An entry of the input: a regular file is counted; DEST checked."""
        self._top(e)
        if e.kind == fmt.K_REG:
            self.s.files += 1

    def _top(self, e: fmt.Entry) -> None:
        """Say once, at the first top-level name DEST lacks, where DEST must point."""
        if b"/" in e.path or self.tree.root is None or self.hinted:
            return
        try:
            os.lstat(e.path, dir_fd=self.tree.root)
        except FileNotFoundError:
            self.hinted = True
            name = os.fsdecode(e.path)
            self.warn(f"{self._where(e)} is missing: DEST must hold the {self.what}'s "
                      f"top-level names ({name}/...), as restore puts them")

    # -- the run -------------------------------------------------------------------

    def _run(self, stream: Stream, places: Handler) -> ReshareSummary:
        t0 = time.monotonic()
        fsinfo.forget()
        self.entries = stream.entries
        try:
            root = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"{self.dest}: no such directory") from None
        except NotADirectoryError:
            raise UsageError(f"{self.dest} is not a directory") from None
        self.tree.root = root
        self.root_dev = os.fstat(root).st_dev
        try:
            dispatch(places, stream.events())
            self._flush()
        finally:
            self._close_all()
            self.tree.close()
            os.close(root)
        s = self.s
        s.warnings += [BytesDiffer(p, n) for p, n in sorted(self.differing.items())]
        s.seconds = time.monotonic() - t0
        return s

    def place(self, sid: int, soff: int, did: int, doff: int, length: int) -> None:
        """B (``did`` at ``doff``) shares ``length`` bytes with A (``sid`` at ``soff``)."""
        s = self.s
        s.references += 1
        s.referenced_bytes += length
        if self.progress:
            self.progress.advance(length)
        opening = (sid not in self.open) + (did not in self.open and did != sid)
        if len(self.open) + opening > FILES or self.pieces >= WINDOW:
            self._flush()
        src, dst = self._file(sid), self._file(did)
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

    # -- files --------------------------------------------------------------------

    def _where(self, e: fmt.Entry) -> str:
        return self.tree.where(e.path)

    def _skip(self, e: fmt.Entry, reason: str) -> None:
        self.unusable.add(e.id)
        w = ReshareSkipped(self._where(e), reason)
        self.s.warnings.append(w)
        self.warn(str(w))

    def _refuse(self, f: _Open, err: int) -> None:
        """The kernel said no for this file (its other files go on)."""
        if err in _FINAL:
            f.refused = True
            self.unusable.add(f.entry.id)
        if f.where in self.reported:
            return
        self.reported.add(f.where)
        if err == errno.EPERM:
            why = ("dedupe not permitted: it needs root, the file's owner, or a user who may "
                   "write the file")
        elif err == errno.EXDEV:
            why = "on another filesystem than the file it shares with"
        elif err in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
            why = "its filesystem cannot dedupe"
        elif err == errno.EINVAL:
            why = "refused as an invalid range (did the file change since it was checked?)"
        else:
            why = os.strerror(err)
        w = DedupeRefused(f.where, why)
        self.s.warnings.append(w)
        self.warn(str(w))

    def _file(self, eid: int) -> _Open | None:
        f = self.open.get(eid)
        if f is not None:
            return f
        if eid in self.unusable:
            return None
        e = self.entries[eid]
        parent, _, name = e.path.rpartition(b"/")
        try:
            pfd = self.tree.dir(parent)
        except ArchiveError:
            self._skip(e, "a directory on its path is a symlink or not a directory")
            return None
        except OSError as ex:
            if ex.errno == errno.EIO:
                raise
            self._skip(e, "missing" if ex.errno == errno.ENOENT else
                       ex.strerror or str(ex))
            return None
        try:
            try:
                fd = os.open(name, _OPEN | os.O_NOATIME, dir_fd=pfd)
            except PermissionError:
                fd = os.open(name, _OPEN, dir_fd=pfd)
        except OSError as ex:
            if ex.errno == errno.EIO:
                raise OSError(ex.errno, ex.strerror, self._where(e)) from None
            self._skip(e, {errno.ENOENT: "missing",
                           errno.ELOOP: "a symlink, not a file"}.get(
                               ex.errno or 0, ex.strerror or str(ex)))
            return None
        ok = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._skip(e, "not a regular file")
                return None
            if st.st_size != e.size:
                self._skip(e, f"{st.st_size} bytes; the {self.what} says {e.size}")
                return None
            where = self._where(e)
            info = fsinfo.fs_info(fd, st.st_dev, where)
            if not self._can_dedupe(fd, st, info, where):
                self._skip(e, f"its filesystem ({info.type}) cannot dedupe")
                return None
            f = _Open(e, fd, st, info.block_size or 4096, where)
            self.open[eid] = f
            ok = True
            return f
        finally:
            if not ok:
                os.close(fd)

    def _can_dedupe(self, fd: int, st: os.stat_result, info: fsinfo.FsInfo,
                    where: str) -> bool:
        """Ask once per filesystem (docs/KERNEL.md D9); DEST's own filesystem
        answering no ends the run."""
        got = self.probed.get(st.st_dev)
        if got is None:
            try:
                ans = fsinfo.dedupe_support(fd, st.st_size, info.block_size or 4096)
            except OSError as ex:
                raise OSError(ex.errno, ex.strerror, where) from None
            if ans is None:
                return True  # an empty file cannot ask; it holds nothing to share
            got = self.probed[st.st_dev] = ans
            if not got and st.st_dev == self.root_dev:
                raise UsageError(f"{self.dest}: its filesystem ({info.type}) cannot dedupe "
                                 "(FIDEDUPERANGE is not supported); reshare works on Btrfs "
                                 "and on XFS made with reflink=1")
        return got

    def _ext(self, f: _Open, as_source: bool) -> _Ext:
        """The file's plain extents; a source deduped into since is mapped again."""
        if f.ext is None or (as_source and f.dirty):
            try:
                f.ext = _Ext(f.fd, f.entry.size, f.where)
            except OSError as ex:
                raise OSError(ex.errno, ex.strerror, f.where) from None
            f.dirty = False
        return f.ext

    def _close(self, f: _Open) -> None:
        try:
            now = os.fstat(f.fd)
            if (now.st_atime_ns, now.st_mtime_ns) != (f.st.st_atime_ns, f.st.st_mtime_ns):
                os.utime(f.fd, ns=(f.st.st_atime_ns, f.st.st_mtime_ns))
                self.s.times_restored += 1
        except OSError as ex:
            self.warn(f"{f.where}: times not checked or not set back: {ex.strerror}")
        finally:
            os.close(f.fd)

    def _close_all(self) -> None:
        while self.open:
            self._close(self.open.popitem()[1])

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
        self._close_all()

    def _readahead(self, sid: int, soff: int, n: int, dests: list[tuple[int, int]]) -> None:
        """Start reading the pages a call will compare (the kernel reads them
        one at a time, without readahead, when it compares)."""
        if self.dry_run:
            return
        for eid, off in [(sid, soff), *dests]:
            f = self.open.get(eid)
            if f is not None and not f.refused:
                try:
                    os.posix_fadvise(f.fd, off, n, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass

    def _dedupe(self, sid: int, soff: int, n: int, dests: list[tuple[int, int]]) -> None:
        s = self.s
        src = self.open.get(sid)
        if src is None or src.refused:
            s.skipped_bytes += n * len(dests)
            return
        todo: list[tuple[_Open, int, int]] = []
        for did, doff in dests:
            dst = self.open.get(did)
            if dst is None or dst.refused:
                s.skipped_bytes += n
                continue
            pre = shared_length(self._ext(src, True), soff, self._ext(dst, False), doff, n)
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

    def _call(self, src: _Open, soff: int, n: int, batch: list[tuple[_Open, int, int]]
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
            self._refuse(src, ex.errno or errno.EIO)
            src.refused = True
            self.unusable.add(src.entry.id)
            s.skipped_bytes += sum(n - pre for _, _, pre in batch)
            return
        s.dedupe_calls += 1
        differ: list[tuple[_Open, int, int]] = []
        for (dst, doff, pre), r in zip(batch, got):
            if r.status == native.DEDUPE_SAME and r.bytes_deduped >= n:
                s.shared_bytes += n - pre
                s.already_shared_bytes += pre
                dst.dirty = True
            elif r.status == native.DEDUPE_DIFFERS:
                differ.append((dst, doff, pre))
            elif r.status == native.DEDUPE_SAME:  # the kernel stopped short
                s.shared_bytes += max(r.bytes_deduped - pre, 0)
                s.skipped_bytes += n - max(r.bytes_deduped, pre)
                s.already_shared_bytes += pre
                dst.dirty = True
            else:
                self._refuse(dst, -r.status)
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
                pre = shared_length(self._ext(src, True), soff + off, self._ext(dst, False),
                                    doff + off, m)
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
            self.rs.what = "sharing map"
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
