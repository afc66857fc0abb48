"""Write an archive: header, entries with their data and references, index,
footer.  Knows offsets (for the index) but nothing about files on disk."""
from __future__ import annotations

import os
import secrets
import sys
import time

from cloneaware import __version__
from cloneaware.archive import format as fmt
from cloneaware.errors import UsageError

WRITEBACK_STEP = 16 << 20
_sync_file_range = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): queue a range for writeback
    without waiting for it (best effort; the fsync at the end is the guarantee)."""
    global _sync_file_range
    if _sync_file_range is None:
        import ctypes

        try:
            f = ctypes.CDLL(None, use_errno=True).sync_file_range
            f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            f.restype = ctypes.c_int
        except (OSError, AttributeError):
            f = False
        _sync_file_range = f
    if _sync_file_range:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE



class _WritebackFile:
    """A buffered file that queues what it wrote for writeback every
    WRITEBACK_STEP bytes, so the fsync at the end waits for the tail only."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = os.fdopen(fd, "wb", buffering=1 << 20)
        self.n = self.queued = 0

    def write(self, b) -> int:
        n = self.buf.write(b)
        self.n += n
        if self.n - self.queued >= WRITEBACK_STEP:
            self.buf.flush()
            start_writeback(self.fd, self.queued, self.n - self.queued)
            self.queued = self.n
        return n

    def flush(self) -> None:
        self.buf.flush()

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.buf.close()


class Output:
    """Where the archive goes: a file written under a temporary name and
    renamed into place only when whole, or standard output."""

    def __init__(self, target: str, force: bool = False):
        self.target = target
        self.tmp: str | None = None
        if target == "-":
            if sys.stdout.isatty():
                raise UsageError("refusing to write an archive to a terminal; "
                                 "use -o FILE or redirect standard output")
            self.f = sys.stdout.buffer
            return
        if os.path.lexists(target) and not force:
            raise UsageError(f"{target} exists; use --force to overwrite it")
        if os.path.isdir(target):
            raise UsageError(f"{target} is a directory")
        d = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(d):
            raise UsageError(f"{d}: no such directory")
        self.tmp = os.path.join(d, f".{os.path.basename(target)}.{secrets.token_hex(4)}.partial")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.f = _WritebackFile(fd)

    def commit(self) -> None:
        self.f.flush()
        if self.tmp is None:
            return
        os.fsync(self.f.fileno())
        os.chmod(self.tmp, 0o666 & ~_umask())
        self.f.close()
        os.replace(self.tmp, self.target)
        self.tmp = None

    def abort(self) -> None:
        if self.tmp is None:
            return
        try:
            self.f.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
        self.tmp = None


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


class Writer:
    def __init__(self, f, base: fmt.Base | None = None, name: str | None = None):
        self.f = f
        self.name = name  # the archive's name, for errors
        self.offset = 0
        self.index: list[fmt.IndexItem] = []
        self.stored_bytes = 0
        self.ref_bytes = 0
        self.base_ref_bytes = 0
        self._cur: fmt.End | None = None
        self._cur_item: fmt.IndexItem | None = None
        self._write(fmt.MAGIC)
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
        e.id = len(self.index)
        item = fmt.IndexItem(e.id, e.kind, e.size, 0, 0, 0, self.offset, e.path)
        self.index.append(item)
        self._write(fmt.frame(fmt.T_ENTRY, e.encode()))
        if e.kind == fmt.K_REG:
            self._cur = fmt.End(e.id)
            self._cur_item = item

    def data(self, offset: int, length: int, codec: int, sha: bytes, payload) -> None:
        head = fmt.encode_data_head(offset, length, codec, sha)
        parts = fmt.frame_parts(fmt.T_DATA, head, payload)
        for p in parts:
            self._write(p)
        self._cur.data_records += 1
        self._cur.stored_bytes += length

    def data_record(self, parts: list, length: int) -> None:
        """A DATA record already framed (by a worker thread) of ``length`` bytes."""
        for p in parts:
            self._write(p)
        self._cur.data_records += 1
        self._cur.stored_bytes += length

    def ref(self, offset: int, length: int, src_id: int, src_offset: int) -> None:
        self._write(fmt.frame(fmt.T_REF, fmt.encode_ref(offset, length, src_id, src_offset)))
        self._cur.ref_records += 1
        self._cur.ref_bytes += length

    def baseref(self, offset: int, length: int, number: int, base_offset: int,
                sha: bytes) -> None:
        self._write(fmt.frame(fmt.T_BASEREF,
                              fmt.encode_baseref(offset, length, number, base_offset, sha)))
        self._cur.base_ref_records += 1
        self._cur.base_ref_bytes += length

    def external(self, offset: int, length: int, sha: bytes) -> None:
        self._write(fmt.frame(fmt.T_EXTERNAL, fmt.encode_external(offset, length, sha)))
        self._cur.external_records += 1
        self._cur.external_bytes += length

    def end(self) -> fmt.End:
        end, self._cur = self._cur, None
        self._write(fmt.frame(fmt.T_END, end.encode()))
        self._cur_item.stored_bytes = end.stored_bytes + end.external_bytes
        self._cur_item.ref_bytes = end.ref_bytes
        self._cur_item.base_ref_bytes = end.base_ref_bytes
        self.stored_bytes += end.stored_bytes + end.external_bytes
        self.ref_bytes += end.ref_bytes
        self.base_ref_bytes += end.base_ref_bytes
        return end

    def finish(self) -> None:
        index_offset = self.offset
        records = 0
        buf: list[bytes] = []
        size = 0
        limit = fmt.LIMITS[fmt.T_INDEX]
        for item in self.index:
            b = item.encode()
            if size + len(b) > limit:
                self._write(fmt.frame(fmt.T_INDEX, b"".join(buf)))
                records += 1
                buf, size = [], 0
            buf.append(b)
            size += len(b)
        if buf or records == 0:
            self._write(fmt.frame(fmt.T_INDEX, b"".join(buf)))
            records += 1
        footer = fmt.Footer(index_offset, records, len(self.index), self.stored_bytes,
                            self.ref_bytes, self.base_ref_bytes, self.offset)
        self._write(fmt.frame(fmt.T_FOOTER, footer.encode()))
