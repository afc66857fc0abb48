"""Restore: read events -> create entries -> write data, clone references ->
verify -> apply metadata -> rename into place (in batches, after a syncfs).

One method per event type (archive/events.py), as ``btrfs receive`` has one
callback per command.  The pieces it drives: ``Tree`` (directory
descriptors beneath DEST), ``Placer`` (renames only for data on disk),
``Cloner`` (clone or copy), ``Meta`` (owner, mode, xattrs, times) and the
thin base (restore/base.py).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloneaware.restore.partial as partial
from cloneaware import fsinfo, native
from cloneaware.archive import format as fmt
from cloneaware.archive.events import (
    BaseRefEvent,
    BlobEvent,
    DataEvent,
    EndEvent,
    EntryEvent,
    ExternalEvent,
    FileState,
    FooterEvent,
    RefEvent,
    StatEvent,
)
from cloneaware.archive.manifest import open_manifest
from cloneaware.archive.reader import Stream, open_archive, read_index
from cloneaware.errors import ArchiveError, SharingMapGiven, UsageError
from cloneaware.fsinfo import errno_reason
from cloneaware.restore.base import open_base, verify_ranges
from cloneaware.restore.cloner import Cloner, Counts
from cloneaware.restore.durable import Placer
from cloneaware.restore.meta import Meta
from cloneaware.restore.select import STAGING, Selection
from cloneaware.restore.subvol import Subvolumes
from cloneaware.restore.tree import FdCache, Tree, remove_stale_temps, remove_tree, temp_name
from cloneaware.safeio import DIR_FLAGS, pid_alive

#: --reshare-existing compares what it cloned from the old copy in slices of
#: this size, and writes the slices that differ
REUSE_SLICE = 64 << 10


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
    hole_bytes: int = 0
    seconds: float = 0.0
    copy_reasons: dict[str, int] = field(default_factory=dict)
    owners_skipped: bool = False
    not_exact: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**self.__dict__, "seconds": round(self.seconds, 3)}


@dataclass(slots=True)
class _Open:
    """The regular file being written: its descriptor and temporary name."""

    entry: fmt.Entry
    fd: int
    pfd: int
    tmp: bytes
    where: str
    filled_at_start: int
    dirty_at_start: int  # bytes written or copied before it: writeback to wait for
    #: --reshare-existing: the file already at this name, and its size
    old_fd: int | None = None
    old_size: int = 0


class Restore:
    """``base``: where the base of a thin archive is on this host.
    ``trust_base``: do not hash the bytes cloned from the base (faster; a
    base changed since the backup then goes unnoticed).  ``open_dest``:
    returns a descriptor of DEST, created if missing (cloneaware serve opens
    it beneath its allowed root); default: by path.  ``reshare_existing``:
    DEST holds an older copy of the tree (implies ``force``); stored bytes
    are cloned from the file already at an entry's name and read back, and
    written only where they differ, so identical data is not written again
    (see ``_put``).  ``listed``: called with each entry's path below DEST
    as it is made (-v)."""

    #: a file left out by --include whose bytes restored files share is
    #: restored, staged, to clone from (a repository serves them itself, and
    #: says itself when --include leaves nothing of its snapshots)
    stage_referenced = True

    def __init__(self, archive, dest: str, force: bool = False, progress=None, warn=None,
                 base: str | None = None, trust_base: bool = False, open_dest=None,
                 reshare_existing: bool = False, select: Selection | None = None,
                 listed: Callable[[bytes], None] | None = None):
        self.archive = archive
        #: -v: called with the path below DEST of each entry as it is made
        self.listed = listed or (lambda path: None)
        self.dest = dest
        self.open_dest = open_dest
        self.reshare_existing = reshare_existing
        force = force or reshare_existing
        self.force = force
        self.reuse_off: str | None = None  # why cloning from old copies stopped
        self.base = base
        self.trust_base = trust_base
        self.progress = progress
        self.warn = warn or (lambda msg: None)
        self.s = RestoreSummary()
        self.counts = Counts(copy_reasons=self.s.copy_reasons)
        self.tree = Tree(dest)
        self.placer = Placer(self.tree, force)
        self.cloner = Cloner(self.counts)
        self.meta = Meta(self._not_exact, self.warn)
        self.srcs = FdCache(256)  # entry id -> descriptor of a restored file
        self.base_fds: dict[int, int] = {}
        self.external_fd: int | None = None
        #: why DEST does not take encoded writes (None: try them)
        self.no_encoded: str | None = None
        self.dir_meta: list[fmt.Entry] = []
        #: directory path -> the flags that its new children inherit (C, c, m
        #: set on it first); entries that get i or a at the very end
        self.dir_first: dict[bytes, int] = {}
        self.last_flags: list[fmt.Entry] = []
        self.subvols = Subvolumes(self.tree, self._not_exact)
        #: restore --include and --strip-components (restore/select.py): the
        #: directories seen but not made (yet), the files restored only to be
        #: cloned or linked from, in the staging directory, and those to stage
        self.select = select or Selection()
        self.unmade_dirs: dict[bytes, fmt.Entry] = {}
        self.staging: bytes | None = None
        self.staged: set[int] = set()
        self.stage_ids: set[int] = set()
        self.skipping = False
        self.took_any = False
        #: top-level entries a failed restore left in DEST (restore/partial.py),
        #: gone over as --force would; those this run made
        self.leftover: set[bytes] = set()
        self.top_seen: set[bytes] = set()
        self.partial: partial.Partial | None = None
        self.placer.replaces = self._replaces
        self.cur: _Open | None = None
        self.stream: Stream | None = None
        self._handlers: dict[type, Callable[[Any], None]] = {
            EntryEvent: self.on_entry, DataEvent: self.on_data, RefEvent: self.on_ref,
            BaseRefEvent: self.on_baseref, ExternalEvent: self.on_external,
            BlobEvent: self.on_blob, StatEvent: self.on_stat,
            EndEvent: self.on_end, FooterEvent: self.on_footer,
        }

    # -- run -------------------------------------------------------------------

    def run(self) -> RestoreSummary:
        t0 = time.monotonic()
        if self.open_dest is None:
            check_dest(self.dest)
        # a file object: read it, do not close it
        path: str | None = self.archive if isinstance(self.archive, str) else None
        sparse = open_manifest(path) if path not in (None, "-") else None
        if path is None:
            f = self.archive
        elif sparse is not None:
            f, self.external_fd = sparse
        else:
            f = open_archive(path)
        try:
            if path not in (None, "-"):
                self._precheck(f)
            elif self.select and f.seekable():  # a repository's manifest
                self._plan_selection(f)
            try:
                self.stream = Stream(f, reuse_buffers=True)
                try:
                    for ev in self.stream.events():
                        self._handlers[type(ev)](ev)
                except SharingMapGiven:
                    raise SharingMapGiven(path if path not in (None, "-") else None) \
                        from None
                if self.select and not self.took_any and self.stage_referenced:
                    raise UsageError(f"{self.select.what()} leaves nothing of the archive "
                                     "to restore")
                self.placer.flush()
                if self.partial is not None:
                    # the leftovers this run went over are whole now
                    self.partial.done(self.leftover - self.top_seen)
                self.subvols.prune()
                self._dir_metadata()
                self._last_flags()
                self.subvols.make_readonly()
                if self.tree.root is not None:
                    native.syncfs(self.tree.root, "syncfs")
            except BaseException:
                self.placer.salvage()
                self._leave_partial()
                raise
            finally:
                self._cleanup()
        finally:
            if path not in (None, "-"):
                f.close()
            for fd in [*self.base_fds.values(), self.external_fd, self.tree.root]:
                if fd is not None:
                    os.close(fd)
        s = self.s
        s.written_bytes = self.counts.written_bytes
        s.reflinked_bytes = self.counts.reflinked_bytes
        s.copied_bytes = self.counts.copied_bytes
        s.reused_bytes = self.counts.reused_bytes
        s.owners_skipped = self.meta.owners_skipped
        s.subvolumes = self.subvols.count
        s.seconds = time.monotonic() - t0
        return s

    def _precheck(self, f) -> None:
        """On a seekable archive, refuse before writing anything if a
        top-level entry already exists in DEST."""
        try:
            if not f.seekable():
                return
            listing = read_index(f)
            if listing.is_map:
                raise SharingMapGiven(self.archive)
            items = listing.items
            if self.progress:  # what the bar counts: every byte put in a file
                ft = listing.footer
                self.progress.set_total(ft.stored_bytes + ft.ref_bytes + ft.base_ref_bytes)
            if listing.base is not None:
                self.base_fds = open_base(listing.base, self.base)
        except (ArchiveError, OSError):
            return  # the full read will report it with the offset
        finally:
            try:
                f.seek(0)
            except OSError:
                pass
        tops = {it.path for it in items if b"/" not in it.path}
        if self.select:
            tops = self._plan_selection(f)
            if not tops:
                raise UsageError(f"{self.select.what()} leaves nothing of the archive to "
                                 "restore")
        if self.force:
            return
        left = partial.read(dest=self.dest)
        for top in sorted(tops - left):
            if os.path.lexists(os.path.join(os.fsencode(self.dest), top)):
                raise UsageError(f"{self.tree.where(top)} exists; "
                                 "use --force to overwrite it")

    def _plan_selection(self, f) -> set[bytes]:
        """--include and --strip-components on a seekable archive: read its
        entries (no data) to know what is made at the top of DEST and which
        files left out a restored hard link needs."""
        from cloneaware.listing import read_contents
        from cloneaware.restore.select import plan

        try:
            rows = read_contents(f, full=True).rows
        except (ArchiveError, OSError):
            return set()  # the full read will report it with the offset
        finally:
            f.seek(0)
        got = plan(self.select, [r.entry for r in rows if r.entry])
        self.stage_ids = got.stage
        return got.tops

    def _open_dest(self) -> None:
        """Create DEST only when there is something to restore into it."""
        if self.open_dest is not None:
            root = self.open_dest()
        else:
            try:
                os.makedirs(self.dest, exist_ok=True)
                root = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except (FileExistsError, NotADirectoryError):
                raise UsageError(f"{self.dest}: not a directory (or a component of it is "
                                 "not)") from None
            except OSError as e:
                raise OSError(e.errno, e.strerror, self.dest) from None
        self.tree.root = root
        self.placer.note_fs(root)
        self.leftover = partial.read(root)
        self.partial = partial.Partial(root, self.leftover)
        if self.force or self.leftover:
            remove_stale_temps(root, self.dest, self.warn)
        for n in os.listdir(root):  # staging directories of killed restores
            m = STAGING.match(os.fsencode(n))
            if m and not pid_alive(int(m.group(1))):
                remove_tree(root, os.fsencode(n))
        magic, block = native.fstatfs(root, self.dest)
        self.cloner.block = block or 4096
        if magic != fsinfo.BTRFS_MAGIC:
            self.no_encoded = "not Btrfs"

    def _cleanup(self) -> None:
        if self.cur is not None:
            if self.cur.old_fd is not None:
                os.close(self.cur.old_fd)
            os.close(self.cur.fd)
            try:
                os.unlink(self.cur.tmp, dir_fd=self.cur.pfd)
            except OSError:
                pass
            self.cur = None
        self.srcs.close()
        if self.staging is not None and self.tree.root is not None:
            try:  # the files staged for --include: cloned and linked from, not kept
                remove_tree(self.tree.root, self.staging)
            except OSError:
                pass
        self.tree.close()
        self.placer.close()
        if self.partial is not None:
            self.partial.close()

    def _named(self, ex: OSError, path: bytes) -> OSError:
        """``ex`` naming the entry as the user knows it (DEST/path), not by
        a temporary name or a bare component (defect 10 of issue 21)."""
        if isinstance(ex.filename, str) and (ex.filename == self.dest or ex.filename.startswith(
                os.path.join(self.dest, ""))):
            return ex
        return OSError(ex.errno, ex.strerror, self.tree.where(path))

    def _not_exact(self, e: fmt.Entry, why: str) -> None:
        self.s.not_exact.append((os.fsdecode(e.path), why))
        self.warn(f"{self.tree.where(e.path)}: {why}")

    # -- events ------------------------------------------------------------------

    def on_entry(self, ev: EntryEvent) -> None:
        e = ev.entry
        if self.tree.root is None:
            assert self.stream is not None
            base = self.stream.base
            if base is not None and not self.base_fds:
                self.base_fds = open_base(base, self.base)
            elif base is None and self.base is not None:
                self.warn("--base given, but this archive is not a thin backup")
            self._open_dest()
        if self.select:
            to = self.select.mapped(e.path) if self.select.take(e.path, e.kind) else None
            if to is None:
                self._not_taken(e)
                return
            self.took_any = True
            if e.kind == fmt.K_HARDLINK and e.link not in self.placer.placed:
                # its file was left out and not staged: only a seekable
                # archive says beforehand which files a chosen link needs
                self.s.left_out += 1
                self._not_exact(e, "not restored: the file it is a hard link to was left "
                                "out (from a pipe; restore from the archive file to get it)")
                return
            self._make_ancestors(e.path)
            if to != e.path:
                e = dataclasses.replace(e, path=to)
        self._make(e)

    def _not_taken(self, e: fmt.Entry) -> None:
        """An entry restore --include or --strip-components leaves out: a
        directory is remembered (it is made if something below it is); a file
        that restored files may share with or link to is staged."""
        self.s.left_out += 1
        if e.kind == fmt.K_DIR:
            self.unmade_dirs[e.path] = e
        elif e.kind == fmt.K_REG:
            if (e.eflags & fmt.EF_REFERENCED and self.stage_referenced) \
                    or e.id in self.stage_ids:
                self._stage(e)
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

    def _stage(self, e: fmt.Entry) -> None:
        assert self.tree.root is not None
        if self.staging is None:
            name = b".cloneaware-staging-%d-%s" % (os.getpid(), secrets.token_hex(4).encode())
            os.mkdir(name, 0o700, dir_fd=self.tree.root)
            self.staging = name
        self.staged.add(e.id)
        staged = dataclasses.replace(e, path=self.staging + b"/%d" % e.id, iflags=e.iflags
                                     & ~fmt.IFLAGS_LAST)
        self._open_file(staged, self.tree.dir(self.staging))

    def _make(self, e: fmt.Entry) -> None:
        parent, _, name = e.path.rpartition(b"/")
        self.subvols.note(e.path)
        new_top = False
        if not parent:
            self.top_seen.add(e.path)
            assert self.tree.root is not None
            new_top = not _lexists(self.tree.root, name)
        try:
            pfd = self.tree.dir(parent)
            if self.subvols.snapshots and self.subvols.inside_snapshot(e.path) is not None:
                self.subvols.clear_for(pfd, name, e.kind)
            if e.kind == fmt.K_DIR:
                self._mkdir(e, pfd, name)
            elif e.kind == fmt.K_REG:
                self._open_file(e, pfd)
            elif e.kind == fmt.K_HARDLINK:
                self._hardlink(e, parent, pfd, name)
            else:
                self._special(e, pfd, name)
        except OSError as ex:
            raise self._named(ex, e.path) from None
        if new_top:
            self._made_top(name)
        self.listed(e.path)

    def on_data(self, ev: DataEvent) -> None:
        if self.skipping:
            return
        cur = self._current()
        x = ev.extent
        if x is not None and self.no_encoded is None and self._encoded_write(cur, ev, x):
            pass
        else:
            self._put(cur, ev.data, ev.offset)
        self._advance(len(ev.data))

    def _advance(self, n: int) -> None:
        if self.progress:
            self.progress.advance(n)

    def _encoded_write(self, cur: _Open, ev: DataEvent, x: fmt.BtrfsExtent) -> bool:
        """Write a Btrfs extent as it was stored: the same compressed bytes,
        the same window, nothing compressed again (its bytes were checked
        against the record's SHA-256 when it was read).  False where the
        kernel will not (no CAP_SYS_ADMIN, a nodatasum file, an unaligned
        range): the caller writes the bytes plainly."""
        try:
            native.btrfs_encoded_write(cur.fd, ev.offset, x.data, len(ev.data),
                                       x.unencoded_len, x.unencoded_offset, x.compression,
                                       cur.where)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS):
                self.no_encoded = os.strerror(e.errno)  # not for the rest of the run
                return False
            if e.errno == errno.EINVAL:
                return False
            raise
        self.counts.written_bytes += len(ev.data)
        self.s.encoded_written_bytes += len(ev.data)
        return True

    def _put(self, cur: _Open, data, off: int) -> None:
        """Stored bytes (checked against their SHA-256 by the reader) at
        ``off``.  With --reshare-existing, the range is first cloned from the
        file already at this name, then read back from the new file and
        compared (clone, then verify: the old copy may be written meanwhile,
        the new file is ours); only a range that differs is written.  Offsets
        and lengths the kernel would not clone (docs/KERNEL.md C1-C3) are
        written."""
        n = len(data)
        if cur.old_fd is not None and self.reuse_off is None and n \
                and off + n <= cur.old_size:
            bs = self.cloner.block
            end = off + n
            clen = n if (n % bs == 0 or end == cur.old_size == cur.entry.size) \
                else n - n % bs
            if off % bs == 0 and clen > 0:
                try:
                    native.ficlonerange(cur.fd, cur.old_fd, off, clen, off, cur.where)
                except OSError as ex:
                    if ex.errno not in native.NOT_SUPPORTED:
                        raise
                    if ex.errno != errno.EINVAL:
                        self.reuse_off = errno_reason(ex.errno)
                        self.warn(f"{self.dest}: not reusing the files already there: "
                                  f"{self.reuse_off}")
                    clen = 0
                if clen:
                    mv = memoryview(data)
                    got = memoryview(_pread_all(cur.fd, clen, off, cur.where))
                    # compared in slices: a chunk of 4 MiB with one edited block
                    # costs that block, not the chunk
                    for lo in range(0, clen, REUSE_SLICE):
                        hi = min(lo + REUSE_SLICE, clen)
                        if got[lo:hi] == mv[lo:hi]:
                            self.counts.reused_bytes += hi - lo
                        else:
                            self.s.reuse_differing_bytes += hi - lo
                            self.cloner.write(cur.fd, mv[lo:hi], off + lo, cur.where)
                    if clen < n:
                        self.cloner.write(cur.fd, mv[clen:], off + clen, cur.where)
                    return
        self.cloner.write(cur.fd, data, off, cur.where)

    def on_ref(self, ev: RefEvent) -> None:
        if self.skipping:
            return
        cur = self._current()
        src = ev.source
        sfd = cur.fd if src.id == cur.entry.id else self._src_fd(src)
        self.cloner.clone_or_copy(cur.fd, sfd, ev.source_offset, ev.length, ev.offset,
                                  src.size, cur.entry.size, cur.where, "archive")
        self._advance(ev.length)

    def on_baseref(self, ev: BaseRefEvent) -> None:
        if self.skipping:
            return
        cur = self._current()
        self.cloner.clone_or_copy(cur.fd, self.base_fds[ev.base_file.number], ev.base_offset,
                                  ev.length, ev.offset, ev.base_file.size, cur.entry.size,
                                  cur.where, "base")
        self.s.base_bytes += ev.length
        self._advance(ev.length)

    def on_external(self, ev: ExternalEvent) -> None:
        if self.skipping:
            return
        cur = self._current()
        if self.external_fd is None:
            raise ArchiveError("EXTERNAL record in an archive that is not a "
                               "sparse thin backup", ev.record)
        size = os.fstat(self.external_fd).st_size
        self.cloner.clone_or_copy(cur.fd, self.external_fd, ev.offset, ev.length, ev.offset,
                                  size, cur.entry.size, cur.where, "sparse")
        self._advance(ev.length)

    def on_blob(self, ev: BlobEvent) -> None:
        """A plain archive has no repository to take blobs from (the
        repository's restore overrides this)."""
        raise ArchiveError("BLOB record in an archive file: only a repository's snapshot "
                           "manifest may hold them", ev.record)

    def on_stat(self, ev: StatEvent) -> None:
        pass

    def on_end(self, ev: EndEvent) -> None:
        if self.skipping:
            self.skipping = False
            return
        self._verify(ev.file)
        self._finish_file()

    def on_footer(self, ev: FooterEvent) -> None:
        pass

    # -- entries -----------------------------------------------------------------

    def _replaces(self, path: bytes) -> bool:
        """May ``path`` replace what is there without --force?"""
        return path.partition(b"/")[0] in self.leftover or \
            self.subvols.inside_snapshot(path) is not None

    def _made_top(self, name: bytes) -> None:
        """A top-level entry made by this run: listed while it runs."""
        if self.partial is not None:
            self.partial.add(name)

    def _leave_partial(self) -> None:
        """The run failed: list the top-level entries it made (with those a
        run before it left), so that a plain retry can go on over them."""
        root = self.tree.root
        if root is None or self.partial is None:
            return
        try:
            made = {n for n in self.partial.names if _lexists(root, n)}
        except OSError:
            made = self.partial.names
        self.partial.keep(made)

    def _path_of(self, eid: int) -> bytes:
        assert self.stream is not None
        return self.stream.entries[eid].path

    def _current(self) -> _Open:
        assert self.cur is not None
        return self.cur

    def _mkdir(self, e: fmt.Entry, pfd: int, name: bytes) -> None:
        full = self.tree.where(e.path)
        try:
            if not (e.subvol and self.subvols.make(e, pfd, name, self._path_of)):
                os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            # in a subvolume restored as a snapshot: a directory of its origin, merged into
            if self.subvols.inside_snapshot(e.path) is None:
                if not (self.force or self._replaces(e.path)):
                    raise UsageError(f"{full} exists; use --force to merge into it") from None
                try:
                    dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
                except OSError:
                    raise UsageError(f"{full} exists and is not a directory") from None
                try:
                    remove_stale_temps(dfd, full, self.warn)
                finally:
                    os.close(dfd)
        parent = e.path.rpartition(b"/")[0]
        inherited = self.dir_first.get(parent, 0)
        if e.iflags & fmt.IFLAGS_FIRST or inherited:
            dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:  # before its children are made: they inherit them
                got = self.meta.iflags.set(dfd, e, fmt.IFLAGS_FIRST, inherited & ~e.iflags)
            finally:
                os.close(dfd)
            if got & fmt.IFLAGS_FIRST:
                self.dir_first[e.path] = got & fmt.IFLAGS_FIRST
        if e.iflags & fmt.IFLAGS_LAST:
            self.last_flags.append(e)
        self.dir_meta.append(e)
        self.s.dirs += 1

    def _open_file(self, e: fmt.Entry, pfd: int) -> None:
        self.placer.note_fs(pfd)
        tmp = temp_name(e.id)
        where = self.tree.where(e.path)
        # O_NOATIME: later copies read from this file, after its times are set
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NOATIME, 0o600, dir_fd=pfd)
        self.cur = _Open(e, fd, pfd, tmp, where, self.counts.filled(), self._dirty())
        inherited = self.dir_first.get(e.path.rpartition(b"/")[0], 0)
        if e.iflags & fmt.IFLAGS_FIRST or inherited:
            # before the file holds data: Btrfs takes C only on an empty file
            self.meta.iflags.set(fd, e, fmt.IFLAGS_FIRST, inherited & ~e.iflags)
        if e.iflags & fmt.IFLAGS_LAST and e.id not in self.staged:
            self.last_flags.append(e)
        try:
            os.ftruncate(fd, e.size)
        except OSError as ex:
            raise OSError(ex.errno, ex.strerror, where) from None
        if self.reshare_existing and self.reuse_off is None:
            self._open_old(self.cur, pfd, e.path.rpartition(b"/")[2])

    def _open_old(self, cur: _Open, pfd: int, name: bytes) -> None:
        """The regular file already at ``name``, if any, to clone from."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                fd = os.open(name, flags | os.O_NOATIME, dir_fd=pfd)
            except PermissionError:
                fd = os.open(name, flags, dir_fd=pfd)
        except OSError:
            return  # nothing there, or nothing this user may read: restored as usual
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not st.st_size:
            os.close(fd)
            return
        cur.old_fd, cur.old_size = fd, st.st_size

    def _hardlink(self, e: fmt.Entry, parent: bytes, pfd: int, name: bytes) -> None:
        tmp = temp_name(e.id)
        tparent, tname = self.placer.placed[e.link]
        tfd = self.tree.dir(tparent)
        pfd = self.tree.dir(parent)
        os.link(tname, tmp, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        if e.link in self.placer.pending_ids or e.link in self.staged:  # not on disk yet
            self.placer.defer(parent, tmp, name, e.path, e.id, 0)
        else:
            try:
                self.placer.place(pfd, tmp, name, e.path)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except OSError:
                    pass
                raise
            self.placer.placed[e.id] = (parent, name)
        self.s.hardlinks += 1

    def _special(self, e: fmt.Entry, pfd: int, name: bytes) -> None:
        tmp = temp_name(e.id)
        if e.kind == fmt.K_SYMLINK:
            os.symlink(e.target, tmp, dir_fd=pfd)
            self.s.symlinks += 1
        else:
            ftype = {fmt.K_FIFO: stat.S_IFIFO, fmt.K_CHR: stat.S_IFCHR,
                     fmt.K_BLK: stat.S_IFBLK}[e.kind]
            try:
                os.mknod(tmp, ftype | 0o600, e.rdev, dir_fd=pfd)
            except PermissionError:
                self._not_exact(e, "creating device nodes needs root")
                return
            self.s.specials += 1
        try:
            self.meta.apply(e, None, pfd, tmp)
            self.placer.place(pfd, tmp, name, e.path)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=pfd)
            except OSError:
                pass
            raise

    # -- data ----------------------------------------------------------------------

    def _src_fd(self, src: fmt.Entry) -> int:
        fd = self.srcs.get(src.id)
        if fd is not None:
            return fd
        parent, name = self.placer.placed[src.id]
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:  # reading must not change the atime we restored
                fd = os.open(name, flags | os.O_NOATIME, dir_fd=self.tree.dir(parent))
            except PermissionError:
                fd = os.open(name, flags, dir_fd=self.tree.dir(parent))
        except OSError as ex:
            raise self._named(ex, src.path) from None
        self.srcs.put(src.id, fd)
        return fd

    def _verify(self, st: FileState) -> None:
        """Hash the bytes now in the restored file where they came from the
        base (unless --trust-base) or the sparse file, and compare."""
        ranges = [] if self.trust_base else list(st.base_ranges)
        ranges += st.external_ranges
        if ranges:
            cur = self._current()
            self.s.verified_bytes += verify_ranges(cur.fd, ranges, cur.where)

    def _finish_file(self) -> None:
        cur = self._current()
        e = cur.entry
        parent, _, name = e.path.rpartition(b"/")
        self.meta.apply(e, cur.fd, cur.pfd, cur.tmp)
        self.cur = None
        if cur.old_fd is not None:
            os.close(cur.old_fd)
        if e.id in self.staged:  # only to clone or link from: kept open, unnamed
            self.srcs.put(e.id, cur.fd)
            self.placer.placed[e.id] = (parent, cur.tmp)
            return
        if e.eflags & fmt.EF_REFERENCED:
            self.srcs.put(e.id, cur.fd)
        else:
            os.close(cur.fd)
        s = self.s
        s.files += 1
        s.logical_bytes += e.size
        s.hole_bytes += e.size - (self.counts.filled() - cur.filled_at_start)
        # a batch is counted in bytes that wait for writeback: reflinked
        # ranges have none, and a syncfs per GiB of clones is a commit for naught
        self.placer.defer(parent, cur.tmp, name, e.path, e.id,
                          self._dirty() - cur.dirty_at_start)

    def _dirty(self) -> int:
        return self.counts.written_bytes + self.counts.copied_bytes

    # -- metadata ------------------------------------------------------------------

    def _dir_metadata(self) -> None:
        for e in reversed(self.dir_meta):  # children before parents
            parent, _, name = e.path.rpartition(b"/")
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=self.tree.dir(parent))
            except OSError as ex:
                raise self._named(ex, e.path) from None
            try:
                self.meta.apply(e, fd, self.tree.dir(parent), name)
            finally:
                os.close(fd)


    def _last_flags(self) -> None:
        """i and a, after everything else: nothing can be written, renamed,
        linked or given times once they are set."""
        for e in self.last_flags:
            parent, _, name = e.path.rpartition(b"/")
            if e.kind == fmt.K_REG:
                if e.id not in self.placer.placed:
                    continue  # not restored (its data failed, or it was left out)
                parent, name = self.placer.placed[e.id]
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC \
                | (os.O_DIRECTORY if e.kind == fmt.K_DIR else 0)
            try:
                fd = os.open(name, flags, dir_fd=self.tree.dir(parent))
            except OSError as ex:
                raise self._named(ex, e.path) from None
            try:
                self.meta.iflags.set(fd, e, fmt.IFLAGS_LAST)
            finally:
                os.close(fd)


def _pread_all(fd: int, n: int, off: int, where: str) -> bytes:
    out = []
    while n > 0:
        try:
            b = os.pread(fd, n, off)
        except OSError as e:
            raise OSError(e.errno, e.strerror, where) from None
        if not b:
            break
        out.append(b)
        n -= len(b)
        off += len(b)
    return b"".join(out)


def _lexists(dfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def check_dest(dest: str) -> None:
    """Refuse a DEST that cannot be one before anything is read: an empty
    path, or something that is not a directory."""
    if not dest:
        raise UsageError("an empty path was given as DEST")
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise UsageError(f"{dest}: exists and is not a directory")


def restore(archive, dest: str, **kw) -> RestoreSummary:
    return Restore(archive, dest, **kw).run()
