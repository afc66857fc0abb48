"""The read-only tree that ``cloneaware mount`` shows, over a Repository,
with no FUSE in it (mount/fuse.py serves it).  Its layout (README.md,
"Browse a repository"):

    snapshots/<time>-<short id>/      one directory per snapshot, holding its
                                      entries as ``ls -r`` shows them
    hosts/<host>/<time>-<short id>    -> ../../snapshots/<time>-<short id>
    hosts/<host>/latest               -> the host's newest snapshot
    tags/<tag>/<time>-<short id>      -> ../../snapshots/<time>-<short id>
    tags/<tag>/latest                 -> the newest snapshot tagged so
    ids/<short id>                    -> ../snapshots/<time>-<short id>
    latest                            -> snapshots/<the newest snapshot>

Lazy and bounded: mounting reads the snapshot list only.  A snapshot's
manifest is read the first time something below its directory is looked
at, and at most ``keep`` manifests are held (the least recently used one
is dropped, and read again if it is needed again: its inode numbers are the
same, as they come from its entries' positions).  An entry's attributes
are decoded from its ENTRY record when asked for; a file's ranges when it
is opened.  A read fetches only the blobs under it, each once while it is
in a cache of ``cache_bytes`` (least recently used out), and the next
blobs of the file ahead of it on threads.

Inode numbers: 1 is the root, the layout's own directories and links are
numbered below ``FIRST_BASE``; a snapshot's entries from a base it is given
the first time it is read (``FIRST_BASE`` and up), entry ``i`` at base + i,
so that a file's hard links share one number.  Errors are OSErrors with the
errno a filesystem would give (ENOENT, ENOTDIR, EIO for what the repository
cannot give back, with the reason logged)."""
from __future__ import annotations

import bisect
import collections
import errno
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from cloneaware.archive import format as fmt
from cloneaware.archive.view import ArchiveBytes, ArchiveView, ManifestBytes, Range
from cloneaware.errors import ArchiveError, CloneawareError
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot

ROOT = 1
FIRST_BASE = 1 << 32
TYPE_BITS = {fmt.K_REG: stat.S_IFREG, fmt.K_DIR: stat.S_IFDIR, fmt.K_SYMLINK: stat.S_IFLNK,
             fmt.K_CHR: stat.S_IFCHR, fmt.K_BLK: stat.S_IFBLK, fmt.K_FIFO: stat.S_IFIFO,
             fmt.K_SOCK: stat.S_IFSOCK}
#: blobs read ahead of a file's reads
AHEAD = 2


class Attr(NamedTuple):
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int  # of 512 bytes: a file's bytes in the repository, its holes not
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int


def _entry_name(text: str) -> bytes:
    """A host name or a tag as a directory entry: whatever a snapshot says
    (anyone who may add one chooses it), so '%' and '/' are written %25
    and %2F, and '.' and '..' (and the empty name) are escaped too."""
    name = text.replace("%", "%25").replace("/", "%2F").encode("utf-8", "surrogateescape")
    return name if name not in (b"", b".", b"..") else b"%" + name.hex().encode()


def _fail(code: int, what: str) -> OSError:
    return OSError(code, os.strerror(code), what)


@dataclass
class _Node:
    """A directory or link of the layout itself."""

    ino: int
    mtime_ns: int
    children: dict[bytes, int] | None = None  # a directory
    target: bytes = b""  # a link
    snap: Any = None  # a snapshot's directory: its Snapshot (or ARCHIVE)
    lazy: bool = False  # versions/: its children made when first asked for


class FileData:
    """An open file: its ranges, read through the blob cache."""

    def __init__(self, size: int, ranges: list[Range], blobs: Blobs, what: str):
        self.size = size
        self.ranges = sorted(ranges)
        self.starts = [r[0] for r in self.ranges]
        self.blobs = blobs
        self.what = what

    def read(self, off: int, n: int) -> bytes:
        n = max(0, min(n, self.size - off))
        end = off + n
        out = bytearray(n)
        i = max(0, bisect.bisect_right(self.starts, off) - 1)
        last = i
        while i < len(self.ranges) and self.ranges[i][0] < end:
            roff, length, key, boff = self.ranges[i]
            a, b = max(off, roff), min(end, roff + length)
            if a < b:
                data = key if boff < 0 else self.blobs.get(key, self.what)
                s = max(boff, 0) + a - roff
                piece = memoryview(data)[s:s + b - a]
                if len(piece) != b - a:
                    raise _fail(errno.EIO, f"{self.what}: a range beyond the end of its blob "
                                "(damaged manifest)")
                out[a - off:b - off] = piece
                last = i
            i += 1
        self.blobs.ahead([r[2] for r in self.ranges[last + 1:last + 1 + AHEAD] if r[3] >= 0])
        return bytes(out)


class Blobs:
    """Blobs by id from the repository, each fetched once while it is among
    the last ``budget`` bytes fetched; a blob that cannot be had raises
    EIO (and is logged), and is tried again when asked for again."""

    def __init__(self, fetch: Callable[[Any], bytes], budget: int,
                 log: Callable[[str], None], threads: int = 2):
        self.fetch = fetch
        self.budget = budget
        self.log = log
        self.lock = threading.Lock()
        self.cache: collections.OrderedDict[bytes, Future] = collections.OrderedDict()
        self.bytes = 0
        self.fetched = 0  # blobs read from the repository (a cache miss each)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ahead")

    def _fetch(self, bid: bytes, fut: Future) -> None:
        try:
            data = self.fetch(bid)
        except (CloneawareError, OSError) as e:
            with self.lock:
                if self.cache.get(bid) is fut:
                    del self.cache[bid]
            fut.set_exception(e)
            return
        with self.lock:
            self.fetched += 1
            if self.cache.get(bid) is fut:
                self.bytes += len(data)
                while self.bytes > self.budget and len(self.cache) > 1:
                    old_id, old = next(iter(self.cache.items()))
                    if not old.done():
                        break
                    del self.cache[old_id]
                    if old.exception() is None:
                        self.bytes -= len(old.result())
        fut.set_result(data)

    def _claim(self, bid: bytes) -> tuple[Future, bool]:
        """The blob's future, and whether the caller is to fetch it."""
        with self.lock:
            fut = self.cache.get(bid)
            if fut is not None:
                self.cache.move_to_end(bid)
                return fut, False
            fut = self.cache[bid] = Future()
            return fut, True

    def get(self, bid: bytes, what: str) -> bytes:
        fut, mine = self._claim(bid)
        if mine:
            self._fetch(bid, fut)
        try:
            return fut.result()
        except (CloneawareError, OSError) as e:
            self.log(f"{what}: {e}")
            raise _fail(errno.EIO, f"{what}: {e}") from None

    def ahead(self, ids: list[bytes]) -> None:
        for bid in ids:
            fut, mine = self._claim(bid)
            if mine:
                self.pool.submit(self._fetch, bid, fut)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Loaded(ArchiveView):
    """One snapshot's entries, from its manifest.  ``rel`` numbers: an
    entry's position; a parent directory the manifest lacks after them;
    the snapshot's own directory -1."""

    def __init__(self, data: ManifestBytes | ArchiveBytes, what: str):
        super().__init__(data, what)
        items = self.items
        n = len(items)
        self.children: dict[int, dict[bytes, int]] = {-1: {}}
        self.subdirs: collections.Counter[int] = collections.Counter()
        self.links: collections.Counter[int] = collections.Counter()  # file -> its hard links
        self.parent: dict[int, int] = {}  # a directory's parent, for ..
        dirs: dict[bytes, int] = {b"": -1}
        self.extra: list[bytes] = []  # parents the manifest lacks
        for i, it in enumerate(items):
            up, _, name = it.path.rpartition(b"/")
            p = dirs.get(up)
            if p is None:
                p = self._make_dirs(up, dirs, n)
            rel = i
            if it.kind == fmt.K_HARDLINK:  # the name of a file already listed
                rel = self.entry(i).link
                if items[rel].kind != fmt.K_REG:
                    raise ArchiveError(f"hard link {i} to an entry that is not a file")
                self.links[rel] += 1
            self.children[p][name] = rel
            if it.kind == fmt.K_DIR:
                dirs[it.path] = i
                self.children.setdefault(i, {})
                self.subdirs[p] += 1
                self.parent[i] = p

    def _make_dirs(self, path: bytes, dirs: dict[bytes, int], n: int) -> int:
        up, _, name = path.rpartition(b"/")
        p = dirs.get(up)
        if p is None:
            p = self._make_dirs(up, dirs, n)
        rel = n + len(self.extra)
        self.extra.append(path)
        dirs[path] = rel
        self.children[p][name] = rel
        self.children[rel] = {}
        self.subdirs[p] += 1
        self.parent[rel] = p
        return rel

    @property
    def count(self) -> int:
        return len(self.items) + len(self.extra)

class RepositorySource:
    """Snapshots' manifests and blobs from a repository."""

    def __init__(self, repo: Repository):
        self.repo = repo
        self.lock = threading.Lock()

    def load(self, snap: Snapshot) -> _Loaded:
        with self.lock:
            if not self.repo._index_loaded:
                self.repo.load_index()
        return _Loaded(ManifestBytes(self.repo.manifest(snap)), f"snapshot {snap.short_id}")

    def fetch(self, bid: bytes) -> bytes:
        return self.repo.read_blob(bid)


class ArchiveSource:
    """One archive file: its entries, and its DATA records by offset."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.bytes = ArchiveBytes(self.fd)
        self.version = fmt.WRITE_VERSION
        self.mtime_ns = os.fstat(self.fd).st_mtime_ns

    def load(self, _snap) -> _Loaded:
        got = _Loaded(self.bytes, "the archive")
        self.version = got.version
        return got

    def fetch(self, off: int) -> bytes:
        return self.bytes.chunk(off, self.version)

    def close(self) -> None:
        os.close(self.fd)


#: the root of a mounted archive file stands in for a snapshot's directory
ARCHIVE = object()


class Tree:
    """The mounted tree (see the module's text).  Thread-safe: the FUSE
    side calls it from several threads at once.  ``snaps`` None: an
    archive file (``source`` an ArchiveSource), whose entries are the
    root's."""

    def __init__(self, source: RepositorySource | ArchiveSource, snaps: list[Snapshot] | None,
                 log: Callable[[str], None], keep: int = 3, cache_bytes: int = 256 << 20,
                 versions: bool = False):
        self.source = source
        self.log = log
        self.keep = keep
        self.blobs = Blobs(source.fetch, cache_bytes, log)
        self.lock = threading.Lock()
        self.nodes: dict[int, _Node] = {}
        self.loaded: collections.OrderedDict[int, _Loaded] = collections.OrderedDict()
        self.loading: dict[int, threading.Lock] = {}  # snapshot dir ino -> its load lock
        self.bases: list[int] = []  # sorted, with self.owner[i] the snapshot dir of bases[i]
        self.owner: list[int] = []
        self.counts: dict[int, int] = {}  # snapshot dir ino -> entries (once known)
        self.base_of: dict[int, int] = {}
        self.next_base = FIRST_BASE
        self.manifests_read = 0
        self._versions_lock = threading.Lock()
        self.up_of: dict[int, int] = {}  # a layout directory's parent
        if snaps is None:
            self._new(getattr(source, "mtime_ns", 0), snap=ARCHIVE)
            self.load_now(ROOT)  # (a damaged archive is refused before it is mounted)
        else:
            self._layout(snaps, versions)

    # -- the layout ---------------------------------------------------------------------

    def _new(self, mtime_ns: int, children: dict | None = None, target: bytes = b"",
             snap: Any = None) -> int:
        ino = len(self.nodes) + ROOT
        self.nodes[ino] = _Node(ino, mtime_ns, children, target, snap)
        return ino

    def _layout(self, snaps: list[Snapshot], versions: bool) -> None:
        newest = max((s.time_ns for s in snaps), default=0)
        root: dict[bytes, int] = {}
        self._new(newest, root)
        top: dict[bytes, int] = {}
        by_host: dict[str, dict[bytes, int]] = {}
        ids: dict[bytes, int] = {}
        root[b"snapshots"] = self._new(newest, top)
        hosts: dict[bytes, int] = {}
        root[b"hosts"] = self._new(newest, hosts)
        root[b"ids"] = self._new(newest, ids)
        by_tag: dict[str, dict[bytes, int]] = {}
        names: dict[str, bytes] = {}
        for s in sorted(snaps, key=lambda s: (s.time_ns, s.id)):
            name = f"{s.data['time'][:19]}Z-{s.short_id}".encode()
            names[s.id] = name
            top[name] = self._new(s.time_ns, {}, snap=s)
            ids[s.short_id.encode()] = self._new(s.time_ns, target=b"../snapshots/" + name)
            h = by_host.setdefault(s.hostname, {})
            h[name] = self._new(s.time_ns, target=b"../../snapshots/" + name)
            h[b"latest"] = self._new(s.time_ns, target=b"../../snapshots/" + name)
            for t in s.tags:
                d = by_tag.setdefault(t, {})
                d[name] = self._new(s.time_ns, target=b"../../snapshots/" + name)
                d[b"latest"] = self._new(s.time_ns, target=b"../../snapshots/" + name)
        for host, d in sorted(by_host.items()):
            hosts[_entry_name(host)] = self._new(newest, d)
        tags: dict[bytes, int] = {}
        root[b"tags"] = self._new(newest, tags)
        for t, d in sorted(by_tag.items()):
            tags[_entry_name(t)] = self._new(newest, d)
        if snaps:
            last = max(snaps, key=lambda s: (s.time_ns, s.id))
            root[b"latest"] = self._new(last.time_ns, target=b"snapshots/" + names[last.id])
        if versions:
            v = root[b"versions"] = self._new(newest, {})
            self.nodes[v].lazy = True
        self._parents()

    def _parents(self) -> None:
        for p, node in self.nodes.items():
            for c in (node.children or {}).values():
                if c in self.nodes:
                    self.up_of[c] = p

    def _versions(self, top: _Node) -> None:
        """versions/: for each path of any snapshot a directory, holding its
        children's names (of any snapshot) and, for each distinct version
        it had as something other than a directory (version_key), that
        entry of the first snapshot (oldest first) that holds it, named as
        that snapshot is in snapshots/.  Every manifest is read once, now."""
        snaps = self.nodes[self.find(ROOT, b"snapshots")].children or {}
        sdirs = list(snaps.values())
        self.log(f"versions: reading the manifests of {len(sdirs)} snapshots")
        kids: dict[bytes, dict[bytes, None]] = {b"": {}}
        found: dict[bytes, dict[bytes, int]] = {}  # path -> stamp -> the entry's ino
        keys: dict[bytes, set[bytes]] = {}
        names = {ino: name for name, ino in snaps.items()}
        for sdir in sdirs:
            got = self._load(sdir)
            base = self.base_of[sdir]
            for i, it in enumerate(got.items):
                path = it.path
                up, _, name = path.rpartition(b"/")
                while up not in kids:  # a parent the manifest lacks
                    kids[up] = {}
                    up2, _, n2 = up.rpartition(b"/")
                    kids.setdefault(up2, {})[n2] = None
                    up = up2
                kids[path.rpartition(b"/")[0]][name] = None
                kids.setdefault(path, {})
                if it.kind == fmt.K_DIR:
                    continue
                rel = got.entry(i).link if it.kind == fmt.K_HARDLINK else i
                key = got.version_key(rel)
                have = keys.setdefault(path, set())
                if key not in have:
                    have.add(key)
                    found.setdefault(path, {})[names[sdir]] = base + rel
        inos = {path: (top.ino if not path else self._new(top.mtime_ns, {})) for path in kids}
        top_children: dict[bytes, int] = {}  # (filled, then shown: readers see it whole)
        for path, children in kids.items():
            d = self.nodes[inos[path]].children if path else top_children
            assert d is not None
            for name in children:
                d[name] = inos[path + b"/" + name if path else name]
            d.update(found.get(path, {}))
        top.children = top_children
        self._parents()
        self.log(f"versions: {len(kids) - 1} paths, {sum(map(len, found.values()))} versions")

    # -- snapshots' entries -------------------------------------------------------------

    def _where(self, ino: int) -> tuple[int, _Loaded, int]:
        """(the snapshot dir's ino, its entries, the entry's rel) of an entry's ino."""
        with self.lock:
            i = bisect.bisect_right(self.bases, ino) - 1
            if i < 0:
                raise _fail(errno.ENOENT, f"inode {ino}")
            sdir = self.owner[i]
            rel = ino - self.bases[i]
            if rel >= self.counts[sdir]:
                raise _fail(errno.ENOENT, f"inode {ino}")
        return sdir, self._load(sdir), rel

    def _load(self, sdir: int) -> _Loaded:
        with self.lock:
            got = self.loaded.get(sdir)
            if got is not None:
                self.loaded.move_to_end(sdir)
                return got
            lk = self.loading.setdefault(sdir, threading.Lock())
        with lk:  # one reader of a manifest; the others wait for it
            with self.lock:
                got = self.loaded.get(sdir)
                if got is not None:
                    return got
            snap = self.nodes[sdir].snap
            assert snap is not None
            what = "the archive" if snap is ARCHIVE else f"snapshot {snap.short_id}"
            try:
                got = self.source.load(snap)
            except (CloneawareError, OSError) as e:
                self.log(f"{what}: {e}")
                raise _fail(errno.EIO, f"{what}: {e}") from None
            with self.lock:
                self.manifests_read += 1
                if sdir not in self.base_of:
                    self.base_of[sdir] = self.next_base
                    self.counts[sdir] = got.count
                    i = bisect.bisect_right(self.bases, self.next_base)
                    self.bases.insert(i, self.next_base)
                    self.owner.insert(i, sdir)
                    self.next_base += got.count + 1
                self.loaded[sdir] = got
                while len(self.loaded) > self.keep:
                    self.loaded.popitem(last=False)
            return got

    def load_now(self, sdir: int) -> None:
        """Read a snapshot's entries (or the archive's) now; their errors as
        they are (a CloneawareError), not EIO."""
        snap = self.nodes[sdir].snap
        got = self.source.load(snap)
        with self.lock:
            self.base_of[sdir] = self.next_base
            self.counts[sdir] = got.count
            self.bases.append(self.next_base)
            self.owner.append(sdir)
            self.next_base += got.count + 1
            self.loaded[sdir] = got
            self.manifests_read += 1

    # -- what FUSE asks -----------------------------------------------------------------

    def ready(self, ino: int) -> bool:
        """Whether what ``ino`` needs is in memory (no manifest to read)."""
        node = self.nodes.get(ino)
        if node is not None:
            return not node.lazy and (node.snap is None or ino in self.loaded)
        with self.lock:
            i = bisect.bisect_right(self.bases, ino) - 1
            return i >= 0 and self.owner[i] in self.loaded

    def lookup(self, parent: int, name: bytes) -> Attr:
        return self.attr(self.find(parent, name))

    def _children(self, ino: int) -> tuple[dict[bytes, int], int]:
        """A directory's children (name -> rel or ino) and the base to add."""
        node = self.nodes.get(ino)
        if node is not None:
            if node.lazy:
                with self._versions_lock:
                    if node.lazy:
                        self._versions(node)
                        node.lazy = False
            if node.snap is not None:
                got = self._load(ino)
                return got.children[-1], self.base_of[ino]
            if node.children is None:
                raise _fail(errno.ENOTDIR, f"inode {ino}")
            return node.children, 0
        sdir, got, rel = self._where(ino)
        kids = got.children.get(rel)
        if kids is None:
            raise _fail(errno.ENOTDIR, f"inode {ino}")
        return kids, self.base_of[sdir]

    def find(self, parent: int, name: bytes) -> int:
        kids, base = self._children(parent)
        rel = kids.get(name)
        if rel is None:
            raise _fail(errno.ENOENT, name.decode("utf-8", "surrogateescape"))
        return base + rel

    def listdir(self, ino: int) -> list[tuple[bytes, int]]:
        kids, base = self._children(ino)
        return [(name, base + rel) for name, rel in kids.items()]

    def up(self, ino: int) -> int:
        """A directory's parent (for ..)."""
        if ino in self.nodes:
            return self.up_of.get(ino, ROOT)
        sdir, got, rel = self._where(ino)
        p = got.parent.get(rel, -1)
        return sdir if p < 0 else self.base_of[sdir] + p

    def attr(self, ino: int) -> Attr:
        node = self.nodes.get(ino)
        if node is not None:
            t = node.mtime_ns
            if node.children is not None or node.snap is not None:
                n = 2 + sum(1 for c in (node.children or {}).values()
                            if (k := self.nodes.get(c)) is not None and
                            (k.children is not None or k.snap is not None))
                if node.snap is not None and ino in self.loaded:
                    n = 2 + self.loaded[ino].subdirs[-1]
                return Attr(ino, stat.S_IFDIR | 0o555, n, 0, 0, 0, 0, t, t, t, 0)
            return Attr(ino, stat.S_IFLNK | 0o777, 1, 0, 0, len(node.target), 0, t, t, t, 0)
        sdir, got, rel = self._where(ino)
        if rel >= len(got.items):  # a parent the manifest lacks
            t = self.nodes[sdir].mtime_ns
            return Attr(ino, stat.S_IFDIR | 0o555, 2 + got.subdirs[rel], 0, 0, 0, 0, t, t, t, 0)
        it = got.items[rel]
        e = self._entry(got, rel)
        size = e.size if it.kind == fmt.K_REG else len(e.target) \
            if it.kind == fmt.K_SYMLINK else 0
        nlink = 2 + got.subdirs[rel] if it.kind == fmt.K_DIR else 1 + got.links[rel]
        blocks = -(-min(it.stored_bytes, size) // 512) if it.kind == fmt.K_REG else 0
        return Attr(ino, TYPE_BITS[it.kind] | stat.S_IMODE(e.mode), nlink, e.uid, e.gid,
                    size, blocks, e.atime_ns, e.mtime_ns, e.mtime_ns, e.rdev)

    def _entry(self, got: _Loaded, rel: int) -> fmt.Entry:
        try:
            return got.entry(rel)
        except ArchiveError as e:
            self.log(f"{got.what}: {e}")
            raise _fail(errno.EIO, f"{got.what}: {e}") from None

    def readlink(self, ino: int) -> bytes:
        node = self.nodes.get(ino)
        if node is not None:
            if node.children is not None or node.snap is not None:
                raise _fail(errno.EINVAL, f"inode {ino}")
            return node.target
        _, got, rel = self._where(ino)
        if rel >= len(got.items) or got.items[rel].kind != fmt.K_SYMLINK:
            raise _fail(errno.EINVAL, f"inode {ino}")
        return self._entry(got, rel).target

    def xattrs(self, ino: int) -> list[tuple[bytes, bytes]]:
        if ino in self.nodes:
            return []
        _, got, rel = self._where(ino)
        if rel >= len(got.items):
            return []
        return self._entry(got, rel).xattrs

    def open(self, ino: int) -> FileData:
        if ino in self.nodes:
            raise _fail(errno.EISDIR, f"inode {ino}")
        _, got, rel = self._where(ino)
        if rel >= len(got.items) or got.items[rel].kind != fmt.K_REG:
            raise _fail(errno.EISDIR if rel >= len(got.items) or
                        got.items[rel].kind == fmt.K_DIR else errno.EINVAL, f"inode {ino}")
        it = got.items[rel]
        what = f"{got.what}: {it.path.decode('utf-8', 'surrogateescape')}"
        try:
            ranges = got.ranges(rel)
        except ArchiveError as e:
            self.log(f"{what}: {e}")
            raise _fail(errno.EIO, f"{what}: {e}") from None
        return FileData(it.size, ranges, self.blobs, what)

    def close(self) -> None:
        self.blobs.close()

