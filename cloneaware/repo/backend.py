"""Where a repository's objects live.  A backend stores whole named objects
(docs/REPOSITORY.md, "Layout") and knows nothing of what they hold: a
local directory here, ssh:// through ``cloneaware serve`` (repo/sshbackend.py),
s3:// (repo/s3backend.py).  ``repo/connect.py`` picks one from a URL.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from typing import Protocol

from cloneaware.errors import RepositoryError, UsageError
from cloneaware.safeio import DIR_FLAGS, AtomicFile

#: The names a repository holds: config, or a directory and an id (packs
#: under data/xx/), or a temporary file of ours (never listed).
NAME = re.compile(r"\A(?:config|(?:keys|index|snapshots|locks)/[0-9a-f]{64}"
                  r"|data/[0-9a-f]{2}/[0-9a-f]{64})\Z")
DIRS = ("keys", "index", "snapshots", "locks", "data")


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise RepositoryError(f"not a repository object name: {name!r}")
    if name.startswith("data/") and name[5:7] != name[8:10]:
        raise RepositoryError(f"pack {name!r} is in the wrong directory")
    return name


def check_content(name: str, data) -> None:
    """A pack, index or snapshot object must be stored under the SHA-256 of
    its bytes (docs/REPOSITORY.md, "Layout")."""
    h = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        h.update(data)
    else:
        for part in data:
            h.update(part)
    if h.hexdigest() != name.rpartition("/")[2]:
        raise UsageError(f"{name}: its bytes do not hash to its name; refused")


def pack_name(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


@dataclass(frozen=True)
class Listed:
    name: str
    size: int
    mtime: float


#: the most a read of a whole object may bring (an object, or a pack that
#: check --read-data reads whole, is far smaller; a store that serves more
#: is refused before the bytes are taken)
WHOLE_MAX = 1 << 30


def too_large(where: str, name: str, size: int, limit: int) -> RepositoryError:
    return RepositoryError(f"{where}: {name} is {size} bytes, more than any such object can "
                           f"be ({limit}): damaged or hostile")


class Backend(Protocol):
    where: str  # the repository as the user named it, for messages
    #: where it is, the same however it was named (a copy elsewhere, with the
    #: same id, has another): what this host's anchors and state are kept by
    location: str

    def read(self, name: str, offset: int = 0, length: int | None = None,
             limit: int = WHOLE_MAX) -> bytes:
        """Bytes of object ``name``; ``length`` None: to its end, refused if
        that is more than ``limit``."""
    def write(self, name: str, data, create_only: bool = False) -> None: ...
    def delete(self, name: str) -> None: ...
    def listing(self, directory: str) -> list[Listed]: ...
    def exists(self, name: str) -> bool: ...
    def sync(self) -> None: ...
    def is_empty(self) -> bool: ...
    def create(self) -> None: ...
    def close(self) -> None: ...


class LocalBackend:
    """A directory.  Objects are written under a temporary name, fsynced and
    renamed into place (create-only writes with RENAME_NOREPLACE); ``sync``
    fsyncs the directories written to, so that the names are durable too.
    Everything is opened below the repository's directory descriptor
    (``root_fd``, or ``path`` opened when first needed) without following
    symlinks, so that ``cloneaware serve`` can hand it a directory opened
    beneath its allowed root."""

    def __init__(self, path: str, where: str | None = None, root_fd: int | None = None,
                 append_only: bool = False, check_names: bool = False):
        """``append_only`` (``serve --allow repo-append``): nothing but this
        client's own locks is deleted or replaced, and only objects whose
        names say what they hold are written: a pack, index or snapshot
        under the SHA-256 of its bytes, a lock (keys and config, whose names
        prove nothing, are refused).  ``check_names``: objects named by
        their hash are checked so without append_only too (``serve``)."""
        self.path = os.path.abspath(path)
        self.where = where or path
        self.location = os.path.realpath(path)
        self.append_only = append_only
        self.check_names = check_names or append_only
        #: the locks this backend wrote (an append-only client may delete those)
        self.own_locks: set[str] = set()
        self._dirty: set[str] = set()
        self._dirfds: dict[str, int] = {}
        if root_fd is not None:
            self._dirfds[""] = root_fd

    def _dir(self, d: str, create: bool = False) -> int:
        fd = self._dirfds.get(d)
        if fd is not None:
            return fd
        if not d:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the user's own path
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                if not create:
                    raise RepositoryError(f"{self.where}: no such repository") from None
                os.makedirs(self.path, mode=0o700, exist_ok=True)
                fd = os.open(self.path, flags)
        else:
            parent, _, base = d.rpartition("/")
            pfd = self._dir(parent, create)
            try:
                fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(base, 0o700, dir_fd=pfd)
                except FileExistsError:
                    pass
                self._dirty.add(parent)
                fd = os.open(base, DIR_FLAGS, dir_fd=pfd)
        self._dirfds[d] = fd
        return fd

    def _split(self, name: str) -> tuple[str, str]:
        check_name(name)
        d, _, base = name.rpartition("/")
        return d, base

    def read(self, name: str, offset: int = 0, length: int | None = None,
             limit: int = WHOLE_MAX) -> bytes:
        d, base = self._split(name)
        try:
            fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._dir(d))
        except FileNotFoundError:
            raise RepositoryError(f"{self.where}: {name} is missing") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RepositoryError(f"{self.where}: {name} is not a regular file")
            if length is None:
                length = st.st_size - offset
                if length > limit:
                    raise too_large(self.where, name, length, limit)
            out = bytearray()
            while len(out) < length:
                b = os.pread(fd, length - len(out), offset + len(out))
                if not b:
                    raise RepositoryError(f"{self.where}: {name} is shorter than expected "
                                          f"({offset + len(out)} bytes)")
                out += b
            return bytes(out)
        finally:
            os.close(fd)

    def write(self, name: str, data, create_only: bool = False) -> None:
        d, base = self._split(name)
        if self.append_only and not name.startswith("locks/"):
            create_only = True
            if d == "keys" or name == "config":
                raise UsageError(f"{self.where}: this server keeps the repository append-only: "
                                 f"{name} cannot be checked by its name and is not written")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = list(data)  # read twice: hashed, then written
        if self.check_names and d not in ("keys", "locks", ""):
            check_content(name, data)
        dfd = self._dir(d, create=name.startswith("data/"))
        with AtomicFile(base, dir_fd=dfd, replace=not create_only,
                        display=f"{self.where}/{name}") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for part in data:
                    f.write(part)
            try:
                f.commit(0o600)
            except UsageError:
                raise FileExistsError(errno.EEXIST, "exists", f"{self.where}/{name}") from None
        self._dirty.add(d)
        if d == "locks":
            self.own_locks.add(name)

    def delete(self, name: str) -> None:
        d, base = self._split(name)
        if self.append_only and name not in self.own_locks:
            raise UsageError(f"{self.where}: this server keeps the repository append-only: "
                             f"{name} may not be deleted"
                             + (" (a lock another command wrote)" if d == "locks" else ""))
        try:
            os.unlink(base, dir_fd=self._dir(d))
        except FileNotFoundError:
            pass
        self._dirty.add(d)

    def exists(self, name: str) -> bool:
        d, base = self._split(name)
        try:
            os.stat(base, dir_fd=self._dir(d), follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def listing(self, directory: str) -> list[Listed]:
        """Objects under ``directory`` (one of DIRS), with sizes and times."""
        out: list[Listed] = []
        subdirs = [f"data/{i:02x}" for i in range(256)] if directory == "data" else [directory]
        for d in subdirs:
            try:
                dfd = self._dir(d)
            except FileNotFoundError:
                continue
            with os.scandir(dfd) as it:
                for e in it:
                    name = f"{d}/{e.name}"
                    if not NAME.match(name):
                        continue  # a temporary file of a writer, or a stranger
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode):
                        out.append(Listed(name, st.st_size, st.st_mtime))
        return out

    def strays(self, directory: str) -> list[Listed]:
        """Files under ``directory`` that are not objects (temporary files left
        by a killed writer), for prune."""
        out = []
        subdirs = [f"data/{i:02x}" for i in range(256)] if directory == "data" else [directory]
        for d in subdirs:
            try:
                dfd = self._dir(d)
            except FileNotFoundError:
                continue
            with os.scandir(dfd) as it:
                for e in it:
                    if not NAME.match(f"{d}/{e.name}") and e.name.endswith(".partial"):
                        st = e.stat(follow_symlinks=False)
                        out.append(Listed(f"{d}/{e.name}", st.st_size, st.st_mtime))
        return out

    def delete_stray(self, name: str) -> None:
        d, _, base = name.rpartition("/")
        try:
            os.unlink(base, dir_fd=self._dir(d))
        except FileNotFoundError:
            pass

    def sync(self) -> None:
        """fsync every directory written to since the last sync."""
        for d in sorted(self._dirty):
            os.fsync(self._dir(d))
        self._dirty.clear()

    def is_empty(self) -> bool:
        try:
            return not os.listdir(self._dir(""))
        except (RepositoryError, FileNotFoundError):
            return True

    def create(self) -> None:
        """Make the directory (and its parents) and the layout's directories."""
        try:
            self._dir("", create=True)
            for d in DIRS:
                self._dir(d, create=True)
            for i in range(256):
                self._dir(f"data/{i:02x}", create=True)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.where) from None
        self._dirty.update(["", *DIRS, "data"])
        self.sync()
        root = self._dirfds.pop("", None)
        for fd in self._dirfds.values():
            os.close(fd)
        self._dirfds = {"": root} if root is not None else {}

    def close(self) -> None:
        for fd in self._dirfds.values():
            os.close(fd)
        self._dirfds.clear()
