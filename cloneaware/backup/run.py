"""Backup: walk -> map -> index -> write, into a sink (backup/sinks.py).

Every file is mapped first (one FIEMAP call each) so that sharing is known
across the whole set; then each file is written in walk order: the pieces it
owns as stored data (read once, hashed, compressed on worker threads), every
later place that shares them as a reference.  A file that changes between
mapping and reading, or while it is read, is detected and reported, and
nothing else trusts its sharing from then on.
"""
from __future__ import annotations

import collections
import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cloneaware import fsinfo, native
from cloneaware.archive import format as fmt
from cloneaware.archive.writer import Writer
from cloneaware.backup.meta import (
    entry_for,
    kind_of,
    map_digest,
    read_iflags,
    read_xattrs,
    same_stat,
)
from cloneaware.backup.sinks import Sink
from cloneaware.backup.workers import BaseCheck, Chunk, Workers, parse_compress
from cloneaware.errors import UsageError
from cloneaware.index.plan import (
    CHECK_CANDIDATE,
    CHECK_ENCODED,
    CHECK_HASHED,
    PIECE_DTYPE,
    IndexBuilder,
    Plan,
    data_ranges,
)
from cloneaware.patterns import Exclusions
from cloneaware.source.capture import Capture
from cloneaware.source.mapping import (
    READING_NOTE,
    TREE_SEARCH,
    FsTable,
    Mapped,
    Skipped,
    extent_map,
    map_tree,
    open_source,
)
from cloneaware.source.snapshot import SUBVOL_ROOT_INO, Snapshots, is_nested_subvolume
from cloneaware.source.walk import Dirs, Node


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
    added_bytes: int = 0
    snapshot: str | None = None
    read_live: int = 0
    read_live_reasons: dict[str, int] = field(default_factory=dict)
    changed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**self.__dict__, "seconds": round(self.seconds, 3)}


# --- what the walk found ------------------------------------------------------

@dataclass(slots=True)
class _File:
    node: Node
    fileno: int  # number in the sharing index; -1: not mapped (plan unusable)
    #: map_digest of the map the plan was made from (None: not mapped); the
    #: map itself is not kept, the index has what it needs
    digest: bytes | None


@dataclass(slots=True)
class _Link:
    node: Node
    first: int  # walk item number of the inode's first name


@dataclass(slots=True)
class _Other:
    node: Node


@dataclass(slots=True)
class _BaseFile:
    rel: bytes  # path inside the base ('' when the base is a file)
    node: Node
    st: os.stat_result

    @property
    def src(self) -> bytes:
        return self.node.src


# --- what one file's pieces become, in file order ------------------------------

class _Store(NamedTuple):
    """Read and store; ``key`` (fileno, logical): remember its hash, a candidate names it;
    ``encoded``: a whole window of a compressed extent, stored as it is on disk."""

    offset: int
    length: int
    key: tuple[int, int] | None = None
    encoded: bool = False


class _Ref(NamedTuple):
    offset: int
    length: int
    source: int  # entry id
    source_offset: int


class _BaseRef(NamedTuple):
    offset: int
    length: int
    base: int  # base file number
    base_offset: int


class _CheckRef(NamedTuple):
    """A compressed candidate: a REF only if its hash equals that stored at ``key``."""

    offset: int
    length: int
    source: int
    source_offset: int
    key: tuple[int, int]


class _AnchorRef(NamedTuple):
    """Unchanged since the last backup: the blocks are shared with the anchor."""

    offset: int
    length: int
    anchor: int  # the anchor's file number
    anchor_offset: int


class _CheckBase(NamedTuple):
    """A compressed candidate into the base: a BASEREF only if both hash alike."""

    offset: int
    length: int
    base: int
    base_offset: int


_Op = _Store | _Ref | _BaseRef | _CheckRef | _CheckBase | _AnchorRef


def _chunks(offset: int, length: int):
    end = offset + length
    while offset < end:
        n = min(fmt.CHUNK_MAX, end - offset)
        yield offset, n
        offset += n


class Backup:
    """Back up ``paths`` into ``sink``.  ``base``: a thin backup relative to
    this file or directory: ranges the clones share with it become BASEREF
    records (offset, length, SHA-256) instead of data."""

    #: chunks in flight on the workers (each up to CHUNK_MAX bytes)
    DEPTH = 8

    def __init__(self, paths: list, sink: Sink, compress: str = "zstd",
                 one_file_system: bool = True, progress=None, warn=None,
                 base: str | None = None, point_in_time: bool = True,
                 snapshot: bool = False, exclude: Exclusions | None = None,
                 listed: Callable[[bytes], None] | None = None, dry_run: bool = False):
        self.paths = paths
        self.dry_run = dry_run  # --dry-run: leave what killed backups left for a real run
        #: -v: called with each entry's path (as ls shows it) once it is stored
        self.listed = listed or (lambda path: None)
        self.sink = sink
        self.codec, self.level = parse_compress(compress)
        self.one_file_system = one_file_system
        self.progress = progress
        self.warn = warn or (lambda msg: None)
        self.summary = Summary()
        sink.summary = self.summary
        self.base = base
        self.base_files: dict[int, _BaseFile] = {}  # fileno -> base file
        self.base_kind = fmt.BASE_FILE
        self.used_base: set[int] = set()  # base filenos a BASEREF may name
        #: (fileno, logical) -> SHA-256 of stored data that a candidate names
        self._hashes: dict[tuple[int, int], bytes] = {}
        self.entry_of_file: dict[int, int] = {}  # fileno -> entry id
        self.invalid: set[int] = set()  # filenos whose bytes no reference may trust
        self.capture = Capture(point_in_time, self.warn, place=sink.capture_dir)
        self.anchor_files: dict[int, object] = {}  # fileno -> anchor (repositories)
        self.snapshot = snapshot
        self.exclude = exclude or Exclusions()
        self.redirect: dict[bytes, bytes] | None = None  # PATH -> its --snapshot
        #: the walk's directory descriptors, kept until the files are read
        self.dirs = Dirs()
        #: subvolumes stored so far, by UUID (a later snapshot of one names it)
        self._subvol_ids: dict[bytes, int] = {}
        self._uuid: bytes | None = None  # of the directory _dir_info looked at last

    @property
    def _unredirect(self) -> dict[bytes, bytes]:
        """--snapshot: each snapshot's path -> the PATH it was taken of."""
        return {v: k for k, v in (self.redirect or {}).items()}

    def _skip(self, path: bytes, reason: str) -> None:
        self.summary.skipped.append((os.fsdecode(path), reason))
        self.warn(f"skipped {os.fsdecode(path)}: {reason}")

    def _changed(self, path: bytes, reason: str) -> None:
        self.summary.changed.append((os.fsdecode(path), reason))
        self.warn(f"{os.fsdecode(path)}: {reason}")

    def run(self) -> Summary:
        t0 = time.monotonic()
        try:
            if not self.snapshot:
                return self._run(t0)
            with Snapshots(self.paths, self.warn, tidy=not self.dry_run) as snaps:
                self.redirect = snaps.redirect
                return self._run(t0)
        finally:
            self.dirs.close()

    def _run(self, t0: float) -> Summary:
        items, plan = self._map()
        s = self.summary
        s.physical_bytes = plan.totals.physical_bytes
        s.base = self.base
        if self.progress:
            self.progress.set_total(plan.stored_bytes())
        first_size = next((i.node.st.st_size for i in items if isinstance(i, _File)), 0)
        workers = Workers(self.codec, self.level)
        ok = False
        try:
            w = self.sink.open(first_size, self._base_record(plan))
            self._write(w, items, plan, workers)
            w.finish()
            self._check_base_unchanged()
            self.sink.commit()
            s.archive_bytes = self.sink.size()
            ok = True
        except BaseException:
            self.sink.abort()
            raise
        finally:
            workers.close(wait=ok)
            self.capture.close()
        c = self.capture.counts
        s.captured_by_clone, s.captured_by_snapshot = c.by_clone, c.by_snapshot
        s.read_live, s.read_live_reasons = c.read_live, c.live_reasons
        s.seconds = time.monotonic() - t0
        return s

    def _base_record(self, plan: Plan) -> fmt.Base | None:
        if self.base is None:
            return None
        used = set(np.unique(plan.pieces["ref_file"]).tolist()) & set(self.base_files)
        b = fmt.Base(os.fsencode(self.base), self.base_kind)
        for n in sorted(used):
            bf = self.base_files[n]
            b.files.append(fmt.BaseFile(n, bf.st.st_size, bf.rel))
        self.used_base = used
        return b

    def _check_base_unchanged(self) -> None:
        for n in sorted(self.used_base):
            bf = self.base_files[n]
            try:
                now = bf.node.lstat()
            except OSError:
                now = None
            if now is None or not same_stat(now, bf.st):
                self._changed(bf.src, "base file changed during the backup; a restore "
                              "will find the ranges that differ and refuse them")

    # -- phase 1: walk and map -------------------------------------------

    def _map(self) -> tuple[list[_File | _Link | _Other], Plan]:
        fstab = FsTable()
        builder = IndexBuilder()
        items: list[_File | _Link | _Other] = []
        inodes: dict[tuple[int, int], int] = {}
        self.anchor_files = self.sink.prepare(fstab, builder)
        if self.base is not None:
            self._map_base(fstab, builder)
        for it in map_tree(self.paths, self.one_file_system, redirect=self.redirect,
                           dirs=self.dirs, exclude=self.exclude):
            if isinstance(it, Skipped):
                self._skip(it.path, it.reason)
            elif isinstance(it, Mapped):
                node = it.node
                key = (node.st.st_dev, node.st.st_ino)
                if node.st.st_nlink > 1 and key in inodes:
                    items.append(_Link(node, inodes[key]))
                    continue
                if node.st.st_nlink > 1:
                    inodes[key] = len(items)
                fileno = builder.add(fstab.number(it.fs), node.st.st_size, it.ext)
                items.append(_File(node, fileno, map_digest(it.ext)))
            elif stat.S_ISSOCK(it.node.st.st_mode):
                self._skip(it.node.src, "socket ignored")
            else:
                if self.redirect and is_nested_subvolume(it.node.st):
                    self.warn(f"{os.fsdecode(it.node.name)}: a nested subvolume, not in the "
                              "snapshot (stored as an empty directory); give it as a PATH "
                              "of its own")
                items.append(_Other(it.node))
        self.summary.excluded = self.exclude.count
        plan = builder.build()
        t = plan.totals
        if TREE_SEARCH.denied is not None and t.encoded_bytes > t.encoded_exact_bytes:
            self.warn(READING_NOTE.format(why=TREE_SEARCH.denied))
        return items, plan

    def _map_base(self, fstab: FsTable, builder: IndexBuilder) -> None:
        """Map the base first, so that it owns every range it shares."""
        assert self.base is not None
        if not self.base:
            raise UsageError("an empty path was given as --base")
        base = os.fsencode(self.base)
        try:
            bst = os.stat(base)
        except OSError as e:
            raise UsageError(f"base {self.base}: {e.strerror}") from None
        if stat.S_ISDIR(bst.st_mode):
            self.base_kind = fmt.BASE_DIR
        elif not stat.S_ISREG(bst.st_mode):
            raise UsageError(f"base {self.base} is neither a file nor a directory")
        base = os.path.realpath(base)
        for it in map_tree([base], self.one_file_system, dirs=self.dirs):
            if isinstance(it, Skipped):
                self._skip(it.path, f"base file not usable: {it.reason}")
            elif isinstance(it, Mapped):
                node = it.node
                rel = node.name.partition(b"/")[2] if self.base_kind == fmt.BASE_DIR else b""
                fileno = builder.add(fstab.number(it.fs), node.st.st_size, it.ext)
                self.base_files[fileno] = _BaseFile(rel, node, node.st)
        if not self.base_files:
            raise UsageError(f"base {self.base} holds no regular file")

    # -- phase 2: write ----------------------------------------------------

    def _write(self, w: Writer, items: list[_File | _Link | _Other], plan: Plan,
               workers: Workers) -> None:
        refs = plan.pieces["ref_file"]
        referenced = set(np.unique(refs[refs >= 0]).tolist())
        entry_of_item: dict[int, int] = {}  # walk item -> entry id
        for n, item in enumerate(items):
            if isinstance(item, _Other):
                e = self._other_entry(item.node)
                if e is not None:
                    w.entry(e)
                    entry_of_item[n] = e.id
                    self.listed(e.path)
                    if e.subvol and self._uuid is not None:
                        self._subvol_ids[self._uuid] = e.id
                continue
            if isinstance(item, _Link):
                target = entry_of_item.get(item.first)
                if target is not None:
                    e = entry_for(item.node, fmt.K_HARDLINK, item.node.st)
                    e.link = target
                    w.entry(e)
                    entry_of_item[n] = e.id
                    self.summary.hardlinks += 1
                    self.listed(e.path)
                    continue
                # the first name vanished: store this name as a file of its own
                item = _File(item.node, -1, None)
            eid = self._file(w, item, plan, workers, referenced)
            if eid is not None:
                entry_of_item[n] = eid
                self.listed(item.node.name)

    def _other_entry(self, node: Node) -> fmt.Entry | None:
        st = node.st
        s = self.summary
        kind = kind_of(st.st_mode)
        if kind is None:
            self._skip(node.src, "unsupported file type")
            return None
        if kind == fmt.K_DIR:
            s.dirs += 1
        e = entry_for(node, kind, st)
        try:
            if kind == fmt.K_SYMLINK:
                e.target = node.readlink()
                s.symlinks += 1
            if kind in (fmt.K_CHR, fmt.K_BLK):
                e.rdev = st.st_rdev
            if kind in (fmt.K_FIFO, fmt.K_CHR, fmt.K_BLK):
                s.specials += 1
            e.xattrs = read_xattrs(node.proc_path())
            if kind == fmt.K_DIR:
                self._dir_info(node, e)
        except FileNotFoundError:
            self._changed(node.src, "vanished before it was read")
            return None
        except OSError as ex:
            self._skip(node.src, ex.strerror or str(ex))
            return None
        return e

    def _dir_info(self, node: Node, e: fmt.Entry) -> None:
        """What only a descriptor of the directory tells: its inode flags, and
        whether it is a Btrfs subvolume (read-only? a snapshot of one stored
        earlier?).  A directory that cannot be opened (no read permission)
        has none stored."""
        self._uuid = None
        try:
            fd = node.open(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except PermissionError:
            return
        try:
            e.iflags = read_iflags(fd)
            if node.st.st_ino != SUBVOL_ROOT_INO:
                return
            orig = self._unredirect.get(node.src)
            try:
                if orig is not None:  # --snapshot: say what the PATH is, not its snapshot
                    ofd = os.open(orig, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        info = native.btrfs_subvol_info(ofd, node.src)
                    finally:
                        os.close(ofd)
                else:
                    info = native.btrfs_subvol_info(fd, node.src)
            except OSError as ex:
                if ex.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    return  # inode 256 of another filesystem, or an old kernel
                raise
        finally:
            os.close(fd)
        e.subvol = fmt.SV_SUBVOLUME
        if info.flags & native.BTRFS_ROOT_SUBVOL_RDONLY:
            e.subvol |= fmt.SV_READONLY
        origin = self._subvol_ids.get(info.parent_uuid) if any(info.parent_uuid) else None
        if origin is not None:
            e.subvol |= fmt.SV_SNAPSHOT
            e.origin = origin
        self._uuid = info.uuid

    def _invalidate(self, item: _File) -> None:
        if item.fileno >= 0:
            self.invalid.add(item.fileno)

    def _file(self, w: Writer, item: _File, plan: Plan, workers: Workers,
              referenced: set[int]) -> int | None:
        s = self.summary
        node = item.node
        try:
            fd = open_source(node)
        except FileNotFoundError:
            self._changed(node.src, "vanished before it was read")
            self._invalidate(item)
            return None
        except OSError as ex:
            if ex.errno == errno.EIO:  # a failing disk ends the job
                raise OSError(ex.errno, ex.strerror, os.fsdecode(node.src)) from None
            self._skip(node.src, ex.strerror or str(ex))
            self._invalidate(item)
            return None
        cap: int | None = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._changed(node.src, "replaced by another kind of file")
                self._invalidate(item)
                return None
            live = self.redirect is None
            if not live:
                self.capture.counts.by_snapshot += 1  # read-only: nothing writes it
            else:
                got = self.capture.clone(fd, node.src, st.st_size,
                                         fsinfo.fs_info(fd, st.st_dev, node.src),
                                         dir_fd=node.dir_fd())
                if isinstance(got, str):
                    e = entry_for(node, fmt.K_REG, st)
                    e.size = st.st_size
                    e.xattrs = read_xattrs(fd)
                    e.iflags = read_iflags(fd)
                    if item.fileno in referenced:
                        e.eflags |= fmt.EF_REFERENCED
                    if self.sink.unchanged(node, st, e):
                        # the metadata rule: the same file as in the parent snapshot
                        if item.fileno >= 0:
                            self.entry_of_file[item.fileno] = e.id
                        s.files += 1
                        s.logical_bytes += st.st_size
                        s.unchanged_bytes += st.st_size
                        return e.id
                    self.capture.counts.live(got)
                else:
                    cap = got
            size = st.st_size
            before: np.ndarray | None = None  # a map taken now, if one is
            before_digest: bytes | None  # the layout the reads are checked against
            if cap is not None:
                # The clone is one instant's state and nobody else writes it;
                # its map must be the one the plan was made from.
                live = False
                st = os.fstat(fd)
                size = os.fstat(cap).st_size
                before = extent_map(cap, size, node.src)
                before_digest = map_digest(before)
                stale_plan = item.fileno < 0 or item.digest is None \
                    or size != node.st.st_size or before_digest != item.digest
            else:
                stale_plan = item.digest is None or item.fileno < 0 \
                    or not same_stat(st, node.st)
                if stale_plan:
                    before = extent_map(fd, size, node.src)
                before_digest = map_digest(before) if before is not None else item.digest
            if stale_plan:
                assert before is not None
                # Changed since it was mapped: its sharing plan is stale.  Store
                # all of its data itself, and let nothing refer to it.
                if item.fileno >= 0 and live:
                    self._changed(node.src, "changed between scan and read; stored whole")
                self._invalidate(item)
                d = data_ranges(before, size)
                p = np.zeros(len(d), dtype=PIECE_DTYPE)
                p["logical"], p["length"], p["ref_file"] = d["logical"], d["length"], -1
            else:
                p = plan.file_pieces(item.fileno)
            data_bytes = int(p["length"].sum()) if len(p) else 0
            e = entry_for(node, fmt.K_REG, st)
            e.size = size
            e.xattrs = read_xattrs(fd)
            e.iflags = read_iflags(fd)
            if item.fileno in referenced and not stale_plan:
                e.eflags |= fmt.EF_REFERENCED
            self.sink.file_entry(e, st)
            if item.fileno >= 0:
                self.entry_of_file[item.fileno] = e.id
            data_fd = fd if cap is None else cap
            # after the entry is known: a file may share with itself
            ops = self._ops(data_fd, item.fileno, p)
            short = self._write_ops(w, data_fd, ops, workers, node.src)
            self.sink.end()
            s.files += 1
            s.logical_bytes += size
            s.hole_bytes += size - data_bytes
            if live:
                after = os.fstat(fd)
                if short or not same_stat(after, st) or before_digest != map_digest(
                        extent_map(fd, after.st_size, node.src)):
                    self._changed(node.src, "file changed as we read it")
                    self._invalidate(item)
            elif short:  # a clone or a snapshot cannot shrink: the disk lied
                raise OSError(errno.EIO, "file shorter than its size", os.fsdecode(node.src))
            if not live and not stale_plan:
                self.sink.keep(data_fd, cap is not None, e, node.src)
            return e.id
        except OSError as ex:
            # Archive writes carry the archive's name; what has none came from
            # this file (fstat, xattrs, reads on the workers).
            if ex.filename is None:
                raise OSError(ex.errno, ex.strerror, os.fsdecode(node.src)) from None
            raise
        finally:
            os.close(fd)
            if cap is not None:
                os.close(cap)

    def _ops(self, fd: int, fileno: int, pieces: np.ndarray) -> list[_Op]:
        """What each piece of the plan becomes, in file order.

        A candidate piece (a compressed range naming the same extent and
        length as an earlier place, CHECK_CANDIDATE) is hashed first and
        becomes a reference only if its hash equals the one recorded when
        the place it names was stored (or, for a base, read now)."""
        ops: list[_Op] = []
        for logical, length, ref_file, ref_logical, check in zip(
                pieces["logical"].tolist(), pieces["length"].tolist(),
                pieces["ref_file"].tolist(), pieces["ref_logical"].tolist(),
                pieces["check"].tolist()):
            if ref_file in self.anchor_files and check != CHECK_CANDIDATE:
                ops.append(_AnchorRef(logical, length, ref_file, ref_logical))
                continue
            if check == CHECK_CANDIDATE and not self.sink.content_addressed:
                if length <= fmt.CHUNK_MAX and ref_file not in self.invalid:
                    if ref_file in self.base_files:
                        ops.append(_CheckBase(logical, length, ref_file, ref_logical))
                        continue
                    src = self.entry_of_file.get(ref_file)
                    if src is not None:
                        ops.append(_CheckRef(logical, length, src, ref_logical,
                                             (ref_file, ref_logical)))
                        continue
            elif ref_file in self.base_files:
                ops += [_BaseRef(o, n, ref_file, ref_logical + (o - logical))
                        for o, n in _chunks(logical, length)]
                continue
            elif ref_file >= 0 and ref_file not in self.invalid \
                    and self.entry_of_file.get(ref_file) is not None:
                ops.append(_Ref(logical, length, self.entry_of_file[ref_file], ref_logical))
                continue
            # stored data
            if check == CHECK_ENCODED and self.sink.encoded_data \
                    and self.codec == fmt.CODEC_ZSTD:
                ops.append(_Store(logical, length, encoded=True))
                continue
            os.posix_fadvise(fd, logical, length, os.POSIX_FADV_WILLNEED)
            if check == CHECK_HASHED and length <= fmt.CHUNK_MAX \
                    and not self.sink.content_addressed:
                ops.append(_Store(logical, length, (fileno, logical)))
            else:
                ops += [_Store(o, n) for o, n in self.sink.cuts(logical, length)]
        return ops

    def _write_ops(self, w: Writer, fd: int, ops: list[_Op], workers: Workers,
                   path: bytes) -> bool:
        """Write one file's records, in order, with up to DEPTH chunks read
        ahead across references; True on a short read."""
        s = self.summary
        data_job = self.sink.data_job(workers)

        def result(fut):
            """A worker's result; its read errors name the file read."""
            try:
                return fut.result()
            except OSError as e:
                if e.filename is None:
                    raise OSError(e.errno, e.strerror, os.fsdecode(path)) from None
                raise

        def submit(op: _Op):
            if isinstance(op, _Store):
                job = workers.encoded_job if op.encoded else data_job
                return workers.submit(job, fd, op.offset, op.length)
            if isinstance(op, (_BaseRef, _CheckRef)):
                return workers.submit(workers.hash_job, fd, op.offset, op.length)
            if isinstance(op, _CheckBase):
                try:  # here, not on a worker: the walk's descriptors are not shared
                    bfd: int | None = open_source(self.base_files[op.base].node)
                except OSError:
                    bfd = None  # unreadable: the range is stored rather than fail the backup
                return workers.submit(workers.base_check_job, fd, op.offset, op.length,
                                      bfd, op.base_offset)
            return None

        short = False
        pending: collections.deque = collections.deque()
        nxt = 0
        while nxt < len(ops) or pending:
            while nxt < len(ops) and len(pending) < self.DEPTH:
                pending.append((ops[nxt], submit(ops[nxt])))
                nxt += 1
            op, fut = pending.popleft()
            if isinstance(op, _Ref):
                self.sink.ref(op.offset, op.length, op.source, op.source_offset)
                s.referenced_bytes += op.length
            elif isinstance(op, _AnchorRef):
                self.sink.anchor_ref(op.offset, op.length, op.anchor, op.anchor_offset)
                s.unchanged_bytes += op.length
            elif isinstance(op, _BaseRef):
                chunk: Chunk = result(fut)
                w.baseref(op.offset, op.length, op.base, op.base_offset, chunk.sha256)
                s.base_referenced_bytes += op.length
                s.bytes_read += chunk.got
                short |= chunk.got < op.length
            elif isinstance(op, _Store):
                chunk = result(fut)
                short |= self._emit_data(fd, op.offset, op.length, chunk)
                workers.give_back(chunk)  # written: its buffer is free
                if op.key is not None:
                    self._hashes[op.key] = chunk.sha256
            else:  # a candidate: use it only if the content matches
                got: Chunk | BaseCheck = result(fut)
                s.bytes_read += got.got
                short |= got.got < op.length
                whole = got.got == op.length
                if whole and isinstance(op, _CheckRef) \
                        and self._hashes.get(op.key) == got.sha256:
                    self.sink.ref(op.offset, op.length, op.source, op.source_offset)
                    s.referenced_bytes += op.length
                    s.checked_bytes += op.length
                elif whole and isinstance(got, BaseCheck) and isinstance(op, _CheckBase) \
                        and got.base_sha256 == got.sha256:
                    w.baseref(op.offset, op.length, op.base, op.base_offset, got.sha256)
                    s.base_referenced_bytes += op.length
                    s.checked_bytes += op.length
                else:
                    s.check_mismatch_bytes += op.length
                    s.bytes_read -= got.got  # read again, as data
                    chunk = result(workers.submit(data_job, fd, op.offset, op.length))
                    short |= self._emit_data(fd, op.offset, op.length, chunk)
                    workers.give_back(chunk)
        return short

    def _emit_data(self, fd: int, offset: int, length: int, chunk: Chunk) -> bool:
        """Hand a stored chunk to the sink; True if the file was short."""
        self.sink.emit_data(fd, offset, length, chunk)
        s = self.summary
        if chunk.encoded:
            s.encoded_stored_bytes += length
            s.encoded_extent_bytes += chunk.encoded
        s.stored_bytes += length
        s.bytes_read += chunk.got
        if self.progress:
            self.progress.advance(length)
        return chunk.got < length
