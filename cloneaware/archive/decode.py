"""A DATA record's payload made the file's bytes again, and checked: zstd
decompressed within the record's length, a Btrfs compressed extent
(CODEC_BTRFS) decompressed as Btrfs would within its limits, the result
hashed against the record's SHA-256.  Run on worker threads by the reader
(archive/reader.py); a decompression context per thread."""
from __future__ import annotations

import hashlib
import os
import threading
import zlib

import zstandard

from cloneaware.archive import format as fmt
from cloneaware.errors import ArchiveError


class Decoder:
    """``check_hashes``: compare each record's bytes with its SHA-256."""

    def __init__(self, check_hashes: bool = True):
        self.check_hashes = check_hashes
        self._local = threading.local()

    def decompress(self, data, length: int, offset: int) -> bytes:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            params = zstandard.get_frame_parameters(data)
            if params.content_size not in (length, zstandard.CONTENTSIZE_UNKNOWN):
                raise ArchiveError(f"zstd frame claims {params.content_size} bytes, "
                                   f"the record {length}", offset)
            out = dctx.decompress(data, max_output_size=length)
        except zstandard.ZstdError as e:
            raise ArchiveError(f"bad zstd data: {e}", offset) from None
        if len(out) != length:
            raise ArchiveError(f"zstd data gave {len(out)} bytes, expected {length}", offset)
        return out

    def btrfs_extent(self, raw, length: int, off: int) -> tuple[bytes, fmt.BtrfsExtent]:
        """The file's bytes of a CODEC_BTRFS record, decompressed here as
        Btrfs would, with the extent to write as it is where DEST is Btrfs."""
        x = fmt.decode_btrfs_extent(raw, length, off)
        try:
            if x.compression == fmt.BTRFS_ZSTD:
                params = zstandard.get_frame_parameters(x.data)
                # Btrfs decompresses frames of windowLog <= 17 only (<linux/btrfs.h>)
                if params.window_size > fmt.BTRFS_EXTENT_MAX or \
                        params.content_size not in range(x.unencoded_len + 1) and \
                        params.content_size != zstandard.CONTENTSIZE_UNKNOWN:
                    raise ArchiveError("zstd frame of a Btrfs extent exceeds its limits", off)
                dctx = getattr(self._local, "dctx", None)
                if dctx is None:
                    dctx = self._local.dctx = zstandard.ZstdDecompressor()
                out = dctx.decompress(x.data, max_output_size=x.unencoded_len,
                                      allow_extra_data=False)
            elif x.compression == fmt.BTRFS_ZLIB:
                d = zlib.decompressobj()
                out = d.decompress(x.data, x.unencoded_len)
                if not d.eof or d.unused_data or d.unconsumed_tail:
                    raise ArchiveError("zlib stream of a Btrfs extent is not one whole "
                                       "stream within its size", off)
            else:
                raise ArchiveError(f"Btrfs compression {x.compression} (lzo) cannot be "
                                   "checked by this cloneaware", off)
        except (zstandard.ZstdError, zlib.error) as e:
            raise ArchiveError(f"bad compressed Btrfs extent: {e}", off) from None
        # shorter than the extent: Btrfs reads zeros after it (ENCODED_WRITE)
        out = out.ljust(x.unencoded_offset + length, b"\0")
        return out[x.unencoded_offset:x.unencoded_offset + length], x

    def decode(self, raw, codec: int, length: int, sha: bytes, off: int, path: bytes,
                foff: int):
        """Decompress and hash-check one DATA record (on a worker thread):
        its bytes, and for CODEC_BTRFS the extent as stored."""
        extent = None
        if codec == fmt.CODEC_ZSTD:
            data = self.decompress(raw, length, off)
        elif codec == fmt.CODEC_BTRFS:
            data, extent = self.btrfs_extent(raw, length, off)
        else:
            data = raw
        if self.check_hashes and hashlib.sha256(data).digest() != sha:
            raise ArchiveError(f"SHA-256 mismatch in data of {os.fsdecode(path)} "
                               f"at file offset {foff}", off)
        return data, extent
