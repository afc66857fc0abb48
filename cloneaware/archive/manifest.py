"""The manifest of a sparse thin backup (``backup --base BASE --sparse``).

The sparse file holds the clone's derivative data at its own offsets and
holes where the clone shares with its base; its references and hashes
travel with it as a *manifest*: an ordinary archive (docs/FORMAT.md) whose
EXTERNAL records say "these bytes are in the sparse file at the same
offset".  The manifest is stored in the sparse file's
``user.cloneaware.manifest`` xattr when the filesystem takes it, otherwise
beside it as ``<file>.cloneaware``.  backup/sinks.py writes it; this module
finds and opens it for readers.
"""
from __future__ import annotations

import io
import os
import stat

from cloneaware.archive import format as fmt
from cloneaware.errors import ArchiveError

XATTR = "user.cloneaware.manifest"
SIDECAR = ".cloneaware"
#: The largest manifest we try to put in an xattr (XFS and ext4 take 64 KiB
#: values; Btrfs about 16 KiB, and says E2BIG/ENOSPC beyond).
XATTR_MAX = 60 << 10
#: The largest sidecar manifest read.
SIDECAR_MAX = 64 << 20


def open_manifest(path: str) -> tuple[io.BytesIO, int] | None:
    """If ``path`` is a sparse thin backup, return (its manifest as a file
    object, a descriptor of the sparse file); if it is anything else, None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, a device: not ours
            os.close(fd)
            return None
        head = os.pread(fd, len(fmt.MAGIC), 0)
        if head in (fmt.MAGIC, fmt.MAP_MAGIC):
            os.close(fd)
            return None
        try:
            manifest: bytes | None = os.getxattr(fd, XATTR)
        except OSError:
            manifest = None
        if manifest is None:
            try:
                with open(path + SIDECAR, "rb") as f:
                    manifest = f.read(SIDECAR_MAX)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                os.close(fd)
                return None
        if not manifest.startswith(fmt.MAGIC):
            raise ArchiveError(f"{path}: its cloneaware manifest is damaged (wrong magic)")
        return io.BytesIO(manifest), fd
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise


def open_any(path: str):
    """(a file object of ARCHIVE, a descriptor of the sparse file or None):
    the archive itself, or the manifest of a sparse thin backup (for ls and
    verify, which read it as they read any archive)."""
    from cloneaware.archive.records import open_archive

    if path not in ("", "-"):
        got = open_manifest(path)
        if got is not None:
            return got
    return open_archive(path), None
