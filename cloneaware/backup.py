"""Backup: walk -> map -> index -> write.

Every file is mapped first (one FIEMAP call each) so that sharing is known
across the whole set; then each file is written in walk order: the pieces it
owns as DATA (read once, hashed, compressed on a second core), every later
place that shares them as a REF.  A file that changes between mapping and
reading, or while it is read, is detected and reported, and nothing else
trusts its sharing from then on.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cloneaware import extents
from cloneaware.archive import format as fmt
from cloneaware.archive.writer import Output, Writer
from cloneaware.errors import UsageError
from cloneaware.scan import FsTable, extent_map, map_tree, open_source
from cloneaware.walk import Node

XATTR_SKIP = {b"trusted.SGI_ACL_FILE", b"trusted.SGI_ACL_DEFAULT"}


@dataclass
class Summary:
    base: str | None = None
    base_referenced_bytes: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    logical_bytes: int = 0
    stored_bytes: int = 0
    referenced_bytes: int = 0
    #: of referenced_bytes: compressed ranges referenced after their content
    #: hash matched the place they name
    checked_bytes: int = 0
    #: compressed ranges that named the same extent as an earlier place but
    #: held other bytes (part of an extent): stored
    check_mismatch_bytes: int = 0
    hole_bytes: int = 0
    bytes_read: int = 0
    physical_bytes: int = 0
    archive_bytes: int = 0
    seconds: float = 0.0
    changed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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


class _Chunker:
    """Reads, hashes, compresses and frames DATA records on worker threads
    (os.pread, hashlib, zstandard and zlib.crc32 release the GIL), so the
    main thread only writes finished records, in order."""

    #: Try zstd on this much of a chunk first; store the chunk raw if that
    #: sample does not shrink (random or already compressed data).
    SAMPLE = 64 << 10

    def __init__(self, codec: int, level: int, workers: int = 3):
        self.codec = codec
        self.level = level
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.local = threading.local()

    def _read(self, fd: int, offset: int, length: int) -> tuple[bytes, int]:
        data = os.pread(fd, length, offset)
        got = len(data)
        if got < length:  # the file shrank while we read it
            data += bytes(length - got)
        return data, got

    def _compress(self, data: bytes):
        c = getattr(self.local, "c", None)
        if c is None:
            import zstandard

            c = self.local.c = zstandard.ZstdCompressor(level=self.level)
        if len(data) > 2 * self.SAMPLE and \
                len(c.compress(data[:self.SAMPLE])) > self.SAMPLE * 0.97:
            return None
        z = c.compress(data)
        return z if len(z) < len(data) else None

    def data_job(self, fd: int, offset: int, length: int):
        """-> (length, bytes read, the parts of a whole DATA record)."""
        data, got = self._read(fd, offset, length)
        sha = hashlib.sha256(data).digest()
        codec, payload = fmt.CODEC_NONE, data
        if self.codec == fmt.CODEC_ZSTD:
            z = self._compress(data)
            if z is not None:
                codec, payload = fmt.CODEC_ZSTD, z
        head = fmt.encode_data_head(offset, length, codec, sha)
        return length, got, fmt.frame_parts(fmt.T_DATA, head, payload), sha

    def hash_job(self, fd: int, offset: int, length: int):
        """-> (sha256, bytes read)."""
        data, got = self._read(fd, offset, length)
        return hashlib.sha256(data).digest(), got

    def base_check_job(self, fd: int, offset: int, length: int, base: bytes,
                       base_offset: int):
        """-> (sha256 of our range, bytes read, sha256 of the base's range or None)."""
        sha, got = self.hash_job(fd, offset, length)
        try:  # the base unreadable: store the range rather than fail the backup
            bfd = open_source(base)
        except OSError:
            return sha, got, None
        try:
            bsha, bgot = self.hash_job(bfd, base_offset, length)
        except OSError:
            return sha, got, None
        finally:
            os.close(bfd)
        return sha, got, bsha if bgot == length else None

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def close(self, wait: bool = True) -> None:
        """Stop the workers; on an error or a signal, do not wait for the
        chunks they are compressing (zstd -19 takes seconds per chunk)."""
        self.pool.shutdown(wait=wait, cancel_futures=True)


def _chunks(pieces: list[tuple[int, int]]):
    for off, ln in pieces:
        end = off + ln
        while off < end:
            n = min(fmt.CHUNK_MAX, end - off)
            yield off, n
            off += n


def read_xattrs(target, follow: bool = False) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(target, follow_symlinks=follow) if not isinstance(target, int) \
            else os.listxattr(target)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOSYS, errno.EPERM):
            return []
        raise
    out = []
    for n in sorted(names):
        bn = n.encode("utf-8", "surrogateescape")
        if bn in XATTR_SKIP:
            continue
        try:
            v = os.getxattr(target, n) if isinstance(target, int) \
                else os.getxattr(target, n, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP):
                continue
            raise
        out.append((bn, v))
    return out


def _meta(node: Node, kind: int, st: os.stat_result) -> fmt.Entry:
    return fmt.Entry(
        id=0, kind=kind, path=node.name, mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
    )


def _same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino == b.st_ino and a.st_size == b.st_size
            and a.st_mtime_ns == b.st_mtime_ns and a.st_ctime_ns == b.st_ctime_ns)


def _same_map(a: np.ndarray, b: np.ndarray) -> bool:
    if len(a) != len(b):
        return False
    for k in ("logical", "physical", "length"):
        if not np.array_equal(a[k], b[k]):
            return False
    return True


@dataclass
class _Item:
    kind: str  # 'file', 'link', 'other'
    node: Node
    fileno: int = -1  # index in the sharing index (files)
    ext: np.ndarray | None = None
    link_to: int = -1  # walk item number of the first name (hard links)


@dataclass
class _BaseFile:
    rel: bytes  # path inside the base ('' when the base is a file)
    src: bytes
    st: os.stat_result


class Backup:
    """``base``: a thin backup relative to this file or directory: ranges the
    clones share with it become BASEREF records (offset, length, SHA-256)
    instead of data.  SparseBackup (thin.py) reuses the whole pipeline with
    another output and another way to store data."""

    def __init__(self, paths: list, output: str, compress: str = "zstd", force: bool = False,
                 one_file_system: bool = True, progress=None, warn=None,
                 base: str | None = None, rsh: str | None = None):
        self.paths = paths
        self.output = output
        self.codec, self.level = parse_compress(compress)
        self.force = force
        self.one_file_system = one_file_system
        self.progress = progress
        self.warn = warn or (lambda msg: None)
        self.summary = Summary()
        self.base = base
        self.base_files: dict[int, _BaseFile] = {}  # fileno -> base file
        self.base_kind = fmt.BASE_FILE
        self.rsh = rsh
        #: (fileno, logical) -> SHA-256 of stored data that a candidate names
        self._hashes: dict[tuple[int, int], bytes] = {}

    def _skip(self, path: bytes, reason: str) -> None:
        self.summary.skipped.append((os.fsdecode(path), reason))
        self.warn(f"skipped {os.fsdecode(path)}: {reason}")

    def _changed(self, path: bytes, reason: str) -> None:
        self.summary.changed.append((os.fsdecode(path), reason))
        self.warn(f"{os.fsdecode(path)}: {reason}")

    def run(self) -> Summary:
        t0 = time.monotonic()
        items, plan = self._map()
        s = self.summary
        s.physical_bytes = plan.totals.physical_bytes
        s.base = self.base
        if self.progress:
            self.progress.set_total(plan.stored_bytes())
        out = self._output(items)
        chunker = _Chunker(self.codec, self.level)
        ok = False
        try:
            w = Writer(out.f, self._base_record(plan),
                       "standard output" if self.output == "-" else self.output)
            self._write(w, items, plan, chunker)
            w.finish()
            self._check_base_unchanged()
            out.commit()
            s.archive_bytes = out.size() if hasattr(out, "size") else w.offset
            ok = True
        except BaseException:
            out.abort()
            raise
        finally:
            chunker.close(wait=ok)
        s.seconds = time.monotonic() - t0
        return s

    def _output(self, items):
        from cloneaware import remote

        if remote.is_url(self.output):
            return remote.RemoteOutput(self.output, self.force, self.rsh)
        return Output(self.output, self.force)

    def _base_record(self, plan: extents.Plan) -> fmt.Base | None:
        if self.base is None:
            return None
        used = set(np.unique(plan.pieces["ref_file"]).tolist()) & set(self.base_files)
        b = fmt.Base(os.fsencode(self.base), self.base_kind)
        for n in sorted(used):
            bf = self.base_files[n]
            b.files.append(fmt.BaseFile(n, bf.st.st_size, bf.rel))
        self.used_base = used
        return b

    def _check_base_unchanged(self) -> None:
        for n in sorted(getattr(self, "used_base", ())):
            bf = self.base_files[n]
            try:
                now = os.stat(bf.src, follow_symlinks=False)
            except OSError:
                now = None
            if now is None or not _same_stat(now, bf.st):
                self._changed(bf.src, "base file changed during the backup; a restore "
                              "will find the ranges that differ and refuse them")

    # -- phase 1: walk and map -------------------------------------------

    def _map(self):
        fstab = FsTable()
        builder = extents.IndexBuilder()
        items: list[_Item] = []
        inodes: dict[tuple[int, int], int] = {}
        if self.base is not None:
            self._map_base(fstab, builder)
        for it in map_tree(self.paths, self.one_file_system):
            if it[0] == "skip":
                self._skip(it[1], it[2])
                continue
            node = it[1]
            if it[0] == "file":
                key = (node.st.st_dev, node.st.st_ino)
                if node.st.st_nlink > 1 and key in inodes:
                    items.append(_Item("link", node, link_to=inodes[key]))
                    continue
                if node.st.st_nlink > 1:
                    inodes[key] = len(items)
                fileno = builder.add(fstab.number(it[2]), node.st.st_size, it[3])
                items.append(_Item("file", node, fileno=fileno, ext=it[3]))
            elif stat.S_ISSOCK(node.st.st_mode):
                self._skip(node.src, "socket ignored")
            else:
                items.append(_Item("other", node))
        return items, builder.build()

    def _map_base(self, fstab: FsTable, builder: extents.IndexBuilder) -> None:
        """Map the base first, so that it owns every range it shares."""
        base = os.fsencode(self.base)
        try:
            bst = os.stat(base)
        except OSError as e:
            raise UsageError(f"base {self.base}: {e.strerror}") from None
        if stat.S_ISDIR(bst.st_mode):
            self.base_kind = fmt.BASE_DIR
        elif not stat.S_ISREG(bst.st_mode):
            raise UsageError(f"base {self.base} is neither a file nor a directory")
        base = os.path.realpath(base)
        for it in map_tree([base], self.one_file_system):
            if it[0] == "skip":
                self._skip(it[1], f"base file not usable: {it[2]}")
                continue
            if it[0] != "file":
                continue
            node = it[1]
            rel = node.name.partition(b"/")[2] if self.base_kind == fmt.BASE_DIR else b""
            fileno = builder.add(fstab.number(it[2]), node.st.st_size, it[3])
            self.base_files[fileno] = _BaseFile(rel, node.src, node.st)
        if not self.base_files:
            raise UsageError(f"base {self.base} holds no regular file")

    # -- phase 2: write ----------------------------------------------------

    def _write(self, w: Writer, items: list[_Item], plan: extents.Plan, chunker) -> None:
        s = self.summary
        referenced = set(np.unique(plan.pieces["ref_file"][plan.pieces["ref_file"] >= 0]).tolist())
        entry_of_file: dict[int, int] = {}  # fileno -> entry id
        entry_of_item: dict[int, int] = {}  # walk item -> entry id
        invalid: set[int] = set()  # filenos whose bytes no reference may trust
        for n, item in enumerate(items):
            node = item.node
            st = node.st
            if item.kind == "other":
                kind, e = self._other_entry(node)
                if e is None:
                    continue
                w.entry(e)
                entry_of_item[n] = e.id
                continue
            if item.kind == "link":
                target = entry_of_item.get(item.link_to)
                if target is not None:
                    e = _meta(node, fmt.K_HARDLINK, st)
                    e.link = target
                    w.entry(e)
                    entry_of_item[n] = e.id
                    s.hardlinks += 1
                    continue
                # the first name vanished: store this name as a file of its own
                item = _Item("file", node, fileno=-1, ext=None)
            eid = self._file(w, item, plan, chunker, referenced, entry_of_file, invalid)
            if eid is not None:
                entry_of_item[n] = eid

    def _other_entry(self, node: Node):
        st = node.st
        m = st.st_mode
        s = self.summary
        if stat.S_ISDIR(m):
            kind = fmt.K_DIR
            s.dirs += 1
        elif stat.S_ISLNK(m):
            kind = fmt.K_SYMLINK
        elif stat.S_ISFIFO(m):
            kind = fmt.K_FIFO
        elif stat.S_ISCHR(m):
            kind = fmt.K_CHR
        elif stat.S_ISBLK(m):
            kind = fmt.K_BLK
        else:
            self._skip(node.src, "unsupported file type")
            return None, None
        e = _meta(node, kind, st)
        try:
            if kind == fmt.K_SYMLINK:
                e.target = os.readlink(node.src)
                s.symlinks += 1
            if kind in (fmt.K_CHR, fmt.K_BLK):
                e.rdev = st.st_rdev
            if kind in (fmt.K_FIFO, fmt.K_CHR, fmt.K_BLK):
                s.specials += 1
            e.xattrs = read_xattrs(node.src)
        except FileNotFoundError:
            self._changed(node.src, "vanished before it was read")
            return kind, None
        except OSError as ex:
            self._skip(node.src, ex.strerror or str(ex))
            return kind, None
        return kind, e

    def _file(self, w: Writer, item: _Item, plan, chunker, referenced, entry_of_file,
              invalid) -> int | None:
        s = self.summary
        node = item.node
        try:
            fd = open_source(node.src)
        except FileNotFoundError:
            self._changed(node.src, "vanished before it was read")
            if item.fileno >= 0:
                invalid.add(item.fileno)
            return None
        except OSError as ex:
            self._skip(node.src, ex.strerror or str(ex))
            if item.fileno >= 0:
                invalid.add(item.fileno)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._changed(node.src, "replaced by another kind of file")
                if item.fileno >= 0:
                    invalid.add(item.fileno)
                return None
            fresh = item.fileno < 0 or not _same_stat(st, node.st)
            if fresh:
                # Changed since it was mapped: its sharing plan is stale.  Store
                # all of its data itself, and let nothing refer to it.
                if item.fileno >= 0:
                    self._changed(node.src, "changed between scan and read; stored whole")
                    invalid.add(item.fileno)
                before = extent_map(fd, st.st_size, node.src)
                d = extents.data_ranges(before, st.st_size)
                pieces = [(int(a), int(b), -1, 0, 0) for a, b in zip(d["logical"], d["length"])]
            else:
                before = item.ext
                p = plan.file_pieces(item.fileno)
                pieces = list(zip(p["logical"].tolist(), p["length"].tolist(),
                                  p["ref_file"].tolist(), p["ref_logical"].tolist(),
                                  p["check"].tolist()))
            e = _meta(node, fmt.K_REG, st)
            e.size = st.st_size
            e.xattrs = read_xattrs(fd)
            if item.fileno in referenced and not fresh:
                e.eflags |= fmt.EF_REFERENCED
            w.entry(e)
            if item.fileno >= 0:
                entry_of_file[item.fileno] = e.id
            short = self._write_pieces(w, fd, pieces, chunker, entry_of_file, invalid,
                                       item.fileno, node.src)
            w.end()
            s.files += 1
            s.logical_bytes += st.st_size
            s.hole_bytes += st.st_size - sum(p[1] for p in pieces)
            after = os.fstat(fd)
            if short or not _same_stat(after, st) or not _same_map(
                    before, extent_map(fd, after.st_size, node.src)):
                self._changed(node.src, "file changed as we read it")
                if item.fileno >= 0:
                    invalid.add(item.fileno)
            return e.id
        except OSError as ex:
            # Archive writes carry the archive's name; what has none came from
            # this file (fstat, xattrs, reads on the workers).
            if ex.filename is None:
                raise OSError(ex.errno, ex.strerror, os.fsdecode(node.src)) from None
            raise
        finally:
            os.close(fd)

    #: chunks in flight on the workers (each up to CHUNK_MAX bytes)
    DEPTH = 8

    def _write_pieces(self, w: Writer, fd: int, pieces, chunker, entry_of_file, invalid,
                      fileno: int, path: bytes = b"") -> bool:
        """Write one file's DATA, REF and BASEREF records, in order, with up
        to DEPTH chunks read ahead across references; True on a short read.

        A candidate piece (a compressed range naming the same extent and
        length as an earlier place, extents.CHECK_CANDIDATE) is hashed first
        and becomes a reference only if its hash equals the one recorded when
        the place it names was stored (or, for a base, read now)."""
        ops = []  # (kind, offset, length, a, b, key) in file order
        for logical, length, ref_file, ref_logical, check in pieces:
            if check == extents.CHECK_CANDIDATE and length <= fmt.CHUNK_MAX \
                    and ref_file not in invalid:
                if ref_file in self.base_files:
                    ops.append(("vbase", logical, length, ref_file, ref_logical, None))
                    continue
                src = entry_of_file.get(ref_file)
                if src is not None:
                    ops.append(("vref", logical, length, src, ref_logical,
                                (ref_file, ref_logical)))
                    continue
            elif check == extents.CHECK_CANDIDATE:
                pass  # stored below
            elif ref_file in self.base_files:
                ops += [("base", off, ln, ref_file, ref_logical + (off - logical), None)
                        for off, ln in _chunks([(logical, length)])]
                continue
            elif ref_file >= 0 and ref_file not in invalid \
                    and entry_of_file.get(ref_file) is not None:
                ops.append(("ref", logical, length, entry_of_file[ref_file], ref_logical, None))
                continue
            # stored data
            os.posix_fadvise(fd, logical, length, os.POSIX_FADV_WILLNEED)
            if check == extents.CHECK_HASHED and length <= fmt.CHUNK_MAX:
                ops.append(("data", logical, length, 0, 0, (fileno, logical)))
            else:
                ops += [("data", off, ln, 0, 0, None) for off, ln in _chunks([(logical, length)])]
        s = self.summary

        def result(fut):
            """A worker's result; its read errors name the file read."""
            try:
                return fut.result()
            except OSError as e:
                if e.filename is None and path:
                    raise OSError(e.errno, e.strerror, os.fsdecode(path)) from None
                raise

        short = False
        pending: collections.deque = collections.deque()
        nxt = 0
        while nxt < len(ops) or pending:
            while nxt < len(ops) and len(pending) < self.DEPTH:
                op = ops[nxt]
                nxt += 1
                fut = None
                if op[0] == "data":
                    fut = chunker.submit(self._data_job(chunker), fd, op[1], op[2])
                elif op[0] in ("base", "vref"):
                    fut = chunker.submit(chunker.hash_job, fd, op[1], op[2])
                elif op[0] == "vbase":
                    fut = chunker.submit(chunker.base_check_job, fd, op[1], op[2],
                                         self.base_files[op[3]].src, op[4])
                pending.append((op, fut))
            op, fut = pending.popleft()
            kind, off, ln = op[0], op[1], op[2]
            if kind == "ref":
                w.ref(off, ln, op[3], op[4])
                s.referenced_bytes += ln
            elif kind == "base":
                sha, got = result(fut)
                w.baseref(off, ln, op[3], op[4], sha)
                s.base_referenced_bytes += ln
                s.bytes_read += got
                short |= got < ln
            elif kind == "data":
                r = result(fut)
                short |= self._emit_data(w, fd, off, ln, r)
                if op[5] is not None:
                    self._hashes[op[5]] = self._sha_of(r)
            else:  # a candidate: use it only if the content matches
                r = result(fut)
                sha, got = r[0], r[1]
                s.bytes_read += got
                short |= got < ln
                if got == ln and kind == "vref" and self._hashes.get(op[5]) == sha:
                    w.ref(off, ln, op[3], op[4])
                    s.referenced_bytes += ln
                    s.checked_bytes += ln
                elif got == ln and kind == "vbase" and r[2] == sha:
                    w.baseref(off, ln, op[3], op[4], sha)
                    s.base_referenced_bytes += ln
                    s.checked_bytes += ln
                else:
                    s.check_mismatch_bytes += ln
                    s.bytes_read -= got  # read again, as data
                    short |= self._emit_data(w, fd, off, ln,
                                             result(chunker.submit(self._data_job(chunker),
                                                                   fd, off, ln)))
        return short

    def _sha_of(self, result) -> bytes:
        """The SHA-256 of the bytes a data job stored."""
        return result[3]

    def _data_job(self, chunker):
        """The worker function for stored data (SparseBackup stores it elsewhere)."""
        return chunker.data_job

    def _emit_data(self, w: Writer, fd: int, offset: int, length: int, result) -> bool:
        """Write a stored chunk the worker prepared; True if the file was short."""
        _ln, got, parts, _sha = result
        w.data_record(parts, length)
        s = self.summary
        s.stored_bytes += length
        s.bytes_read += got
        if self.progress:
            self.progress.advance(length)
        return got < length


def backup(paths: list, output: str, **kw) -> Summary:
    return Backup(paths, output, **kw).run()
