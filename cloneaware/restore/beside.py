"""Restoring beside what is already on disk (issue 30): bytes a restore
would write that a file already on DEST's filesystem holds are cloned from
that file instead, so what is restored next to its family shares with it.

Two kinds of file are cloned from:

- **the snapshot's own files already in DEST**: a restore with --include
  that needs bytes of a file it is not restoring (a clone restored beside
  its golden image) looks for that file at its place in DEST.  From an
  archive, the left-out file is staged as before, cloning each range from
  the file in DEST; from a repository, ``left_out_blobs`` says, from a
  pass over the manifest, which left-out file holds each blob and where;
- **--share-with PATH...**: files or trees on DEST's filesystem, read once
  before the restore and indexed by the SHA-256 of each CHUNK-aligned
  chunk (``ShareIndex``); a restored range whose aligned chunks hash the
  same is cloned from there.

Nothing is trusted by name or by the hash taken beforehand: every range is
cloned first and then read back from the restored file and compared with
the stored bytes, and whatever differs is written (restore/filedata.py,
the same clone-then-verify as --reshare-existing).  A file that changes
meanwhile costs space, never correctness."""
from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass

from cloneaware.archive.events import BlobEvent, EntryEvent
from cloneaware.archive.format import K_REG
from cloneaware.archive.reader import Stream
from cloneaware.errors import UsageError
from cloneaware.restore.select import Selection
from cloneaware.safeio import open_beneath

#: --share-with matches ranges in chunks of this size at file offsets that
#: are multiples of it (blobs are cut on a grid of at least this size, and a
#: VM image's clone keeps its bytes at the golden image's offsets)
CHUNK = 64 << 10
_KEY = 16  # bytes of the SHA-256 kept per chunk
_READ = 4 << 20


def left_out_blobs(manifest: bytes, select: Selection
                   ) -> dict[bytes, tuple[bytes, int, int, int]]:
    """blob id -> (path below DEST, file offset of the blob's byte 0, and
    the part of the blob that file holds: start, end) for the regular files
    of a manifest that ``select`` leaves out (the first such place of each
    blob): where DEST may already hold them."""
    sel = select.fresh()
    out: dict[bytes, tuple[bytes, int, int, int]] = {}
    where: bytes | None = None
    for ev in Stream(io.BytesIO(manifest)).events():
        if isinstance(ev, EntryEvent):
            e = ev.entry
            where = None
            taken = sel.take(e.path, e.kind)  # every entry: a directory taken takes its tree
            if e.kind == K_REG and not taken:
                where = sel.mapped(e.path)
        elif where is not None and isinstance(ev, BlobEvent):
            out.setdefault(ev.blob_id, (where, ev.offset - ev.blob_offset, ev.blob_offset,
                                        ev.blob_offset + ev.length))
    return out


@dataclass
class ShareStats:
    files: int = 0
    bytes_read: int = 0
    chunks: int = 0
    skipped_other_fs: int = 0


class ShareIndex:
    """``--share-with``: the chunks of files on DEST's filesystem by hash.
    Files are reopened by path when a chunk is cloned (at most ``cap`` kept
    open)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.chunks: dict[bytes, tuple[int, int]] = {}  # key -> (file number, offset)
        self.stats = ShareStats()
        self._fds: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self.chunks)

    @classmethod
    def build(cls, paths: list[str], dest: str) -> ShareIndex:
        """Read every regular file below ``paths`` (not following symbolic
        links) that is on the filesystem DEST is (or will be) on."""
        dev = _dest_dev(dest)
        idx = cls()
        for p in paths:
            try:
                st = os.lstat(p)
            except OSError as e:
                raise UsageError(f"--share-with {p}: {e.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != dev:
                    raise UsageError(f"--share-with {p}: not on the filesystem of {dest} "
                                     "(clones are made within one filesystem)")
                for top, dirs, files in os.walk(p):
                    # not into other filesystems (clones stay within one)
                    dirs[:] = sorted(d for d in dirs if _dev(os.path.join(top, d)) == dev)
                    for n in sorted(files):
                        idx._add(os.path.join(top, n), dev)
            elif stat.S_ISREG(st.st_mode):
                if st.st_dev != dev:
                    raise UsageError(f"--share-with {p}: not on the filesystem of {dest} "
                                     "(clones are made within one filesystem)")
                idx._add(p, dev)
            else:
                raise UsageError(f"--share-with {p}: not a regular file or a directory")
        return idx

    def _add(self, path: str, dev: int) -> None:
        fd = _open_regular(path)
        if fd is None:
            return  # gone, unreadable, or not a regular file: nothing to share with
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < CHUNK:
                return
            if st.st_dev != dev:
                self.stats.skipped_other_fs += 1
                return
            number = len(self.paths)
            self.paths.append(path)
            self.stats.files += 1
            off = 0
            while True:
                try:
                    buf = os.pread(fd, _READ, off)
                except OSError:
                    return
                if not buf:
                    break
                self.stats.bytes_read += len(buf)
                mv = memoryview(buf)
                for lo in range(0, len(buf) - CHUNK + 1, CHUNK):
                    key = hashlib.sha256(mv[lo:lo + CHUNK]).digest()[:_KEY]
                    if key not in self.chunks:
                        self.chunks[key] = (number, off + lo)
                        self.stats.chunks += 1
                off += len(buf)
                if len(buf) % CHUNK:
                    break  # the end of the file (or a short read: the rest is left)
        finally:
            os.close(fd)

    def runs(self, data: memoryview, off: int) -> list[tuple[int, int, int, int]]:
        """The ranges of ``data`` (to be written at file offset ``off``)
        whose aligned chunks an indexed file holds: (start, end) in
        ``data``, file number and offset there; adjacent chunks that
        continue one another are one run."""
        out: list[tuple[int, int, int, int]] = []
        n = len(data)
        first = -off % CHUNK
        for lo in range(first, n - CHUNK + 1, CHUNK):
            hit = self.chunks.get(hashlib.sha256(data[lo:lo + CHUNK]).digest()[:_KEY])
            if hit is None:
                continue
            number, soff = hit
            if out and out[-1][1] == lo and out[-1][2] == number \
                    and out[-1][3] + (lo - out[-1][0]) == soff:
                a, _, num, so = out[-1]
                out[-1] = (a, lo + CHUNK, num, so)
            else:
                out.append((lo, lo + CHUNK, number, soff))
        return out

    def fd(self, number: int) -> tuple[int, int] | None:
        """A descriptor of file ``number`` and its size now; None if it
        cannot be opened any more."""
        fd = self._fds.get(number)
        if fd is None:
            fd = _open_regular(self.paths[number])
            if fd is None:
                return None
            if len(self._fds) >= 64:
                self.close()
            self._fds[number] = fd
        return fd, os.fstat(fd).st_size

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class BesideFiles:
    """Regular files already below DEST (the snapshot's own, left out of
    this restore), opened for reading by their path below DEST's
    descriptor, never through a symbolic link, and kept open."""

    #: descriptors kept open at most (then all are closed and reopened as needed)
    CAP = 64

    def __init__(self) -> None:
        self.fds: dict[bytes, tuple[int, int]] = {}
        self.absent: set[bytes] = set()

    def get(self, root: int | None, path: bytes) -> tuple[int, int] | None:
        """The file at ``path`` and its size; None if there is none."""
        got = self.fds.get(path)
        if got is not None or path in self.absent or root is None:
            return got
        fd = None
        try:  # looked at first without opening it: a device is never opened
            pfd = open_beneath(root, path.split(b"/"), os.O_PATH | os.O_CLOEXEC)
        except OSError:
            pfd = None
        if pfd is not None:
            try:
                fd = _reopen_regular(pfd)
            finally:
                os.close(pfd)
        if fd is None:
            self.absent.add(path)
            return None
        size = os.fstat(fd).st_size
        if not size:
            os.close(fd)
            self.absent.add(path)
            return None
        if len(self.fds) >= self.CAP:
            self.close()
        self.fds[path] = got = (fd, size)
        return got

    def close(self) -> None:
        for fd, _size in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _reopen_regular(pfd: int) -> int | None:
    """``pfd`` (an O_PATH descriptor) opened for reading if it is a regular
    file; None otherwise (a device, a FIFO, a directory is never opened)."""
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            return None
        proc = f"/proc/self/fd/{pfd}"
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            return os.open(proc, flags | os.O_NOATIME)
        except PermissionError:
            return os.open(proc, flags)
    except OSError:
        return None


def _open_regular(path) -> int | None:
    """The regular file at ``path`` (not through a symlink) opened for
    reading, or None."""
    try:
        pfd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _reopen_regular(pfd)
    finally:
        os.close(pfd)


def _dev(path: str) -> int:
    try:
        return os.lstat(path).st_dev
    except OSError:
        return -1


def _dest_dev(dest: str) -> int:
    """The device of DEST, or of its nearest existing parent."""
    p = os.path.abspath(dest)
    while True:
        try:
            return os.stat(p).st_dev
        except FileNotFoundError:
            up = os.path.dirname(p)
            if up == p:
                raise
            p = up
