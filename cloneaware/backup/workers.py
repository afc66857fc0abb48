"""The worker threads of a backup: read, hash, compress and frame chunks
(os.pread, hashlib, zstandard and zlib.crc32 release the GIL), so that the
main thread only writes finished records, in order."""
from __future__ import annotations

import errno
import hashlib
import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import zstandard

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.archive.records import Buffers, background_thread
from cloneaware.errors import UsageError


class Chunk(NamedTuple):
    """A chunk a worker read: its SHA-256, the bytes actually read (fewer if
    the file shrank: the rest was zeros), and, for a data job, the parts of
    a whole DATA record (None for a hash job)."""

    sha256: bytes
    got: int
    record: list | None
    #: a CODEC_BTRFS record: the bytes of the compressed extent it holds
    encoded: int = 0
    #: the buffer of Workers.bufs that ``record`` holds the bytes in, given
    #: back (Workers.give_back) once the record is written
    buf: bytearray | None = None


class BaseCheck(NamedTuple):
    """A candidate range hashed here and in the base file it names (the base's
    hash is None when the base could not be opened or read, empty when it
    ends before the range)."""

    sha256: bytes
    got: int
    base_sha256: bytes | None


def parse_compress(spec: str) -> tuple[int, int]:
    """'none' | 'zstd' | 'zstd:LEVEL' -> (codec, level)."""
    if spec == "none":
        return fmt.CODEC_NONE, 0
    name, _, level = spec.partition(":")
    if name != "zstd":
        raise UsageError(f"unknown compression {spec!r}; use none, zstd or zstd:LEVEL")
    try:
        lv = int(level) if level else 3
    except ValueError:
        raise UsageError(f"bad zstd level {level!r}") from None
    if not 1 <= lv <= 22:
        raise UsageError(f"zstd level {lv} outside 1..22")
    return fmt.CODEC_ZSTD, lv


class Workers:
    #: Try zstd on this much of a chunk first; store the chunk raw if that
    #: sample does not shrink (random or already compressed data).
    SAMPLE = 64 << 10

    def __init__(self, codec: int, level: int, workers: int = 3):
        self.codec = codec
        self.level = level
        self.pool = ThreadPoolExecutor(max_workers=workers, initializer=background_thread)
        self.local = threading.local()
        #: what chunks are read into: a new bytes object for each 4 MiB read
        #: faults in 1,024 fresh pages, the most of a backup's page faults;
        #: kept up to a DEPTH of them (files read ahead come in many sizes)
        self.bufs = Buffers(keep_bytes=32 << 20)

    @staticmethod
    def read(fd: int, offset: int, length: int) -> tuple[bytes, int]:
        data = os.pread(fd, length, offset)
        got = len(data)
        if got < length:  # the file shrank while we read it
            data += bytes(length - got)
        return data, got

    def read_into(self, fd: int, offset: int, length: int) -> tuple[memoryview, int, bytearray]:
        """As read, into a buffer of ``bufs``: (its first ``length`` bytes,
        the bytes read, the buffer to give back)."""
        buf = self.bufs.get(length)
        mv = memoryview(buf)[:length]
        got = os.preadv(fd, [mv], offset)
        if got < length:  # the file shrank while we read it
            mv[got:] = bytes(length - got)
        return mv, got, buf

    def give_back(self, chunk: Chunk) -> None:
        """``chunk``'s record has been written: its buffer may be read into again."""
        if chunk.buf is not None:
            self.bufs.put(chunk.buf)

    def zstd(self, level: int) -> zstandard.ZstdCompressor:
        """This thread's compressor at ``level``."""
        c = getattr(self.local, "z", None)
        if c is None or self.local.zlevel != level:
            c = self.local.z = zstandard.ZstdCompressor(level=level)
            self.local.zlevel = level
        return c

    def compress(self, data: bytes | memoryview) -> bytes | None:
        """zstd of data, or None when it would not be smaller."""
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = zstandard.ZstdCompressor(level=self.level)
        if len(data) > 2 * self.SAMPLE and \
                len(c.compress(data[:self.SAMPLE])) > self.SAMPLE * 0.97:
            return None
        z = c.compress(data)
        return z if len(z) < len(data) else None

    def data_job(self, fd: int, offset: int, length: int) -> Chunk:
        """Read, hash, compress and frame one DATA record (stored as read:
        the record holds the buffer, for the caller to give back)."""
        data, got, buf = self.read_into(fd, offset, length)
        z = self.compress(data) if self.codec == fmt.CODEC_ZSTD else None
        chunk = self.data_chunk(offset, data, got, z)
        if z is not None:  # the record holds z, not the buffer
            del data
            self.bufs.put(buf)
            return chunk
        return chunk._replace(buf=buf)

    def data_chunk(self, offset: int, data: memoryview, got: int, z: bytes | None) -> Chunk:
        """The DATA record of ``data`` (read by data_job, or ahead by
        backup/ahead.py), ``z`` its zstd frame if it was compressed and is
        smaller (else stored raw)."""
        sha = hashlib.sha256(data).digest()
        codec, payload = fmt.CODEC_NONE, data  # type: tuple[int, bytes | memoryview]
        if z is not None and len(z) < len(data):
            codec, payload = fmt.CODEC_ZSTD, z
        head = fmt.encode_data_head(offset, len(data), codec, sha)
        return Chunk(sha, got, fmt.frame_parts(fmt.T_DATA, head, payload))

    #: encoded read refused for the whole run (no CAP_SYS_ADMIN, not Btrfs)
    encoded_refused: str | None = None

    def encoded_job(self, fd: int, offset: int, length: int) -> Chunk:
        """One whole window of a compressed Btrfs extent (CHECK_ENCODED):
        read it as stored (BTRFS_IOC_ENCODED_READ), decompress it here to
        hash the file's bytes, and frame it as a CODEC_BTRFS DATA record, so
        that nothing is compressed again and the restore can write the
        extent as it is.  Anything else than a zstd or zlib extent of exactly
        this window (the file changed, lzo) is stored as a data job does."""
        if self.encoded_refused is None:
            try:
                enc = native.btrfs_encoded_read(fd, offset)
            except OSError as e:
                if e.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                    if e.errno in (errno.EPERM, errno.ENOTTY):
                        self.encoded_refused = os.strerror(e.errno)
                    return self.data_job(fd, offset, length)
                raise
            data = self._window(enc, length)
            if data is not None:
                window, frame = data
                sha = hashlib.sha256(window).digest()
                x = fmt.BtrfsExtent(enc.unencoded_len, enc.unencoded_offset,
                                    enc.compression, frame)
                head = fmt.encode_data_head(offset, length, fmt.CODEC_BTRFS, sha)
                return Chunk(sha, length, fmt.frame_parts(fmt.T_DATA, head,
                                                          fmt.encode_btrfs_extent(x)),
                             len(frame))
        return self.data_job(fd, offset, length)

    def _window(self, enc: native.Encoded, length: int) -> tuple[bytes, bytes] | None:
        """(the file's ``length`` bytes, the compressed stream without the
        sector padding) of an encoded read, or None if it is not what
        CODEC_BTRFS holds."""
        if enc.len != length or enc.encryption or enc.unencoded_offset % 4096 \
                or enc.unencoded_offset + length > enc.unencoded_len \
                or enc.unencoded_len > fmt.BTRFS_EXTENT_MAX:
            return None
        d: zstandard.ZstdDecompressionObj | zlib._Decompress
        if enc.compression == fmt.BTRFS_ZSTD:
            d = zstandard.ZstdDecompressor().decompressobj()
        elif enc.compression == fmt.BTRFS_ZLIB:
            d = zlib.decompressobj()
        else:
            return None  # plain, or lzo (no checker here): stored as data
        try:
            out = d.decompress(enc.data)
        except (zstandard.ZstdError, zlib.error):
            return None
        frame = enc.data[:len(enc.data) - len(d.unused_data)]
        if not d.eof or not 0 < len(frame) < enc.unencoded_len \
                or len(out) > enc.unencoded_len:
            return None
        out = out.ljust(enc.unencoded_offset + length, b"\0")
        return out[enc.unencoded_offset:enc.unencoded_offset + length], frame

    def hash_job(self, fd: int, offset: int, length: int) -> Chunk:
        """Read and hash."""
        data, got, buf = self.read_into(fd, offset, length)
        sha = hashlib.sha256(data).digest()
        del data
        self.bufs.put(buf)
        return Chunk(sha, got, None)

    def base_check_job(self, fd: int, offset: int, length: int, bfd: int | None,
                       base_offset: int) -> BaseCheck:
        """Hash our range and the base's range it is believed to equal
        (``bfd``: the base file, closed here; None: it could not be opened)."""
        try:
            mine = self.hash_job(fd, offset, length)
        except BaseException:
            if bfd is not None:
                os.close(bfd)
            raise
        if bfd is None:  # the base unreadable: store the range rather than fail the backup
            return BaseCheck(mine.sha256, mine.got, None)
        try:
            theirs = self.hash_job(bfd, base_offset, length)
        except OSError:
            return BaseCheck(mine.sha256, mine.got, None)
        finally:
            os.close(bfd)
        return BaseCheck(mine.sha256, mine.got,
                         theirs.sha256 if theirs.got == length else b"")

    def submit(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)

    def close(self, wait: bool = True) -> None:
        """Stop the workers; on an error or a signal, do not wait for the
        chunks they are compressing (zstd -19 takes seconds per chunk)."""
        self.pool.shutdown(wait=wait, cancel_futures=True)
