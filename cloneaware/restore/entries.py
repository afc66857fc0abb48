"""Entries made beneath DEST for ``DirectoryOutput`` (restore/directory.py):
directories, regular files (and the files --include stages to clone or
link from), hard links, symlinks, FIFOs and devices, each reached from its
parent's descriptor and made under a temporary name where it can be; the
inode flags that must come first (before a directory's children, before a
file's data) and last (immutable, append-only); directory metadata,
children before parents."""
from __future__ import annotations

import dataclasses
import os
import secrets
import stat
from collections.abc import Callable
from typing import Any

from cloneaware.archive import format as fmt
from cloneaware.errors import UsageError
from cloneaware.restore.filedata import OpenFile
from cloneaware.restore.tree import remove_stale_temps, temp_name
from cloneaware.safeio import DIR_FLAGS, lexists


class Entries:
    """``out``: the DirectoryOutput they are made for (its tree, placer,
    metadata and subvolumes)."""

    def __init__(self, out: Any):
        self.out = out
        self.dir_meta: list[fmt.Entry] = []
        #: directory path -> the flags that its new children inherit (C, c, m
        #: set on it first); entries that get i or a at the very end
        self.dir_first: dict[bytes, int] = {}
        self.last: list[fmt.Entry] = []

    def make(self, e: fmt.Entry, how: Callable[[fmt.Entry, int, bytes], bool | None]) -> bool:
        """Make ``e`` with ``how(e, parent descriptor, name)``; errors name
        the entry as the user knows it.  False if ``how`` said it could not."""
        out = self.out
        parent, _, name = e.path.rpartition(b"/")
        out.subvols.note(e.path)
        new_top = out._top(e.path)
        try:
            pfd = out.tree.dir(parent)
            if out.subvols.snapshots and out.subvols.inside_snapshot(e.path) is not None:
                out.subvols.clear_for(pfd, name, e.kind)
            ok = how(e, pfd, name)
        except OSError as ex:
            raise out.named(ex, e.path) from None
        if new_top:
            out._made_top(name)
        return ok is not False

    def mkdir(self, e: fmt.Entry, pfd: int, name: bytes) -> None:
        out = self.out
        full = out.tree.where(e.path)
        parent = e.path.rpartition(b"/")[0]
        disk = name  # its name on disk: a new directory's is temporary for a while
        try:
            if not (e.subvol and out.subvols.make(e, pfd, name, lambda i: out.entries[i].path)):
                if out.fresh_below(e.path) or e.subvol or out.subvols.snapshots \
                        or lexists(pfd, name):
                    os.mkdir(name, 0o700, dir_fd=pfd)
                else:
                    disk = out.fresh.make_root(e.path, pfd)
        except FileExistsError:
            # in a subvolume restored as a snapshot: a directory of its origin, merged into
            if out.subvols.inside_snapshot(e.path) is None:
                if not (out.force or out._replaces(e.path)):
                    raise UsageError(f"{full} exists; use --force to merge into it") from None
                try:
                    dfd = os.open(name, DIR_FLAGS, dir_fd=pfd)
                except OSError:
                    raise UsageError(f"{full} exists and is not a directory") from None
                try:
                    remove_stale_temps(dfd, full, out.warn)
                finally:
                    os.close(dfd)
        inherited = self.dir_first.get(parent, 0)
        if e.iflags & fmt.IFLAGS_FIRST or inherited:
            dfd = os.open(disk, DIR_FLAGS, dir_fd=pfd)
            try:  # before its children are made: they inherit them
                got = out.meta.iflags.set(dfd, e, fmt.IFLAGS_FIRST, inherited & ~e.iflags)
            finally:
                os.close(dfd)
            if got & fmt.IFLAGS_FIRST:
                self.dir_first[e.path] = got & fmt.IFLAGS_FIRST
        if e.iflags & fmt.IFLAGS_LAST:
            self.last.append(e)
        self.dir_meta.append(e)

    def first_flags(self, fd: int, e: fmt.Entry, staged: bool) -> None:
        """A new file's inherited and first flags (before it holds data:
        Btrfs takes C only on an empty file); its last ones noted."""
        inherited = self.dir_first.get(e.path.rpartition(b"/")[0], 0)
        if e.iflags & fmt.IFLAGS_FIRST or inherited:
            self.out.meta.iflags.set(fd, e, fmt.IFLAGS_FIRST, inherited & ~e.iflags)
        if e.iflags & fmt.IFLAGS_LAST and not staged:
            self.last.append(e)

    def stage(self, e: fmt.Entry) -> None:
        """A file left out by --include that chosen files clone or link
        from: restored in the staging directory, removed at the end."""
        out = self.out
        assert out.tree.root is not None
        if out.staging is None:
            name = b".cloneaware-staging-%d-%s" % (os.getpid(), secrets.token_hex(4).encode())
            os.mkdir(name, 0o700, dir_fd=out.tree.root)
            out.staging = name
        out.staged.add(e.id)
        staged = dataclasses.replace(e, path=out.staging + b"/%d" % e.id,
                                     iflags=e.iflags & ~fmt.IFLAGS_LAST)
        self.open_file(staged, out.tree.dir(out.staging), b"", staged=True)

    def open_file(self, e: fmt.Entry, pfd: int, name: bytes, staged: bool = False) -> bool:
        """A regular file made under a temporary name, sized, with the flags
        that must come before its data; the output's current file."""
        out = self.out
        out.placer.note_fs(pfd)
        fresh = not staged and out.fresh_below(e.path)
        tmp = name if fresh else temp_name(e.id)
        where = out.tree.where(e.path)
        # O_NOATIME: later copies read from this file, after its times are set
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NOATIME, 0o600, dir_fd=pfd)
        out.cur = cur = OpenFile(e, fd, pfd, tmp, where, out.data.dirty(), staged, fresh)
        self.first_flags(fd, e, staged)
        try:
            os.ftruncate(fd, e.size)
        except OSError as ex:
            raise OSError(ex.errno, ex.strerror, where) from None
        if not staged:
            out.data.open_old(cur, e.path.rpartition(b"/")[2])
        return True

    def hardlink(self, e: fmt.Entry, pfd: int, name: bytes) -> None:
        out = self.out
        placer = out.placer
        parent = e.path.rpartition(b"/")[0]
        tparent, tname = placer.placed[e.link]
        if out.fresh_below(e.path):  # below a new directory: its final name now
            os.link(tname, name, src_dir_fd=out.tree.dir(tparent), dst_dir_fd=pfd,
                    follow_symlinks=False)
            placer.placed[e.id] = (parent, name)
            return
        tmp = temp_name(e.id)
        os.link(tname, tmp, src_dir_fd=out.tree.dir(tparent), dst_dir_fd=pfd,
                follow_symlinks=False)
        if e.link in placer.pending_ids or e.link in out.staged:  # not on disk yet
            placer.defer(parent, tmp, name, e.path, e.id, 0)
            return
        try:
            placer.place(pfd, tmp, name, e.path)
        except BaseException:
            _unlink(pfd, tmp)
            raise
        placer.placed[e.id] = (parent, name)

    def special(self, e: fmt.Entry, pfd: int, name: bytes) -> bool:
        out = self.out
        fresh = out.fresh_below(e.path)
        tmp = name if fresh else temp_name(e.id)
        if e.kind == fmt.K_SYMLINK:
            os.symlink(e.target, tmp, dir_fd=pfd)
        else:
            ftype = {fmt.K_FIFO: stat.S_IFIFO, fmt.K_CHR: stat.S_IFCHR,
                     fmt.K_BLK: stat.S_IFBLK, fmt.K_SOCK: stat.S_IFSOCK}[e.kind]
            try:
                os.mknod(tmp, ftype | 0o600, e.rdev, dir_fd=pfd)
            except PermissionError:
                out.not_exact(e, "creating device nodes needs root")
                return False
        try:
            out.meta.apply(e, None, pfd, tmp)
            if not fresh:
                out.placer.place(pfd, tmp, name, e.path)
        except BaseException:
            _unlink(pfd, tmp)
            raise
        return True

    def dir_metadata(self) -> None:
        out = self.out
        for e in reversed(self.dir_meta):  # children before parents
            parent, _, name = e.path.rpartition(b"/")
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=out.tree.dir(parent))
            except OSError as ex:
                raise out.named(ex, e.path) from None
            try:
                out.meta.apply(e, fd, out.tree.dir(parent), name)
            finally:
                os.close(fd)

    def last_flags(self) -> None:
        """i and a, after everything else: nothing can be written, renamed,
        linked or given times once they are set."""
        out = self.out
        for e in self.last:
            parent, _, name = e.path.rpartition(b"/")
            if e.kind == fmt.K_REG:
                if e.id not in out.placer.placed:
                    continue  # not restored (its data failed, or it was left out)
                parent, name = out.placer.placed[e.id]
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC \
                | (os.O_DIRECTORY if e.kind == fmt.K_DIR else 0)
            try:
                fd = os.open(name, flags, dir_fd=out.tree.dir(parent))
            except OSError as ex:
                raise out.named(ex, e.path) from None
            try:
                out.meta.iflags.set(fd, e, fmt.IFLAGS_LAST)
            finally:
                os.close(fd)


def _unlink(dfd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
