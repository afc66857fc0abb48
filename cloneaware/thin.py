"""The sparse form of a thin backup (``backup --base BASE --sparse``).

The output is a sparse file of the clone's size holding the clone's
derivative data at its own offsets and holes where the clone shares with its
base, so that ordinary tools can inspect it and it costs only the derivative
data on disk.  Its references and hashes travel with it as a *manifest*: an
ordinary archive (docs/FORMAT.md) whose EXTERNAL records say "these bytes are
in the sparse file at the same offset".  The manifest is stored in the
sparse file's ``user.cloneaware.manifest`` xattr when the filesystem takes
it, and otherwise beside it as ``<file>.cloneaware``.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import secrets
import stat

from cloneaware.archive import format as fmt
from cloneaware.backup import Backup
from cloneaware.errors import ArchiveError, UsageError

XATTR = "user.cloneaware.manifest"
SIDECAR = ".cloneaware"
#: The largest manifest we try to put in an xattr (XFS and ext4 take 64 KiB
#: values; Btrfs about 16 KiB, and says E2BIG/ENOSPC beyond).
XATTR_MAX = 60 << 10


class _SparseOutput:
    def __init__(self, target: str, size: int, force: bool):
        if target == "-":
            raise UsageError("--sparse writes a file; it cannot go to standard output")
        if os.path.lexists(target) and not force:
            raise UsageError(f"{target} exists; use --force to overwrite it")
        d = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(d):
            raise UsageError(f"{d}: no such directory")
        self.target = target
        self.tmp = os.path.join(d, f".{os.path.basename(target)}.{secrets.token_hex(4)}.partial")
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)
        self.f = io.BytesIO()  # the manifest
        self.sidecar = False

    def size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512 + (len(self.f.getvalue()) if self.sidecar
                                                    else 0)

    def commit(self) -> None:
        manifest = self.f.getvalue()
        side = self.target + SIDECAR
        self.sidecar = True
        if len(manifest) <= XATTR_MAX:
            try:
                os.setxattr(self.fd, XATTR, manifest)
                self.sidecar = False
            except OSError as e:
                if e.errno not in (errno.E2BIG, errno.ENOSPC, errno.ERANGE, errno.ENOTSUP,
                                   errno.EPERM):
                    raise
        if self.sidecar:
            tmp = side + ".partial"
            with open(tmp, "wb") as f:
                f.write(manifest)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, side)
        elif os.path.lexists(side):
            os.unlink(side)  # a stale sidecar of an older backup would shadow nothing, but
            # it would confuse a reader of the directory
        os.fsync(self.fd)
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.target)
        self.tmp = None

    def abort(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None
        try:
            os.close(self.fd)
        except OSError:
            pass


class SparseBackup(Backup):
    def __init__(self, paths: list, output: str, **kw):
        if kw.get("base") is None:
            raise UsageError("--sparse needs --base")
        if len(paths) != 1:
            raise UsageError("--sparse takes exactly one clone file")
        try:
            st = os.stat(paths[0], follow_symlinks=False)
        except OSError as e:
            raise UsageError(f"{paths[0]}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"--sparse takes a regular file; {paths[0]} is not one")
        super().__init__(paths, output, **kw)

    def _output(self, items):
        size = next(i.node.st.st_size for i in items if i.kind == "file")
        self.out = _SparseOutput(self.output, size, self.force)
        return self.out

    def _data_job(self, chunker):
        return chunker.hash_job

    def _sha_of(self, result) -> bytes:
        return result[0]

    def _emit_data(self, w, fd: int, offset: int, length: int, result) -> bool:
        """Put derivative data into the sparse file at its own offset (reflinked
        by copy_file_range where the filesystem can) and describe it by an
        EXTERNAL record with its hash."""
        sha, got = result
        out = self.out.fd
        done = 0
        while done < got:
            n = os.copy_file_range(fd, out, got - done, offset + done, offset + done)
            if n == 0:
                break
            done += n
        w.external(offset, length, sha)
        s = self.summary
        s.stored_bytes += length
        s.bytes_read += got
        if self.progress:
            self.progress.advance(length)
        return done < length


def open_manifest(path: str):
    """For ``restore``: if ``path`` is a sparse thin backup, return (manifest
    file object, fd of the sparse file); else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, len(fmt.MAGIC), 0)
        if head == fmt.MAGIC:
            os.close(fd)
            return None
        try:
            manifest = os.getxattr(fd, XATTR)
        except OSError:
            manifest = None
        if manifest is None:
            try:
                with open(path + SIDECAR, "rb") as f:
                    manifest = f.read(64 << 20)
            except FileNotFoundError:
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


def sha256_range(fd: int, offset: int, length: int) -> bytes:
    h = hashlib.sha256()
    pos = offset
    end = offset + length
    while pos < end:
        b = os.pread(fd, min(4 << 20, end - pos), pos)
        if not b:
            break
        h.update(b)
        pos += len(b)
    return h.digest()
