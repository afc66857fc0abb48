"""Restore: read archive -> create entries -> write data, clone references ->
verify -> apply metadata -> rename into place (in batches, after a syncfs).

Entries are created relative to directory descriptors opened with
O_NOFOLLOW, never by joining path strings, so neither a hostile archive nor
a symlink already in DEST can make us write outside DEST.  Regular files are
written under a temporary name and renamed into place only when complete,
verified and on disk: a batch of them at a time, after a syncfs, so that even
a crash leaves no final name on data that never reached the disk.
"""
from __future__ import annotations

import collections
import errno
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field

from cloneaware import ioctl
from cloneaware.archive import format as fmt
from cloneaware.archive.reader import Stream, open_archive, read_index
from cloneaware.errors import ArchiveError, BaseMismatch, UsageError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: the temporary names _tmpname makes, and nothing else
TEMP_NAME = re.compile(rb"\.cloneaware-[0-9]+-[0-9a-f]{8}\.tmp\Z")


@dataclass
class RestoreSummary:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    logical_bytes: int = 0
    written_bytes: int = 0
    reflinked_bytes: int = 0
    copied_bytes: int = 0
    base_bytes: int = 0
    verified_bytes: int = 0
    hole_bytes: int = 0
    seconds: float = 0.0
    copy_reasons: dict[str, int] = field(default_factory=dict)
    owners_skipped: bool = False
    not_exact: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Fds:
    """A small LRU of open descriptors, closed on eviction."""

    def __init__(self, cap: int):
        self.cap = cap
        self.d: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        fd = self.d.get(key)
        if fd is not None:
            self.d.move_to_end(key)
        return fd

    def put(self, key, fd: int) -> None:
        self.d[key] = fd
        self.d.move_to_end(key)
        while len(self.d) > self.cap:
            _, old = self.d.popitem(last=False)
            os.close(old)

    def close(self) -> None:
        while self.d:
            os.close(self.d.popitem()[1])


class Restore:
    """``base``: where the base of a thin archive is on this host.
    ``trust_base``: do not hash the bytes cloned from the base (faster; a
    base changed since the backup then goes unnoticed)."""

    def __init__(self, archive: str, dest: str, force: bool = False, progress=None, warn=None,
                 base: str | None = None, trust_base: bool = False, open_dest=None):
        self.archive = archive
        self.dest = dest
        #: returns a descriptor of DEST, created if missing (cloneaware serve
        #: opens it beneath its allowed root); default: by path
        self.open_dest = open_dest
        self.force = force
        self.base = base
        self.trust_base = trust_base
        self.base_fds: dict[int, int] = {}
        self.external_fd: int | None = None
        self.dest_fd: int | None = None
        self.progress = progress
        self.warn = warn or (lambda msg: None)
        self.s = RestoreSummary()
        self.root = os.geteuid() == 0
        self.dirs = _Fds(64)
        self.srcs = _Fds(256)
        self.dir_meta: list[fmt.Entry] = []
        self.placed: dict[int, tuple[bytes, bytes]] = {}  # entry id -> (parent, name)
        self.tmp: tuple[int, bytes] | None = None  # (dir fd, temp name) being written
        #: complete, verified files (and hard links to them) still under their
        #: temporary names: (parent, temp name, name, path, entry id)
        self.pending: list[tuple[bytes, bytes, bytes, bytes, int]] = []
        self.pending_ids: set[int] = set()
        self.pending_bytes = 0
        #: st_dev -> a descriptor on that filesystem, opened before anything
        #: was written there (syncfs reports writeback errors seen since the
        #: descriptor was opened, once), owned here
        self.sync_fds: dict[int, int] = {}
        self.sync_failed = False
        self.cur_fd: int | None = None
        self.no_reflink: dict[str, str] = {}  # source channel -> why it cannot clone
        self.block = 4096
        self._file_start = 0

    # -- paths ---------------------------------------------------------------

    def _dir(self, parent: bytes) -> int:
        """A descriptor for a directory of the restore, walked component by
        component from DEST with O_NOFOLLOW."""
        if not parent:
            return self.dest_fd
        fd = self.dirs.get(parent)
        if fd is not None:
            return fd
        # Start from the deepest cached ancestor: a deep tree costs one open
        # per new directory, not one per component per entry.
        up, _, comps = parent.rpartition(b"/")
        rest = [comps]
        while up and self.dirs.get(up) is None:
            up, _, c = up.rpartition(b"/")
            rest.append(c)
        cur = self.dirs.get(up) if up else self.dest_fd
        # Every directory opened on the way is cached too: restoring directory
        # metadata deepest first then finds each parent among them.
        prefix = up
        for comp in reversed(rest):
            prefix = prefix + b"/" + comp if prefix else comp
            try:
                nfd = os.open(comp, DIR_FLAGS, dir_fd=cur)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ArchiveError(f"{os.fsdecode(parent)}: a component is not a directory "
                                       "(symlink?); refusing to follow it") from None
                raise OSError(e.errno, e.strerror,
                              os.path.join(self.dest, os.fsdecode(parent))) from None
            self.dirs.put(prefix, nfd)
            cur = nfd
        return cur

    def _remove_stale_temps(self, dfd: int, where: str) -> None:
        """--force into an existing directory: remove the temporary files a
        restore that crashed or lost its filesystem left there (names only
        _tmpname makes; none can be a user's file), and say so."""
        n = 0
        for entry in os.scandir(dfd):
            name = os.fsencode(entry.name)
            if TEMP_NAME.match(name) and entry.is_file(follow_symlinks=False):
                os.unlink(name, dir_fd=dfd)
                n += 1
        if n:
            self.warn(f"{where}: removed {n} temporary file{'s' if n > 1 else ''} "
                      "left by an interrupted restore")

    def _tmpname(self, eid: int) -> bytes:
        return b".cloneaware-%d-%s.tmp" % (eid, secrets.token_hex(4).encode())

    def _place(self, pfd: int, tmp: bytes, name: bytes, path: bytes) -> None:
        try:
            ioctl.renameat2(pfd, tmp, pfd, name, noreplace=not self.force)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise UsageError(f"{os.path.join(self.dest, os.fsdecode(path))} exists; "
                                 "use --force to overwrite it") from None
            raise OSError(e.errno, e.strerror,
                          os.path.join(self.dest, os.fsdecode(path))) from None

    #: Files get their final names in batches, after a syncfs: a crash (or a
    #: filesystem that fails) never leaves a name whose data did not reach the
    #: disk.  A batch ends after this many files or bytes, and at the end.
    BATCH_FILES = 4096
    BATCH_BYTES = 1 << 30

    def _note_fs(self, dfd: int) -> None:
        """Remember the filesystem of a directory we are about to write in."""
        dev = os.fstat(dfd).st_dev
        if dev not in self.sync_fds:
            self.sync_fds[dev] = os.dup(dfd)

    def _defer(self, parent: bytes, tmp: bytes, name: bytes, path: bytes, eid: int,
               size: int) -> None:
        """Hand a complete file to the next batch (the caller clears self.tmp)."""
        self.pending.append((parent, tmp, name, path, eid))
        self.pending_ids.add(eid)
        self.placed[eid] = (parent, tmp)
        self.pending_bytes += size

    def _batch_full(self) -> None:
        if len(self.pending) >= self.BATCH_FILES or self.pending_bytes >= self.BATCH_BYTES:
            self._place_pending()

    def _sync(self) -> None:
        """syncfs every filesystem written to; a failure is final (a retry
        would not see the writeback error again)."""
        try:
            for fd in self.sync_fds.values():
                _syncfs(fd)
        except BaseException:
            self.sync_failed = True
            raise

    def _rename_pending(self, keep_going: bool = False) -> None:
        """Rename every pending file into place, in order.  keep_going: a file
        that cannot be placed loses its temporary file, the others go on."""
        while self.pending:
            parent, tmp, name, path, eid = self.pending[0]
            try:
                self._place(self._dir(parent), tmp, name, path)
            except Exception:
                if not keep_going:
                    raise
                try:
                    os.unlink(tmp, dir_fd=self._dir(parent))
                except OSError:
                    pass
            else:
                self.placed[eid] = (parent, name)
            self.pending.pop(0)
            self.pending_ids.discard(eid)
        self.pending_bytes = 0

    def _place_pending(self) -> None:
        """syncfs, then rename every pending file into place."""
        if self.pending:
            self._sync()
            self._rename_pending()

    # -- run -------------------------------------------------------------------

    def run(self) -> RestoreSummary:
        t0 = time.monotonic()
        from cloneaware.thin import open_manifest

        given = not isinstance(self.archive, str)  # a file object: read it, do not close it
        sparse = open_manifest(self.archive) if not given and self.archive != "-" else None
        if given:
            f = self.archive
        elif sparse is not None:
            f, self.external_fd = sparse
        else:
            f = open_archive(self.archive)
        try:
            if not given and self.archive != "-":
                self._precheck(f)
            try:
                self._restore(f)
                if self.dest_fd is not None:
                    _syncfs(self.dest_fd)
            except BaseException:
                self._place_what_is_complete()
                raise
            finally:
                self._cleanup()
        finally:
            if not given and self.archive != "-":
                f.close()
            for fd in [*self.base_fds.values(), self.external_fd, self.dest_fd]:
                if fd is not None:
                    os.close(fd)
        self.s.seconds = time.monotonic() - t0
        return self.s

    def _open_dest(self) -> None:
        """Create DEST only when there is something to restore into it."""
        if self.open_dest is not None:
            self.dest_fd = self.open_dest()
        else:
            os.makedirs(self.dest, exist_ok=True)
            self.dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._note_fs(self.dest_fd)
        if self.force:
            self._remove_stale_temps(self.dest_fd, self.dest)
        self.block = ioctl.fstatfs(self.dest_fd, self.dest)[1] or 4096

    def _open_base(self, base: fmt.Base) -> None:
        """Before writing anything: the base must be here, with every file the
        archive references, each of the size it had at backup time."""
        need = os.fsdecode(base.path)
        if self.base is None:
            raise BaseMismatch(f"this is a thin backup made against the base {need!r}; "
                               "restore it with --base PATH")
        try:
            bfd = os.open(self.base, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BaseMismatch(f"base {self.base}: {e.strerror} (the archive needs {need!r})"
                               ) from None
        try:
            is_dir = stat.S_ISDIR(os.fstat(bfd).st_mode)
            if is_dir != (base.kind == fmt.BASE_DIR):
                raise BaseMismatch(f"base {self.base} should be a "
                                   f"{'directory' if base.kind == fmt.BASE_DIR else 'file'}, "
                                   f"like {need!r} was at backup time")
            for bf in base.files:
                where = os.path.join(self.base, os.fsdecode(bf.path)) if bf.path else self.base
                try:
                    fd = _open_beneath(bfd, bf.path) if bf.path else os.dup(bfd)
                except OSError as e:
                    raise BaseMismatch(f"base file {where} is needed: {e.strerror}") from None
                self.base_fds[bf.number] = fd
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise BaseMismatch(f"base file {where} is not a regular file")
                if st.st_size != bf.size:
                    raise BaseMismatch(f"base file {where} has {st.st_size} bytes; the backup "
                                       f"was made against {bf.size} bytes")
        finally:
            os.close(bfd)

    def _precheck(self, f) -> None:
        """On a seekable archive, refuse before writing anything if a
        top-level entry already exists in DEST."""
        try:
            if not f.seekable():
                return
            listing = read_index(f)
            items = listing.items
            if listing.base is not None:
                self._open_base(listing.base)
        except (ArchiveError, OSError):
            return  # the full read will report it with the offset
        finally:
            try:
                f.seek(0)
            except OSError:
                pass
        if self.force:
            return
        for it in items:
            if b"/" not in it.path and os.path.lexists(os.path.join(os.fsencode(self.dest),
                                                                    it.path)):
                raise UsageError(f"{os.path.join(self.dest, os.fsdecode(it.path))} exists; "
                                 "use --force to overwrite it")

    def _place_what_is_complete(self) -> None:
        """On an error or an interrupt: files already complete and verified
        still get their names if the filesystem can make them durable (a full
        disk can); else their temporary files are removed."""
        try:
            if self.pending and not self.sync_failed:
                self._sync()
                self._rename_pending(keep_going=True)
        except BaseException:  # noqa: BLE001 - the first error is the one to report
            pass
        for parent, tmp, *_ in self.pending:
            try:
                os.unlink(tmp, dir_fd=self._dir(parent))
            except BaseException:  # noqa: BLE001
                pass
        self.pending = []
        self.pending_ids.clear()

    def _cleanup(self) -> None:
        if self.cur_fd is not None:
            os.close(self.cur_fd)
            self.cur_fd = None
        if self.tmp is not None:
            pfd, name = self.tmp
            try:
                os.unlink(name, dir_fd=pfd)
            except OSError:
                pass
            self.tmp = None
        self.srcs.close()
        self.dirs.close()
        for fd in self.sync_fds.values():
            os.close(fd)
        self.sync_fds.clear()

    def _restore(self, f) -> None:
        stream = Stream(f)
        for ev in stream.events():
            kind = ev[0]
            if kind == "entry":
                if self.dest_fd is None:
                    if stream.base is not None and not self.base_fds:
                        self._open_base(stream.base)
                    elif stream.base is None and self.base is not None:
                        self.warn("--base given, but this archive is not a thin backup")
                    self._open_dest()
                self._entry(ev[1])
            elif kind == "baseref":
                _, st, off, length, bf, boff, _sha, _ = ev
                self._clone_or_copy(self.base_fds[bf.number], boff, length, off, bf.size,
                                    st.entry.size, st.entry.path, "base")
                self.s.base_bytes += length
            elif kind == "external":
                _, st, off, length, _sha, roff = ev
                if self.external_fd is None:
                    raise ArchiveError("EXTERNAL record in an archive that is not a "
                                       "sparse thin backup", roff)
                size = os.fstat(self.external_fd).st_size
                self._clone_or_copy(self.external_fd, off, length, off, size,
                                    st.entry.size, st.entry.path, "sparse")
            elif kind == "data":
                _, st, off, data, _ = ev
                self._pwrite(data, off, st.entry.path)
                self.s.written_bytes += len(data)
                if self.progress:
                    self.progress.advance(len(data))
            elif kind == "ref":
                _, st, off, length, src, soff, _ = ev
                self._ref(st.entry, off, length, src, soff)
            elif kind == "end":
                self._verify(ev[1])
                self._finish_file(ev[1].entry)
        self._place_pending()
        self._dir_metadata()

    def _pwrite(self, data: bytes, off: int, path: bytes) -> None:
        mv = memoryview(data)
        while mv:
            try:
                n = os.pwrite(self.cur_fd, mv, off)
            except OSError as e:
                raise OSError(e.errno, e.strerror,
                              os.path.join(self.dest, os.fsdecode(path))) from None
            mv = mv[n:]
            off += n

    # -- entries -----------------------------------------------------------------

    def _entry(self, e: fmt.Entry) -> None:
        parent, _, name = e.path.rpartition(b"/")
        pfd = self._dir(parent)
        full = os.path.join(self.dest, os.fsdecode(e.path))
        if e.kind == fmt.K_DIR:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                if not self.force:
                    raise UsageError(f"{full} exists; use --force to merge into it") from None
                try:
                    dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
                except OSError:
                    raise UsageError(f"{full} exists and is not a directory") from None
                try:
                    self._remove_stale_temps(dfd, full)
                finally:
                    os.close(dfd)
            self.dir_meta.append(e)
            self.s.dirs += 1
            return
        tmp = self._tmpname(e.id)
        if e.kind == fmt.K_REG:
            self._note_fs(pfd)
            # O_NOATIME: later copies read from this file, after its times are set
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NOATIME, 0o600, dir_fd=pfd)
            self.tmp = (pfd, tmp)
            self.cur_fd = fd
            self._file_start = self._filled()
            try:
                os.ftruncate(fd, e.size)
            except OSError as ex:
                raise OSError(ex.errno, ex.strerror, full) from None
            return
        self.tmp = (pfd, tmp)
        if e.kind == fmt.K_HARDLINK:
            tparent, tname = self.placed[e.link]
            tfd = self._dir(tparent)
            pfd = self._dir(parent)
            os.link(tname, tmp, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            if e.link in self.pending_ids:  # its data is not on disk yet
                self._defer(parent, tmp, name, e.path, e.id, 0)
                self.tmp = None
                self._batch_full()
            else:
                self._place(pfd, tmp, name, e.path)
                self.tmp = None
                self.placed[e.id] = (parent, name)
            self.s.hardlinks += 1
            return
        if e.kind == fmt.K_SYMLINK:
            os.symlink(e.target, tmp, dir_fd=pfd)
            self.s.symlinks += 1
        else:
            ftype = {fmt.K_FIFO: stat.S_IFIFO, fmt.K_CHR: stat.S_IFCHR,
                     fmt.K_BLK: stat.S_IFBLK}[e.kind]
            try:
                os.mknod(tmp, ftype | 0o600, e.rdev, dir_fd=pfd)
            except PermissionError:
                self.tmp = None
                self._not_exact(e, "creating device nodes needs root")
                return
            self.s.specials += 1
        self._apply_meta(e, None, pfd, tmp)
        self._place(pfd, tmp, name, e.path)
        self.tmp = None

    def _not_exact(self, e: fmt.Entry, why: str) -> None:
        self.s.not_exact.append((os.fsdecode(e.path), why))
        self.warn(f"{os.path.join(self.dest, os.fsdecode(e.path))}: {why}")

    # -- data ----------------------------------------------------------------------

    def _src_fd(self, src: fmt.Entry) -> int:
        fd = self.srcs.get(src.id)
        if fd is not None:
            return fd
        parent, name = self.placed[src.id]
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:  # reading must not change the atime we restored
            fd = os.open(name, flags | os.O_NOATIME, dir_fd=self._dir(parent))
        except PermissionError:
            fd = os.open(name, flags, dir_fd=self._dir(parent))
        self.srcs.put(src.id, fd)
        return fd

    def _ref(self, e: fmt.Entry, off: int, length: int, src: fmt.Entry, soff: int) -> None:
        sfd = self.cur_fd if src.id == e.id else self._src_fd(src)
        self._clone_or_copy(sfd, soff, length, off, src.size, e.size, e.path, "archive")

    def _copy(self, sfd: int, soff: int, length: int, off: int, reason: str, path) -> None:
        """Copy bytes the kernel would not clone (copy_file_range, else read/write)."""
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(sfd, self.cur_fd, length - done, soff + done, off + done)
            except OSError as ex:
                if ex.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    n = 0
                else:
                    raise OSError(ex.errno, ex.strerror,
                                  os.path.join(self.dest, os.fsdecode(path))) from None
            if n == 0:
                b = os.pread(sfd, min(length - done, 4 << 20), soff + done)
                if not b:
                    raise ArchiveError(f"reference reads past the end of its source for "
                                       f"{os.fsdecode(path)}")
                self._pwrite(b, off + done, path)
                n = len(b)
            done += n
        self.s.copied_bytes += length
        self.s.copy_reasons[reason] = self.s.copy_reasons.get(reason, 0) + length

    def _clone_or_copy(self, sfd, soff, length, off, src_size, dst_size, path, channel) -> None:
        """Clone [soff, soff+length) of sfd to off in the file being restored;
        copy what cannot be cloned: unaligned heads and tails, and everything
        when the source cannot be cloned from (``channel`` names the source
        so that a base on another filesystem does not stop clones from the
        archive's own files)."""
        bs = self.block
        why = self.no_reflink.get(channel)
        if why is not None:
            self._copy(sfd, soff, length, off, why, path)
            return
        if soff % bs != off % bs:
            self._copy(sfd, soff, length, off, "offsets not block-aligned alike", path)
            return
        head = min((-off) % bs, length)
        if head:
            self._copy(sfd, soff, head, off, "unaligned head", path)
        a, sa, rem = off + head, soff + head, length - head
        at_eof = sa + rem == src_size and a + rem == dst_size
        tail = 0 if at_eof else rem % bs
        n = rem - tail
        if n > 0:
            try:
                ioctl.ficlonerange(self.cur_fd, sfd, sa, n, a, path)
                self.s.reflinked_bytes += n
            except OSError as ex:
                if ex.errno not in ioctl.NOT_SUPPORTED:
                    raise OSError(ex.errno, ex.strerror,
                                  os.path.join(self.dest, os.fsdecode(path))) from None
                from cloneaware.probe import errno_reason

                reason = errno_reason(ex.errno)
                if ex.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV):
                    self.no_reflink[channel] = reason  # stop trying for this source
                self._copy(sfd, sa, n, a, reason, path)
        if tail:
            self._copy(sfd, sa + n, tail, a + n, "unaligned tail", path)

    def _verify(self, st) -> None:
        """Clone, then verify: hash the bytes now in the restored file where
        they came from the base (unless --trust-base) or the sparse file, and
        compare with the archive."""
        from cloneaware.thin import sha256_range

        ranges = [] if self.trust_base else list(st.base_ranges)
        ranges += st.external_ranges
        for off, length, sha in ranges:
            self.s.verified_bytes += length
            if sha256_range(self.cur_fd, off, length) != sha:
                where = os.path.join(self.dest, os.fsdecode(st.entry.path))
                raise BaseMismatch(
                    f"{where}: bytes {off}-{off + length} differ from the backup "
                    "(the base or the sparse file changed since); the file was not restored")

    def _finish_file(self, e: fmt.Entry) -> None:
        fd = self.cur_fd
        pfd, tmp = self.tmp
        parent, _, name = e.path.rpartition(b"/")
        self._apply_meta(e, fd, pfd, tmp)
        self._defer(parent, tmp, name, e.path, e.id, e.size)
        self.tmp = None
        self.cur_fd = None
        if e.eflags & fmt.EF_REFERENCED:
            self.srcs.put(e.id, fd)
        else:
            os.close(fd)
        s = self.s
        s.files += 1
        s.logical_bytes += e.size
        s.hole_bytes += e.size - (self._filled() - self._file_start)
        self._batch_full()

    def _filled(self) -> int:
        return self.s.written_bytes + self.s.reflinked_bytes + self.s.copied_bytes

    # -- metadata ------------------------------------------------------------------

    def _apply_meta(self, e: fmt.Entry, fd: int | None, pfd: int, name: bytes) -> None:
        link = e.kind == fmt.K_SYMLINK
        target = fd if fd is not None else name
        kw = {} if fd is not None else {"dir_fd": pfd, "follow_symlinks": False}
        if self.root:
            try:
                os.chown(target, e.uid, e.gid, **kw)
            except OSError as ex:
                self._not_exact(e, f"owner not restored: {ex.strerror}")
        elif not self.s.owners_skipped:
            self.s.owners_skipped = True
            self.warn("not running as root: file owners are not restored")
        if not link:
            try:
                os.chmod(target, e.mode, **({} if fd is not None else {"dir_fd": pfd}))
            except OSError as ex:
                self._not_exact(e, f"mode not restored: {ex.strerror}")
        if e.xattrs:
            xt = fd if fd is not None else f"/proc/self/fd/{pfd}/{os.fsdecode(name)}"
            for xn, xv in e.xattrs:
                try:
                    if fd is not None:
                        os.setxattr(xt, xn, xv)
                    else:
                        os.setxattr(xt, xn, xv, follow_symlinks=False)
                except OSError as ex:
                    self._not_exact(e, f"xattr {os.fsdecode(xn)} not restored: {ex.strerror}")
        try:
            os.utime(target, ns=(e.atime_ns, e.mtime_ns), **kw)
        except OSError as ex:
            self._not_exact(e, f"times not restored: {ex.strerror}")

    def _dir_metadata(self) -> None:
        for e in reversed(self.dir_meta):  # children before parents
            parent, _, name = e.path.rpartition(b"/")
            pfd = self._dir(parent)
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            try:
                self._apply_meta(e, fd, pfd, name)
            finally:
                os.close(fd)


def _open_beneath(dirfd: int, rel: bytes) -> int:
    """Open a file below dirfd, component by component, following no symlink."""
    parts = fmt.check_path(rel)
    cur = dirfd
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, DIR_FLAGS, dir_fd=cur)
            if cur != dirfd:
                os.close(cur)
            cur = nfd
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
    finally:
        if cur != dirfd:
            os.close(cur)


def _syncfs(fd: int) -> None:
    """syncfs(2): make the restored files durable before we report success."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "syncfs")


def restore(archive: str, dest: str, **kw) -> RestoreSummary:
    return Restore(archive, dest, **kw).run()
