"""Restore snapshots of a repository: the restore of manifests
(restore/several.py) fed by blobs from the repository.

The blobs to fetch are known from the manifests before anything is
written: their BLOB records, found in C and followed by the receiver's
rule (``quick_plan``), give the order in which the restore will ask for
blobs; where that rule is not the whole story (--include, a blob in no
index, a range outside its blob) the restore's own receiver is run over
them with recording outputs and a ``Planner`` for a blob source.  The
``Fetcher`` then reads them ahead in that order on threads (adjacent blobs
of a pack in one read), decrypted, decompressed and checked against their
ids while earlier files are being written.
"""
from __future__ import annotations

import collections
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from cloneaware.archive import format as fmt
from cloneaware.archive.blobs import BlobCache
from cloneaware.errors import RepositoryError
from cloneaware.repo import format as rf
from cloneaware.repo.blobread import READ_MAX, read_run
from cloneaware.repo.pieces import walk_piece
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot
from cloneaware.restore.output import RestoreSummary
from cloneaware.restore.several import ManifestsRestore

#: blob bytes fetched ahead of the restore, counted as they are once read
#: (raw): counted as stored, a window of compressed text held three to four
#: times as much (230 of a restore's 355 MiB traced, issue 36)
WINDOW = 64 << 20
#: blobs kept once fetched, for later ranges of them: a blob asked for
#: again is nearly always asked for at once (the parts of a rewritten
#: image's blob) or after far more than any cache holds (120,000 files: 320
#: blobs fetched again with 64 MiB, 321 with 16, 323 with 4), so the
#: Planner and the Fetcher keep 16 MiB, not the 64 the BlobCache would
CACHE = 16 << 20


class IndexBlobs:
    """A blob source that knows the repository's index and fetches nothing
    (a dry run).  ``sizes``: the raw length of each blob asked for so far
    (a restore asks it of every range, twice: a binary search each cost
    3 s of a 40 s restore of 116,000 files)."""

    def __init__(self, repo: Repository, sizes: dict[bytes, int] | None = None):
        self.repo = repo
        self.sizes: dict[bytes, int] = {} if sizes is None else sizes

    def size(self, bid: bytes, where: str) -> int:
        n = self.sizes.get(bid)
        if n is not None:
            return n
        n = self.repo.index.raw_length(bid)
        if n >= 0:
            self.sizes[bid] = n
        else:
            raise RepositoryError(f"{self.repo.where}: blob {bid.hex()} of {where} is in no "
                                  "index (the repository is damaged; run cloneaware check)")
        return n

    def get(self, bid: bytes) -> bytes | None:
        return None


class Planner(IndexBlobs):
    """The blob ids a restore will fetch, in the order it will ask for
    them, with the Fetcher's cache rule (a blob still cached is not fetched
    again)."""

    def __init__(self, repo: Repository):
        super().__init__(repo)
        self.order: list[bytes] = []
        self.cache = BlobCache(CACHE)

    def get(self, bid: bytes) -> bytes | None:
        if self.cache.get(bid) is None:
            self.order.append(bid)
            self.cache.put(bid, self.size(bid, "the manifest"))
        return None


def quick_plan(repo: Repository, manifests: list[bytes]) -> Planner | None:
    """The Planner's answer for a restore of every entry of ``manifests``
    (no --include), from their BLOB records alone: found in C
    (pieces.walk_piece), their sizes looked up at once, then the receiver's
    rule followed range by range (a range fetches its blob when a part of
    it was written nowhere yet and the blob is no longer cached).  That is
    the receiver's own rule as long as every file is restored whole, which
    holds unless a blob is in no index or a range outside its blob (a file
    not restored, or a hostile manifest): None then, and the receiver plans
    (Planner), which says so before anything is written.  A manifest whose
    records are whole but wrong in another way (a path, the order of
    entries) is refused by the restore when it meets it, as an archive's
    is.  A tenth of the planning pass it replaces (issue 36)."""
    plan = Planner(repo)
    cache, sizes, order = plan.cache, plan.sizes, plan.order
    #: blob -> its bytes written: (lo, hi) after its first range, then
    #: [[lo, hi], ...] sorted and apart
    seen: dict[bytes, tuple[int, int] | list[list[int]]] = {}
    for data in manifests:
        if data[:len(fmt.MAGIC)] != fmt.MAGIC:
            return None
        p = walk_piece(data, len(fmt.MAGIC))
        if p.next != 0:
            return None  # the receiver says what is wrong
        r = p.ranges
        raw = repo.index.raw_lengths(r.ids)
        if len(raw) and (raw.min() < 0 or
                         (r.boff.astype(np.int64) + r.length > raw).any()):
            return None
        ids = r.id_list()
        sizes.update(zip(ids, raw.tolist()))
        for bid, boff, length in zip(ids, r.boff.tolist(), r.length.tolist()):
            end = boff + length
            spans = seen.get(bid)
            if spans is None:  # the first range of a blob: always fetched
                seen[bid] = (boff, end)
                order.append(bid)
                cache.put(bid, sizes[bid])
                continue
            if isinstance(spans, tuple):
                if spans[0] <= boff and end <= spans[1]:
                    continue
                spans = seen[bid] = [list(spans)]
            if _cover(spans, boff, end) and cache.get(bid) is None:
                order.append(bid)
                cache.put(bid, sizes[bid])
    return plan


def _cover(spans: list[list[int]], lo: int, hi: int) -> bool:
    """Add [lo, hi) to ``spans`` (sorted, apart); whether a part of it was
    in none of them."""
    for s in spans:
        if s[0] <= lo and hi <= s[1]:
            return False
    merged = sorted([*spans, [lo, hi]])
    spans[:] = [merged[0]]
    for s in merged[1:]:
        if s[0] <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], s[1])
        else:
            spans.append(s)
    return True


class Fetcher(IndexBlobs):
    """Reads blobs ahead, in the planned order, on threads; keeps the last
    ones fetched (BlobCache) for the later parts of a blob that need them.
    A blob asked for out of the planned order is read at once and counted
    (``unplanned``): the plan follows the receiver's rule, so that is a
    fault worth saying.  A blob asked for that was planned later than
    others not asked for drops those (``passed``, counted too): a plan
    entry the restore never asks for would otherwise hold the head of the
    queue, and every read after it would be unplanned."""

    def __init__(self, repo: Repository, order: list[bytes], threads: int = 3,
                 sizes: dict[bytes, int] | None = None):
        super().__init__(repo, sizes)
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.groups = self._groups(order)
        self.queue: collections.deque = collections.deque()  # (bid, future, i, raw)
        self.ahead = 0
        self.cache = BlobCache(CACHE)
        self.unplanned = 0
        self.passed = 0
        #: how many times each blob is in ``queue``
        self.queued: collections.Counter[bytes] = collections.Counter()

    def _groups(self, order: list[bytes]):
        group: list[tuple[bytes, rf.IndexEntry]] = []
        for bid, e in zip(order, self.repo.index.get_many(order)):
            if e is None:
                raise RepositoryError(f"{self.repo.where}: blob {bid.hex()} is in no index "
                                      "(the repository is damaged; run cloneaware check)")
            if group:
                last = group[-1][1]
                if e.pack != last.pack or e.offset != last.offset + last.stored_length or \
                        e.offset + e.stored_length - group[0][1].offset > READ_MAX:
                    yield group
                    group = []
            group.append((bid, e))
        if group:
            yield group

    def _read(self, group: list[tuple[bytes, rf.IndexEntry]]) -> list:
        """The blobs of one ranged read (repo/blobread.py read_run), a
        RepositoryError in the place of one that cannot be had."""
        return read_run(self.repo, group, keep_errors=True)

    def _fill(self) -> None:
        while self.ahead < WINDOW:
            group = next(self.groups, None)
            if group is None:
                return
            fut: Future = self.pool.submit(self._read, group)
            for i, (bid, e) in enumerate(group):
                self.queue.append((bid, fut, i, e.raw_length))
                self.queued[bid] += 1
                self.ahead += e.raw_length

    def _pop(self) -> tuple[bytes, Future, int]:
        bid, fut, i, raw = self.queue.popleft()
        self.ahead -= raw
        self.queued[bid] -= 1
        if not self.queued[bid]:
            del self.queued[bid]
        return bid, fut, i

    def get(self, bid: bytes) -> bytes:
        got = self.cache.get(bid)
        if isinstance(got, bytes):
            return got
        self._fill()
        if self.queue and self.queue[0][0] != bid and bid in self.queued:
            while self.queue[0][0] != bid:  # planned, never asked for: passed over
                self._pop()
                self.passed += 1
        if self.queue and self.queue[0][0] == bid:
            _, fut, i = self._pop()
            data = fut.result()[i]
            if isinstance(data, RepositoryError):  # this blob only: the receiver says so
                raise data
        else:
            self.unplanned += 1
            data = self.repo.read_blob(bid)
        self.cache.put(bid, data)
        return data

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def restore_snapshots(repo: Repository, snaps: list[Snapshot], dest: str,
                      dry_run: bool = False, warn=None, **kw) -> RestoreSummary:
    """Restore ``snaps`` into ``dest`` (one as DEST/<name>, several as
    DEST/<short id>/<name>); options as for ManifestsRestore."""
    t0 = time.monotonic()
    repo.load_index(check_packs=True)  # a pack gone is said once, not at each blob
    mr = ManifestsRestore([(repo.manifest(s), s.short_id) for s in snaps], dest,
                          dry_run=dry_run, warn=warn, **kw)
    mr.check()
    if dry_run:
        s = mr.receive(IndexBlobs(repo), record=True)
    else:
        progress = mr.progress
        if progress:
            progress.set_total(mr.stored_bytes())
        planner = None if mr.select else quick_plan(repo, [it.data for it in mr.items])
        if planner is None:
            planner = Planner(repo)
            mr.progress, mr.listed, listed = None, None, mr.listed
            mr.receive(planner, record=True)
            mr.progress, mr.listed = progress, listed
        fetcher = Fetcher(repo, planner.order, sizes=planner.sizes)
        try:
            s = mr.receive(fetcher)
        finally:
            fetcher.close()
        s.unplanned_fetches = fetcher.unplanned + fetcher.passed
        if (fetcher.unplanned or fetcher.passed) and warn is not None:
            warn(f"{repo.where}: {fetcher.unplanned} blobs were read outside the planned order "
                 f"and {fetcher.passed} planned were not asked for (slower; please report this)")
    s.seconds = time.monotonic() - t0
    return s
