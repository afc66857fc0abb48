"""The restore's output into a directory: entries made beneath DEST
through directory descriptors (restore/tree.py), each file under a
temporary name until it is complete, verified and on disk
(restore/durable.py), its bytes written or cloned (restore/filedata.py),
metadata applied children before parents (restore/meta.py), Btrfs
subvolumes made again (restore/subvol.py), and what a failed run made kept
for a retry (restore/partial.py)."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import cloneaware.restore.partial as partial
from cloneaware import fsinfo, native
from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.blobs import Place
from cloneaware.archive.events import FileState
from cloneaware.errors import ArchiveError, Damaged, NotExact, UsageError
from cloneaware.restore.base import BaseFiles, open_base
from cloneaware.restore.beside import BesideFiles, ShareIndex
from cloneaware.restore.cloner import Counts
from cloneaware.restore.durable import Placer
from cloneaware.restore.entries import Entries
from cloneaware.restore.filedata import FileData, OpenFile
from cloneaware.restore.fresh import FreshDirs
from cloneaware.restore.meta import Meta
from cloneaware.restore.output import RestoreSummary
from cloneaware.restore.select import STAGING
from cloneaware.restore.smallfiles import Holder
from cloneaware.restore.subvol import Subvolumes
from cloneaware.restore.tree import FdCache, Tree, remove_stale_temps, stale_dir
from cloneaware.safeio import lexists, open_beneath, pid_alive, remove_tree

if TYPE_CHECKING:
    from cloneaware.bookends import Bookends


class Places:
    """The outputs of the manifests restored in one run, so that a blob
    range can be cloned from wherever it was written first, in whichever
    snapshot (archive/blobs.py ``Place``)."""

    #: files of manifests restored earlier in the run kept open, the last
    #: used: a later snapshot of a tree clones nearly every file from an
    #: earlier one's, and kept open they all were, two snapshots of more
    #: than ~1,000 files stopped at the descriptors a process may hold
    DONE_FDS = 64

    def __init__(self) -> None:
        self.outputs: list[DirectoryOutput] = []
        self.done_fds = FdCache(self.DONE_FDS)

    def source(self, place: Place, asking: DirectoryOutput) -> tuple[int, int]:
        """A descriptor and the size of the file that holds ``place``,
        for the caller's use now (a batch keeps a dup of its own)."""
        out = self.outputs[place.owner]
        if out is asking:
            return out.source_fd(place.entry)
        key = (place.owner, place.entry)
        fd = self.done_fds.get(key)
        if fd is None:  # a file of a manifest restored earlier in this run, in place now
            fd = out.reopen(place.entry)
            self.done_fds.put(key, fd)
        return fd, out.entries[place.entry].size

    def close(self) -> None:
        self.done_fds.close()


class DirectoryOutput:
    """Make the entries in DEST.  ``base``: where the base of a thin
    archive is on this host; ``trust_base``: do not hash the bytes cloned
    from it.  ``open_dest``: returns a descriptor of DEST, created if missing
    (``cloneaware serve`` opens it beneath its allowed root); default: by
    path; ``open_base_at`` the same for --base.  ``reshare_existing``: DEST
    holds an older copy of the tree (implies ``force``).  ``external_fd``:
    the sparse file of a sparse thin backup.  ``places``: shared by the
    manifests restored together.  ``share``: --share-with's files
    (restore/beside.py)."""

    def __init__(self, dest: str, summary: RestoreSummary | None = None,
                 force: bool = False, warn: Callable[[str], None] | None = None,
                 base: str | None = None, trust_base: bool = False, open_dest=None,
                 reshare_existing: bool = False, external_fd: int | None = None,
                 places: Places | None = None, open_base_at=None,
                 share: ShareIndex | None = None):
        self.s = summary if summary is not None else RestoreSummary()
        self.dest = dest
        self.warn = warn or (lambda msg: None)
        self.force = force or reshare_existing
        self.base = base
        self.trust_base = trust_base
        self.open_dest = open_dest
        self.open_base_at = open_base_at  # opens --base (serve: beneath its root)
        self.external_fd = external_fd
        self.base_files: BaseFiles | None = None
        self.counts = Counts(copy_reasons=self.s.copy_reasons)
        self.tree = Tree(dest)
        self.placer = Placer(self.tree, self.force, dirty=lambda: self.data.dirty())
        self.fresh = FreshDirs(self.tree, self.placer)
        self.data = FileData(self.counts, self.warn, dest, reshare_existing, share)
        self.beside = BesideFiles()  # the snapshot's own files already in DEST
        self.meta = Meta(self.not_exact, self.warn)
        self.subvols = Subvolumes(self.tree, self.not_exact)
        self.entries: list[fmt.Entry] = []
        self.made_here = Entries(self)
        self.srcs = FdCache(256)  # entry id -> descriptor of a restored file
        self.cur: OpenFile | None = None
        #: small files made in batches (restore/smallfiles.py)
        self.small = Holder(self)
        self.staging: bytes | None = None
        self.staged: set[int] = set()
        #: entries not restored: bytes of theirs could not be had (Damaged)
        self.damaged_ids: set[int] = set()
        #: top-level entries a failed restore left in DEST (restore/partial.py),
        #: gone over as --force would; those this run made
        self.leftover: set[bytes] = set()
        self.top_seen: set[bytes] = set()
        self.partial: partial.Partial | None = None
        self.placer.replaces = self._replaces
        self.places = places if places is not None else Places()
        self.places.outputs.append(self)
        #: --reshare-existing: the old copies' extents left referenced in part
        self.bookends: Bookends | None = None
        if reshare_existing:  # numpy and the extent tree: only when asked for
            from cloneaware.bookends import BookendCounts, Bookends
            self.bookends = Bookends(BookendCounts(), self.warn)
        self.fs_type = ""

    # -- the run ----------------------------------------------------------------------

    def use_base(self, base: thin.Base | None) -> None:
        """Open the thin archive's base files (checked against the archive)."""
        if base is not None and self.base_files is None:
            self.base_files = open_base(base, self.base, self.open_base_at)

    def begin(self, base: thin.Base | None, entries: list[fmt.Entry]) -> None:
        self.entries = entries
        if base is not None:
            self.use_base(base)
        elif self.base is not None:
            self.warn("--base given, but this archive is not a thin backup")
        self._open_dest()

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
            if m and not pid_alive(int(m.group(1))) or stale_dir(os.fsencode(n)):
                remove_tree(root, os.fsencode(n))
        magic, block = native.fstatfs(root, self.dest)
        self.fs_type = fsinfo.fs_type_name(magic)
        self.data.cloner.block = block or 4096
        if magic != fsinfo.BTRFS_MAGIC:
            self.data.no_encoded = "not Btrfs"

    def finish(self) -> None:
        if self.tree.root is None:
            return  # nothing was restored: DEST was never made
        self.placer.writeback.stop()  # what is left, the syncfs below writes
        self.small.flush()
        self.placer.flush(always=bool(self.fresh.roots))
        self.fresh.place()
        if self.partial is not None:
            # the leftovers this run went over are whole now
            self.partial.done(self.leftover - self.top_seen)
        self.subvols.prune()
        self.made_here.dir_metadata()
        self.made_here.last_flags()
        self.subvols.make_readonly()
        native.syncfs(self.tree.root, "syncfs")
        if self.bookends is not None:
            from cloneaware.restore.rewrite import rewrite_bookends
            rewrite_bookends(self.bookends, self.placer.placed, self.tree.root, self.s)
        self._totals()

    def _totals(self) -> None:
        s, c = self.s, self.counts
        s.written_bytes += c.written_bytes
        s.reflinked_bytes += c.reflinked_bytes
        s.copied_bytes += c.copied_bytes
        s.reused_bytes += c.reused_bytes
        s.beside_bytes += c.beside_bytes
        s.encoded_written_bytes += self.data.encoded_written
        s.reuse_differing_bytes += self.data.reuse_differing
        s.owners_skipped = s.owners_skipped or self.meta.owners_skipped
        s.subvolumes += self.subvols.count

    def fail(self) -> None:
        """The run failed: rename what is complete, and list the top-level
        entries it made (with those a run before it left), so that a plain
        retry can go on over them."""
        self.small.salvage()
        if self.cur is not None:  # never under a name, final or in a new directory
            self._discard_current()
        self.placer.salvage()
        if self.fresh.roots:  # the new directories too, if they can be made durable
            try:
                if self.placer.sync_failed:
                    raise OSError("not durable")
                self.placer.sync()
                self.fresh.place()
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                self.fresh.discard()
        root = self.tree.root
        if root is None or self.partial is None:
            return
        try:
            made = {n for n in self.partial.names if lexists(root, n)}
        except OSError:
            made = self.partial.names
        self.partial.keep(made)

    def _discard_current(self) -> None:
        """The file being written, closed and its temporary name removed."""
        cur, self.cur = self._current(), None
        cur.close()
        os.close(cur.fd)
        try:
            # its directory found again: the descriptor it was opened in may
            # be closed since (Tree keeps the last 64 used), its number
            # another directory's
            pfd = self.tree.dir(cur.entry.path.rpartition(b"/")[0])
            os.unlink(cur.tmp, dir_fd=pfd)
        except (OSError, ArchiveError):
            pass

    def close(self) -> None:
        """Let go of everything the restore holds, each step whatever an
        earlier one raised, a signal's included; the first error is raised
        once all have run.  A descriptor or the writeback thread left
        behind would keep a mount busy in a process that goes on, as a
        library's caller does."""
        steps = [self.small.drop, self._discard_current_if_any, self.srcs.close,
                 self.beside.close, self._drop_staging, self.tree.close, self.placer.close,
                 self._close_partial, self._close_base_files, self._close_root]
        first: BaseException | None = None
        i = 0
        while i < len(steps):
            try:
                while i < len(steps):
                    step = steps[i]
                    i += 1  # before the call: a step that raised is not run again
                    step()
            except BaseException as e:  # noqa: BLE001 - told below, after the rest
                if first is None:
                    first = e
        if first is not None:
            raise first

    def _discard_current_if_any(self) -> None:
        if self.cur is not None:
            self._discard_current()

    def _close_partial(self) -> None:
        if self.partial is not None:
            self.partial.close()

    def _drop_staging(self) -> None:
        if self.staging is not None and self.tree.root is not None:
            try:  # the files staged for --include: cloned and linked from, not kept
                remove_tree(self.tree.root, self.staging)
            except OSError:
                pass

    def _close_base_files(self) -> None:
        base_files, self.base_files = self.base_files, None  # never closed twice
        if base_files is not None:
            base_files.close()

    def _close_root(self) -> None:
        root, self.tree.root = self.tree.root, None
        if root is not None:
            os.close(root)

    # -- entries ------------------------------------------------------------------------

    def made(self, eid: int) -> bool:
        return eid in self.placer.placed or self.small.holds(eid)

    def replaces(self, e: fmt.Entry) -> bool:
        return False  # said only by a dry run

    def where(self, path: bytes) -> str:
        return self.tree.where(path)

    def named(self, ex: OSError, path: bytes) -> OSError:
        """``ex`` naming the entry as the user knows it (DEST/path), not by
        a temporary name or a bare component (defect 10 of issue 21)."""
        if isinstance(ex.filename, str) and (ex.filename == self.dest or ex.filename.startswith(
                os.path.join(self.dest, ""))):
            return ex
        return OSError(ex.errno, ex.strerror, self.tree.where(path))

    def not_exact(self, e: fmt.Entry, why: str) -> None:
        self.s.warnings.append(NotExact(os.fsdecode(e.path), why))
        self.warn(f"{self.tree.where(e.path)}: {why}")

    def damaged(self, e: fmt.Entry, why: str) -> None:
        """The file (or hard link) is not restored: never a wrong byte under
        a final name."""
        self.s.warnings.append(Damaged(os.fsdecode(e.path), why))
        self.warn(f"{self.tree.where(e.path)}: {why}")
        self.damaged_ids.add(e.id)

    def _replaces(self, path: bytes) -> bool:
        """May ``path`` replace what is there without --force?"""
        return path.partition(b"/")[0] in self.leftover or \
            self.subvols.inside_snapshot(path) is not None

    def _top(self, path: bytes) -> bool:
        """A top-level entry about to be made: True if it is new in DEST."""
        if b"/" in path:
            return False
        self.top_seen.add(path)
        assert self.tree.root is not None
        return not lexists(self.tree.root, path)

    def _made_top(self, name: bytes) -> None:
        if self.partial is not None:
            self.partial.add(name)

    def mkdir(self, e: fmt.Entry) -> None:
        if e.subvol & fmt.SV_SNAPSHOT:  # a snapshot of its origin takes no half-made file
            self.small.flush()
        self.made_here.make(e, self.made_here.mkdir)

    def hardlink(self, e: fmt.Entry) -> None:
        self.small.on_disk(e.link)  # linked to
        if e.link in self.damaged_ids:
            self.damaged(e, "not restored: a hard link to "
                         f"{os.fsdecode(self.entries[e.link].path)}, which could not be had")
            return
        self.made_here.make(e, self.made_here.hardlink)

    def special(self, e: fmt.Entry) -> bool:
        return self.made_here.make(e, self.made_here.special)

    # -- files ---------------------------------------------------------------------------

    def open_file(self, e: fmt.Entry, staged: bool, beside: bytes | None = None) -> None:
        if staged:
            self.made_here.stage(e)
            if beside is not None:
                got = self.beside.get(self.tree.root, beside)
                if got is not None:  # its copy in DEST: cloned from, then compared
                    self.data.use_old(self._current(), os.dup(got[0]), beside=True)
        elif self.small.holdable(e):
            self.made_here.make(e, self.small.hold)
        else:
            # the small ones before a big file start being made now, on the
            # helper, while it is written: where the disk fills, the first
            # error seen is reported, and fail() names what either made whole
            self.small.submit()
            self.made_here.make(e, self.made_here.open_file)

    def write_beside(self, path: bytes, src_offset: int, offset: int, data) -> bool:
        self.small.unhold()
        got = self.beside.get(self.tree.root, path)
        if got is None:
            return False
        return self.data.clone_verified(self._current(), data, offset, got[0], src_offset,
                                        got[1], beside=True)

    def _current(self) -> OpenFile:
        assert self.cur is not None
        return self.cur

    def write(self, offset: int, length: int, data, extent=None) -> None:
        if self.small.take(offset, data, extent):
            return
        self.data.write(self._current(), offset, data, extent)

    def clone_entry(self, src: fmt.Entry, src_offset: int, length: int, offset: int) -> None:
        sfd, size = self.source_fd(src.id)
        if self.small.clone(sfd, src_offset, length, offset, size, "archive", ("entry", src.id)):
            return
        self.small.unhold()
        self.data.clone(self._current(), sfd, src_offset, length, offset, size, "archive")

    def clone_place(self, place: Place, src_offset: int, length: int, offset: int) -> None:
        sfd, size = self.places.source(place, self)
        if self.small.clone(sfd, src_offset, length, offset, size, "archive",
                            ("place", place.owner, place.entry)):
            return
        self.small.unhold()
        self.data.clone(self._current(), sfd, src_offset, length, offset, size, "archive")

    def clone_base(self, bf: thin.BaseFile, base_offset: int, length: int, offset: int
                   ) -> None:
        self.small.unhold()
        assert self.base_files is not None, "base records before the base was opened"
        self.data.clone(self._current(), self.base_files.fd(bf.number), base_offset, length,
                        offset, bf.size, "base")

    def clone_external(self, offset: int, length: int, record: int) -> None:
        if self.external_fd is None:
            raise ArchiveError("EXTERNAL record in an archive that is not a "
                               "sparse thin backup", record)
        self.small.unhold()
        size = os.fstat(self.external_fd).st_size
        self.data.clone(self._current(), self.external_fd, offset, length, offset, size,
                        "sparse")

    def end_file(self, st: FileState) -> None:
        if self.small.end():
            if self.fresh.due():
                self._checkpoint()
            return
        cur = self._current()
        if cur.entry.id in self.damaged_ids:  # unnamed, and gone
            self._discard_current()
            return
        self.s.verified_bytes += self.data.verify(cur, st, self.trust_base)
        e = cur.entry
        self.meta.apply(e, cur.fd, cur.pfd, cur.tmp)
        if self.bookends is not None and not cur.staged:
            self.bookends.add(cur.fd, os.fstat(cur.fd), e.id, cur.reused, self.fs_type)
        self.cur = None
        cur.close()
        if cur.staged:  # only to clone or link from: kept open, unnamed
            self.srcs.put(e.id, cur.fd)
            self.placer.placed[e.id] = (e.path.rpartition(b"/")[0], cur.tmp)
            return
        if e.eflags & fmt.EF_REFERENCED:
            self.srcs.put(e.id, cur.fd)
        else:
            os.close(cur.fd)
        parent, _, name = e.path.rpartition(b"/")
        if cur.fresh:  # below a new directory: named when it is
            self.placer.placed[e.id] = (parent, name)
            self.fresh.count(self.data.dirty() - cur.dirty_at_start)
            if self.fresh.due():
                self._checkpoint()
            return
        # a batch is counted in bytes that wait for writeback: reflinked
        # ranges have none, and a syncfs per GiB of clones is a commit for naught
        self.placer.defer(parent, cur.tmp, name, e.path, e.id,
                          self.data.dirty() - cur.dirty_at_start)

    def fresh_below(self, path: bytes) -> bool:
        """Whether ``path`` is made under its final name, below a new
        directory (restore/fresh.py): not in a subvolume restored as a
        snapshot, whose origin's entries it replaces."""
        return self.fresh.inside(path.rpartition(b"/")[0]) and not (
            self.subvols.snapshots and self.subvols.inside_snapshot(path) is not None)

    def _checkpoint(self) -> None:
        """Everything so far durable and under its name, the new
        directories too (restore/fresh.py): a run killed later keeps it."""
        self.small.flush()
        self.placer.flush(always=True)
        self.fresh.place()

    def source_fd(self, eid: int) -> tuple[int, int]:
        """A descriptor and the size of entry ``eid`` of this restore (the
        file being written itself, which is then not held)."""
        held = self.small.held
        if held is not None and held.entry.id == eid:
            self.small.unhold()
        cur = self.cur
        if cur is not None and eid == cur.entry.id:
            return cur.fd, cur.entry.size
        return self._src_fd(eid), self.entries[eid].size

    def _src_fd(self, eid: int) -> int:
        self.small.on_disk(eid)  # cloned from
        fd = self.srcs.get(eid)
        if fd is not None:
            return fd
        parent, name = self.placer.placed[eid]
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:  # reading must not change the atime we restored
                fd = os.open(name, flags | os.O_NOATIME, dir_fd=self.tree.dir(parent))
            except PermissionError:
                fd = os.open(name, flags, dir_fd=self.tree.dir(parent))
        except OSError as ex:
            raise self.named(ex, self.entries[eid].path) from None
        self.srcs.put(eid, fd)
        return fd

    def reopen(self, eid: int) -> int:
        """A descriptor of entry ``eid``, after this output has finished
        (its file is in place now, beneath DEST)."""
        self.small.flush()
        parent, name = self.placer.placed[eid]
        # DEST/<snapshot id>, made by this run: not followed if a symlink now
        root = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            parts = [*(parent.split(b"/") if parent else []), name]
            return open_beneath(root, parts, os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(root)
