"""The bytes of the file a restore is writing: stored bytes written (a
Btrfs compressed extent written as it was stored, where DEST takes it;
with --reshare-existing, cloned from the copy already there and compared
first), ranges that exist elsewhere cloned or copied (restore/cloner.py),
and the ranges cloned from a base or a sparse file hashed afterwards."""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.archive.events import FileState
from cloneaware.fsinfo import errno_reason
from cloneaware.restore.base import verify_ranges
from cloneaware.restore.beside import CHUNK, ShareIndex
from cloneaware.restore.cloner import Cloner, Counts

#: --reshare-existing compares what it cloned from the old copy in slices of
#: this size, and writes the slices that differ
REUSE_SLICE = 64 << 10


@dataclass(slots=True)
class OpenFile:
    """The regular file being written: its descriptor and temporary name."""

    entry: fmt.Entry
    fd: int
    #: its directory, while it is opened: Tree may close it later (an LRU)
    pfd: int
    tmp: bytes
    where: str
    dirty_at_start: int  # bytes written or copied before it: writeback to wait for
    staged: bool = False
    #: made under its final name below a new directory (restore/fresh.py)
    fresh: bool = False
    #: --reshare-existing: the file already at this name, and its size
    old_fd: int | None = None
    old_size: int = 0
    reused: bool = False  # some of it was cloned from the old copy
    #: the old copy is the file's place in DEST, cloned from as a file
    #: beside the restore (a staged file), not replaced by it
    old_beside: bool = False

    def close(self) -> None:
        if self.old_fd is not None:
            os.close(self.old_fd)
            self.old_fd = None


class FileData:
    """Writes into one file at a time.  ``reshare_existing``: stored bytes
    are first cloned from the file already at the entry's name (see
    ``_put``)."""

    def __init__(self, counts: Counts, warn: Callable[[str], None], dest: str,
                 reshare_existing: bool = False, share: ShareIndex | None = None):
        self.counts = counts
        self.cloner = Cloner(counts)
        self.warn = warn
        self.dest = dest
        self.reshare_existing = reshare_existing
        self.share = share  # --share-with
        #: why DEST does not take encoded writes (None: try them)
        self.no_encoded: str | None = None
        self.reuse_off: str | None = None  # why cloning from old copies stopped
        #: of written: as Btrfs compressed extents; --reshare-existing: cloned
        #: from the old copy and found to differ, so written
        self.encoded_written = 0
        self.reuse_differing = 0

    def dirty(self) -> int:
        """Bytes written or copied so far: what writeback has to carry."""
        return self.counts.written_bytes + self.counts.copied_bytes

    def open_old(self, cur: OpenFile, name: bytes) -> None:
        """--reshare-existing: the regular file already at ``name``, if any,
        to clone from."""
        if not self.reshare_existing or self.reuse_off is not None:
            return
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                fd = os.open(name, flags | os.O_NOATIME, dir_fd=cur.pfd)
            except PermissionError:
                fd = os.open(name, flags, dir_fd=cur.pfd)
        except OSError:
            return  # nothing there, or nothing this user may read: restored as usual
        self.use_old(cur, fd)

    def use_old(self, cur: OpenFile, fd: int, beside: bool = False) -> None:
        """Clone ``cur``'s stored ranges from ``fd`` (a regular file, taken
        over) at the same offsets; ``beside``: a file left in place."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not st.st_size:
            os.close(fd)
            return
        cur.old_fd, cur.old_size, cur.old_beside = fd, st.st_size, beside

    def write(self, cur: OpenFile, off: int, data, extent: fmt.BtrfsExtent | None) -> None:
        if extent is not None and self.no_encoded is None and \
                self._encoded_write(cur, off, data, extent):
            return
        self._put(cur, data, off)

    def _encoded_write(self, cur: OpenFile, off: int, data, x: fmt.BtrfsExtent) -> bool:
        """Write a Btrfs extent as it was stored: the same compressed bytes,
        the same window, nothing compressed again (its bytes were checked
        against the record's SHA-256 when it was read).  False where the
        kernel will not (no CAP_SYS_ADMIN, a nodatasum file, an unaligned
        range): the caller writes the bytes plainly."""
        try:
            native.btrfs_encoded_write(cur.fd, off, x.data, len(data), x.unencoded_len,
                                       x.unencoded_offset, x.compression, cur.where)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS):
                self.no_encoded = os.strerror(e.errno)  # not for the rest of the run
                return False
            if e.errno == errno.EINVAL:
                return False
            raise
        self.counts.written_bytes += len(data)
        self.encoded_written += len(data)
        return True

    def _put(self, cur: OpenFile, data, off: int) -> None:
        """Stored bytes (checked against their SHA-256 by the reader) at
        ``off``: cloned from the file already at this name
        (--reshare-existing, or a staged file's place in DEST) at the same
        offset, else from --share-with files where their chunks hash the
        same (restore/beside.py), else written."""
        n = len(data)
        if cur.old_fd is not None and n and off + n <= cur.old_size and \
                self.clone_verified(cur, data, off, cur.old_fd, off, cur.old_size, cur.old_beside):
            return
        if self.share and n >= CHUNK:
            mv = memoryview(data)
            pos = 0
            for lo, hi, number, soff in self.share.runs(mv, off):
                src = self.share.fd(number)
                if src is None or not self.clone_verified(cur, mv[lo:hi], off + lo, src[0],
                                                          soff, src[1], True):
                    continue
                if lo > pos:
                    self.cloner.write(cur.fd, mv[pos:lo], off + pos, cur.where)
                pos = hi
            if pos:
                if pos < n:
                    self.cloner.write(cur.fd, mv[pos:], off + pos, cur.where)
                return
        self.cloner.write(cur.fd, data, off, cur.where)

    def clone_verified(self, cur: OpenFile, data, off: int, sfd: int, soff: int,
                       src_size: int, beside: bool = False) -> bool:
        """Put ``data`` at ``off`` by cloning it from ``sfd`` at ``soff``,
        then reading it back from the new file and comparing (clone, then
        verify: the source may be written meanwhile, the new file is ours);
        only what differs is written.  A tail the kernel would not clone
        (docs/KERNEL.md C1-C3) is written.  False, with nothing done, where
        the range cannot be cloned (the caller writes it); ``beside``:
        counted as cloned from a file beside the restore, not from the old
        copy."""
        n = len(data)
        if self.reuse_off is not None or not n or soff + n > src_size:
            return False
        bs = self.cloner.block
        end = off + n
        clen = n if (n % bs == 0 or (soff + n == src_size and end == cur.entry.size)) \
            else n - n % bs
        if off % bs or soff % bs or clen <= 0:
            return False
        try:
            native.ficlonerange(cur.fd, sfd, soff, clen, off, cur.where)
        except OSError as ex:
            if beside and ex.errno not in native.NOT_SUPPORTED:
                return False  # a file beside the restore, changed or busy: written
            if ex.errno not in native.NOT_SUPPORTED:
                raise
            if ex.errno not in (errno.EINVAL, errno.EXDEV):
                self.reuse_off = errno_reason(ex.errno)
                self.warn(f"{self.dest}: not cloning from the files already there: "
                          f"{self.reuse_off}")
            return False
        cur.reused = True
        mv = memoryview(data)
        self._compare(cur, mv, off, clen, beside)
        if clen < n:
            self.cloner.write(cur.fd, mv[clen:], off + clen, cur.where)
        return True

    def _compare(self, cur: OpenFile, mv: memoryview, off: int, clen: int,
                 beside: bool) -> None:
        """The first ``clen`` bytes were cloned: read them back, and write
        the slices that differ (a chunk of 4 MiB with one edited block
        costs that block, not the chunk)."""
        got = memoryview(_pread_all(cur.fd, clen, off, cur.where))
        for lo in range(0, clen, REUSE_SLICE):
            hi = min(lo + REUSE_SLICE, clen)
            if got[lo:hi] == mv[lo:hi]:
                if beside:
                    self.counts.beside_bytes += hi - lo
                else:
                    self.counts.reused_bytes += hi - lo
            else:
                self.reuse_differing += hi - lo
                self.cloner.write(cur.fd, mv[lo:hi], off + lo, cur.where)

    def clone(self, cur: OpenFile, sfd: int, soff: int, length: int, off: int,
              src_size: int, channel: str) -> None:
        self.cloner.clone_or_copy(cur.fd, sfd, soff, length, off, src_size, cur.entry.size,
                                  cur.where, channel)

    def verify(self, cur: OpenFile, st: FileState, trust_base: bool) -> int:
        """Hash the bytes now in the restored file where they came from the
        base (unless --trust-base) or the sparse file, and compare; the
        bytes verified."""
        ranges = [] if trust_base else list(st.base_ranges)
        ranges += st.external_ranges
        return verify_ranges(cur.fd, ranges, cur.where) if ranges else 0


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
