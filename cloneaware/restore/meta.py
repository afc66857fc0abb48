"""Metadata of restored entries: owner (as root), mode, xattrs, inode flags
and times.  Whatever cannot be applied is reported, never silently dropped."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable

from cloneaware import fsinfo, native
from cloneaware.archive import format as fmt

#: the inode flags applied with the rest of the metadata (not first, not last)
IFLAGS_MIDDLE = fmt.IFLAGS_STORED & ~fmt.IFLAGS_FIRST & ~fmt.IFLAGS_LAST


#: filesystems that never compress file data: FS_NOCOMP_FL holds there by itself
_NEVER_COMPRESS = {"xfs", "ext4", "tmpfs"}


def _compresses(fd: int) -> bool:
    """Whether fd's filesystem may compress its data (any but those known not to)."""
    try:
        magic, _bsize = native.fstatfs(fd, None)
    except OSError:
        return True
    return fsinfo.fs_type_name(magic) not in _NEVER_COMPRESS


class IFlags:
    """Inode flags (docs/FORMAT.md, "Inode flags"): ``set`` makes the bits of
    ``mask`` that the entry has, and clears those of ``clear`` (inherited
    from a directory restored with them), keeping every other flag the
    target has; each wanted flag the target does not take, refused or
    dropped silently (read back), is reported as not restored."""

    def __init__(self, not_exact: Callable[[fmt.Entry, str], None]):
        self.not_exact = not_exact

    def set(self, fd: int, e: fmt.Entry, mask: int, clear: int = 0) -> int:
        """The flags fd has afterwards (0 when they cannot be read)."""
        want = e.iflags & mask
        manage = mask & (want | clear)
        if not manage:
            return 0
        try:
            cur = native.getflags(fd)
        except OSError as ex:
            if want:
                self._missing(e, want, ex.strerror or str(ex))
            return 0
        new = (cur & ~manage) | want
        why = "the filesystem does not keep it"
        if new != cur:
            try:
                native.setflags(fd, new)
            except OSError as ex:
                if ex.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY, errno.EPERM,
                                    errno.EACCES):
                    raise
                why = ex.strerror or str(ex)
                have = cur
                for bit in fmt.IFLAG_LETTERS:  # one at a time: which does it take?
                    if (have ^ new) & bit:
                        try:
                            native.setflags(fd, have ^ bit)
                            have ^= bit
                        except OSError:
                            pass
            try:
                cur = native.getflags(fd)
            except OSError as ex:
                self._missing(e, want, ex.strerror or str(ex))
                return 0
        missing = want & ~cur
        if missing & fmt.FS_NOCOMP_FL and not _compresses(fd):
            # "do not compress" holds by itself where nothing is compressed;
            # Btrfs sets it on its own on a file that did not compress well
            missing &= ~fmt.FS_NOCOMP_FL
        if missing:
            self._missing(e, missing, why)
        return cur

    def _missing(self, e: fmt.Entry, bits: int, why: str) -> None:
        self.not_exact(e, f"inode flags +{fmt.iflag_letters(bits)} not restored: {why}")


class Meta:
    """``not_exact(entry, why)`` is called for each thing not applied."""

    def __init__(self, not_exact: Callable[[fmt.Entry, str], None],
                 warn: Callable[[str], None]):
        self.not_exact = not_exact
        self.warn = warn
        self.iflags = IFlags(not_exact)
        self.root = os.geteuid() == 0
        self.owners_skipped = False

    def owners_noted(self) -> None:
        """Said once: owners are set only by root."""
        if not self.root and not self.owners_skipped:
            self.owners_skipped = True
            self.warn("not running as root: file owners are not restored")

    def apply(self, e: fmt.Entry, fd: int | None, pfd: int, name: bytes) -> None:
        """Apply e's metadata to ``fd``, or (without one) to ``name`` in ``pfd``,
        never following a symlink."""
        link = e.kind == fmt.K_SYMLINK
        target: int | bytes = fd if fd is not None else name
        kw: dict = {} if fd is not None else {"dir_fd": pfd, "follow_symlinks": False}
        if self.root:
            try:
                os.chown(target, e.uid, e.gid, **kw)
            except OSError as ex:
                self.not_exact(e, f"owner not restored: {ex.strerror}")
        else:
            self.owners_noted()
        if not link:
            try:
                if fd is not None:
                    os.chmod(fd, e.mode)
                else:
                    os.chmod(name, e.mode, dir_fd=pfd)
            except OSError as ex:
                self.not_exact(e, f"mode not restored: {ex.strerror}")
        if e.xattrs:
            xt: int | str = fd if fd is not None else f"/proc/self/fd/{pfd}/{os.fsdecode(name)}"
            for xn, xv in e.xattrs:
                try:
                    if fd is not None:
                        os.setxattr(xt, xn, xv)
                    else:
                        os.setxattr(xt, xn, xv, follow_symlinks=False)
                except OSError as ex:
                    self.not_exact(e, f"xattr {os.fsdecode(xn)} not restored: {ex.strerror}")
        if fd is not None and e.iflags & IFLAGS_MIDDLE:
            self.iflags.set(fd, e, IFLAGS_MIDDLE)
        try:
            os.utime(target, ns=(e.atime_ns, e.mtime_ns), **kw)
        except OSError as ex:
            self.not_exact(e, f"times not restored: {ex.strerror}")
