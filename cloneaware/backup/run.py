"""Backup: walk -> map -> index -> write, into a sink (backup/sinks.py).

Every file is mapped first (one FIEMAP call each) so that sharing is known
across the whole set; then each entry is written in walk order: a regular
file's pieces as stored data (read once, hashed, compressed on worker
threads) or, for every later place that shares them, as references
(backup/files.py, backup/ops.py); the other entries from their metadata
(backup/others.py).  A file that changes between mapping and reading, or
while it is read, is detected and reported, and nothing else trusts its
sharing from then on.
"""
from __future__ import annotations

import array
import os
import stat
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.backup.ahead import ReadAhead, available
from cloneaware.backup.cloneahead import CloneAhead
from cloneaware.backup.files import FileWriter, WalkedFile
from cloneaware.backup.meta import entry_for, map_digest, same_stat
from cloneaware.backup.ops import INLINE, Known, OpWriter
from cloneaware.backup.others import Others
from cloneaware.backup.sinks import Sink
from cloneaware.backup.summary import Summary
from cloneaware.backup.workers import Workers, parse_compress
from cloneaware.errors import FileChanged, FileSkipped, JobWarning, UsageError
from cloneaware.index.plan import IndexBuilder, Plan
from cloneaware.patterns import Exclusions
from cloneaware.source.capture import Capture
from cloneaware.source.flags import PHYS
from cloneaware.source.mapping import (
    READING_NOTE,
    TREE_SEARCH,
    FsTable,
    Mapped,
    Skipped,
    Unopened,
    map_node,
    map_tree,
    open_source,
    shared_physical,
)
from cloneaware.source.snapshot import Snapshots, is_nested_subvolume
from cloneaware.source.walk import Dirs, Node

__all__ = ["Backup", "Summary"]

#: items of the walk whose unopened files are encoded in one native call
WINDOW = 8192


# --- what the walk found ------------------------------------------------------

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


class Backup:
    """Back up ``paths`` into ``sink``.  ``base``: a thin backup relative to
    this file or directory: ranges the clones share with it become BASEREF
    records (offset, length, SHA-256) instead of data."""

    def __init__(self, paths: list, sink: Sink, compress: str = "zstd",
                 one_file_system: bool = True, progress=None, warn=None,
                 base: str | None = None, point_in_time: bool = True,
                 snapshot: bool = False, exclude: Exclusions | None = None,
                 listed: Callable[[bytes], None] | None = None, dry_run: bool = False,
                 strict: bool = False):
        self.paths = paths
        #: a PATH that does not exist stops the backup (else: skipped, exit 1)
        self.strict = strict
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
        self.base_kind = thin.BASE_FILE
        self.used_base: set[int] = set()  # base filenos a BASEREF may name
        self.known = Known({}, set(), set(), {})
        self.capture = Capture(point_in_time, self.warn, place=sink.capture_dir)
        self.snapshot = snapshot
        self.exclude = exclude or Exclusions()
        self.redirect: dict[bytes, bytes] | None = None  # PATH -> its --snapshot
        #: the walk's directory descriptors, kept until the files are read
        self.dirs = Dirs()

    def _report(self, w: JobWarning) -> None:
        self.summary.warnings.append(w)
        self.warn(str(w))

    def _skip(self, path: bytes, reason: str) -> None:
        self._report(FileSkipped(os.fsdecode(path), reason))

    def _changed(self, path: bytes, reason: str) -> None:
        self._report(FileChanged(os.fsdecode(path), reason))

    def _present(self) -> None:
        """Leave out the PATHs that do not exist, each said and counted as
        skipped (the job exits 1), as tar and Borg do; with ``strict``, or
        when none exists, a usage error before anything is written."""
        present, missing = [], []
        for p in self.paths:
            try:
                if os.fsencode(p):  # an empty one: the walk refuses it
                    os.lstat(p)
            except FileNotFoundError:
                if self.strict:
                    raise UsageError(f"{os.fsdecode(p)}: No such file or directory "
                                     "(--strict: nothing backed up)") from None
                missing.append(p)
                continue
            except (OSError, ValueError):
                pass  # the walk says what is wrong with it
            present.append(p)
        if not present:
            raise UsageError("none of the PATHs exists; nothing backed up")
        for p in missing:
            self._skip(os.path.abspath(os.fsencode(p)),
                       "no such file or directory (a PATH given; not backed up)")
        self.paths = present

    def run(self) -> Summary:
        t0 = time.monotonic()
        self._present()
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
        first_size = next((i.node.st.st_size for i in items if isinstance(i, WalkedFile)), 0)
        workers = Workers(self.codec, self.level)
        ok = False
        try:
            self.sink.open(first_size, self._base_record(plan))
            self._write(items, plan, workers)
            # what the walk kept of every entry, let go before the sink's
            # commit builds its last indexes (the peak of memory was there)
            items.clear()
            del plan
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
        if s.base_unreadable_bytes:
            self.warn(f"base {self.base}: {s.base_unreadable_bytes} bytes could not be read to "
                      "compare with the clones' compressed ranges; those were stored")
        s.seconds = time.monotonic() - t0
        return s

    def _base_record(self, plan: Plan) -> thin.Base | None:
        if self.base is None:
            return None
        used = set(np.unique(plan.pieces["ref_file"]).tolist()) & set(self.base_files)
        b = thin.Base(os.fsencode(self.base), self.base_kind)
        for n in sorted(used):
            bf = self.base_files[n]
            b.files.append(thin.BaseFile(n, bf.st.st_size, bf.rel))
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
                self._changed(bf.node.src, "base file changed during the backup; a restore "
                              "will find the ranges that differ and refuse them")

    def _open_base(self, n: int) -> int | None:
        """A descriptor of base file ``n``, or None if it cannot be opened
        (the ranges that name it are then stored, and counted)."""
        try:
            return open_source(self.base_files[n].node)
        except OSError:
            return None

    # -- phase 1: walk and map -------------------------------------------

    def _map(self) -> tuple[list[WalkedFile | Unopened | _Link | _Other | None], Plan]:
        fstab = FsTable()
        builder = IndexBuilder()
        items: list = []
        inodes: dict[tuple[int, int], int] = {}
        cached = self.sink.prepare()

        def known(node: Node) -> int:
            """A second name of an inode is a hard link: never opened (any
            row will do, it becomes a _Link); else the sink's files cache."""
            if node.st.st_nlink > 1 and (node.st.st_dev, node.st.st_ino) in inodes:
                return 0
            return -1 if cached is None else cached(node)

        try:
            self._walk(items, inodes, known)
        except BaseException:
            self.sink.settle()
            raise
        self._map_again(items)
        # The anchors of what is not taken unopened, first: they own what they share.
        self.known.priors.update(self.sink.priors(
            fstab, builder, [i.row for i in items if isinstance(i, Unopened)]))
        if self.base is not None:
            self._map_base(fstab, builder)
        for n, it in enumerate(items):
            if isinstance(it, Mapped):
                fileno = builder.add(fstab.number(it.fs), it.node.st.st_size, it.ext)
                items[n] = WalkedFile(it.node, fileno, map_digest(it.ext), it.ext)
        self.summary.excluded = self.exclude.count
        plan = builder.build()
        t = plan.totals
        if TREE_SEARCH.denied is not None and t.encoded_bytes > t.encoded_exact_bytes:
            self.warn(READING_NOTE.format(why=TREE_SEARCH.denied))
        return items, plan

    def _walk(self, items: list, inodes: dict[tuple[int, int], int],
              known: Callable[[Node], int]) -> None:
        for it in map_tree(self.paths, self.one_file_system, redirect=self.redirect,
                           dirs=self.dirs, exclude=self.exclude, known=known):
            if isinstance(it, Skipped):
                self._skip(it.path, it.reason)
            elif isinstance(it, (Mapped, Unopened)):
                node = it.node
                key = (node.st.st_dev, node.st.st_ino)
                if node.st.st_nlink > 1 and key in inodes:
                    items.append(_Link(node, inodes[key]))
                    continue
                if node.st.st_nlink > 1:
                    inodes[key] = len(items)
                items.append(it)
            else:
                if self.redirect and is_nested_subvolume(it.node.st):
                    self.warn(f"{os.fsdecode(it.node.name)}: a nested subvolume, not in the "
                              "snapshot (stored as an empty directory); give it as a PATH "
                              "of its own")
                items.append(_Other(it.node))

    def _map_again(self, items: list) -> None:
        """Map the unopened files the sink no longer trusts once the walk
        is over (``Sink.walked``), and those that a mapped one may share
        blocks with (a new clone of an unchanged file): the sharing index
        must see both to find it.  A file mapped for nothing costs a FIEMAP."""
        unopened = [n for n, it in enumerate(items) if isinstance(it, Unopened)]
        rows = np.array([items[n].row for n in unopened], dtype=np.int64)
        # first those the sink no longer trusts: their maps are queries too
        untrusted = set(self.sink.walked(rows).tolist())
        if untrusted:  # rare (packs lost or pruned): the rest listed again
            self._map_rows(items, unopened, untrusted)
            unopened = [n for n in unopened if isinstance(items[n], Unopened)]
            rows = np.array([items[n].row for n in unopened], dtype=np.int64)
        if not unopened:
            return
        exts = [it.ext for it in items if isinstance(it, Mapped)]
        queries = shared_physical(np.concatenate(exts)) if exts else np.zeros(0, dtype=PHYS)
        self._map_rows(items, unopened, set(self.sink.sharing_with(rows, queries).tolist()))

    def _map_rows(self, items: list, unopened: list[int], rows: set[int]) -> None:
        """Map the items of ``unopened`` whose rows are ``rows``."""
        if not rows:
            return
        for n in unopened:
            it = items[n]
            if it.row in rows:
                got = map_node(it.node)
                if isinstance(got, Skipped):
                    self._skip(got.path, got.reason)
                    items[n] = None
                else:
                    items[n] = got

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
            self.base_kind = thin.BASE_DIR
        elif not stat.S_ISREG(bst.st_mode):
            raise UsageError(f"base {self.base} is neither a file nor a directory")
        base = os.path.realpath(base)
        for it in map_tree([base], self.one_file_system, dirs=self.dirs):
            if isinstance(it, Skipped):
                self._skip(it.path, f"base file not usable: {it.reason}")
            elif isinstance(it, Mapped):
                node = it.node
                rel = node.name.partition(b"/")[2] if self.base_kind == thin.BASE_DIR else b""
                fileno = builder.add(fstab.number(it.fs), node.st.st_size, it.ext)
                self.base_files[fileno] = _BaseFile(rel, node, node.st)
        if not self.base_files:
            raise UsageError(f"base {self.base} holds no regular file")
        self.known.base_files.update(self.base_files)

    # -- phase 2: write ----------------------------------------------------

    def _write(self, items: list[WalkedFile | Unopened | _Link | _Other | None], plan: Plan,
               workers: Workers) -> None:
        s, sink = self.summary, self.sink
        ops = OpWriter(sink, workers, s, self._open_base, self.progress)
        files = FileWriter(sink, s, self.capture, plan, self.known, ops,
                           self.codec == fmt.CODEC_ZSTD, self.redirect is None,
                           self._changed, self._skip)
        others = Others(s, {v: k for k, v in (self.redirect or {}).items()}, self._changed,
                        self._skip)
        ahead = ReadAhead(items, WalkedFile, plan, sink, workers, min(self.capture.small, INLINE),
                          self.redirect is None) \
            if sink.read_ahead() and available(sink.small_level(workers)) else None
        clones = CloneAhead(items, WalkedFile, plan, sink, workers, self.capture,
                            self.codec == fmt.CODEC_ZSTD) \
            if CloneAhead.wanted(self.capture, sink, self.redirect is None) else None
        try:
            self._write_items(items, files, others, ahead, clones)
        finally:
            try:
                if clones is not None:
                    clones.close()
            finally:
                if ahead is not None:
                    ahead.close()

    def _write_items(self, items: list, files: FileWriter, others: Others,
                     ahead: ReadAhead | None, clones: CloneAhead | None) -> None:
        s, sink = self.summary, self.sink
        # walk item -> entry id (-1: none), 8 bytes an item
        entry_of_item = array.array("q", [-1]) * len(items)
        # The unopened files of a window of the walk are encoded in one call
        # (repo/unopened.py), each run of them in a row written in one write.
        enc = None
        window_end = 0
        ubase = 0  # the number in ``enc`` of the next unopened file
        skip_to = 0  # items before this were written with a run of unopened files
        for n, item in enumerate(items):
            if n >= window_end:
                if n:
                    # what the window's files needed and let go (read-ahead
                    # batches, packs, compressed chunks) back to the kernel:
                    # glibc keeps it resident, and the peak grew by it
                    native.trim()
                window_end = min(n + WINDOW, len(items))
                batch = [it for it in items[n:window_end] if isinstance(it, Unopened)]
                enc = sink.encode_unopened(batch) if batch else None
                ubase = 0
            if n < skip_to or item is None:
                continue
            if isinstance(item, Unopened):
                skip_to = n + 1
                while skip_to < window_end and isinstance(items[skip_to], Unopened):
                    skip_to += 1
                run = typing.cast(list[Unopened], items[n:skip_to])
                first = files.write_unopened(enc, ubase, ubase + len(run), run)
                for k, it in enumerate(run):
                    entry_of_item[n + k] = first + k
                    self.listed(it.node.name)
                ubase += len(run)
                continue
            if isinstance(item, _Other):
                e = others.entry(item.node)
                if e is not None:
                    sink.entry(e)
                    others.stored(e)
                    entry_of_item[n] = e.id
                    self.listed(e.path)
                continue
            if isinstance(item, _Link):
                target = entry_of_item[item.first]
                if target >= 0:
                    e = entry_for(item.node, fmt.K_HARDLINK, item.node.st)
                    e.link = target
                    sink.entry(e)
                    entry_of_item[n] = e.id
                    s.hardlinks += 1
                    self.listed(e.path)
                    continue
                # the first name vanished: store this name as a file of its own
                item = WalkedFile(item.node, -1, None)
            early = ahead.take(n) if ahead is not None else None
            try:
                pre = clones.take(n) if clones is not None else None
            except BaseException:  # a signal while the next are prepared
                if early is not None:
                    os.close(early.fd)
                raise
            eid = files.write(item, early, pre)
            if eid is not None:
                entry_of_item[n] = eid
                self.listed(item.node.name)
