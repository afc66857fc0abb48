"""One regular file of a backup, from its walk record to its records in
the sink: opened; cloned for its point in time (or read from a snapshot,
or live); taken unread where the sink's metadata rule says it did not
change; its plan checked against the map of what is read (a stale plan
stores the file whole and lets nothing refer to it); its ranges written
(backup/ops.py); checked for changes while it was read; kept as an anchor
where the sink keeps them."""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cloneaware import fsinfo
from cloneaware.archive import format as fmt
from cloneaware.backup.ahead import Early
from cloneaware.backup.cloneahead import Prepared
from cloneaware.backup.meta import entry_for, map_digest, read_iflags, read_xattrs, same_stat
from cloneaware.backup.ops import Known, OpWriter, Store, plan_ops
from cloneaware.backup.sinks import Sink
from cloneaware.backup.summary import Summary
from cloneaware.index.plan import PIECE_DTYPE, Plan, data_ranges
from cloneaware.source.capture import Capture
from cloneaware.source.mapping import Unopened, extent_map, open_source
from cloneaware.source.walk import Node


@dataclass(slots=True)
class WalkedFile:
    """A regular file the walk found and mapped."""

    node: Node
    fileno: int  # number in the sharing index; -1: not mapped (plan unusable)
    #: map_digest of the map the plan was made from (None: not mapped)
    digest: bytes | None
    #: that map, for the files cache (repo/filescache.py), until it is written
    ext: np.ndarray | None = None


class FileWriter:
    """Writes regular files into ``sink``.  ``live``: files are read where
    they are (not from a --snapshot), so each is cloned for its point in
    time where it can be; ``changed(path, why)`` and ``skip(path, why)``
    report."""

    def __init__(self, sink: Sink, summary: Summary, capture: Capture, plan: Plan,
                 known: Known, ops: OpWriter, encoded: bool, live: bool,
                 changed: Callable[[bytes, str], None], skip: Callable[[bytes, str], None]):
        self.sink = sink
        self.s = summary
        self.capture = capture
        self.plan = plan
        self.known = known
        self.ops = ops
        self.encoded = encoded
        self.live = live
        self.changed = changed
        self.skip = skip
        refs = plan.pieces["ref_file"]
        #: file numbers that later places reference
        self.referenced = set(np.unique(refs[refs >= 0]).tolist())

    def invalidate(self, item: WalkedFile) -> None:
        """Nothing may take this file's bytes as those of a place again."""
        if item.fileno >= 0:
            self.known.invalid.add(item.fileno)

    def write(self, item: WalkedFile, early: Early | None = None,
              pre: Prepared | None = None) -> int | None:
        """The file's entry id, or None if it was not stored.  ``early``: the
        file opened and read ahead (backup/ahead.py); ``pre``: opened and
        cloned ahead (backup/cloneahead.py); either's descriptors ours."""
        node = item.node
        try:
            fd = pre.fd if pre is not None else open_source(node) if early is None else early.fd
        except FileNotFoundError:
            self.changed(node.src, "vanished before it was read")
            self.invalidate(item)
            return None
        except OSError as ex:
            if ex.errno == errno.EIO:  # a failing disk ends the job
                raise OSError(ex.errno, ex.strerror, os.fsdecode(node.src)) from None
            self.skip(node.src, ex.strerror or str(ex))
            self.invalidate(item)
            return None
        cap: int | None = None
        #: the xattrs and inode flags read for the metadata rule (or ahead), read once
        meta: tuple[list[tuple[bytes, bytes]], int] | None = \
            early.meta if early is not None else None
        try:
            if pre is not None and isinstance(pre.got, int):
                st = pre.st  # its stat before its clone (taken ahead)
            else:  # a live read: its stat just before, as any file's
                st = early.st if early is not None else os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.changed(node.src, "replaced by another kind of file")
                self.invalidate(item)
                return None
            if not self.live:
                self.capture.counts.by_snapshot += 1  # read-only: nothing writes it
            else:
                got = pre.got if pre is not None else \
                    self.capture.clone(fd, node.src, st.st_size,
                                       fsinfo.fs_info(fd, st.st_dev, node.src),
                                       dir_fd=node.dir_fd())
                if isinstance(got, str):  # no clone: read live
                    got_e = self._unchanged(item, fd, st, meta)
                    if isinstance(got_e, int):
                        return got_e
                    meta = got_e.xattrs, got_e.iflags
                    self.capture.counts.live(got)
                else:
                    cap = got
            return self._write(item, fd, cap, st, meta, early, pre)
        except OSError as ex:
            # Archive writes carry the archive's name; what has none (or a
            # descriptor's number: os.listxattr(fd)) came from this file
            # (fstat, xattrs, reads on the workers).
            if ex.filename is None or isinstance(ex.filename, int):
                raise OSError(ex.errno, ex.strerror, os.fsdecode(node.src)) from None
            raise
        finally:
            if pre is not None:
                pre.close()  # once no worker reads its descriptors
            else:
                os.close(fd)
                if cap is not None:
                    os.close(cap)

    def _entry(self, item: WalkedFile, fd: int, st: os.stat_result, size: int,
               referenced: bool, meta: tuple[list[tuple[bytes, bytes]], int] | None = None
               ) -> fmt.Entry:
        """``meta``: its xattrs and inode flags, if they were just read."""
        e = entry_for(item.node, fmt.K_REG, st)
        e.size = size
        if meta is None:
            e.xattrs = read_xattrs(fd)
            e.iflags = read_iflags(fd)
        else:
            e.xattrs, e.iflags = meta
        if referenced:
            e.eflags |= fmt.EF_REFERENCED
        return e

    def _unchanged(self, item: WalkedFile, fd: int, st: os.stat_result,
                   meta: tuple[list[tuple[bytes, bytes]], int] | None = None) -> int | fmt.Entry:
        """The sink's metadata rule: the same file as in the last backup,
        written by the sink unread.  Its entry id, or else the entry it was
        judged by (its xattrs and flags are not read again; ``meta``: read
        already)."""
        e = self._entry(item, fd, st, st.st_size, item.fileno in self.referenced, meta)
        if not self.sink.unchanged(item.node, st, e, item.ext):
            return e
        if item.fileno >= 0:
            self.known.entry_of_file[item.fileno] = e.id
        s = self.s
        s.files += 1
        s.logical_bytes += st.st_size
        s.unchanged_bytes += st.st_size
        return e.id

    def write_unopened(self, enc, lo: int, hi: int, items: list[Unopened]) -> int:
        """Files its stat proves unchanged (the files cache), ``items``, which
        are files lo .. hi-1 of the batch ``enc`` the sink encoded: written
        by the sink from the cache in one write, never opened.  The first
        one's entry id."""
        first = self.sink.take_unopened_run(enc, lo, hi, [it.node.src for it in items])
        size, data = sum(enc.sizes[lo:hi]), sum(enc.blob_bytes[lo:hi])
        s = self.s
        s.files += hi - lo
        s.unopened_files += hi - lo
        s.logical_bytes += size
        s.unchanged_bytes += size
        s.hole_bytes += size - data
        return first

    def _write(self, item: WalkedFile, fd: int, cap: int | None, st: os.stat_result,
               meta: tuple[list[tuple[bytes, bytes]], int] | None = None,
               early: Early | None = None, pre: Prepared | None = None) -> int:
        node = item.node
        live = cap is None and self.live
        if pre is not None and pre.before is None:
            pre = None  # the clone was not mapped ahead: done here
        if cap is not None:
            # the metadata as near the clone's instant as can be
            st = pre.st_after if pre is not None and pre.st_after is not None else os.fstat(fd)
        pieces, stale, size, before = self._pieces(item, fd, cap, st, pre)
        data_bytes = sum(pieces["length"].tolist())  # numpy's sum: 1 us a file
        e = self._entry(item, fd, st, size, item.fileno in self.referenced and not stale,
                        meta if cap is None else None)
        self.sink.entry(e, st, item.ext)
        if item.fileno >= 0:
            self.known.entry_of_file[item.fileno] = e.id
        data_fd = fd if cap is None else cap
        # after the entry is known: a file may share with itself
        ops = plan_ops(data_fd, item.fileno, pieces, self.known, self.sink, self.encoded)
        op = ops[0] if len(ops) == 1 else None
        if early is not None and (cap is not None or not isinstance(op, Store) or op.encoded
                                  or op.offset != 0 or op.length != early.length):
            early = None  # not the read done ahead: done here
        elif early is not None:
            self.s.read_ahead_files += 1
        short = self.ops.write(data_fd, ops, node.src, early,
                               pre.take if pre is not None and pre.jobs else None)
        if pre is not None and pre.used:
            self.s.cloned_ahead_files += 1
        self.sink.end()
        s = self.s
        s.files += 1
        s.logical_bytes += size
        s.hole_bytes += size - data_bytes
        if live:
            # after the xattrs were read too, for a file read ahead
            after = os.fstat(fd)
            ext = early.ext if early is not None else None
            if ext is None:
                ext = extent_map(fd, after.st_size, node.src)
            if short or not same_stat(after, st) or before != map_digest(ext):
                self.changed(node.src, "file changed as we read it")
                self.invalidate(item)
        elif short:  # a clone or a snapshot cannot shrink: the disk lied
            raise OSError(errno.EIO, "file shorter than its size", os.fsdecode(node.src))
        if not live and not stale:
            self.sink.keep(data_fd, cap is not None, e, node.src)
        return e.id

    def _pieces(self, item: WalkedFile, fd: int, cap: int | None, st: os.stat_result,
                pre: Prepared | None = None) -> tuple[np.ndarray, bool, int, bytes | None]:
        """(the pieces to write, whether the plan was stale, the size, the
        digest of the layout the reads are checked against).  ``pre``: the
        clone's size and map were taken ahead."""
        node = item.node
        size = st.st_size
        before: np.ndarray | None = None  # a map taken now, if one is
        if cap is not None:
            # The clone is one instant's state and nobody else writes it;
            # its map must be the one the plan was made from.
            if pre is not None and pre.before is not None:
                size, before = pre.size, pre.before
            else:
                size = os.fstat(cap).st_size
                before = extent_map(cap, size, node.src)
            digest: bytes | None = map_digest(before)
            stale = item.fileno < 0 or item.digest is None or size != node.st.st_size \
                or digest != item.digest
        else:
            stale = item.digest is None or item.fileno < 0 or not same_stat(st, node.st)
            if stale:
                before = extent_map(fd, size, node.src)
            digest = map_digest(before) if before is not None else item.digest
        if not stale:
            return self.plan.file_pieces(item.fileno), False, size, digest
        assert before is not None
        # Changed since it was mapped: its sharing plan is stale.  Store all
        # of its data itself, and let nothing refer to it.
        if item.fileno >= 0 and cap is None and self.live:
            self.changed(node.src, "changed between scan and read; stored whole")
        self.invalidate(item)
        d = data_ranges(before, size)
        p = np.zeros(len(d), dtype=PIECE_DTYPE)
        p["logical"], p["length"], p["ref_file"] = d["logical"], d["length"], -1
        return p, True, size, digest
