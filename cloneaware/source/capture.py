"""Point-in-time capture: clone a file before reading it, so that a file
written during the backup (a running VM's image, a database) is saved as
one instant's state instead of a mixture of many.

``FICLONE`` takes the inode locks and flushes dirty pages, so the clone
holds the file as it was between two write calls; the writer waits only for
the clone itself (docs/KERNEL.md).  The clone goes into an ``O_TMPFILE`` in
the file's own directory: it has no name, so nothing is left behind by a
crash or a kill, and the directory's mtime does not change.

Files of at most SMALL bytes are not cloned: a clone costs about 70 us per
file (measured on 100,000 files of 100 B to 8 KiB: 7-10 s read live, 15-16 s
cloned, on Btrfs and XFS alike), and such a file is read with one read call.
On XFS one buffered read is atomic against writes (reads take the inode
lock shared, writes exclusive); on Btrfs and ext4 it is not, so those files
keep the before/after check (size, mtime, ctime, extent map) that reports a
change seen while reading.

Where cloning is impossible (ext4, tmpfs, a read-only mount, no write
permission on the filesystem) the file is read live with the same check,
and the reason is said once per filesystem.  A clone that fails for want of
space (the clone pins the old blocks while it is read) falls back to a live
read of that file, reported, never failing the backup.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware import native
from cloneaware.fsinfo import FsInfo

#: Files up to this size are read with one read call instead of cloned.
SMALL = 64 << 10
#: why a file on a read-only mount or subvolume is read as it is
READ_ONLY = "read-only: nothing can write it"

#: errnos that say the filesystem cannot give us a clone at all
_FS_CANNOT = {errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV, errno.EISDIR}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


@dataclass
class CaptureCounts:
    by_clone: int = 0
    by_snapshot: int = 0
    read_live: int = 0
    #: why files were read live: reason -> number of files
    live_reasons: dict[str, int] = field(default_factory=dict)

    def live(self, reason: str) -> None:
        self.read_live += 1
        self.live_reasons[reason] = self.live_reasons.get(reason, 0) + 1


class Capture:
    """Clones of the files of one backup, each taken just before it is read."""

    def __init__(self, enabled: bool = True, warn: Callable[[str], None] | None = None,
                 small: int = SMALL, place: Callable[[bytes], int | None] | None = None):
        self.enabled = enabled
        self.warn = warn or (lambda msg: None)
        self.small = small
        #: a directory on the file's mount for its clone, or None (its own
        #: directory): a repository keeps clones as anchors there
        self.place = place
        self.counts = CaptureCounts()
        self._no_clone: dict[str, str] = {}  # filesystem key -> why not (said once)
        self._readonly: set[int] = set()  # st_dev of read-only mounts and subvolumes
        self._dir: tuple[bytes, int] | None = None  # the last directory opened

    def _dir_fd(self, src: bytes) -> int:
        d = os.path.dirname(src) or b"."
        if self._dir is not None and self._dir[0] == d:
            return self._dir[1]
        self.close()
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dir = (d, fd)
        return fd

    def _cannot(self, fs: FsInfo, src: bytes, reason: str) -> str:
        if fs.key not in self._no_clone:
            self._no_clone[fs.key] = reason
            self.warn(f"{os.fsdecode(src)}: {reason} on this {fs.type} filesystem; its "
                      "files are read live and checked for changes instead")
        return reason

    def clone(self, fd: int, src: bytes, size: int, fs: FsInfo,
              dir_fd: int | None = None) -> int | str:
        """A descriptor of a clone of ``fd`` (the file ``src`` of ``size``
        bytes on ``fs``), or why not (then the file is read live: the caller
        counts it with ``counts.live``).  ``dir_fd``: the file's directory
        (the walk's descriptor, borrowed): else it is opened by ``src``,
        which a tree deeper than PATH_MAX does not allow."""
        if not self.enabled:
            return "--no-point-in-time"
        if size <= self.small:
            return f"small file (up to {self.small >> 10} KiB, read in one call)"
        why = self._no_clone.get(fs.key)
        if why is not None:
            return why
        if self._readonly and os.fstat(fd).st_dev in self._readonly:
            return READ_ONLY
        where = self.place(src) if self.place is not None else None
        try:
            if where is None:
                where = dir_fd if dir_fd is not None else self._dir_fd(src)
            tfd = os.open(b".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=where)
        except OSError as e:
            if e.errno in _FS_CANNOT or e.errno == errno.EINVAL:
                return self._cannot(fs, src, "no O_TMPFILE")
            if e.errno == errno.EROFS:
                # A read-only mount, or a read-only Btrfs subvolume (a snapshot)
                # inside a writable one: nothing can write its files while they
                # are read, and the filesystem's other subvolumes can still clone.
                self._readonly.add(os.fstat(fd).st_dev)
                return READ_ONLY
            if e.errno in (errno.EACCES, errno.EPERM):
                return self._cannot(fs, src, "no write permission for a clone")
            if e.errno in _NO_SPACE:
                return self._no_space(src)
            raise OSError(e.errno, e.strerror, os.fsdecode(src)) from None
        try:
            native.ficlone(tfd, fd, os.fsdecode(src))
        except OSError as e:
            os.close(tfd)
            if e.errno in _FS_CANNOT:
                return self._cannot(fs, src, "the filesystem cannot clone files")
            if e.errno in _NO_SPACE:
                return self._no_space(src)
            if e.errno in (errno.EINVAL, errno.ETXTBSY, errno.EPERM, errno.EACCES):
                # e.g. a Btrfs NOCOW file cloned into a COW directory, a swap file
                self.warn(f"{os.fsdecode(src)}: cannot be cloned ({e.strerror}); read live")
                return "cannot be cloned"
            raise
        self.counts.by_clone += 1
        return tfd

    def _no_space(self, src: bytes) -> str:
        self.warn(f"{os.fsdecode(src)}: no space for a point-in-time clone; read live")
        return "no space for a clone"

    def close(self) -> None:
        if self._dir is not None:
            os.close(self._dir[1])
            self._dir = None
