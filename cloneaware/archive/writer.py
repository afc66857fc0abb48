"""Write an archive: header, entries with their data and references, index,
footer, to any object with ``write``.  Knows offsets (for the index) but
nothing about files on disk."""
from __future__ import annotations

import array
import itertools
import time
import zlib

import numpy as np

from cloneaware import __version__
from cloneaware.archive import format as fmt
from cloneaware.archive import thin

#: an INDEX item's fixed fields and its path's length, as fmt.IndexItem
#: encodes them in this writer's version (the id implicit, the offset the
#: distance from the item before)
_ITEM_HEAD = np.dtype([("id", "<u8"), ("kind", "u1"), ("size", "<u8"), ("stored", "<u8"),
                       ("ref", "<u8"), ("base_ref", "<u8"), ("offset", "<u8"),
                       ("path_len", "<u2")])
assert _ITEM_HEAD.itemsize == fmt._INDEX_ITEM.size + fmt.U16.size
assert fmt.WRITE_VERSION >= fmt.RELATIVE


class Writer:
    """The records of one archive, in order; ``name`` names the archive in
    errors raised by ``f.write``.  ``magic``: fmt.MAP_MAGIC for a sharing map
    (records without data, docs/FORMAT.md)."""

    def __init__(self, f, base: thin.Base | None = None, name: str | None = None,
                 magic: bytes = fmt.MAGIC):
        self.f = f
        self.name = name  # the archive's name, for errors
        self.offset = 0
        # the INDEX, columnar (a list of objects was about 400 bytes a file)
        self._kind = array.array("B")
        self._size = array.array("Q")
        self._stored = array.array("Q")
        self._ref = array.array("Q")
        self._base_ref = array.array("Q")
        self._offset = array.array("Q")
        # the paths one after another, each ending where _path_end says: a
        # bytes object each was 33 bytes more a file, for the whole backup
        self._path_bytes = bytearray()
        self._path_end = array.array("Q")
        self.stored_bytes = 0
        self.ref_bytes = 0
        self.base_ref_bytes = 0
        self._cur: fmt.End | None = None
        self._write(magic)
        hdr = fmt.Header(created_ns=time.time_ns(), tool=f"cloneaware {__version__}")
        self._write(fmt.frame(fmt.T_HEADER, hdr.encode()))
        if base is not None:
            for payload in base.encode_records():
                self._write(fmt.frame(fmt.T_BASE, payload))

    def _write(self, b) -> None:
        try:
            self.f.write(b)
        except OSError as e:
            if e.filename is None and self.name is not None:
                raise OSError(e.errno, e.strerror, self.name) from None
            raise
        self.offset += len(b)

    def entry(self, e: fmt.Entry) -> None:
        assert self._cur is None, "END missing"
        e.id = self.entries
        self._item(e.kind, e.size, 0, self.offset, e.path)
        self._write(fmt.frame(fmt.T_ENTRY, e.encode()))
        if e.kind == fmt.K_REG:
            self._cur = fmt.End(e.id)

    @property
    def entries(self) -> int:
        """How many entries are in (the next one's id)."""
        return len(self._path_end)

    def _item(self, kind: int, size: int, stored: int, offset: int, path: bytes) -> None:
        self._kind.append(kind)
        self._size.append(size)
        self._stored.append(stored)
        self._ref.append(0)
        self._base_ref.append(0)
        self._offset.append(offset)
        self._path_bytes += path
        self._path_end.append(len(self._path_bytes))

    def _file(self) -> fmt.End:
        """The counts of the REG entry being written."""
        assert self._cur is not None, "record outside a regular file"
        return self._cur

    def data(self, offset: int, length: int, codec: int, sha: bytes, payload) -> None:
        head = fmt.encode_data_head(offset, length, codec, sha)
        self.data_record(fmt.frame_parts(fmt.T_DATA, head, payload), length)

    def data_record(self, parts: list, length: int) -> None:
        """A DATA record already framed (by a worker thread) of ``length`` bytes."""
        cur = self._file()
        for p in parts:
            self._write(p)
        cur.data_records += 1
        cur.stored_bytes += length

    def ref(self, offset: int, length: int, src_id: int, src_offset: int) -> None:
        cur = self._file()
        at = self.entries - 1
        self._write(fmt.frame(fmt.T_REF, fmt.encode_ref(offset, length, src_id, src_offset,
                                                        at=at)))
        cur.ref_records += 1
        cur.ref_bytes += length

    def baseref(self, offset: int, length: int, number: int, base_offset: int,
                sha: bytes) -> None:
        cur = self._file()
        self._write(fmt.frame(fmt.T_BASEREF,
                              thin.encode_baseref(offset, length, number, base_offset, sha)))
        cur.base_ref_records += 1
        cur.base_ref_bytes += length

    def external(self, offset: int, length: int, sha: bytes) -> None:
        cur = self._file()
        self._write(fmt.frame(fmt.T_EXTERNAL, thin.encode_external(offset, length, sha)))
        cur.external_records += 1
        cur.external_bytes += length

    def blob(self, offset: int, length: int, blob_offset: int, blob_id: bytes) -> None:
        cur = self._file()
        self._write(fmt.frame(fmt.T_BLOB, fmt.encode_blob(offset, length, blob_offset, blob_id)))
        cur.blob_records += 1
        cur.blob_bytes += length

    def stat(self, ino: int, ctime_ns: int) -> None:
        """The source's inode and ctime, right after a REG entry."""
        self._file()
        self._write(fmt.frame(fmt.T_STAT, fmt.encode_stat(ino, ctime_ns)))

    def regulars(self, data, paths: list[bytes], sizes: list[int], at: list[int],
                 blob_bytes: list[int]) -> int:
        """Whole REG entries whose records were encoded elsewhere, in this
        writer's version (repo/unopened.py: files taken from the files
        cache): ``data`` holds file i's records from ``at[i] - at[0]``.  The
        id of the first."""
        assert self._cur is None, "END missing"
        assert fmt.WRITE_VERSION >= fmt.RELATIVE, "records encoded with implicit ids"
        first = self.entries
        base = self.offset - at[0]
        self._kind.extend(bytes([fmt.K_REG]) * len(paths))
        self._size.extend(sizes)
        self._stored.extend(blob_bytes)
        zeros = array.array("Q", bytes(8 * len(paths)))
        self._ref.extend(zeros)
        self._base_ref.extend(zeros)
        self._offset.extend(base + a for a in at[:len(paths)])
        ends = itertools.accumulate(map(len, paths), initial=len(self._path_bytes))
        self._path_end.extend(itertools.islice(ends, 1, None))
        self._path_bytes += b"".join(paths)
        self._write(data)
        self.stored_bytes += sum(blob_bytes)
        return first

    def end(self) -> fmt.End:
        end = self._file()
        self._cur = None
        self._write(fmt.frame(fmt.T_END, end.encode()))
        self._stored[-1] = end.stored_bytes + end.external_bytes + end.blob_bytes
        self._ref[-1] = end.ref_bytes
        self._base_ref[-1] = end.base_ref_bytes
        self.stored_bytes += end.stored_bytes + end.external_bytes + end.blob_bytes
        self.ref_bytes += end.ref_bytes
        self.base_ref_bytes += end.base_ref_bytes
        return end

    def _index_heads(self) -> bytes:
        """Every INDEX item's fixed part, one after another, made by numpy
        from the columns (a Python call and an IndexItem an entry took 2 to
        3 us: 0.3 s of a night of 116,645 entries)."""
        n = self.entries
        heads = np.zeros(n, dtype=_ITEM_HEAD)
        heads["kind"] = np.frombuffer(self._kind, dtype=np.uint8, count=n)
        for col, arr in (("size", self._size), ("stored", self._stored), ("ref", self._ref),
                         ("base_ref", self._base_ref)):
            heads[col] = np.frombuffer(arr, dtype=np.uint64, count=n)
        offsets = np.frombuffer(self._offset, dtype=np.uint64, count=n)
        heads["offset"] = np.diff(offsets, prepend=np.uint64(0))
        ends = np.frombuffer(self._path_end, dtype=np.uint64, count=n)
        heads["path_len"] = np.diff(ends, prepend=np.uint64(0))
        return heads.tobytes()

    def finish(self) -> None:
        index_offset = self.offset
        records = 0
        buf: list[bytes] = []
        size = 0
        limit = fmt.LIMITS[fmt.T_INDEX]
        fixed, width = self._index_heads(), _ITEM_HEAD.itemsize
        names, start = bytes(self._path_bytes), 0
        for i, end in enumerate(self._path_end):
            path = names[start:end]
            n = width + end - start
            start = end
            if size + n > limit:
                self._write(fmt.frame(fmt.T_INDEX, b"".join(buf)))
                records += 1
                buf, size = [], 0
            buf += (fixed[i * width:(i + 1) * width], path)
            size += n
            if zlib.crc32(path) % fmt.INDEX_CUT == 0:  # a record ends where the paths say
                self._write(fmt.frame(fmt.T_INDEX, b"".join(buf)))
                records += 1
                buf, size = [], 0
        if buf or records == 0:
            self._write(fmt.frame(fmt.T_INDEX, b"".join(buf)))
            records += 1
        footer = fmt.Footer(index_offset, records, self.entries, self.stored_bytes,
                            self.ref_bytes, self.base_ref_bytes, self.offset)
        self._write(fmt.frame(fmt.T_FOOTER, footer.encode()))
