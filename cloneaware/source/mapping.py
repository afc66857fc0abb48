"""Map the files of a walk: one native FIEMAP call each, turned into a numpy
extent map, yielded as typed records in walk order."""
from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from cloneaware import fsinfo, native
from cloneaware.errors import UsageError
from cloneaware.patterns import Exclusions
from cloneaware.source.flags import (
    BTRFS_FILE_EXTENT_REG,
    BTRFS_MAX_UNCOMPRESSED,
    CA_EXACT,
    EXACT_SHIFT,
    EXTENT_DTYPE,
    FE_ENCODED,
    FE_SHARED,
    FE_UNKNOWN,
    FILE_EXTENT_DTYPE,
    NOT_CANDIDATE,
    PHYS,
)
from cloneaware.source.walk import Dirs, Node, _listed, compact, walk

assert EXTENT_DTYPE.itemsize == native.EXTENT_SIZE
assert FILE_EXTENT_DTYPE.itemsize == native.FILE_EXTENT_SIZE

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
#: FIEMAP refused as not supported (tmpfs): the map comes from SEEK_DATA
NO_FIEMAP = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS)


def open_source(where: bytes | Node) -> int:
    """Open a regular file for reading without following symlinks, without
    blocking on a FIFO swapped in by a race, and without touching atime when
    allowed: a walk's node beneath its directory's descriptor (any depth),
    or a path."""
    def op(flags: int) -> int:
        return where.open(flags) if isinstance(where, Node) else os.open(where, flags)

    try:
        return op(_OPEN_FLAGS | os.O_NOATIME)
    except PermissionError:
        return op(_OPEN_FLAGS)


def fiemap(fd: int, path=None) -> np.ndarray:
    """The whole extent map of fd (FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC), as a
    structured array of EXTENT_DTYPE in logical order."""
    return np.frombuffer(native.fiemap(fd, path), dtype=EXTENT_DTYPE).copy()


def seek_map(fd: int, size: int) -> np.ndarray:
    """Extent map from SEEK_DATA/SEEK_HOLE, for filesystems without FIEMAP
    (tmpfs).  Flags UNKNOWN: the file's own data, never shared."""
    rows = []
    pos = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            if e.errno == errno.EINVAL:  # no SEEK_DATA: all data
                rows.append((pos, 0, size - pos, FE_UNKNOWN, 0))
                break
            raise
        h = os.lseek(fd, d, os.SEEK_HOLE)
        rows.append((d, 0, h - d, FE_UNKNOWN, 0))
        pos = h
    return np.array(rows, dtype=EXTENT_DTYPE)


class _TreeSearch:
    """Whether BTRFS_IOC_TREE_SEARCH_V2 may be used in this process: it needs
    CAP_SYS_ADMIN, and the first refusal is remembered (and said once by
    the caller), so that a non-root backup does not try once per file.
    ``CLONEAWARE_TREE_SEARCH=0`` in the environment makes root do as a user
    does (the tests of the content check use it)."""

    def __init__(self) -> None:
        self.denied: str | None = None
        if os.environ.get("CLONEAWARE_TREE_SEARCH") == "0":
            self.denied = "CLONEAWARE_TREE_SEARCH=0"


TREE_SEARCH = _TreeSearch()

#: "compressed sharing is proved by reading": what scan and backup say, once,
#: when encoded extents were found and the tree search was refused
READING_NOTE = ("compressed (encoded) Btrfs extents: their sharing is proved by reading "
                "and hashing both places ({why}); as root it is read from Btrfs's file "
                "extent items")


def btrfs_file_extents(fd: int, ino: int, path=None, tree_id: int = 0) -> np.ndarray:
    """The file extent items of inode ``ino`` (BTRFS_IOC_TREE_SEARCH_V2) in
    subvolume tree ``tree_id`` (0: fd's) as a structured array of
    FILE_EXTENT_DTYPE, in file order."""
    return np.frombuffer(native.btrfs_file_extents(fd, ino, path, tree_id),
                         dtype=FILE_EXTENT_DTYPE).copy()


def exact_items(items: np.ndarray) -> np.ndarray:
    """The items whose ranges get an exact address: regular, compressed,
    not encrypted, on a sector of 4 KiB or coarser, within the sizes Btrfs
    writes (anything else stays a candidate, docs/KERNEL.md F23)."""
    d = items["disk_bytenr"]
    ok = ((items["type"] == BTRFS_FILE_EXTENT_REG) & (items["compression"] != 0)
          & (items["encryption"] == 0) & (d != 0) & (d % 4096 == 0)
          & (d < np.uint64(1 << (64 - EXACT_SHIFT - 1)))
          & (items["ram_bytes"] <= BTRFS_MAX_UNCOMPRESSED) & (items["num_bytes"] > 0)
          & (items["offset"] + items["num_bytes"] <= items["ram_bytes"]))
    return items[ok]


def refine_encoded(ext: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Replace the address of each ENCODED range of a FIEMAP map by where
    its bytes are inside the compressed extent, from the file extent items
    (FIEMAP gives only the extent's start, docs/KERNEL.md F10): ranges are
    cut at item boundaries and get ``physical = disk_bytenr * 32 + offset``
    and the CA_EXACT flag.  A range the items do not cover whole, or whose
    first item names another extent (the file changed between the two
    calls), is left as it was: a candidate."""
    f = ext["flags"]
    enc = ((f & FE_ENCODED) != 0) & ((f & NOT_CANDIDATE) == 0) & (ext["physical"] != 0)
    it = exact_items(items)
    if not enc.any() or len(it) == 0:
        return ext
    rows = ext[enc]
    s = it["logical"]
    e = s + it["num_bytes"]
    a = rows["logical"]
    b = a + rows["length"]
    i0 = np.searchsorted(e, a, side="right")  # the first item ending after a
    i1 = np.searchsorted(s, b, side="left")  # past the last item starting before b
    cnt = np.maximum(i1.astype(np.int64) - i0.astype(np.int64), 0)
    total = int(cnt.sum())
    rep = np.repeat(np.arange(len(rows)), cnt)
    k = np.repeat(i0, cnt) + (np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    lo = np.maximum(a[rep], s[k])
    hi = np.minimum(b[rep], e[k])
    covered = np.zeros(len(rows), dtype=np.uint64)
    np.add.at(covered, rep, hi - lo)
    first = np.cumsum(cnt) - cnt
    good = (cnt > 0) & (covered == rows["length"])
    good[cnt > 0] &= (it["disk_bytenr"][k[first[cnt > 0]]] == rows["physical"][cnt > 0]) \
        & (s[k[first[cnt > 0]]] <= a[cnt > 0])
    take = good[rep]
    new = np.zeros(int(take.sum()), dtype=EXTENT_DTYPE)
    kk, rr = k[take], rep[take]
    new["logical"] = lo[take]
    new["length"] = hi[take] - lo[take]
    new["physical"] = ((it["disk_bytenr"][kk] >> np.uint64(12)) << np.uint64(12 + EXACT_SHIFT)) \
        + it["offset"][kk] + (lo[take] - s[kk])
    new["flags"] = rows["flags"][rr] | np.uint32(CA_EXACT)
    keep = np.ones(len(ext), dtype=bool)
    keep[np.nonzero(enc)[0][good]] = False
    out = np.concatenate([ext[keep], new])
    return out[np.argsort(out["logical"], kind="stable")]


def extent_map(fd: int, size: int, path=None, exact: bool = True) -> np.ndarray:
    """FIEMAP, or SEEK_DATA/SEEK_HOLE where the filesystem has no FIEMAP.

    With ``exact`` (the default), a map with ENCODED ranges is refined with
    the file's Btrfs extent items (refine_encoded), where the process may
    search the tree (CAP_SYS_ADMIN): every caller that compares maps gets
    the same kind."""
    try:
        ext = fiemap(fd, path)
    except OSError as e:
        if e.errno in NO_FIEMAP:
            return seek_map(fd, size)
        raise
    if not exact or TREE_SEARCH.denied is not None or len(ext) == 0 \
            or not (ext["flags"] & FE_ENCODED).any():
        return ext
    try:
        items = btrfs_file_extents(fd, os.fstat(fd).st_ino, path)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            TREE_SEARCH.denied = "BTRFS_IOC_TREE_SEARCH_V2 needs CAP_SYS_ADMIN"
            return ext
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return ext  # not Btrfs (or too old a kernel): FIEMAP's answer stands
        raise
    return refine_encoded(ext, items)


def physical(ext: np.ndarray, shared_only: bool = False) -> np.ndarray:
    """The physical ranges of a map that another file could share (PHYS)."""
    f = ext["flags"]
    keep = (ext["physical"] != 0) & ((f & NOT_CANDIDATE) == 0)
    if shared_only:
        keep &= (f & FE_SHARED) != 0
    out = np.empty(int(keep.sum()), dtype=PHYS)
    out["start"] = ext["physical"][keep]
    out["length"] = ext["length"][keep]
    return out


def shared_physical(ext: np.ndarray) -> np.ndarray:
    """The physical ranges of a map that the filesystem says are shared."""
    return physical(ext, shared_only=True)


@dataclass
class FsTable:
    """Small integers for filesystem keys (the index wants ints)."""

    keys: dict[str, int] = field(default_factory=dict)
    infos: list[fsinfo.FsInfo] = field(default_factory=list)

    def number(self, info: fsinfo.FsInfo) -> int:
        n = self.keys.get(info.key)
        if n is None:
            n = self.keys[info.key] = len(self.infos)
            self.infos.append(info)
        return n


@dataclass(slots=True)
class Mapped:
    """A regular file, opened and mapped (``node.st`` is its fstat, compact)."""

    node: Node
    fs: fsinfo.FsInfo
    ext: np.ndarray


@dataclass(slots=True)
class Other:
    """Anything that is not a regular file: directory, symlink, device, ..."""

    node: Node


@dataclass(slots=True)
class Unopened:
    """A regular file its stat proves unchanged since the last backup
    (``row``: its row in the files cache); ``node.st`` is its lstat."""

    node: Node
    row: int


@dataclass(slots=True)
class Skipped:
    """A path that could not be walked or mapped, and why."""

    path: bytes
    reason: str


Item = Mapped | Other | Unopened | Skipped


def _fatal_io(e: OSError, path: bytes) -> None:
    """An I/O error on a source (a failing disk) ends the job, naming the file;
    anything else (permission, a file gone) skips it."""
    if e.errno == errno.EIO:
        raise OSError(e.errno, e.strerror, os.fsdecode(path)) from None


def map_tree(paths: list, one_file_system: bool = True, unique_names: bool = True,
             redirect: dict[bytes, bytes] | None = None, dirs: Dirs | None = None,
             exclude: Exclusions | None = None,
             known: Callable[[Node], int] | None = None) -> Iterator[Item]:
    """Walk and map, yielding Mapped, Other and Skipped records in walk order
    (``redirect``, ``dirs``, ``exclude``: see walk).  ``known``: a regular
    file for which it answers a row number (>= 0) is the one the row
    describes (the files cache, repo/filescache.py): yielded as Unopened,
    neither opened nor mapped."""
    errors: list[Skipped] = []

    def on_error(p: bytes, reason: str) -> None:
        errors.append(Skipped(p, reason))

    batch = _MapBatch()
    try:
        for node in walk(paths, on_error, one_file_system, unique_names, redirect, dirs,
                         exclude):
            batch.slots += errors
            errors.clear()
            if not stat.S_ISREG(node.st.st_mode):
                batch.slots.append(Other(node))
            else:
                if node.st.st_nlink > 1 and batch.nodes:
                    # known() may answer by what the caller has seen (a second
                    # name of an inode): let it see everything before this
                    yield from batch.run()
                if known is not None and (row := known(node)) >= 0:
                    batch.slots.append(Unopened(node, row))
                elif node.dirs is None:  # a PATH itself: said as such if unreadable
                    batch.slots.append(map_node(node))
                else:
                    batch.add(node)
            if len(batch.nodes) >= batch.FILES or not batch.nodes:
                yield from batch.run()
        batch.slots += errors
        yield from batch.run()
    finally:
        batch.drop()


class _MapBatch:
    """Regular files of the walk opened, stat'ed and mapped FILES at a time
    by one native call spread over a few threads (native.read_small with
    nothing to read: several metadata reads and FIEMAPs in flight, no
    Python call per file for them), and what the walk found between them,
    yielded in walk order.  A file the call could not do whole (an error,
    not a regular file any more, more extents than it keeps, encoded
    extents to refine, no FIEMAP) is mapped again by map_node, which
    says why as it always has."""

    FILES = 64

    def __init__(self) -> None:
        self.slots: list = []  # items, and the nodes to map (placeholders)
        self.nodes: list[Node] = []
        self.recs = bytearray()
        self.names = bytearray()
        self.dups: dict[bytes, int] = {}

    def add(self, node: Node) -> None:
        try:
            dfd = self.dups.get(node.parent)
            if dfd is None:
                got = node.dir_fd()
                assert got is not None  # map_tree maps a node made by hand itself
                dfd = self.dups[node.parent] = os.dup(got)
        except OSError:
            self.slots.append(map_node(node))  # says why
            return
        self.recs += bytes(native.READ_SMALL_SIZE)
        _MAP_IN.pack_into(self.recs, len(self.nodes) * native.READ_SMALL_SIZE, dfd,
                          len(node.leaf), len(self.names), 0, 0, -1)
        self.names += node.leaf
        self.nodes.append(node)
        self.slots.append(node)

    def run(self) -> Iterator[Item]:
        slots, nodes, recs, names = self.slots, self.nodes, self.recs, self.names
        self.slots, self.nodes, self.recs, self.names = [], [], bytearray(), bytearray()
        if nodes:
            try:
                native.read_small(recs, len(nodes), names, bytearray(1), native.READ_SMALL_MAP)
            finally:
                self.drop()
        k = 0
        try:
            for slot in slots:
                if type(slot) is not Node:
                    yield slot
                    continue
                k += 1  # _mapped closes its record's descriptor, whatever happens
                yield _mapped(slot, recs, k - 1)
        finally:  # stopped early (an error, the caller gone): close the rest
            for i in range(k, len(nodes)):
                fd = native.READ_SMALL.unpack_from(recs, i * native.READ_SMALL_SIZE)[5]
                if fd >= 0:
                    os.close(fd)

    def drop(self) -> None:
        """Close the directories' descriptors held for the next call."""
        dups, self.dups = self.dups, {}
        for fd in dups.values():
            os.close(fd)


_MAP_IN = struct.Struct("<iI3Qi")  # and fd -1: not opened (yet)
_EXT_AT = native.READ_SMALL.size


def any_encoded(ext: np.ndarray) -> bool:
    """Whether any of a few extents (a native record's) is encoded: a
    Python loop over them, where numpy's calls cost 1.8 us a file."""
    return any(f & FE_ENCODED for f in ext["flags"].tolist())


def _mapped(node: Node, recs: bytearray, k: int) -> Mapped | Skipped:
    """Node ``k`` of a _MapBatch, from what the native call did."""
    rec = native.READ_SMALL.unpack_from(recs, k * native.READ_SMALL_SIZE)
    fd, err, step, n_ext = rec[5:9]
    if fd < 0:
        return map_node(node)
    try:
        st = _listed(rec[14:27])
        no_fiemap = step == 4 and err in NO_FIEMAP
        if (err and not no_fiemap) or not stat.S_ISREG(st.st_mode):
            return map_node(node)  # which says why
        ext = None
        if not no_fiemap and n_ext <= native.READ_SMALL_EXT:
            ext = np.frombuffer(recs, dtype=EXTENT_DTYPE, count=n_ext,
                                offset=k * native.READ_SMALL_SIZE + _EXT_AT).copy()
            if n_ext and TREE_SEARCH.denied is None and any_encoded(ext):
                ext = None  # refined as extent_map does
        if ext is None:  # more extents than a record keeps, encoded, or no FIEMAP
            ext = extent_map(fd, st.st_size, node.src)
        node.st = st
        return Mapped(node, fsinfo.fs_info(fd, st.st_dev, node.src), ext)
    except OSError as e:
        _fatal_io(e, node.src)
        return Skipped(node.src, e.strerror or str(e))
    finally:
        os.close(fd)


def map_node(node: Node) -> Mapped | Skipped:
    """Open and map a regular file the walk found."""
    try:
        fd = open_source(node)
    except OSError as e:
        _fatal_io(e, node.src)
        if b"/" not in node.name:  # a PATH itself: issue 21, defect 8
            raise UsageError(f"{os.fsdecode(node.src)}: {e.strerror or e} (a PATH that "
                             "cannot be read at all)") from None
        return Skipped(node.src, e.strerror or str(e))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Skipped(node.src, "replaced while scanning")
        info = fsinfo.fs_info(fd, st.st_dev, node.src)
        ext = extent_map(fd, st.st_size, node.src)
        # kept until the end of the backup: what of it is read, in a third
        # of an os.stat_result's memory (57 of 225 MiB traced for 99,000 files)
        node.st = compact(st)
        return Mapped(node, info, ext)
    except OSError as e:
        _fatal_io(e, node.src)
        return Skipped(node.src, e.strerror or str(e))
    finally:
        os.close(fd)
