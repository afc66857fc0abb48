"""Packs being written (docs/REPOSITORY.md, "Packs"): stored blobs gathered
into packs, uploaded on threads, and listed in index objects once durable
("Crash safety and concurrency", rules 1 and 2).  Used by a backup, an
archive import and prune's repacking; ``DryPacker`` is backup --dry-run's,
which writes nothing."""
from __future__ import annotations

import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from cloneaware.repo import format as rf
from cloneaware.repo.backend import pack_name
from cloneaware.repo.repository import Repository

INDEX_EVERY = 8  # packs per index object while a backup runs


class Packer:
    """Gathers stored blobs into packs of about ``pack_size`` bytes, written
    by ``connections`` uploader threads (at most that many packs, plus the
    one being filled, in memory).  Blobs are in the index once ``flush``
    returns (or every INDEX_EVERY packs).  Every pack and index is written
    only while the repository's lock holds (``Repository.check_lock``)."""

    def __init__(self, repo: Repository, connections: int = 2):
        self.repo = repo
        self.pool = ThreadPoolExecutor(max_workers=max(1, connections))
        self.slots = threading.BoundedSemaphore(max(1, connections))
        self.cur: list[bytes] = []
        self.entries: list[rf.PackEntry] = []
        self.size = 0
        self.pending: dict[bytes, int] = {}  # blob id -> type, not yet in the index
        self.inflight: list[Future] = []
        self.done: list[rf.IndexPack] = []  # written, not yet in an index object
        self.packs_written = 0
        self.bytes_written = 0
        self.lock = threading.Lock()

    def known(self, bid: bytes) -> bool:
        return bid in self.repo.index or bid in self.pending

    def add(self, bid: bytes, btype: int, raw_length: int, stored: bytes) -> bool:
        """Add a blob; False if the repository (or this packer) has it."""
        if self.known(bid):
            return False
        self.pending[bid] = btype
        self.cur.append(stored)
        self.entries.append(rf.PackEntry(bid, btype, raw_length, len(stored)))
        self.size += len(stored)
        if self.size >= self.repo.config.pack_size or len(self.entries) >= 100_000:
            self._close_pack()
        return True

    def _close_pack(self) -> None:
        if not self.entries:
            return
        entries, blobs = self.entries, self.cur
        self.cur, self.entries, self.size = [], [], 0
        if self.repo.crypto.encrypted:
            # blobs in the order they came would let a store that sees the
            # sizes of the stored blobs, in order, recognise a known file
            # (its chunks are cut on a fixed grid); restic does the same
            order = list(range(len(entries)))
            secrets.SystemRandom().shuffle(order)
            entries = [entries[i] for i in order]
            blobs = [blobs[i] for i in order]
        trailer = self.repo.encode_object(rf.K_TRAILER, rf.encode_trailer_payload(entries))
        parts = [*blobs, trailer, rf.pack_tail(trailer)]
        self._reap()
        self.slots.acquire()
        try:
            self.inflight.append(self.pool.submit(self._upload, entries, parts))
        except BaseException:
            self.slots.release()
            raise

    def _upload(self, entries: list[rf.PackEntry], parts: list[bytes]) -> None:
        try:
            self.repo.check_lock()
            data = b"".join(parts)
            parts.clear()  # the blobs, now in ``data``: not held twice while it uploads
            pid = rf.object_id(data)
            self.repo.backend.write(pack_name(pid), data)
            pack = rf.IndexPack(bytes.fromhex(pid))
            off = 0
            for e in entries:
                pack.blobs.append((e.id, e.type, off, e.stored_length, e.raw_length))
                off += e.stored_length
            with self.lock:
                self.done.append(pack)
                self.packs_written += 1
                self.bytes_written += len(data)
        finally:
            self.slots.release()

    def _reap(self) -> None:
        """Raise the first upload error; write an index every INDEX_EVERY packs."""
        still = []
        for f in self.inflight:
            if f.done():
                f.result()
            else:
                still.append(f)
        self.inflight = still
        if len(self.done) >= INDEX_EVERY:
            self._index(self._take_done())

    def _take_done(self) -> list[rf.IndexPack]:
        with self.lock:
            packs, self.done = self.done, []
        return packs

    def _index(self, packs: list[rf.IndexPack]) -> None:
        if not packs:
            return
        self.repo.backend.sync()  # the packs' names are durable before an index names them
        self.repo.write_index(packs)
        for p in packs:
            self.repo.index.add(p)
            for b in p.blobs:
                self.pending.pop(b[0], None)

    def finish_packs(self) -> list[rf.IndexPack]:
        """Write the last pack and wait for every upload; the packs written
        and not yet in an index object (prune indexes them with the rest)."""
        self._close_pack()
        for f in self.inflight:
            f.result()
        self.inflight = []
        return self._take_done()

    def flush(self) -> None:
        """Write the last pack, wait for every upload, and index them all."""
        self._index(self.finish_packs())

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)


class DryPacker(Packer):
    """backup --dry-run: which blobs the backup would add, and nothing
    sealed, packed or uploaded."""

    def add(self, bid: bytes, btype: int, raw_length: int, stored: bytes) -> bool:
        if self.known(bid):
            return False
        self.pending[bid] = btype
        return True

    def finish_packs(self) -> list[rf.IndexPack]:
        return []

    def flush(self) -> None:
        pass
