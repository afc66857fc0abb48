"""Walk source trees: iterative (no recursion limit), sorted by name, never
following symlinks, staying on one filesystem unless told otherwise.

"One filesystem" is a filesystem identity (fsinfo.FsInfo.key), so Btrfs
subvolumes and snapshots inside the tree are included: they are where the
sharing is.

The walk goes by directory descriptor (``Dirs``): each directory is opened
from its parent's descriptor, one component at a time with O_NOFOLLOW, and
its entries are listed and stat'ed through that descriptor, so a tree deeper
than PATH_MAX is walked whole (issue 21, defect 4).  ``Node.src`` is the
entry's path for messages (it may be longer than any system call takes);
``Node.open`` and ``Node.at`` are how the entry is reached.
"""
from __future__ import annotations

import collections
import errno
import os
import stat
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cloneaware import fsinfo, native
from cloneaware.errors import UsageError
from cloneaware.patterns import Exclusions
from cloneaware.source import anchors

OnError = Callable[[bytes, str], None]

ANCHOR_DIR = anchors.DIRNAME

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Dirs:
    """Descriptors of a walk's source directories, by source path, in a small
    LRU.  A directory is opened from the nearest cached ancestor (or from its
    root, opened by the path the user gave) one component at a time with
    O_NOFOLLOW.  A descriptor handed out stays valid until the next call."""

    def __init__(self, cap: int = 64):
        self.cap = cap
        self.cache: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.roots: set[bytes] = set()

    def root(self, path: bytes) -> None:
        """A directory opened by its path (what the user named, or its parent)."""
        self.roots.add(path)

    def _put(self, path: bytes, fd: int) -> None:
        self.cache[path] = fd
        while len(self.cache) > self.cap:
            os.close(self.cache.popitem(last=False)[1])

    def fd(self, path: bytes) -> int:
        got = self.cache.get(path)
        if got is not None:
            self.cache.move_to_end(path)
            return got
        rest: list[bytes] = []
        p = path
        while p not in self.cache and p not in self.roots:
            parent, _, comp = p.rpartition(b"/")
            if not parent or not comp:
                break
            rest.append(comp)
            p = parent
        try:
            cur = self.cache.get(p)
            if cur is None:
                cur = os.open(p, _DIR)
                self._put(p, cur)
            else:
                self.cache.move_to_end(p)
            for comp in reversed(rest):
                p = p + b"/" + comp
                nfd = os.open(comp, _DIR | os.O_NOFOLLOW, dir_fd=cur)
                self._put(p, nfd)
                cur = nfd
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fsdecode(p)) from None
        return cur

    def adopt(self, path: bytes, fd: int) -> None:
        """Keep ``fd``, opened elsewhere, as the descriptor of ``path``."""
        if path in self.cache:
            os.close(fd)
        else:
            self._put(path, fd)

    def close(self) -> None:
        while self.cache:
            os.close(self.cache.popitem()[1])


class _Stat:
    """What the backup reads of a stat, kept for every walked entry until
    the end: about 350 bytes where an os.stat_result, with its 15 objects,
    is about 630 (issue 36, memory a file)."""

    __slots__ = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                 "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_rdev", "st_blocks")

    def __init__(self, st: os.stat_result):
        self.st_mode, self.st_ino, self.st_dev, self.st_nlink = (
            st.st_mode, st.st_ino, st.st_dev, st.st_nlink)
        self.st_uid, self.st_gid, self.st_size = st.st_uid, st.st_gid, st.st_size
        self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns = (
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        self.st_rdev, self.st_blocks = st.st_rdev, st.st_blocks

    def __repr__(self) -> str:
        return "Stat(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


def _listed(rec: tuple) -> os.stat_result:
    """A ``native.LIST_STAT`` record (whose err is 0) as a _Stat."""
    st = _Stat.__new__(_Stat)
    (st.st_mode, st.st_uid, st.st_gid, _, st.st_ino, st.st_dev, st.st_nlink, st.st_size,
     st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev, st.st_blocks) = rec
    return typing.cast(os.stat_result, st)


def compact(st: os.stat_result) -> os.stat_result:
    """``st`` as a _Stat: the same st_* attributes (all the backup reads),
    in less memory; typed as what it stands for."""
    return typing.cast(os.stat_result, _Stat(st))


@dataclass(slots=True)
class Node:
    #: ``name`` and ``src`` when they are not ``pname/leaf`` and
    #: ``parent/leaf`` (a PATH, a node made by hand); None for the walk's
    #: entries, whose paths are made when asked for rather than kept (each
    #: directory's are shared by its entries: issue 36, memory a file)
    _name: bytes | None
    _src: bytes | None
    st: os.stat_result
    #: the directory that holds it (its source path) and its name there
    parent: bytes = b""
    leaf: bytes = b""
    dirs: Dirs | None = None
    #: the archive path of that directory
    pname: bytes = b""

    @property
    def name(self) -> bytes:
        """Archive path: relative, '/'-separated bytes, starting with the root's basename."""
        n = self._name
        return self.pname + b"/" + self.leaf if n is None else n

    @property
    def src(self) -> bytes:
        """Source path on this host, for messages (system calls go through ``dirs``)."""
        s = self._src
        return self.parent + b"/" + self.leaf if s is None else s

    def dir_fd(self) -> int | None:
        """A descriptor of its directory (valid until the next call on the
        same Dirs), or None for a node made by hand (reached by path)."""
        return None if self.dirs is None else self.dirs.fd(self.parent)

    def open(self, flags: int) -> int:
        """Open it beneath its directory's descriptor (O_NOFOLLOW added)."""
        if self.dirs is None:
            return os.open(self.src, flags | os.O_NOFOLLOW)
        return os.open(self.leaf, flags | os.O_NOFOLLOW, dir_fd=self.dirs.fd(self.parent))

    def lstat(self) -> os.stat_result:
        if self.dirs is None:
            return os.lstat(self.src)
        return os.stat(self.leaf, dir_fd=self.dirs.fd(self.parent), follow_symlinks=False)

    def readlink(self) -> bytes:
        if self.dirs is None:
            return os.readlink(self.src)
        return os.readlink(self.leaf, dir_fd=self.dirs.fd(self.parent))

    def proc_path(self) -> bytes:
        """A short path that names it without following it, for the calls
        that take no descriptor (lgetxattr on a symlink): /proc/self/fd/N/leaf.
        Valid until the next call on the same Dirs."""
        if self.dirs is None:
            return self.src
        return b"/proc/self/fd/%d/%s" % (self.dirs.fd(self.parent), self.leaf)


def root_names(paths: list, unique_names: bool = True) -> list[tuple[bytes, bytes]]:
    """(archive name, source path) per PATH argument; a path named twice is
    kept once; two paths with the same basename are refused when the names
    must be unique (an archive stores each PATH under its basename)."""
    out: list[tuple[bytes, bytes]] = []
    seen_real: set[bytes] = set()
    names: dict[bytes, bytes] = {}
    for p in paths:
        if not os.fsencode(p):
            raise UsageError("an empty PATH was given")
        src = os.path.abspath(os.fsencode(p))
        try:
            os.lstat(src)
        except OSError as e:
            raise UsageError(f"{os.fsdecode(p)}: {e.strerror}") from None
        real = os.path.realpath(src) if not os.path.islink(src) else src
        if real in seen_real:
            continue
        seen_real.add(real)
        name = os.path.basename(os.path.normpath(src))
        if name in (b"", b".", b".."):
            raise UsageError(f"{os.fsdecode(p)}: cannot name the root directory; "
                             "give a directory inside it")
        if name in names and unique_names:
            raise UsageError(
                f"{os.fsdecode(p)} and {os.fsdecode(names[name])} would both be stored "
                f"as {os.fsdecode(name)!r}")
        names[name] = src
        out.append((name, src))
    return out


def _fs_key(dfd: int, name: bytes, st: os.stat_result, shown: bytes) -> str:
    fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=dfd)
    try:
        return fsinfo.fs_info(fd, st.st_dev, shown).key
    finally:
        os.close(fd)


def walk(paths: list, on_error: OnError, one_file_system: bool = True,
         unique_names: bool = True, redirect: dict[bytes, bytes] | None = None,
         dirs: Dirs | None = None, exclude: Exclusions | None = None) -> Iterator[Node]:
    """Yield a Node per entry, parents before children, in sorted name order.
    ``redirect``: read the tree of a PATH (absolute) from another place (its
    snapshot), naming its entries as if read from the PATH.  ``dirs``: the
    descriptors to walk with (the caller keeps them open to reach the nodes
    later); by default the walk's own, closed at its end.  ``exclude``: what
    to leave out (patterns.py); an excluded directory is not entered."""
    fsinfo.forget()  # st_dev numbers may have been reused since the last walk
    own = dirs is None
    d = Dirs() if dirs is None else dirs
    try:
        yield from _walk(paths, on_error, one_file_system, unique_names, redirect, d,
                         exclude or Exclusions())
    finally:
        if own:
            d.close()


class _Lister:
    """Lists and lstats the walk's directories in batches: the one the walk
    is at and the next few on its stack, in one native call that spreads
    them, and their entries, over a few threads and holds no GIL
    (``native.list_dirs``).  From a cold cache the walk waits on the
    filesystem's metadata reads, and several in flight take less time than
    one at a time; from a warm one the entries are stat'ed without a Python
    call each (issue 36).  Each directory is opened from its parent's
    descriptor with O_NOFOLLOW, as ``Dirs`` does, and handed to ``Dirs``
    when the walk gets there.  Stats taken ahead are as good as stats taken
    later: each is of some instant before the entry is read, and what is
    read is checked against the open file (``map_node``)."""

    #: directories listed in one batch
    BATCH = 32
    #: at most this many listed ahead (each holds a descriptor)
    AHEAD = 256
    THREADS = 4

    def __init__(self, dirs: Dirs):
        self.dirs = dirs
        #: directory -> (descriptor, errno, names, stats), listed ahead
        self.ready: dict[bytes, tuple[int, int, bytes, bytes]] = {}

    def entries(self, dsrc: bytes, stack: list[tuple[bytes, bytes, bytes]]
                ) -> list[tuple[bytes, tuple]]:
        """The entries of directory ``dsrc`` (the walk's next, just popped
        from ``stack``): (name, ``native.LIST_STAT`` record), sorted by name.
        OSError with the path if it cannot be listed."""
        got = self.ready.pop(dsrc, None)
        if got is None:
            got = self._batch(dsrc, stack)
        fd, err, names, stats = got
        if fd >= 0:
            self.dirs.adopt(dsrc, fd)
        if err:
            raise OSError(err, os.strerror(err), os.fsdecode(dsrc))
        out = list(zip(names.split(b"\0"), native.LIST_STAT.iter_unpack(stats)))
        out.sort()
        return out

    def _batch(self, dsrc: bytes, stack: list[tuple[bytes, bytes, bytes]]
               ) -> tuple[int, int, bytes, bytes]:
        todo = [dsrc]
        for k in range(len(stack) - 1, -1, -1):
            if len(todo) >= self.BATCH or len(self.ready) + len(todo) > self.AHEAD:
                break
            if stack[k][1] not in self.ready:
                todo.append(stack[k][1])
        args: list[tuple[int, bytes | None]] = []
        try:
            for d in todo:
                parent, _, leaf = d.rpartition(b"/")
                try:
                    # a copy: Dirs may close what it handed out at its next call
                    args.append((os.dup(self.dirs.fd(parent)), leaf))
                except OSError:
                    if d == dsrc:  # a root PATH, or its parent is gone: the walk's own
                        args.append((os.dup(self.dirs.fd(d)), None))
                    else:
                        break  # left for later
            got = native.list_dirs(args, self.THREADS)
        finally:
            for pfd, _ in args:
                os.close(pfd)
        for d, r in zip(todo[1:], got[1:]):
            self.ready[d] = r
        return got[0]

    def close(self) -> None:
        for fd, *_ in self.ready.values():
            if fd >= 0:
                os.close(fd)
        self.ready.clear()


def _walk(paths: list, on_error: OnError, one_file_system: bool, unique_names: bool,
          redirect: dict[bytes, bytes] | None, dirs: Dirs, exclude: Exclusions
          ) -> Iterator[Node]:
    for name, src in root_names(paths, unique_names):
        shown = src  # the PATH on this host, which an absolute pattern names
        if redirect:
            src = redirect.get(src, src)
        parent, leaf = os.path.split(src)
        dirs.root(parent)
        try:
            st = os.lstat(src)
        except OSError as e:
            raise _unreadable(src, e) from None
        if exclude and exclude.skip(name, shown, stat.S_ISDIR(st.st_mode)):
            continue
        yield Node(name, src, st, parent, leaf, dirs)
        if not stat.S_ISDIR(st.st_mode):
            continue
        root_key = None
        if one_file_system:
            try:
                root_key = _fs_key(dirs.fd(parent), leaf, st, src)
            except OSError as e:
                raise _unreadable(src, e) from None
        dev_ok = {st.st_dev: True}
        mounts: anchors.Mounts | None = None
        stack: list[tuple[bytes, bytes, bytes]] = [(name, src, shown)]
        lister = _Lister(dirs)
        try:
            while stack:
                dname, dsrc, dshown = stack.pop()
                try:
                    entries = lister.entries(dsrc, stack)
                    if exclude:
                        children = [c for c, _ in entries]
                        kept = exclude.cache_children(dirs.fd(dsrc), children)
                        if kept is not children:
                            entries = [e for e in entries if e[0] in kept]
                except OSError as e:
                    if dsrc == src:
                        raise _unreadable(src, e) from None
                    on_error(dsrc, e.strerror or str(e))
                    continue
                subdirs = []
                for c, rec in entries:
                    csrc = dsrc + b"/" + c
                    err = rec[3]
                    if err:
                        if err != errno.ENOENT:
                            on_error(csrc, os.strerror(err))
                        continue
                    cst = _listed(rec)
                    is_dir = stat.S_ISDIR(cst.st_mode)
                    cname = dname + b"/" + c
                    cshown = dshown + b"/" + c
                    if c == ANCHOR_DIR:
                        if mounts is None:
                            mounts = anchors.Mounts()
                        if anchors.is_anchor_dir(dirs.fd(dsrc), dshown, cst, mounts):
                            continue  # the anchors at the top of a mount: not the user's data
                    if exclude and exclude.skip(cname, cshown, is_dir):
                        continue
                    if is_dir and root_key is not None:
                        ok = dev_ok.get(cst.st_dev)
                        if ok is None:
                            try:
                                ok = _fs_key(dirs.fd(dsrc), c, cst, csrc) == root_key
                            except OSError:
                                ok = False
                            dev_ok[cst.st_dev] = ok
                        # a mount point itself is kept, as tar does; not its content
                        is_dir = ok
                    yield Node(None, None, cst, dsrc, c, dirs, dname)
                    if is_dir:
                        subdirs.append((cname, csrc, cshown))
                stack.extend(reversed(subdirs))
        finally:
            lister.close()


def _unreadable(src: bytes, e: OSError) -> Exception:
    """A PATH that cannot be read at all is a usage error (exit 2), as a
    missing one is (issue 21, defect 8): a backup of nothing is no backup.
    What cannot be read below a PATH is skipped and reported (exit 1); a
    failing disk is an I/O error either way."""
    if e.errno == errno.EIO:
        return OSError(e.errno, e.strerror, os.fsdecode(src))
    return UsageError(f"{os.fsdecode(src)}: {e.strerror or e} (a PATH that cannot be read "
                      "at all)")
