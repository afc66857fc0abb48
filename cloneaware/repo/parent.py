"""The parent of a backup into a repository: the snapshot this host wrote
last of the backup set (never merely the newest one the store shows), and
its regular files as rows of a files cache (repo/filescache.py): the
cache the last backup left, else the same rows read from the parent's
manifest (trusted by the metadata rule, never taken unopened)."""
from __future__ import annotations

import bisect
import io
from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware.archive import format as fmt
from cloneaware.archive.events import (
    BlobEvent,
    EndEvent,
    EntryEvent,
    Handler,
    StatEvent,
    dispatch,
)
from cloneaware.archive.reader import Stream
from cloneaware.repo import filescache
from cloneaware.repo.filescache import CacheBuilder, FilesCache
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot
from cloneaware.repo.state import ClientState
from cloneaware.source.anchors import AnchorSets


@dataclass(slots=True)
class Segments:
    """A file's bytes as blob ranges, in file order: parallel lists."""

    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    blob_offsets: list[int] = field(default_factory=list)

    def add(self, offset: int, length: int, bid: bytes, boff: int) -> None:
        self.offsets.append(offset)
        self.lengths.append(length)
        self.blobs.append(bid)
        self.blob_offsets.append(boff)

    def resolve(self, offset: int, length: int):
        """(position in the range, length, blob id, offset in the blob) covering
        [offset, offset + length); KeyError if a part is not covered."""
        end = offset + length
        i = bisect.bisect_right(self.offsets, offset) - 1
        pos = offset
        while pos < end:
            if i < 0 or i >= len(self.offsets) or \
                    not self.offsets[i] <= pos < self.offsets[i] + self.lengths[i]:
                raise KeyError(pos)
            skip = pos - self.offsets[i]
            n = min(self.lengths[i] - skip, end - pos)
            yield pos - offset, n, self.blobs[i], self.blob_offsets[i] + skip
            pos += n
            i += 1


class _ParentFiles(Handler):
    """A snapshot's regular files as rows of a files cache (repo/filescache.py),
    for a parent that has no cache: trusted by the metadata rule, never
    taken unopened (no physical ranges)."""

    def __init__(self) -> None:
        self.rows = CacheBuilder()
        self.cur: fmt.Entry | None = None
        self.ino = self.ctime = -1
        self.segs = Segments()

    def on_entry(self, ev: EntryEvent) -> None:
        e = ev.entry
        if e.kind == fmt.K_REG:
            self.cur, self.ino, self.ctime, self.segs = e, -1, -1, Segments()

    def on_stat(self, ev: StatEvent) -> None:
        if self.cur is not None:
            self.ino, self.ctime = ev.ino, ev.ctime_ns

    def on_blob(self, ev: BlobEvent) -> None:
        if self.cur is not None:
            self.segs.add(ev.offset, ev.length, ev.blob_id, ev.blob_offset)

    def on_end(self, ev: EndEvent) -> None:
        e = self.cur
        if e is not None:
            s = self.segs
            # a file without its inode and ctime (an older manifest) matches no stat
            self.rows.add(e.path, (self.ino if self.ino >= 0 else (1 << 64) - 1, e.size,
                                   e.mtime_ns, self.ctime), e.id, e.iflags, e.xattrs,
                          s.offsets, s.lengths, s.blobs, s.blob_offsets, None)
        self.cur = None


def read_manifest(data: bytes, snapshot: str, started_ns: int) -> FilesCache:
    """A snapshot's regular files, from its manifest."""
    got = _ParentFiles()
    dispatch(got, Stream(io.BytesIO(data)).events())
    return FilesCache(snapshot, started_ns, *got.rows.build(None), complete=False)


def parent_files(repo: Repository, cache_path: str, set_key: str, parent: Snapshot,
                 known_as: str | None, warn: Callable[[str], None]) -> FilesCache:
    """The parent's files: its cache (kept under ``known_as``, the id this
    host knows it by) if there is a sound one, else its manifest (the index
    loaded first, with its packs checked: a backup takes blobs as present on
    its word).  Rows with a blob the repository lacks are trusted until the
    caller checks them (``FilesCache.check_blobs``) against the index."""
    files = filescache.load(cache_path, repo.config.id, set_key, known_as or parent.id, warn)
    if files is None:
        repo.load_index(check_packs=True)
        files = read_manifest(repo.manifest(parent), parent.id, parent.time_ns)
    return files


def trusted_parent(repo: Repository, state: ClientState, snaps: list[Snapshot],
                   sets: AnchorSets, host: str, paths: list[str], spec: str | None,
                   warn: Callable[[str], None]) -> tuple[Snapshot | None, str | None]:
    """The last snapshot this host wrote of the set (repo/state.py), if it
    is still there, and the id this host knows it by (its files cache and
    anchors are kept under it); never merely the newest one of the same
    host and PATHs, which anyone who may add snapshots could have written
    (a forged parent would have files taken unread with its blob ranges).
    Under another id (``tag`` rewrote it), it is known by its content key:
    a snapshot with the same manifest holds the same files, whoever wrote
    it.  Without one, every file is read: slower, never wrong.  ``spec``:
    the one the owner names (backup --parent), taken as it is."""
    if spec is not None:
        got = repo.find(spec, snaps)
        return got, got.id
    if sets.legacy_key is not None:  # the set as an earlier version keyed it
        state.adopt(sets.legacy_key, sets.key)
    want = state.parent(sets.key)
    parent = next((s for s in snaps if s.id == want), None) if want else None
    content = state.parent_content(sets.key)
    if parent is None and want is not None and content is not None:
        parent = next((s for s in reversed(snaps) if s.content_key == content), None)
        if parent is not None:
            return parent, want
    mine = [s for s in snaps if s.hostname == host and sorted(s.paths) == paths]
    if want is not None and parent is None:
        warn(f"{repo.where}: the snapshot this host wrote last of these paths "
             f"({want[:8]}) is gone; every file is read")
    elif want is None and mine:
        warn(f"{repo.where}: this host has no record of writing any of the "
             f"snapshots of these paths (say {mine[-1].short_id}): none is taken as "
             "the parent, and every file is read once")
    newer = [s for s in mine if parent is None or s.time_ns > parent.time_ns]
    if parent is not None and newer:
        warn(f"{repo.where}: snapshot {newer[-1].short_id} of these paths is newer "
             "than the last one this host wrote, and not taken as the parent")
    return parent, want if parent is not None else None
