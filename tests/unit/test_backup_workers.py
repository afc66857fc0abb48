"""The backup's workers read chunks into reused buffers (Workers.bufs):
what they hand on is what the file held, whatever a buffer held before."""
from __future__ import annotations

import hashlib
import os

from cloneaware.archive import format as fmt
from cloneaware.backup.workers import Workers

MiB = 1 << 20


def _file(tmp_path, name: str, data: bytes) -> int:
    p = tmp_path / name
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY)


def _payload(chunk) -> bytes:
    head, head_payload, data, crc = chunk.record
    return bytes(data)


def test_stored_chunks_come_back_to_be_read_into_again(tmp_path):
    w = Workers(fmt.CODEC_NONE, 0)
    data = os.urandom(4 * MiB)
    fd = _file(tmp_path, "f", data)
    try:
        a = w.data_job(fd, 0, MiB)
        assert _payload(a) == data[:MiB] and a.buf is not None
        w.give_back(a)
        b = w.data_job(fd, MiB, MiB)
        assert b.buf is a.buf  # the same buffer, read into again
        assert _payload(b) == data[MiB:2 * MiB]
        assert b.sha256 == hashlib.sha256(data[MiB:2 * MiB]).digest()
        c = w.data_job(fd, 2 * MiB, MiB)  # b not given back: another buffer
        assert c.buf is not b.buf and _payload(b) == data[MiB:2 * MiB]
    finally:
        os.close(fd)
        w.close()


def test_a_short_read_into_a_used_buffer_is_zeros_after_the_end(tmp_path):
    """A file that shrank while read: the rest of the chunk is zeros, not
    the bytes of the chunk read into the buffer before."""
    w = Workers(fmt.CODEC_NONE, 0)
    full = _file(tmp_path, "full", b"\xff" * MiB)
    short = _file(tmp_path, "short", b"\x01" * 1000)
    try:
        w.give_back(w.data_job(full, 0, MiB))
        c = w.data_job(short, 0, MiB)
        assert c.got == 1000
        assert _payload(c) == b"\x01" * 1000 + bytes(MiB - 1000)
        assert c.sha256 == hashlib.sha256(_payload(c)).digest()
        h = w.hash_job(short, 0, MiB)
        assert (h.got, h.sha256) == (1000, c.sha256)
    finally:
        os.close(full)
        os.close(short)
        w.close()


def test_compressed_chunks_hold_no_buffer(tmp_path):
    w = Workers(fmt.CODEC_ZSTD, 3)
    fd = _file(tmp_path, "z", b"compressible " * 100000)
    try:
        c = w.data_job(fd, 0, MiB)
        assert c.buf is None and c.record[2][:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    finally:
        os.close(fd)
        w.close()


def test_the_workers_yield_to_the_thread_that_writes():
    """Backup workers are SCHED_BATCH: waking with a chunk done, they do not
    preempt the main thread, which writes the records in order."""
    w = Workers(fmt.CODEC_NONE, 0)
    try:
        assert w.pool.submit(os.sched_getscheduler, 0).result() == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        w.close()


def test_free_buffers_kept_are_bounded_in_all_sizes():
    """Files read ahead come in many sizes: the free buffers kept are
    bounded in bytes across sizes, not only in number a size (an archive
    backup's peak grew 25 MiB with files of 64 KiB to 4 MiB read ahead)."""
    from cloneaware.archive.records import Buffers

    b = Buffers(keep_bytes=1 * MiB)
    bufs = [b.get(n * 64 * 1024) for n in range(1, 9)]  # 64 KiB .. 512 KiB: 2.25 MiB
    for x in bufs:
        b.put(x)
    assert b.free_bytes <= MiB
    kept = [x for xs in b.free.values() for x in xs]
    assert sum(map(len, kept)) == b.free_bytes > 0
    got = b.get(len(kept[0]))
    assert got is kept[0] and b.free_bytes == sum(map(len, kept)) - len(got)
    unbounded = Buffers()
    for n in range(1, 9):
        unbounded.put(unbounded.get(n * 64 * 1024))
    assert unbounded.free_bytes == sum(n * 64 * 1024 for n in range(1, 9))
