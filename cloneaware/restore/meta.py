"""Metadata of restored entries: owner (as root), mode, xattrs and times.
Whatever cannot be applied is reported, never silently dropped."""
from __future__ import annotations

import os
from collections.abc import Callable

from cloneaware.archive import format as fmt


class Meta:
    """``not_exact(entry, why)`` is called for each thing not applied."""

    def __init__(self, not_exact: Callable[[fmt.Entry, str], None],
                 warn: Callable[[str], None]):
        self.not_exact = not_exact
        self.warn = warn
        self.root = os.geteuid() == 0
        self.owners_skipped = False

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
        elif not self.owners_skipped:
            self.owners_skipped = True
            self.warn("not running as root: file owners are not restored")
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
        try:
            os.utime(target, ns=(e.atime_ns, e.mtime_ns), **kw)
        except OSError as ex:
            self.not_exact(e, f"times not restored: {ex.strerror}")
