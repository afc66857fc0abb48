"""Where a backup's records and data go.

- ``ArchiveSink``: one archive (docs/FORMAT.md) written to a file (under a
  temporary name, renamed when whole), to standard output, or to anything
  with write/flush/commit/abort (an ssh:// target, remote/client.py);
- ``SparseSink``: the sparse form of a thin backup: derivative data in a
  sparse file at its own offsets, described by a manifest archive of
  EXTERNAL records (archive/manifest.py).

A sink is made before the walk (so that a bad target fails at once) and
opened after it; it chooses the worker job for stored data and turns each
finished chunk into records.
"""
from __future__ import annotations

import errno
import io
import os
import stat
import sys
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import numpy as np

from cloneaware.archive import format as fmt
from cloneaware.archive import manifest, thin
from cloneaware.archive.writer import Writer
from cloneaware.backup.workers import Chunk, Workers
from cloneaware.errors import UsageError
from cloneaware.safeio import AtomicFile, sha256_range
from cloneaware.source.walk import Node


class Output(Protocol):
    """A byte stream an archive is written to."""

    def write(self, b) -> int: ...
    def flush(self) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class _Stdout:
    def __init__(self) -> None:
        if sys.stdout.isatty():
            raise UsageError("refusing to write an archive to a terminal; "
                             "use -o FILE or redirect standard output")
        self.f = sys.stdout.buffer

    def write(self, b) -> int:
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def commit(self) -> None:
        self.f.flush()

    def abort(self) -> None:
        pass


class Discard:
    """backup --dry-run: an output that counts what would be written and
    keeps none of it."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        self.count += n
        return n

    def flush(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _check_target(target: str, force: bool) -> None:
    """Refuse before any work a target that cannot be written."""
    if os.path.lexists(target) and not force:
        raise UsageError(f"{target} exists; use --force to overwrite it")
    if os.path.isdir(target):
        raise UsageError(f"{target} is a directory")
    d = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(d):
        raise UsageError(f"{d}: no such directory")


def file_output(target: str, force: bool = False, dry_run: bool = False
                ) -> Callable[[], Output]:
    """An opener for ARCHIVE: '-' is standard output, else a file written
    under a temporary name and renamed into place when whole.  ``dry_run``:
    the target is checked as for a backup, and nothing is written."""
    if target == "-":
        return Discard if dry_run else _Stdout
    if not target:
        raise UsageError("an empty path was given as the archive (-o)")
    _check_target(target, force)
    # the owner's alone: an archive holds every file's bytes, whatever their
    # modes were (an export of an encrypted repository is not encrypted)
    return Discard if dry_run else lambda: AtomicFile(target, replace=force, mode=0o600)


class Prior(NamedTuple):
    """A file in the sharing index that is not an entry of this backup: a
    place a range can be "the same bytes as" though the backup does not
    store it (a repository's anchor of the last backup, repo/sink.py).
    ``fileno``: its number in the index."""

    fileno: int


class Sink:
    """Where a backup's entries and data go.  What Backup says to a sink is
    narrow: an entry; for a regular file, its ranges, each "store these
    bytes", "these bytes are those of that earlier place" (an entry of this
    backup, or a Prior) or, for thin archives, "these bytes are the base's";
    then its end.  A repository's sink also knows the last backup (its
    anchors are Priors, and ``unchanged`` is its metadata rule).

    ``content_addressed``: identical bytes are stored once by content
    (repositories), so compressed candidates are stored rather than checked
    by hash; ``encoded_data``: stored bytes may be Btrfs compressed extents
    as they are on disk."""

    summary: Any = None  # the backup's Summary, set by Backup
    content_addressed = False
    encoded_data = False
    writer: Writer | None = None

    def read_ahead(self) -> bool:
        """Whether small files may be read before their turn, in batches
        (backup/ahead.py): their chunks made by small_chunk, and no file
        taken unread by unchanged()."""
        return False

    def small_level(self, workers: Workers) -> int:
        """The zstd level a file read ahead is compressed with (0: none)."""
        return 0

    def chunks_ahead(self) -> bool:
        """Whether data_job's chunks may be made before their file's turn
        (backup/cloneahead.py): they depend on the bytes read and nothing
        else of the sink's state."""
        return False

    def small_chunk(self, workers: Workers, data: memoryview, got: int,
                    z: bytes | None) -> Chunk:
        """The chunk of a file's first ``len(data)`` bytes read ahead
        (``got`` of them read, zeros after), ``z`` their zstd frame at
        small_level (None at level 0): what data_job would have made."""
        raise NotImplementedError

    def _w(self) -> Writer:
        assert self.writer is not None
        return self.writer

    # -- the run ---------------------------------------------------------------------

    def prepare(self) -> Callable[[Node], int] | None:
        """Before the walk: what says that a regular file is unchanged since
        the last backup from its stat alone (a row number >= 0, taken by
        ``take_unopened``), or None."""
        return None

    def walked(self, rows: np.ndarray) -> np.ndarray:
        """After the walk: of the unopened files ``rows`` (what ``prepare``'s
        test gave), those it no longer trusts, now that what it started
        beside the walk has ended (their blobs gone from the repository):
        they are mapped and read after all."""
        return rows[:0]

    def settle(self) -> None:
        """The walk failed: what ``prepare`` started beside it is not waited
        for (its errors are not the walk's to report)."""

    def sharing_with(self, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Of the unopened files ``rows``, those whose blocks may be among the
        physical ranges ``queries`` (PHYS): they are mapped after all."""
        return rows

    def priors(self, fstab, builder, unopened: list[int]) -> dict[int, Prior]:
        """After the walk, before its files: add the files the plan may share
        with to the index builder (all but those of the rows taken
        ``unopened``); returns them by file number."""
        return {}

    def encode_unopened(self, items: list):
        """The records of unopened files ``items`` (each whole: entry, data,
        end) from what the last backup recorded, encoded at once, for
        take_unopened_run."""
        raise AssertionError("only a sink that says files are unchanged takes them")

    def take_unopened_run(self, enc, lo: int, hi: int, srcs: list[bytes]) -> int:
        """Write files lo .. hi-1 of ``enc`` (consecutive in the walk; their
        source paths ``srcs``).  -> the first one's entry id."""
        raise AssertionError("only a sink that says files are unchanged takes them")

    def open(self, size_hint: int, base: thin.Base | None) -> None:
        """After the walk: the output opened.  ``size_hint``: the size of
        the first regular file; ``base``: a thin archive's base."""
        raise NotImplementedError

    def commit(self) -> None:
        """Every entry is in: the output made whole and durable."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    # -- entries -----------------------------------------------------------------------

    def entry(self, e: fmt.Entry, st: os.stat_result | None = None,
              ext: np.ndarray | None = None) -> None:
        """An entry; a regular file's ranges follow, then ``end``.  ``st``:
        the file's stat (its inode and ctime, for the next backup); ``ext``:
        its extent map from the walk (the files cache)."""
        self._w().entry(e)

    def unchanged(self, node, st: os.stat_result, e: fmt.Entry,
                  ext: np.ndarray | None = None) -> bool:
        """The metadata rule: whether regular file ``e`` is the same as in
        the last backup, taken from it unread; if so the sink has written
        it whole (entry, data and end)."""
        return False

    def capture_dir(self, src: bytes) -> int | None:
        """Where to make the point-in-time clone of ``src`` (None: its own
        directory)."""
        return None

    def keep(self, fd: int, captured: bool, e: fmt.Entry, src: bytes) -> None:
        """After a regular file is written from ``fd`` (its clone if
        ``captured``): a repository keeps it as the file's anchor."""

    # -- a regular file's ranges ----------------------------------------------------

    def cuts(self, offset: int, length: int):
        """How stored data is cut into chunks."""
        end = offset + length
        while offset < end:
            n = min(fmt.CHUNK_MAX, end - offset)
            yield offset, n
            offset += n

    def data_job(self, workers: Workers):
        """The worker function that reads a stored chunk (and prepares it)."""
        raise NotImplementedError

    def store(self, fd: int, offset: int, length: int, chunk: Chunk) -> None:
        """Stored bytes, as the worker made them."""
        raise NotImplementedError

    def ref(self, offset: int, length: int, source: int | Prior, source_offset: int) -> None:
        """The bytes at ``offset`` are those of ``source`` (an entry id, or a
        Prior) at ``source_offset``."""
        assert not isinstance(source, Prior), "only repositories have priors"
        self._w().ref(offset, length, source, source_offset)

    def baseref(self, offset: int, length: int, base: int, base_offset: int,
                sha256: bytes) -> None:
        """The bytes are those of the thin backup's base file ``base``."""
        self._w().baseref(offset, length, base, base_offset, sha256)

    def end(self) -> None:
        self._w().end()


class ArchiveSink(Sink):
    encoded_data = True

    def __init__(self, opener: Callable[[], Output], name: str):
        self.opener = opener
        self.name = name  # the archive's name, for errors
        self.out: Output | None = None
        self.writer: Writer | None = None

    def open(self, size_hint: int, base: thin.Base | None) -> None:
        """Open the output and start the archive (``size_hint`` unused)."""
        self.out = self.opener()
        self.writer = Writer(self.out, base, self.name)

    def read_ahead(self) -> bool:
        return True

    def small_level(self, workers: Workers) -> int:
        return workers.level if workers.codec == fmt.CODEC_ZSTD else 0

    def chunks_ahead(self) -> bool:
        return True

    def small_chunk(self, workers: Workers, data: memoryview, got: int,
                    z: bytes | None) -> Chunk:
        return workers.data_chunk(0, data, got, z)

    def data_job(self, workers: Workers):
        return workers.data_job

    def store(self, fd: int, offset: int, length: int, chunk: Chunk) -> None:
        assert self.writer is not None and chunk.record is not None
        self.writer.data_record(chunk.record, length)

    def commit(self) -> None:
        assert self.out is not None
        self._w().finish()
        self.out.commit()

    def abort(self) -> None:
        if self.out is not None:
            self.out.abort()

    def size(self) -> int:
        assert self.writer is not None
        return self.writer.offset


class SparseSink(Sink):
    """``backup --base BASE --sparse -o OUT CLONE``."""

    def __init__(self, target: str, paths: list, base: str | None, force: bool = False):
        if base is None:
            raise UsageError("--sparse needs --base")
        if len(paths) != 1:
            raise UsageError("--sparse takes exactly one clone file")
        try:
            st = os.stat(paths[0], follow_symlinks=False)
        except OSError as e:
            raise UsageError(f"{paths[0]}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"--sparse takes a regular file; {paths[0]} is not one")
        if target == "-":
            raise UsageError("--sparse writes a file; it cannot go to standard output")
        if not target:
            raise UsageError("an empty path was given as the archive (-o)")
        _check_target(target, force)
        self.target = target
        self.force = force
        self.file: AtomicFile | None = None
        self.manifest = io.BytesIO()
        self.sidecar = False
        #: OUT is not on the clone's filesystem: its bytes are copied, not reflinked
        self.copying = False
        self.writer: Writer | None = None

    def open(self, size_hint: int, base: thin.Base | None) -> None:
        # read too: each range is hashed as it is in the file once copied
        self.file = AtomicFile(self.target, replace=self.force, read=True)
        try:
            os.ftruncate(self.file.fd, size_hint)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.target) from None
        self.writer = Writer(self.manifest, base, self.target)

    def data_job(self, workers: Workers):
        """Put derivative data into the sparse file at its own offset
        (reflinked by copy_file_range where the filesystem can, else
        copied), then hash what the sparse file now holds there: the
        EXTERNAL record's SHA-256 describes the bytes a restore will find,
        even if the clone was written while it was copied (a live file read
        with --no-point-in-time; it is then reported as changed)."""

        def job(fd: int, offset: int, length: int) -> Chunk:
            assert self.file is not None
            got = self._copy(fd, self.file.fd, offset, length)
            return Chunk(sha256_range(self.file.fd, offset, length), got, None)

        return job

    def _copy(self, fd: int, out: int, offset: int, length: int) -> int:
        """Copy [offset, offset+length) of ``fd`` to the same place in
        ``out``; the bytes there were (fewer if the file shrank)."""
        done = 0
        while done < length:
            n = 0
            if not self.copying:
                try:
                    n = os.copy_file_range(fd, out, length - done, offset + done,
                                           offset + done)
                except OSError as e:
                    # another filesystem (EXDEV since Linux 5.19), or none that does it
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                       errno.EOPNOTSUPP):
                        raise OSError(e.errno, e.strerror, self.target) from None
                    self.copying = True
            if n == 0:  # copy: read here, write there
                b = os.pread(fd, min(length - done, fmt.CHUNK_MAX), offset + done)
                if not b:
                    break
                try:
                    n = os.pwrite(out, b, offset + done)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, self.target) from None
            done += n
        return done

    def store(self, fd: int, offset: int, length: int, chunk: Chunk) -> None:
        """Describe the derivative data the job put in the sparse file by an
        EXTERNAL record with its hash."""
        self._w().external(offset, length, chunk.sha256)

    def commit(self) -> None:
        assert self.file is not None
        self._w().finish()
        data = self.manifest.getvalue()
        side = self.target + manifest.SIDECAR
        self.sidecar = True
        if len(data) <= manifest.XATTR_MAX:
            try:
                os.setxattr(self.file.fd, manifest.XATTR, data)
                self.sidecar = False
            except OSError as e:
                if e.errno not in (errno.E2BIG, errno.ENOSPC, errno.ERANGE, errno.ENOTSUP,
                                   errno.EPERM):
                    raise
        if self.sidecar:
            with AtomicFile(side, replace=True) as f:
                f.write(data)
                f.commit(0o600)
        elif os.path.lexists(side):
            os.unlink(side)  # a stale sidecar of an older backup would confuse a reader
        self.file.commit(0o600)

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()

    def size(self) -> int:
        st = os.stat(self.target)
        return st.st_blocks * 512 + (len(self.manifest.getvalue()) if self.sidecar else 0)

