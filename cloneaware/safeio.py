"""Two primitives every writer and reader of user paths shares, one of each:

- ``AtomicFile``: a file written under a temporary name in its directory
  and renamed into place only when complete and on disk, so that no crash,
  error or kill leaves a file under the final name that is not whole;
- ``open_beneath``: open a path below a directory descriptor one component
  at a time with O_NOFOLLOW, so that no symlink (planted, or swapped in
  after a check) leads outside it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets

from cloneaware import native
from cloneaware.errors import UsageError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: Written data is queued for writeback every this many bytes, so that the
#: fsync at the end waits for the tail only.
WRITEBACK_STEP = 16 << 20


def umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Queue a range for writeback without waiting (best effort: the fsync
    at the end is the guarantee)."""
    try:
        native.sync_file_range_write(fd, offset, length)
    except OSError:
        pass


class _WritebackWriter:
    """A buffered writer that queues what it wrote for writeback every
    WRITEBACK_STEP bytes."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = os.fdopen(fd, "wb", buffering=1 << 20, closefd=False)
        self.n = self.queued = 0

    def write(self, b) -> int:
        n = self.buf.write(b)
        self.n += n
        if self.n - self.queued >= WRITEBACK_STEP:
            self.buf.flush()
            start_writeback(self.fd, self.queued, self.n - self.queued)
            self.queued = self.n
        return n

    def flush(self) -> None:
        self.buf.flush()

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.buf.close()


class AtomicFile:
    """``name`` (in ``dir_fd``, or a path) written as a temporary file
    ``.NAME.XXXXXXXX.partial`` beside it.

    ``write()`` goes through a buffer that starts writeback as it goes;
    ``fd`` is there for pwrite/ftruncate/setxattr.  ``commit()`` flushes,
    fsyncs, sets the final mode and renames into place: over an existing
    file only if ``replace``, else failing with UsageError if the name
    appeared meanwhile.  ``abort()`` (or leaving a ``with`` block by an
    exception) removes the temporary file.  ``display`` names the file in
    messages (default: the path as given).
    """

    def __init__(self, name, dir_fd: int | None = None, replace: bool = False,
                 display: str | None = None, read: bool = False, mode: int | None = None):
        self.display = display if display is not None else os.fsdecode(name)
        self.replace = replace
        self.mode = mode  # what commit() gives it when not told
        if dir_fd is None:
            path = os.fsencode(os.path.abspath(os.fsencode(name)))
            d, base = os.path.split(path)
            self._own_dir = True
            try:
                dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise OSError(e.errno, e.strerror, os.fsdecode(d)) from None
        else:
            base = os.fsencode(name)
            self._own_dir = False
        self.dir_fd = dir_fd
        self.name = base
        self.tmp: bytes | None = b".%s.%s.partial" % (base[:200],
                                                      secrets.token_hex(4).encode())
        flags = (os.O_RDWR if read else os.O_WRONLY) | os.O_CREAT | os.O_EXCL \
            | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self.fd = os.open(self.tmp, flags, 0o600, dir_fd=dir_fd)
        except OSError as e:
            self._close_dir()
            raise OSError(e.errno, e.strerror, self.display) from None
        self.f = _WritebackWriter(self.fd)

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.display) from None

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.fd

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def commit(self, mode: int | None = None) -> None:
        """Make the file durable and give it its name.  ``mode``: its final
        permissions (default: the one given when it was made, else 0o666
        less the umask, as for any new file)."""
        mode = self.mode if mode is None else mode
        if self.tmp is None:
            return
        try:
            self.f.flush()
            os.fsync(self.fd)
            os.fchmod(self.fd, (0o666 & ~umask()) if mode is None else mode)
            native.renameat2(self.dir_fd, self.tmp, self.dir_fd, self.name,
                             noreplace=not self.replace, path=self.display)
        except OSError as e:
            if e.errno == errno.EEXIST:
                self.abort()
                raise UsageError(f"{self.display} exists; use --force to overwrite it") \
                    from None
            self.abort()
            raise OSError(e.errno, e.strerror, self.display) from None
        self.tmp = None
        self._close()

    def abort(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            except OSError:
                pass
            self.tmp = None
        self._close()

    def _close(self) -> None:
        if self.fd >= 0:
            try:
                self.f.close()
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1
        self._close_dir()

    def _close_dir(self) -> None:
        if self._own_dir and self.dir_fd is not None and self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self.tmp is not None:
            self.abort()


def open_beneath(root_fd: int, parts: list[bytes], flags: int = DIR_FLAGS,
                 create_dirs: bool = False, mode: int = 0o755) -> int:
    """Open ``parts`` (path components, none '', '.' or '..') below root_fd.

    Every directory on the way is opened with O_NOFOLLOW|O_DIRECTORY (and
    created first if ``create_dirs``); the last component with ``flags``
    (O_NOFOLLOW is added).  An empty ``parts`` opens root_fd itself again.
    """
    if not parts:
        return os.open(".", flags & ~os.O_NOFOLLOW, dir_fd=root_fd)
    cur = root_fd
    try:
        for i, comp in enumerate(parts):
            last = i == len(parts) - 1
            if create_dirs and (not last or flags & os.O_DIRECTORY):
                try:
                    os.mkdir(comp, mode, dir_fd=cur)
                except FileExistsError:
                    pass
            nfd = os.open(comp, (flags | os.O_NOFOLLOW) if last else DIR_FLAGS, dir_fd=cur)
            if cur != root_fd:
                os.close(cur)
            cur = nfd
        return cur
    except BaseException:
        if cur != root_fd:
            os.close(cur)
        raise


def _unlink_or_dir(dfd: int, name: bytes) -> bool:
    """Unlink ``name``; False if it is a directory (left for the caller)."""
    try:
        os.unlink(name, dir_fd=dfd)
        return True
    except IsADirectoryError:
        return False
    except OSError as e:
        if e.errno == errno.EPERM and os.path.isdir(f"/proc/self/fd/{dfd}/{os.fsdecode(name)}"):
            return False  # some filesystems say EPERM for a directory
        raise


def remove_tree(dfd: int, name: bytes) -> None:
    """Remove ``name`` in ``dfd`` and, if it is a directory, everything in
    it, by descriptor and without recursion (any depth; symlinks are removed,
    not followed)."""
    if _unlink_or_dir(dfd, name):
        return
    # (parent descriptor, name, own descriptor, names still to remove)
    stack: list[tuple[int, bytes, int, list[bytes]]] = []
    fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    stack.append((dfd, name, fd, [os.fsencode(n) for n in os.listdir(fd)]))
    try:
        while stack:
            pfd, pname, fd, todo = stack[-1]
            if not todo:
                stack.pop()
                os.close(fd)
                os.rmdir(pname, dir_fd=pfd)
                continue
            n = todo.pop()
            if not _unlink_or_dir(fd, n):
                sub = os.open(n, DIR_FLAGS, dir_fd=fd)
                stack.append((fd, n, sub, [os.fsencode(x) for x in os.listdir(sub)]))
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)


def sha256_range(fd: int, offset: int, length: int) -> bytes:
    """The SHA-256 of [offset, offset+length) of ``fd`` (fewer bytes if the
    file ends before)."""
    h = hashlib.sha256()
    pos = offset
    end = offset + length
    while pos < end:
        b = os.pread(fd, min(4 << 20, end - pos), pos)
        if not b:
            break
        h.update(b)
        pos += len(b)
    return h.digest()


def lexists(dfd: int, name: bytes) -> bool:
    """Whether ``name`` is in directory ``dfd`` (a symlink too, not followed)."""
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def pid_alive(pid: int) -> bool:
    """Is process PID (on this host) still there?  For the names and lock
    files that carry the PID of the run that made them."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
