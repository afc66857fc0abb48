"""A backup into a repository: the sink (backup/sinks.py) that turns a
backup's pieces into blobs, BLOB records of the snapshot's manifest, and
anchors.

- Stored data is cut on the repository's grid (docs/REPOSITORY.md, "Blobs
  and the grid"); each piece is hashed (its blob id) on a worker, and only
  a blob the repository does not have is compressed, sealed and packed.
- A range the plan shares with an earlier file becomes BLOB records of the
  sub-ranges of that file's blobs; a range shared with the file's anchor
  (the clone kept by the previous backup) becomes the previous snapshot's
  blob ranges, and is not read.
- A file that cannot be cloned (small, on ext4, --no-point-in-time) is
  taken from the parent snapshot unread when its inode, size, mtime and
  ctime are unchanged (the metadata rule); else it is read.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import zstandard

from cloneaware import __version__, fsinfo, native
from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.writer import Writer
from cloneaware.backup.sinks import Prior, Sink
from cloneaware.backup.workers import Chunk, Workers
from cloneaware.repo import crypto, filescache
from cloneaware.repo import format as rf
from cloneaware.repo.filescache import CacheBuilder, FilesCache
from cloneaware.repo.packer import DryPacker, Packer
from cloneaware.repo.parent import Segments, parent_files, trusted_parent
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot, now_rfc3339
from cloneaware.repo.state import ClientState
from cloneaware.repo.unopened import Encoded
from cloneaware.source.anchors import AnchorSets, set_key
from cloneaware.source.anchorsets import STALE_NS, stale
from cloneaware.source.mapping import extent_map


class Background:
    """``call`` run on a thread of its own from now on: a daemon, which a
    command that fails or is stopped leaves behind (it only reads)."""

    def __init__(self, call: Callable[[], None]):
        self._future: Future = Future()
        threading.Thread(target=self._run, args=(call,), name="prepare", daemon=True).start()

    def _run(self, call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as e:  # for result() to raise
            self._future.set_exception(e)
        else:
            self._future.set_result(None)

    def result(self) -> None:
        """Wait for it; raise what it raised."""
        self._future.result()


class ManifestOut:
    """The manifest's bytes as the Writer writes them, cut into manifest
    blobs where their content says (docs/REPOSITORY.md, "Manifest blobs"),
    so that the entries a night did not change are the blobs the last night
    stored, and handed to the packer."""

    def __init__(self, repo: Repository, packer: Packer):
        self.repo = repo
        self.packer = packer
        self.dry_run = isinstance(packer, DryPacker)
        self.buf = bytearray()
        self.ids: list[bytes] = []
        #: the blobs of the ids' blob list, when there is one
        self.list_ids: list[bytes] = []
        self.total = 0
        #: where the first record starts in ``buf`` (after the magic)
        self.first = len(fmt.MAGIC)
        self.zstd = zstandard.ZstdCompressor(level=3)

    def write(self, b) -> int:
        self.buf += b
        self.total += len(b)
        if len(self.buf) >= rf.MANIFEST_CUT_MAX:
            self._cut(final=False)
        return len(b)

    def _cut(self, final: bool) -> None:
        if not self.ids and not final:
            # the first piece of a manifest longer than a piece: the magic and
            # the HEADER (its time changes nightly)
            head = len(fmt.MAGIC) + fmt.FRAME.size
            if len(self.buf) >= head:
                head += int.from_bytes(self.buf[head - 4:head], "little") + fmt.CRC.size
            if len(self.buf) < head:
                return
            self._emit(bytes(self.buf[:head]))
            del self.buf[:head]
            self.first = 0
        view = memoryview(self.buf)
        pos = 0
        try:
            while len(view) - pos >= (1 if final else rf.MANIFEST_CUT_MAX):
                n, self.first = native.manifest_cut(
                    view[pos:], self.first, rf.MANIFEST_CUT_MIN, rf.MANIFEST_CUT_MAX,
                    rf.MANIFEST_CUT_BITS, final)
                self._emit(bytes(view[pos:pos + n]))
                pos += n
        finally:
            view.release()
        del self.buf[:pos]

    def _emit(self, chunk: bytes, into: list[bytes] | None = None) -> None:
        bid = self.repo.crypto.blob_id(chunk)
        (self.ids if into is None else into).append(bid)
        if self.packer.known(bid):  # an unchanged part: stored by an earlier night
            return
        self.packer.add(bid, rf.T_TREE, len(chunk), b"" if self.dry_run else
                        self.repo.encode_blob(rf.T_TREE, bid, chunk, self.zstd))

    def finish(self) -> None:
        self._cut(final=True)
        if len(self.ids) > 1:  # named by a blob list, not the snapshot object
            for piece in rf.cut_list(self.ids):
                self._emit(piece, self.list_ids)

    def names(self) -> dict:
        """The snapshot object's keys that name the manifest."""
        if self.list_ids:
            return {"manifest": [], "manifest_list": [b.hex() for b in self.list_ids],
                    "manifest_bytes": self.total}
        return {"manifest": [b.hex() for b in self.ids], "manifest_bytes": self.total}


class RepositorySink(Sink):
    """Backs up into a repository as a new snapshot (or, for import_archive,
    takes an archive's entries and bytes).  The last snapshot of the same
    host and PATHs is the parent: its files' anchors become priors in the
    sharing index (a range still sharing blocks with its anchor is the
    parent's blob ranges, unread), and a file its metadata says is the
    parent's is taken unread (``unchanged``)."""

    content_addressed = True

    def __init__(self, repo: Repository, paths: list, host: str | None = None,
                 tags: list[str] | None = None, level: int = 3, connections: int = 2,
                 warn: Callable[[str], None] | None = None, anchors: bool = True,
                 dry_run: bool = False, parent: bool = True, keep_all: bool = False,
                 parent_spec: str | None = None, atime: bool = False):
        """``dry_run``: read and hash as a backup does, and count what it
        would add; write nothing to the repository (no blob, manifest or
        snapshot) and keep no anchor.  ``atime``: record access times
        (else each entry's mtime stands for it: docs/REPOSITORY.md, "Access
        times").  ``parent``: look for a parent
        snapshot (an import has none).  ``keep_all``: every file's blob
        ranges are kept for later REFs, not only those the archive marks
        as referenced (an archive of another origin may not mark them).
        ``parent_spec``: the snapshot the owner names as the parent
        (backup --parent), instead of the one this host wrote last."""
        self.repo = repo
        self.dry_run = dry_run
        self.roots = sorted(os.path.abspath(os.fsencode(p)) for p in paths)
        self.paths = [os.fsdecode(r) for r in self.roots] if parent else list(paths)
        self.host = host or socket.gethostname()
        self.tags = sorted(set(tags or []))
        self.level = level
        self.warn = warn or (lambda m: None)
        self.packer = (DryPacker if dry_run else Packer)(repo, connections)
        self.out = ManifestOut(repo, self.packer)
        self.started_ns = time.time_ns()
        self.grid = repo.config.grid
        self.use_anchors = anchors
        self.use_parent = parent
        self.atime = atime
        self.keep_all = keep_all
        self.parent_spec = parent_spec
        self.sets = AnchorSets(repo.config.id, set_key(self.host, self.paths, repo.location),
                               self.warn, info={"location": repo.location, "host": self.host,
                                                "paths": self.paths},
                               legacy_key=None if dry_run else set_key(self.host, self.paths))
        self.parent: Snapshot | None = None
        #: the id this host knows the parent by (its own, unless tag gave it another)
        self.parent_key: str | None = None
        #: the parent's regular files (its files cache, or read from its manifest)
        self.files: FilesCache | None = None
        self.next_files = CacheBuilder()  # the new snapshot's
        self.anchor_segments: dict[int, Segments] = {}  # fileno -> the anchor's blobs
        self.segments: dict[int, Segments] = {}  # entry id -> blobs (referenced files)
        self.cur: Segments | None = None
        self.cur_entry: fmt.Entry | None = None
        self.cur_keep = False  # the current file's ranges are kept for later ones
        self.cur_st: os.stat_result | None = None
        self.cur_ext: np.ndarray | None = None
        self.state: ClientState | None = None
        self.snapshot: Snapshot | None = None
        self.summary = None
        self._zstd = zstandard.ZstdCompressor(level=level) if level else None
        #: the snapshot of another repository this one copies (repo/copy.py):
        #: its time, host, user, PATHs and tags are kept, and its id as ``original``
        self.copy_of: Snapshot | None = None
        #: the index loading beside the walk (``prepare``)
        self._index_job: Background | None = None

    # -- before the walk ----------------------------------------------------------------

    def prepare(self):
        repo = self.repo
        if not self.use_parent:
            self._load_index()
            return None
        self._snaps = repo.snapshots()
        self.state = repo.state or ClientState(repo.config.id, self.warn,
                                               location=repo.location)
        self.parent, self.parent_key = trusted_parent(
            repo, self.state, self._snaps, self.sets, self.host, self.paths, self.parent_spec,
            self.warn)
        if self.parent is None:
            self._load_index()
            return None
        files = self.files = parent_files(repo, self._cache_path(), self.sets.key,
                                          self.parent, self.parent_key, self.warn)
        if not files.complete:  # read from its manifest, the index loaded for it
            files.check_blobs(repo.index.contains_many)
            return None
        # The index is loaded beside the walk (a large repository's takes
        # about as long as a night's walk of what it backs up): rows are
        # taken on their stat meanwhile, and those with a blob the index
        # lacks are mapped after all (``walked``).
        self._index_job = Background(self._load_index)
        return lambda node: files.unchanged(node.name, node.st)

    def _load_index(self) -> None:
        # blobs are taken as present on the index's word: only in packs there
        self.repo.load_index(check_packs=True)
        if self.files is not None:
            self.files.check_blobs(self.repo.index.contains_many)

    def _index_ready(self) -> None:
        job, self._index_job = self._index_job, None
        if job is not None:
            job.result()

    def walked(self, rows: np.ndarray) -> np.ndarray:
        self._index_ready()
        if self.files is None or not len(rows):
            return rows[:0]
        return rows[~self.files.blobs_ok[rows]]

    def settle(self) -> None:
        self._index_job = None  # it only reads: left to end, or to end with the process

    def _cache_path(self) -> str:
        assert self.state is not None
        return filescache.cache_path(self.state.dir, self.repo.config.id, self.sets.key)

    def sharing_with(self, rows, queries):
        assert self.files is not None
        self._index_ready()
        return self.files.sharing_with(rows, queries)

    def priors(self, fstab, builder, unopened: list[int]) -> dict[int, Prior]:
        self._index_ready()
        files = self.files
        if not self.use_parent or not self.use_anchors:
            return {}
        wanted: set[int] = set()
        if files is not None:
            # every anchor but those of the files taken unopened (moved on
            # instead): a changed file's, and a renamed or deleted one's,
            # whose blocks a file of another name may still share
            entries = files.rows["entry"]
            keep = np.ones(len(entries), dtype=bool)
            keep[np.asarray(unopened, dtype=np.int64)] = False
            wanted = set(entries[keep].tolist())
        tops = self.sets.tops(self.roots)
        self._note_stale(tops)
        anchors = self.sets.previous(tops, self.parent_key,
                                     {s.id for s in self._snaps} | {self.parent_key or ""},
                                     tidy=not self.dry_run,
                                     wanted=wanted)
        out: dict[int, Prior] = {}
        for a in anchors:
            try:
                assert files is not None
                r = files.entry_row(a.entry_id)
                st = os.fstat(a.fd)
                if r < 0 or int(files.rows["size"][r]) != st.st_size or not files.blobs_ok[r]:
                    continue
                ext = extent_map(a.fd, st.st_size, a.path)
                info = fsinfo.fs_info(a.fd, st.st_dev, a.path)
                fileno = builder.add(fstab.number(info), st.st_size, ext)
                self.anchor_segments[fileno] = self._row_segments(r)
                out[fileno] = Prior(fileno)
            finally:
                os.close(a.fd)
        return out

    def _row_segments(self, r: int) -> Segments:
        assert self.files is not None
        sg = self.files.segments(r)
        return Segments(sg["offset"].tolist(), sg["length"].tolist(),
                        [self.files.blob_id(b) for b in sg["blob"].tolist()],
                        sg["blob_offset"].tolist())

    def _note_stale(self, tops: list[bytes]) -> None:
        """Say when other anchor sets on these filesystems have not been
        renewed by any backup for long: they pin space for nothing if their
        repository or backup set is gone."""
        old = stale(tops, self.repo.config.id, self.sets.key)
        if old:
            where = ", ".join(sorted({os.fsdecode(s.top) for s in old}))
            days = STALE_NS // (86400 * 10**9)
            self.warn(f"{len(old)} anchor set{'s' if len(old) > 1 else ''} on {where} "
                      f"{'have' if len(old) > 1 else 'has'} not been renewed by a backup for "
                      f"more than {days} days: `cloneaware anchors list` shows the space they "
                      f"pin, `cloneaware anchors drop --older-than {days}d` gives it back")

    def capture_dir(self, src: bytes) -> int | None:
        if not self.use_anchors or self.dry_run:
            return None
        return self.sets.staging(self.sets.mounts.top(os.path.dirname(src) or b"."))

    def read_ahead(self) -> bool:
        return self.files is None  # no last backup to take a file from unread

    def small_level(self, workers: Workers) -> int:
        return self.level

    def chunks_ahead(self) -> bool:
        return True  # a blob is its bytes; one made twice is packed once

    def small_chunk(self, workers: Workers, data, got: int, z: bytes | None) -> Chunk:
        return self.chunk(data, got, None, z)

    def unchanged(self, node, st, e: fmt.Entry, ext=None) -> bool:
        r = -1 if self.files is None else self.files.unchanged(node.name, st)
        if r < 0:
            return False
        self.entry(e, st, ext)
        self._blobs(r)
        self.end()
        return True

    def encode_unopened(self, items: list) -> Encoded:
        """The records of these files taken unopened, in one native call."""
        assert self.files is not None
        return Encoded(self.files, items, self.atime)

    def take_unopened_run(self, enc: Encoded, lo: int, hi: int, srcs: list[bytes]) -> int:
        """Files lo .. hi-1 of ``enc``, which the walk has in a row, in one
        write (``srcs``: their source paths, for their anchors).  The id of
        the first."""
        first = self._w().regulars(memoryview(enc.data)[enc.at[lo]:enc.at[hi]],
                                   enc.paths[lo:hi], enc.sizes[lo:hi], enc.at[lo:hi + 1],
                                   enc.blob_bytes[lo:hi])
        self.next_files.keep_many(enc.rows[lo:hi], first)
        if self.use_anchors and not self.dry_run:
            sets = self.sets
            for i in range(lo, hi):
                old = enc.old_entries[i]
                if sets.had(old):
                    sets.carry(sets.mounts.top(os.path.dirname(srcs[i - lo]) or b"."), old,
                               first + i - lo)
        return first

    def _blobs(self, r: int) -> int:
        """The BLOB records of the parent's row ``r``.  -> its data bytes."""
        assert self.files is not None
        sg = self.files.segments(r)
        blob = self.files.blob_id
        for off, n, b, boff in zip(sg["offset"].tolist(), sg["length"].tolist(),
                                   sg["blob"].tolist(), sg["blob_offset"].tolist()):
            self._blob(off, n, blob(b), boff)
        return int(sg["length"].sum())

    def keep(self, fd: int, captured: bool, e: fmt.Entry, src: bytes) -> None:
        if self.use_anchors and not self.dry_run:
            self.sets.keep(self.sets.mounts.top(os.path.dirname(src) or b"."), e.id, fd,
                           captured)

    # -- writing ---------------------------------------------------------------------------

    def open(self, size_hint: int, base: thin.Base | None) -> None:
        if base is not None:
            raise AssertionError("thin backups go to archives")
        self._index_ready()
        self.writer = Writer(self.out, None, f"{self.repo.where} (manifest)")

    def entry(self, e: fmt.Entry, st: os.stat_result | None = None,
              ext: np.ndarray | None = None) -> None:
        w = self._w()
        if not self.atime:
            e.atime_ns = e.mtime_ns
        # whether later files share this one's ranges: kept here, 0 in the
        # manifest, whose BLOB records name blobs, not entries (a flag that
        # flipped as a file was mapped one night and taken unopened the next
        # would change its entry's bytes: docs/REPOSITORY.md, "The manifest")
        keep = self.keep_all or bool(e.eflags & fmt.EF_REFERENCED)
        e.eflags = 0
        w.entry(e)
        if e.kind != fmt.K_REG:
            return
        if st is not None:
            w.stat(st.st_ino, st.st_ctime_ns)
        self.cur = Segments()
        self.cur_entry = e
        self.cur_keep = keep
        self.cur_st, self.cur_ext = st, ext

    def cuts(self, offset: int, length: int):
        """At every multiple of the grid, and at the ends of the range."""
        g = self.grid
        end = offset + length
        while offset < end:
            n = min(g - offset % g, end - offset)
            yield offset, n
            offset += n

    def chunk(self, data, got: int, z, compressed: bytes | None = None) -> Chunk:
        """A stored chunk of ``data``: its blob id, and the sealed blob if
        the repository does not have it (on a worker, or in import_archive);
        ``compressed``: its zstd frame, made already (backup/ahead.py)."""
        repo = self.repo
        bid = repo.crypto.blob_id(data)
        if self.packer.known(bid):
            return Chunk(bid, got, None)
        if self.dry_run:
            return Chunk(bid, got, [b""])
        return Chunk(bid, got, [repo.encode_blob(rf.T_DATA, bid, data, z, compressed)])

    def data_job(self, workers: Workers):
        level = self.level

        def job(fd: int, offset: int, length: int) -> Chunk:
            data, got = workers.read(fd, offset, length)
            return self.chunk(data, got, workers.zstd(level) if level else None)

        return job

    def _blob(self, offset: int, length: int, bid: bytes, boff: int) -> None:
        assert self.cur is not None
        self._w().blob(offset, length, boff, bid)
        self.cur.add(offset, length, bid, boff)

    def blob(self, offset: int, length: int, bid: bytes, boff: int) -> None:
        """A range of the current file in a blob the repository holds
        already (``repair snapshots`` keeps a manifest's ranges so)."""
        self._blob(offset, length, bid, boff)

    def store(self, fd: int, offset: int, length: int, chunk: Chunk) -> None:
        if chunk.record is not None and \
                self.packer.add(chunk.sha256, rf.T_DATA, length, chunk.record[0]):
            if self.summary is not None:
                self.summary.added_bytes += length
        self._blob(offset, length, chunk.sha256, 0)

    def ref(self, offset: int, length: int, source: int | Prior, source_offset: int) -> None:
        assert self.cur_entry is not None and self.cur is not None
        if isinstance(source, Prior):  # unchanged since the last backup
            segs = self.anchor_segments[source.fileno]
        else:
            segs = self.cur if source == self.cur_entry.id else self.segments[source]
        for pos, n, bid, boff in segs.resolve(source_offset, length):
            self._blob(offset + pos, n, bid, boff)

    def end(self) -> None:
        e, cur, st = self.cur_entry, self.cur, self.cur_st
        assert e is not None and cur is not None
        self._w().end()
        if self.cur_keep:
            self.segments[e.id] = cur
        if st is not None:
            self.next_files.add(e.path, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
                                e.id, e.iflags, e.xattrs, cur.offsets, cur.lengths, cur.blobs,
                                cur.blob_offsets, self.cur_ext)
        self.cur = self.cur_entry = self.cur_st = self.cur_ext = None

    # -- the end -------------------------------------------------------------------------

    def commit(self) -> None:
        self._w().finish()
        self.out.finish()
        self.packer.flush()
        if self.dry_run:
            self.packer.close()
            return
        s = self.summary
        data = {
            "time": now_rfc3339(self.started_ns), "time_ns": self.started_ns,
            "hostname": self.host, "username": crypto.username(), "paths": self.paths,
            "tags": self.tags, **self.out.names(),
            "parent": self.parent.id if self.parent else None,
            "program": f"cloneaware {__version__}",
            "summary": {} if s is None else {
                k: getattr(s, k) for k in ("files", "dirs", "logical_bytes", "stored_bytes",
                                           "referenced_bytes", "unchanged_bytes",
                                           "added_bytes", "bytes_read")},
        }
        if self.copy_of is not None:
            o = self.copy_of.data
            data.update({k: o[k] for k in ("time", "time_ns", "hostname", "username", "paths",
                                           "tags")}, original=self.copy_of.id, parent=None)
        self.snapshot = self.repo.save_snapshot(data)
        if s is not None:
            s.snapshot = self.snapshot.id
        if self.use_parent:
            assert self.state is not None
            self.state.wrote(self.sets.key, self.snapshot.id, self.started_ns,
                             self.snapshot.content_key)
            self.state.save()
        self.sets.commit(self.snapshot.id)
        self.packer.close()
        if self.use_parent:
            self._write_cache()

    def _write_cache(self) -> None:
        """The new snapshot's files cache; not written, it costs the next
        backup speed only (said)."""
        assert self.snapshot is not None
        path = self._cache_path()
        try:
            self.next_files.write(path, self.files, self.repo.config.id, self.sets.key,
                                  self.snapshot.id, self.started_ns)
        except OSError as e:
            self.warn(f"{path}: {e.strerror}; the next backup opens and maps every file")

    def abort(self) -> None:
        self.packer.close(wait=False)
        self.sets.abort()

    def size(self) -> int:
        return self.packer.bytes_written
