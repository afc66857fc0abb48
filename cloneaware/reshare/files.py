"""The files of DEST that reshare dedupes: each opened read-only beneath
DEST one component at a time without following symlinks, checked to be a
regular file of the size the input gives (else skipped and listed), its
filesystem asked once whether it can dedupe, its plain extents mapped, its
times set back when it is closed if anything moved them."""
from __future__ import annotations

import errno
import os
import stat
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware import fsinfo
from cloneaware.archive import format as fmt
from cloneaware.bookends import BookendCounts, Bookends
from cloneaware.errors import (
    ArchiveError,
    BytesDiffer,
    DedupeRefused,
    ReshareSkipped,
    UsageError,
    Warnings,
)
from cloneaware.index.plan import data_ranges, is_own
from cloneaware.restore.tree import Tree
from cloneaware.source.mapping import extent_map

_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: errnos after which a file is not asked again
_FINAL = {errno.EPERM, errno.EACCES, errno.ETXTBSY, errno.EROFS, errno.EOPNOTSUPP,
          errno.ENOTTY, errno.ENOSYS}


@dataclass
class ReshareSummary:
    dry_run: bool = False
    files: int = 0  # regular files in the input
    references: int = 0  # shared places read from the input
    referenced_bytes: int = 0
    #: bytes asked of the kernel (not already shared, aligned, in files usable)
    to_dedupe_bytes: int = 0
    shared_bytes: int = 0  # the kernel found them identical and shares them now
    already_shared_bytes: int = 0  # the same blocks already: not asked
    differing_bytes: int = 0  # the kernel found other bytes: left alone
    #: not on block boundaries alike in both files: cannot be deduped
    unaligned_bytes: int = 0
    #: of references whose file (either side) was skipped or refused
    skipped_bytes: int = 0
    #: references into the base of a thin archive (outside DEST): not reshared
    base_bytes: int = 0
    dedupe_calls: int = 0
    times_restored: int = 0  # files whose times were set back
    #: extents the dedupe left partly referenced (Btrfs), and what was
    #: rewritten so that they are released (cloneaware/bookends.py)
    bookends: BookendCounts = field(default_factory=BookendCounts)
    #: what the filesystem's used space fell by (statfs before and after, as
    #: df shows it; other writers count too); None on a dry run
    freed_bytes: int | None = None
    seconds: float = 0.0
    #: files not used: missing, of another size or kind, not readable
    #: (ReshareSkipped); files the kernel would not dedupe into or from
    #: (DedupeRefused); files with bytes that differ from their source, and
    #: how many (BytesDiffer)
    warnings: Warnings = field(default_factory=Warnings)

    @property
    def skipped(self) -> list[ReshareSkipped]:
        return self.warnings.of(ReshareSkipped)

    @property
    def refused(self) -> list[DedupeRefused]:
        return self.warnings.of(DedupeRefused)

    @property
    def differing(self) -> list[BytesDiffer]:
        return self.warnings.of(BytesDiffer)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("warnings", "bookends")}
        return {**d, "bookends": self.bookends.as_dict(),
                **self.warnings.as_json(ReshareSkipped, DedupeRefused, BytesDiffer)}


class Ext:
    """The plain extents of a file (those whose address locates bytes), as
    sorted lists: logical start, end, and physical - logical."""

    __slots__ = ("starts", "ends", "offs")

    def __init__(self, fd: int, size: int, where: str):
        d = data_ranges(extent_map(fd, size, where), size)
        d = d[~is_own(d["flags"], d["physical"])]
        self.starts = d["logical"].tolist()
        self.ends = (d["logical"] + d["length"]).tolist()
        self.offs = [p - lg for p, lg in zip(d["physical"].tolist(), self.starts)]


def shared_length(a: Ext, s: int, b: Ext, d: int, n: int) -> int:
    """Bytes of a's [s, s+n) that map the same physical bytes as b's [d, d+n)."""
    total = 0
    delta = d - s
    i = bisect_right(a.ends, s)
    while i < len(a.starts) and a.starts[i] < s + n:
        lo, hi = max(a.starts[i], s), min(a.ends[i], s + n)
        j = bisect_right(b.ends, lo + delta)
        while j < len(b.starts) and b.starts[j] < hi + delta:
            if b.offs[j] + delta == a.offs[i]:
                total += min(b.ends[j] - delta, hi) - max(b.starts[j] - delta, lo)
            j += 1
        i += 1
    return total


@dataclass(slots=True)
class Open:
    entry: fmt.Entry
    fd: int
    st: os.stat_result  # when opened: the times to keep
    block: int
    where: str
    fs_type: str
    ext: Ext | None = None
    dirty: bool = False  # deduped into since ext was taken
    refused: bool = False


class DestFiles:
    """The files of DEST open at a time, by entry id.  ``entries``: the
    input's entries, by id; ``what``: what the input is, for messages."""

    def __init__(self, dest: str, summary: ReshareSummary,
                 warn: Callable[[str], None]):
        self.dest = dest
        self.s = summary
        self.warn = warn
        self.tree = Tree(dest)
        self.open: dict[int, Open] = {}
        self.unusable: set[int] = set()  # entry ids skipped or refused for good
        self.reported: set[str] = set()
        self.probed: dict[int, bool] = {}  # st_dev -> can dedupe
        self.entries: list[fmt.Entry] = []
        self.root_dev = 0
        self.what = "archive"
        self.bookends = Bookends(summary.bookends, warn)
        self.times_set: set[int] = set()  # entry ids whose times were set back

    def where(self, e: fmt.Entry) -> str:
        return self.tree.where(e.path)

    def skip(self, e: fmt.Entry, reason: str) -> None:
        self.unusable.add(e.id)
        w = ReshareSkipped(self.where(e), reason)
        self.s.warnings.append(w)
        self.warn(str(w))

    def refuse(self, f: Open, err: int) -> None:
        """The kernel said no for this file (its other files go on)."""
        if err in _FINAL:
            f.refused = True
            self.unusable.add(f.entry.id)
        if f.where in self.reported:
            return
        self.reported.add(f.where)
        if err == errno.EPERM:
            why = ("dedupe not permitted: it needs root, the file's owner, or a user who may "
                   "write the file")
        elif err == errno.EXDEV:
            why = "on another filesystem than the file it shares with"
        elif err in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
            why = "its filesystem cannot dedupe"
        elif err == errno.EINVAL:
            why = "refused as an invalid range (did the file change since it was checked?)"
        else:
            why = os.strerror(err)
        w = DedupeRefused(f.where, why)
        self.s.warnings.append(w)
        self.warn(str(w))

    def get(self, eid: int) -> Open | None:
        f = self.open.get(eid)
        if f is not None:
            return f
        if eid in self.unusable:
            return None
        e = self.entries[eid]
        parent, _, name = e.path.rpartition(b"/")
        try:
            pfd = self.tree.dir(parent)
        except ArchiveError:
            self.skip(e, "a directory on its path is a symlink or not a directory")
            return None
        except OSError as ex:
            if ex.errno == errno.EIO:
                raise
            self.skip(e, "missing" if ex.errno == errno.ENOENT else
                       ex.strerror or str(ex))
            return None
        try:
            try:
                fd = os.open(name, _OPEN | os.O_NOATIME, dir_fd=pfd)
            except PermissionError:
                fd = os.open(name, _OPEN, dir_fd=pfd)
        except OSError as ex:
            if ex.errno == errno.EIO:
                raise OSError(ex.errno, ex.strerror, self.where(e)) from None
            self.skip(e, {errno.ENOENT: "missing",
                           errno.ELOOP: "a symlink, not a file"}.get(
                               ex.errno or 0, ex.strerror or str(ex)))
            return None
        ok = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.skip(e, "not a regular file")
                return None
            if st.st_size != e.size:
                self.skip(e, f"{st.st_size} bytes; the {self.what} says {e.size}")
                return None
            where = self.where(e)
            info = fsinfo.fs_info(fd, st.st_dev, where)
            if not self._can_dedupe(fd, st, info, where):
                self.skip(e, f"its filesystem ({info.type}) cannot dedupe")
                return None
            f = Open(e, fd, st, info.block_size or 4096, where, info.type)
            self.open[eid] = f
            self.bookends.add(fd, st, eid, False, info.type)
            ok = True
            return f
        finally:
            if not ok:
                os.close(fd)

    def _can_dedupe(self, fd: int, st: os.stat_result, info: fsinfo.FsInfo,
                    where: str) -> bool:
        """Ask once per filesystem (docs/KERNEL.md D9); DEST's own filesystem
        answering no ends the run."""
        got = self.probed.get(st.st_dev)
        if got is None:
            try:
                ans = fsinfo.dedupe_support(fd, st.st_size, info.block_size or 4096)
            except OSError as ex:
                raise OSError(ex.errno, ex.strerror, where) from None
            if ans is None:
                return True  # an empty file cannot ask; it holds nothing to share
            got = self.probed[st.st_dev] = ans
            if not got and st.st_dev == self.root_dev:
                raise UsageError(f"{self.dest}: its filesystem ({info.type}) cannot dedupe "
                                 "(FIDEDUPERANGE is not supported); reshare works on Btrfs "
                                 "and on XFS made with reflink=1")
        return got

    def ext(self, f: Open, as_source: bool) -> Ext:
        """The file's plain extents; a source deduped into since is mapped again."""
        if f.ext is None or (as_source and f.dirty):
            try:
                f.ext = Ext(f.fd, f.entry.size, f.where)
            except OSError as ex:
                raise OSError(ex.errno, ex.strerror, f.where) from None
            f.dirty = False
        return f.ext

    def deduped_into(self, f: Open) -> None:
        """The kernel moved some of f's references."""
        f.dirty = True
        self.touched(f)

    def touched(self, f: Open) -> None:
        """f shares (now, or since an earlier run) with another place: its
        own extents may be referred to in part."""
        self.bookends.add(f.fd, f.st, f.entry.id, True, f.fs_type)

    def close(self, f: Open) -> None:
        try:
            now = os.fstat(f.fd)
            if (now.st_atime_ns, now.st_mtime_ns) != (f.st.st_atime_ns, f.st.st_mtime_ns):
                os.utime(f.fd, ns=(f.st.st_atime_ns, f.st.st_mtime_ns))
                if f.entry.id not in self.times_set:
                    self.times_set.add(f.entry.id)
                    self.s.times_restored += 1
        except OSError as ex:
            self.warn(f"{f.where}: times not checked or not set back: {ex.strerror}")
        finally:
            os.close(f.fd)

    def close_all(self) -> None:
        while self.open:
            self.close(self.open.popitem()[1])

