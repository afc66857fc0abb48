"""The entries of a backup that hold no data: directories (with their
inode flags, and, on Btrfs, whether they are subvolumes or snapshots of a
subvolume stored earlier), symlinks, FIFOs and devices."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable

from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.backup.meta import entry_for, kind_of, read_iflags, read_xattrs
from cloneaware.backup.summary import Summary
from cloneaware.source.snapshot import SUBVOL_ROOT_INO
from cloneaware.source.walk import Node


class Others:
    """``unredirect``: with --snapshot, each snapshot's path -> the PATH it
    was taken of (a subvolume is described as the PATH is)."""

    def __init__(self, summary: Summary, unredirect: dict[bytes, bytes],
                 changed: Callable[[bytes, str], None], skip: Callable[[bytes, str], None]):
        self.s = summary
        self.unredirect = unredirect
        self.changed = changed
        self.skip = skip
        #: subvolumes stored so far, by UUID (a later snapshot of one names it)
        self.subvol_ids: dict[bytes, int] = {}
        self.uuid: bytes | None = None  # of the directory dir_info looked at last

    def entry(self, node: Node) -> fmt.Entry | None:
        """The entry of a node that is not a regular file, or None (skipped,
        or vanished: said)."""
        st = node.st
        s = self.s
        kind = kind_of(st.st_mode)
        if kind is None:
            self.skip(node.src, "unsupported file type")
            return None
        if kind == fmt.K_DIR:
            s.dirs += 1
        e = entry_for(node, kind, st)
        try:
            if kind == fmt.K_SYMLINK:
                e.target = node.readlink()
                s.symlinks += 1
            if kind in (fmt.K_CHR, fmt.K_BLK):
                e.rdev = st.st_rdev
            if kind in (fmt.K_FIFO, fmt.K_CHR, fmt.K_BLK, fmt.K_SOCK):
                s.specials += 1
            e.xattrs = read_xattrs(node.proc_path())
            if kind == fmt.K_DIR:
                self._dir_info(node, e)
        except FileNotFoundError:
            self.changed(node.src, "vanished before it was read")
            return None
        except OSError as ex:
            self.skip(node.src, ex.strerror or str(ex))
            return None
        return e

    def stored(self, e: fmt.Entry) -> None:
        """``e`` has its id: a later snapshot of it may name it."""
        if e.subvol and self.uuid is not None:
            self.subvol_ids[self.uuid] = e.id

    def _dir_info(self, node: Node, e: fmt.Entry) -> None:
        """What only a descriptor of the directory tells: its inode flags, and
        whether it is a Btrfs subvolume (read-only? a snapshot of one stored
        earlier?).  A directory that cannot be opened (no read permission)
        has none stored."""
        self.uuid = None
        try:
            fd = node.open(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except PermissionError:
            return
        try:
            e.iflags = read_iflags(fd)
            if node.st.st_ino != SUBVOL_ROOT_INO:
                return
            orig = self.unredirect.get(node.src)
            try:
                if orig is not None:  # --snapshot: say what the PATH is, not its snapshot
                    ofd = os.open(orig, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        info = native.btrfs_subvol_info(ofd, node.src)
                    finally:
                        os.close(ofd)
                else:
                    info = native.btrfs_subvol_info(fd, node.src)
            except OSError as ex:
                if ex.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    return  # inode 256 of another filesystem, or an old kernel
                raise
        finally:
            os.close(fd)
        e.subvol = fmt.SV_SUBVOLUME
        if info.flags & native.BTRFS_ROOT_SUBVOL_RDONLY:
            e.subvol |= fmt.SV_READONLY
        origin = self.subvol_ids.get(info.parent_uuid) if any(info.parent_uuid) else None
        if origin is not None:
            e.subvol |= fmt.SV_SNAPSHOT
            e.origin = origin
        self.uuid = info.uuid
