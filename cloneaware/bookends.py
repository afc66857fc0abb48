"""Extents that deduplication left partly referenced, rewritten so that Btrfs
can release them.

Btrfs releases a data extent only when no block of it is referenced any more
(docs/KERNEL.md D12).  Deduplicating a copy into the file it was copied from
moves the copy's references to the other file's extent, block range by
block range; where a few blocks differ, they stay referenced in the copy's
own extent, and that extent, all of it, stays allocated: a "bookend".
A 128 MiB image with 2% of its blocks its own keeps its 128 MiB; `df` does
not move, whatever FIEMAP says of the ranges (bees rewrites such remainders
for the same reason).  XFS counts references per block and has no such
extents.

The pass, after the deduplication, for each file that was deduplicated or
cloned into (``touched``), on Btrfs:

1. its file extent items (BTRFS_IOC_TREE_SEARCH_V2) give the extents it
   refers to, and which part of each (I10); an extent it refers to whole is done;
2. every reference to the extent (BTRFS_IOC_LOGICAL_INO_V2, I14, ignoring
   offsets) and the items of each referring inode give the blocks of it
   still referenced (the union);
3. an extent is rewritten only when all its references are in files of the
   tree (``known``: a snapshot, or a file outside the tree, holds it anyway)
   and rewriting frees more than it writes: the unreferenced part is at
   least the referenced part, and at least ``MIN_GAIN``;
4. the referenced blocks are copied into a new, unnamed file (O_TMPFILE) on
   the same filesystem, and each reference is deduplicated from that copy
   (FIDEDUPERANGE: the kernel compares the bytes, so a file written since is
   left as it is); when every reference has moved, nothing refers to the old
   extent and the next commit releases it; the unnamed file goes when it is
   closed, leaving only what the files now refer to.

A range that ends at its file's end inside a block is copied into a file
of its own that ends there too (a partial block is deduplicated only where
it ends both files, KERNEL.md D10).  Compressed extents (at most 128 KiB of
data each) are left alone.  Both ioctls need CAP_SYS_ADMIN; without it the
pass says once that it could not look.  What the filesystem really freed is
measured by the caller with ``used_bytes`` before and after (statfs, after
syncfs: what df shows)."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

from cloneaware import native
from cloneaware.source.flags import BTRFS_FILE_EXTENT_REG, FILE_EXTENT_DTYPE

#: an extent is rewritten only if that releases at least this much more than it writes
MIN_GAIN = 256 << 10
#: bytes copied per read
READ = 8 << 20
FS_NOCOW_FL = 0x00800000

#: why partly referenced extents were kept (the keys of Bookends.kept)
OUTSIDE = "held by files outside the tree (or a snapshot)"
NOT_WORTH = "rewriting them would write more than it frees"
CHANGED = "a file changed or could not be opened while they were rewritten"
NO_SPACE = "no space to write the copy"


def used_bytes(fd: int, path=None) -> int:
    """The filesystem's used space as df shows it (statfs: blocks - free),
    after syncfs so that what was released is counted."""
    native.syncfs(fd, path)
    st = os.fstatvfs(fd)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@dataclass
class BookendCounts:
    #: extents looked at that were referenced only in part
    partly_referenced: int = 0
    partly_referenced_bytes: int = 0  # their size on disk
    extents_rewritten: int = 0
    rewritten_bytes: int = 0  # the blocks still referenced, written anew
    released_bytes: int = 0  # the size on disk of the extents so released
    #: why the others were kept: disk bytes by reason
    kept: dict[str, int] = field(default_factory=dict)
    #: why the pass could not look (None: it did, or had nothing to look at)
    unchecked: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(slots=True)
class _Ref:
    key: Hashable  # the caller's name for the file
    ino: int
    logical: int  # where the item starts in the file
    offset: int  # where its bytes start in the extent
    length: int  # bytes of the extent it refers to (num_bytes)


class Bookends:
    """Collects the files of a tree (``add``), then rewrites what the
    deduplication left partly referenced (``run``).  ``open_file(key)`` gives
    a descriptor of the file the caller registered under ``key`` (or None);
    the caller owns it and may close it when ``release()`` is called."""

    def __init__(self, counts: BookendCounts, warn: Callable[[str], None]):
        self.c = counts
        self.warn = warn
        self.known: dict[tuple[int, int], Hashable] = {}  # (tree id, inode) -> key
        self.touched: dict[tuple[int, int], Hashable] = {}
        self._trees: dict[int, int] = {}  # st_dev -> Btrfs tree id
        self._cache: dict[tuple[int, int], np.ndarray] = {}  # items of the owners seen

    def add(self, fd: int, st: os.stat_result, key: Hashable, touched: bool,
            fs_type: str) -> None:
        """A regular file of the tree; ``touched``: it was deduplicated or
        cloned into, so it may now refer to part of an extent."""
        if fs_type != "btrfs" or self.c.unchecked is not None:
            return
        tree = self._trees.get(st.st_dev)
        if tree is None:
            try:
                tree = self._trees[st.st_dev] = native.btrfs_subvol_info(fd).tree_id
            except OSError as ex:
                why = os.strerror(ex.errno or 0)
                self.c.unchecked = f"the subvolume could not be asked ({why})"
                return
        self.known[(tree, st.st_ino)] = key
        if touched:
            self.touched[(tree, st.st_ino)] = key

    def run(self, open_file: Callable[[Hashable], int | None], tmp_dir: int,
            release: Callable[[], None]) -> None:
        """Look at every extent the touched files refer to in part; rewrite
        those it pays to.  ``tmp_dir``: a directory on the same filesystem
        for the unnamed copies."""
        # committed first: LOGICAL_INO may miss a reference made moments ago
        # (a file outside DEST that clones an extent would then go unseen,
        # and the extent be rewritten for nothing: docs/KERNEL.md I14)
        native.syncfs(tmp_dir)
        done: set[int] = set()
        for (tree, ino), key in list(self.touched.items()):
            self._cache.clear()
            if self.c.unchecked is not None:
                return
            fd = open_file(key)
            if fd is None or os.fstat(fd).st_ino != ino:
                continue
            items = self._items(fd, tree, ino)
            if items is None:
                return
            for bytenr in np.unique(items["disk_bytenr"]).tolist():
                if bytenr in done:
                    continue
                done.add(bytenr)
                mine = items[items["disk_bytenr"] == bytenr]
                if _covered(mine) >= int(mine["ram_bytes"][0]):
                    continue  # this file alone refers to all of it
                fd = open_file(key)  # (release() may have closed it)
                if fd is None:
                    break
                self._extent(fd, bytenr, open_file, tmp_dir)
                release()
                if self.c.unchecked is not None:
                    return

    # -- one extent ------------------------------------------------------------------

    def _items(self, fd: int, tree: int, ino: int) -> np.ndarray | None:
        """The plain (uncompressed, regular) extent items of an inode."""
        try:
            raw = native.btrfs_file_extents(fd, ino, None, tree)
        except OSError as ex:
            if ex.errno in (errno.EPERM, errno.EACCES):
                self.c.unchecked = "reading Btrfs's extent items needs CAP_SYS_ADMIN (root)"
            elif ex.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.c.unchecked = "the filesystem does not answer Btrfs's tree search"
            else:
                raise
            return None
        it = np.frombuffer(raw, dtype=FILE_EXTENT_DTYPE)
        ok = (it["type"] == BTRFS_FILE_EXTENT_REG) & (it["compression"] == 0) \
            & (it["encryption"] == 0) & (it["disk_bytenr"] != 0) & (it["num_bytes"] > 0)
        return it[ok]

    def _owners(self, fd: int, bytenr: int) -> set[tuple[int, int]] | None:
        """The (tree, inode) pairs that refer to the extent at ``bytenr``;
        None where that cannot be known (said in ``c.unchecked``, or an
        extent hotter than one answer holds)."""
        try:
            return {(root, ino) for ino, _off, root in native.btrfs_logical_ino(fd, bytenr)}
        except OSError as ex:
            if ex.errno in (errno.EPERM, errno.EACCES):
                self.c.unchecked = "finding an extent's references needs CAP_SYS_ADMIN (root)"
                return None
            if ex.errno == errno.EOVERFLOW:
                return None  # referred to by more items than one answer holds: a hot extent
            raise

    def _extent(self, fd: int, bytenr: int, open_file, tmp_dir: int) -> None:
        owners = self._owners(fd, bytenr)
        if owners is None:
            return
        refs: list[_Ref] = []
        size = disk = 0
        outside = False
        for tree, ino in sorted(owners):
            key = self.known.get((tree, ino))
            if key is None:
                outside = True
            items = self._cache.get((tree, ino))
            if items is None:
                items = self._items(fd, tree, ino)
                if items is None:
                    return
                if len(self._cache) < 256:
                    self._cache[(tree, ino)] = items
            items = items[items["disk_bytenr"] == bytenr]
            for it in items:
                size, disk = int(it["ram_bytes"]), int(it["disk_num_bytes"])
                refs.append(_Ref(key, ino, int(it["logical"]), int(it["offset"]),
                                 int(it["num_bytes"])))
        if not refs:
            return  # released meanwhile
        spans = _union([(r.offset, r.offset + r.length) for r in refs])
        referenced = sum(b - a for a, b in spans)
        if referenced >= size:
            return
        self.c.partly_referenced += 1
        self.c.partly_referenced_bytes += disk
        if outside:
            self._keep(OUTSIDE, disk)
        elif size - referenced < max(referenced, MIN_GAIN):
            self._keep(NOT_WORTH, disk)
        else:
            # asked again after a commit, before anything is written: an
            # answer has been seen to miss a reference a moment old even
            # after the syncfs the pass starts with (docs/KERNEL.md I14)
            native.syncfs(fd)
            again = self._owners(fd, bytenr)
            if again is not None and any(self.known.get(o) is None for o in again):
                self._keep(OUTSIDE, disk)
            elif again != owners:
                self._keep(CHANGED, disk)
            else:
                self._rewrite(refs, spans, disk, open_file, tmp_dir)

    def _keep(self, why: str, n: int) -> None:
        self.c.kept[why] = self.c.kept.get(why, 0) + n

    def _rewrite(self, refs: list[_Ref], spans: list[tuple[int, int]], disk: int,
                 open_file, tmp_dir: int) -> None:
        """Copy the referenced blocks into unnamed files and move every
        reference there."""
        fds: dict[Hashable, tuple[int, int]] = {}  # key -> (fd, size)
        for r in refs:
            if r.key not in fds:
                fd = open_file(r.key)
                if fd is None:
                    self._keep(CHANGED, disk)
                    return
                st = os.fstat(fd)
                if st.st_ino != r.ino:
                    self._keep(CHANGED, disk)
                    return
                fds[r.key] = (fd, st.st_size)
        # where each reference's bytes end in the extent: at its file's end
        # inside a block, or where the item ends
        ends = {id(r): r.offset + min(r.length, fds[r.key][1] - r.logical) for r in refs}
        copies: list[tuple[int, int, int, int]] = []  # (start, end, temp index, temp offset)
        shared_at = 0
        tails = 0
        for a, b in spans:
            inside = [r for r in refs if a <= r.offset < b]
            end = max(ends[id(r)] for r in inside)
            ragged = [r for r in inside if ends[id(r)] % 4096]
            if ragged:
                if any(ends[id(r)] != end for r in ragged):
                    self._keep(CHANGED, disk)  # two files end at different points of it
                    return
                tails += 1
                copies.append((a, end, tails, 0))
            else:
                copies.append((a, b, 0, shared_at))
                shared_at += b - a
        temps: dict[int, int] = {}
        try:
            try:
                flags = native.getflags(fds[refs[0].key][0]) & FS_NOCOW_FL
                for a, b, t, at in copies:
                    if t not in temps:
                        temps[t] = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC,
                                           0o600, dir_fd=tmp_dir)
                        if flags:
                            native.setflags(temps[t], flags)
                    if not self._copy(refs, fds, ends, a, b, temps[t], at):
                        self._keep(CHANGED, disk)
                        return
            except OSError as ex:
                if ex.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._keep(NO_SPACE, disk)
                    return
                if ex.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EOPNOTSUPP):
                    self.c.unchecked = f"no unnamed file could be made for the copies " \
                        f"({os.strerror(ex.errno)})"
                    return
                raise
            moved = True
            for r in refs:
                a, b, t, at = next(c for c in copies if c[0] <= r.offset < c[1])
                n = ends[id(r)] - r.offset
                if n <= 0:
                    continue
                fd = fds[r.key][0]
                got = native.fideduperange(temps[t], at + r.offset - a, n, [(fd, r.logical)])
                if got[0].status != native.DEDUPE_SAME:
                    moved = False
        finally:
            for t in temps.values():
                os.close(t)
        written = sum(b - a for a, b, _t, _at in copies)
        self.c.rewritten_bytes += written
        if moved:
            self.c.extents_rewritten += 1
            self.c.released_bytes += disk
        else:
            self._keep(CHANGED, disk)

    def _copy(self, refs: list[_Ref], fds, ends, a: int, b: int, out: int, at: int) -> bool:
        """The extent's bytes [a, b), read through the files that refer to
        them, written to ``out`` at ``at``; False if some are no file's
        (a file was cut short since its items were read)."""
        x = a
        while x < b:
            r = next((r for r in refs if r.offset <= x < ends[id(r)]), None)
            if r is None:
                return False
            n = min(b, ends[id(r)], x + READ) - x
            fd = fds[r.key][0]
            data = os.pread(fd, n, r.logical + x - r.offset)
            if len(data) != n:
                return False
            done = 0
            while done < n:
                done += os.pwrite(out, memoryview(data)[done:], at + x - a + done)
            x += n
        return True


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _covered(items: np.ndarray) -> int:
    return sum(b - a for a, b in _union(
        [(int(o), int(o + n)) for o, n in zip(items["offset"], items["num_bytes"])]))
