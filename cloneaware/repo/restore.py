"""Restore snapshots of a repository: the archive receiver (restore/) fed
by each snapshot's manifest, with BLOB records served from the repository.

A blob's bytes are written once, where they are first needed; every later
range of the same blob is cloned from there (FICLONERANGE, or copied where
the kernel will not clone), across files and across the snapshots of one
restore, which re-creates the sharing the sources had.  The blobs to fetch
are known from the manifests before anything is written, so they are read
ahead on threads (adjacent blobs of a pack in one read), decrypted,
decompressed and checked against their ids while earlier files are being
written.
"""
from __future__ import annotations

import collections
import io
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cloneaware.restore.partial as partial
from cloneaware.archive.events import BlobEvent, EntryEvent
from cloneaware.archive.reader import Stream, read_index
from cloneaware.errors import RepositoryError, UsageError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import pack_name
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot
from cloneaware.restore.receive import Restore, RestoreSummary
from cloneaware.restore.select import Selection, plan
from cloneaware.safeio import open_beneath

READ_MAX = 8 << 20  # one ranged read covers adjacent blobs up to this much
WINDOW = 64 << 20  # stored bytes fetched ahead of the restore


@dataclass
class Place:
    """Blob bytes [lo, hi) were written in file ``entry`` of restore number
    ``owner``, the blob's byte 0 being at file offset ``base``."""

    owner: int
    entry: int
    base: int
    lo: int
    hi: int


class Coverage:
    """Which ranges of which blobs were written where.  The same rule plans
    the fetches (from the manifests alone) and drives the restore, so the two
    agree: a range is cut where the places that hold its parts begin and end;
    the parts some place holds are cloned from it, the others written (and
    become places)."""

    def __init__(self) -> None:
        self.places: dict[bytes, list[Place]] = {}

    def split(self, bid: bytes, boff: int, length: int) -> list[tuple[int, int, Place | None]]:
        """(lo, hi, place or None) covering [boff, boff + length) in order."""
        out: list[tuple[int, int, Place | None]] = []
        pos, end = boff, boff + length
        for p in self.places.get(bid, ()):
            if p.hi <= pos:
                continue
            if p.lo >= end:
                break
            if p.lo > pos:
                out.append((pos, p.lo, None))
                pos = p.lo
            hi = min(p.hi, end)
            out.append((pos, hi, p))
            pos = hi
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end, None))
        return out

    def add(self, bid: bytes, place: Place) -> None:
        ps = self.places.setdefault(bid, [])
        ps.append(place)
        if len(ps) > 1 and ps[-2].lo > place.lo:
            ps.sort(key=lambda p: p.lo)


class BlobCache:
    """The blobs fetched last, up to ``capacity`` bytes (plan and restore use
    the same cache rule)."""

    def __init__(self, capacity: int = 64 << 20):
        self.capacity = capacity
        self.d: collections.OrderedDict[bytes, bytes | int] = collections.OrderedDict()
        self.size = 0

    def get(self, bid: bytes):
        got = self.d.get(bid)
        if got is not None:
            self.d.move_to_end(bid)
        return got

    def put(self, bid: bytes, data: bytes | int) -> None:
        n = data if isinstance(data, int) else len(data)
        self.d[bid] = data
        self.size += n
        while self.size > self.capacity and len(self.d) > 1:
            _, old = self.d.popitem(last=False)
            self.size -= old if isinstance(old, int) else len(old)


def plan_fetches(repo: Repository, manifests: list[bytes],
                 wanted: list[set[int]] | None = None) -> list[bytes]:
    """The blob ids the restore will fetch, in the order it will fetch them
    (with ``wanted``: only for those files of each manifest, as restore
    --include chose them)."""
    cov = Coverage()
    cache = BlobCache()
    order: list[bytes] = []
    for owner, m in enumerate(manifests):
        entry = -1
        files = wanted[owner] if wanted is not None else None
        for ev in Stream(io.BytesIO(m), check_hashes=False).events():
            if isinstance(ev, EntryEvent):
                entry = ev.entry.id
            elif isinstance(ev, BlobEvent) and (files is None or entry in files):
                for lo, hi, place in cov.split(ev.blob_id, ev.blob_offset, ev.length):
                    if place is not None:
                        continue
                    if cache.get(ev.blob_id) is None:
                        e = repo.index.get(ev.blob_id)
                        order.append(ev.blob_id)
                        cache.put(ev.blob_id, e.raw_length if e is not None else 0)
                    cov.add(ev.blob_id, Place(owner, entry, ev.offset - ev.blob_offset, lo, hi))
    return order


class Fetcher:
    """Reads blobs ahead, in the planned order, on threads; keeps the last
    ones fetched (BlobCache) for the later parts of a blob that need them."""

    def __init__(self, repo: Repository, order: list[bytes], threads: int = 3):
        self.repo = repo
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.groups = self._groups(order)
        self.queue: collections.deque = collections.deque()  # (bid, future, i, stored)
        self.ahead = 0
        self.cache = BlobCache()

    def _groups(self, order: list[bytes]):
        idx = self.repo.index
        group: list[tuple[bytes, rf.IndexEntry]] = []
        for bid in order:
            e = idx.get(bid)
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

    def _read(self, group: list[tuple[bytes, rf.IndexEntry]]) -> list[bytes]:
        first = group[0][1]
        end = group[-1][1].offset + group[-1][1].stored_length
        pid = first.pack.hex()
        raw = self.repo.backend.read(pack_name(pid), first.offset, end - first.offset)
        out = []
        for bid, e in group:
            start = e.offset - first.offset
            out.append(self.repo.decode_blob(
                bid, e, memoryview(raw)[start:start + e.stored_length],
                f"{self.repo.where}: blob {bid.hex()[:16]} in pack {pid[:16]}"))
        return out

    def _fill(self) -> None:
        while self.ahead < WINDOW:
            group = next(self.groups, None)
            if group is None:
                return
            fut: Future = self.pool.submit(self._read, group)
            for i, (bid, e) in enumerate(group):
                self.queue.append((bid, fut, i, e.stored_length))
                self.ahead += e.stored_length

    def get(self, bid: bytes) -> bytes:
        got = self.cache.get(bid)
        if isinstance(got, bytes):
            return got
        self._fill()
        if self.queue and self.queue[0][0] == bid:
            _, fut, i, stored = self.queue.popleft()
            self.ahead -= stored
            data = fut.result()[i]
        else:
            data = self.repo.read_blob(bid)  # not where the plan said: read it now
        self.cache.put(bid, data)
        return data

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Receiver(Restore):
    """The archive receiver, with BLOB records served by the repository."""

    stage_referenced = False  # the blobs come from the repository, not from a file

    def __init__(self, shared: SnapshotsRestore, owner: int, manifest: bytes, dest: str,
                 **kw):
        super().__init__(io.BytesIO(manifest), dest, **kw)
        self.shared = shared
        self.owner = owner

    def on_blob(self, ev: BlobEvent) -> None:
        if self.skipping:  # a file restore --include leaves out
            return
        cur = self._current()
        sh = self.shared
        entry = sh.repo.index.get(ev.blob_id)
        if entry is None:
            raise RepositoryError(f"{sh.repo.where}: blob {ev.blob_id.hex()} of "
                                  f"{cur.where} is in no index (run cloneaware check)")
        if ev.blob_offset + ev.length > entry.raw_length:
            raise RepositoryError(f"{sh.repo.where}: the manifest asks for bytes "
                                  f"{ev.blob_offset}-{ev.blob_offset + ev.length} of a blob of "
                                  f"{entry.raw_length} (hostile or damaged manifest)")
        base = ev.offset - ev.blob_offset  # where the blob's byte 0 falls in this file
        for lo, hi, place in sh.cov.split(ev.blob_id, ev.blob_offset, ev.length):
            if place is not None:
                sfd, size = sh.source(place, self)
                self.cloner.clone_or_copy(cur.fd, sfd, place.base + lo, hi - lo, base + lo,
                                          size, cur.entry.size, cur.where, "archive")
                self._advance(hi - lo)
                continue
            data = sh.fetcher.get(ev.blob_id)
            if len(data) != entry.raw_length:
                raise RepositoryError(f"{sh.repo.where}: blob {ev.blob_id.hex()} has "
                                      f"{len(data)} bytes, its index says {entry.raw_length}")
            self._put(cur, memoryview(data)[lo:hi], base + lo)
            sh.cov.add(ev.blob_id, Place(self.owner, cur.entry.id, base, lo, hi))
            self._advance(hi - lo)

    def source(self, entry: int) -> tuple[int, int]:
        """A descriptor and the size of entry ``entry`` of this restore."""
        cur = self._current()
        if entry == cur.entry.id:
            return cur.fd, cur.entry.size
        assert self.stream is not None
        e = self.stream.entries[entry]
        return self._src_fd(e), e.size


class SnapshotsRestore:
    """Restore SNAPSHOTs into DEST: one snapshot as DEST/<name>, several as
    DEST/<short id>/<name>, sharing their common data with each other."""

    def __init__(self, repo: Repository, snaps: list[Snapshot], dest: str, **kw):
        self.repo = repo
        self.snaps = snaps
        self.dest = dest
        self.kw = kw
        self.cov = Coverage()
        self.receivers: list[_Receiver] = []
        self.done_fds: dict[tuple[int, int], int] = {}
        self.fetcher: Fetcher

    def run(self) -> RestoreSummary:
        self.repo.load_index()
        manifests = [self.repo.manifest(s) for s in self.snaps]
        several = len(self.snaps) > 1
        dests = [os.path.join(self.dest, s.short_id) if several else self.dest
                 for s in self.snaps]
        select = self.kw.get("select") or Selection()
        all_tops = []
        wanted: list[set[int]] | None = [] if select else None
        for m in manifests:
            if wanted is not None:  # one pass over each manifest's entries
                got = plan(select, [ev.entry for ev in Stream(io.BytesIO(m)).events()
                                    if isinstance(ev, EntryEvent)])
                tops = got.tops
                wanted.append(got.with_data)
            else:
                tops = {it.path for it in read_index(io.BytesIO(m)).items
                        if b"/" not in it.path}
            all_tops.append(tops)
        if select and not any(all_tops):
            raise UsageError(f"{select.what()} leaves nothing of the "
                             f"snapshot{'s' if several else ''} to restore")
        if not self.kw.get("force"):
            for tops, d in zip(all_tops, dests):
                left = partial.read(dest=d)  # what a failed restore left: gone over
                for top in sorted(tops - left):
                    if os.path.lexists(os.path.join(os.fsencode(d), top)):
                        raise UsageError(f"{os.path.join(d, os.fsdecode(top))} exists; "
                                         "use --force to overwrite it")
        progress = self.kw.get("progress")
        if progress:
            progress.set_total(sum(read_index(io.BytesIO(m)).footer.stored_bytes
                                   for m in manifests))
        self.fetcher = Fetcher(self.repo, plan_fetches(self.repo, manifests, wanted))
        total = RestoreSummary()
        try:
            for owner, (m, d) in enumerate(zip(manifests, dests)):
                kw = {**self.kw, "select": select.fresh()}  # each has its own walk state
                if several and kw.get("listed") is not None:
                    kw["listed"] = lambda p, f=kw["listed"], at=self.snaps[owner].short_id: \
                        f(at.encode() + b"/" + p)
                r = _Receiver(self, owner, m, d, **kw)
                self.receivers.append(r)
                s = r.run()
                for k, v in s.as_dict().items():
                    if isinstance(v, bool):
                        setattr(total, k, getattr(total, k) or v)
                    elif isinstance(v, (int, float)):
                        setattr(total, k, getattr(total, k) + v)
                    elif isinstance(v, list):
                        getattr(total, k).extend(v)
                    elif isinstance(v, dict):
                        for rk, rv in v.items():
                            total.copy_reasons[rk] = total.copy_reasons.get(rk, 0) + rv
        finally:
            self.fetcher.close()
            for fd in self.done_fds.values():
                os.close(fd)
        return total

    def source(self, place: Place, asking: _Receiver) -> tuple[int, int]:
        """A descriptor and size of the file where a blob was written."""
        r = self.receivers[place.owner]
        if r is asking:
            return r.source(place.entry)
        key = (place.owner, place.entry)
        fd = self.done_fds.get(key)
        if fd is None:  # a file of a snapshot restored earlier in this run, in place now
            assert r.stream is not None
            parent, name = r.placer.placed[place.entry]
            root = os.open(r.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                parts = [*(parent.split(b"/") if parent else []), name]
                fd = open_beneath(root, parts, os.O_RDONLY | os.O_CLOEXEC)
            finally:
                os.close(root)
            self.done_fds[key] = fd
        assert r.stream is not None
        return fd, r.stream.entries[place.entry].size
