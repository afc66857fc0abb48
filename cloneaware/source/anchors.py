"""Anchors: the point-in-time clones of a backup, kept on the source
filesystems so that the next backup can prove what did not change
(docs/REPOSITORY.md, "Anchors").

    <mount>/.cloneaware-anchors/CLONEAWARE-ANCHORS                 the marker
    <mount>/.cloneaware-anchors/<repo id>/<set>/<snapshot id>/<entry id>
    <mount>/.cloneaware-anchors/<repo id>/<set>/<snapshot id>/ANCHORS
    <mount>/.cloneaware-anchors/<repo id>/<set>/new-<pid>-<hex>/    being made

An anchor is trusted only while its inode, size, mtime and ctime are those
recorded in ANCHORS when it was linked: any write to it changes its ctime.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from cloneaware import native
from cloneaware.safeio import DIR_FLAGS, pid_alive
from cloneaware.source.walk import ANCHOR_DIR, ANCHOR_MARKER

DIRNAME = ANCHOR_DIR
MARKER = ANCHOR_MARKER
MARKER_TEXT = (b"This directory holds cloneaware's anchors: point-in-time clones of backed-up\n"
               b"files, kept so that the next backup reads only what changed.  They share\n"
               b"their blocks with the live files and cost about what changed since the last\n"
               b"backup.  Removing this directory is safe: the next backup reads every file.\n")
STAGING = re.compile(r"\Anew-(\d+)-[0-9a-f]{8}\Z")
SNAP = re.compile(r"\A[0-9a-f]{64}\Z")
RECORD = "ANCHORS"


def set_key(hostname: str, paths: list[str]) -> str:
    """The backup set: the same PATHs from the same host."""
    return hashlib.sha256(json.dumps([hostname, sorted(paths)]).encode()).hexdigest()[:16]


def _unescape(s: str) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes((int(m.group(1), 8),)), s.encode())


class Mounts:
    """Mount points from /proc/self/mountinfo, longest first."""

    def __init__(self) -> None:
        points = []
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 4:
                        points.append(_unescape(fields[4]))
        except OSError:
            points = [b"/"]
        self.points = sorted(set(points), key=len, reverse=True)
        self._cache: dict[bytes, bytes] = {}

    def top(self, directory: bytes) -> bytes:
        """The mount point that holds ``directory`` (resolved)."""
        got = self._cache.get(directory)
        if got is not None:
            return got
        real = os.path.realpath(directory)
        for p in self.points:
            if real == p or real.startswith(p.rstrip(b"/") + b"/"):
                break
        else:
            p = b"/"
        self._cache[directory] = p
        return p

    def under(self, root: bytes) -> list[bytes]:
        """Mount points at or below ``root`` (resolved)."""
        real = os.path.realpath(root).rstrip(b"/") + b"/"
        return [p for p in self.points if (p.rstrip(b"/") + b"/").startswith(real)]


@dataclass
class Anchor:
    entry_id: int
    fd: int  # open, read-only
    path: bytes


class AnchorSets:
    """The anchors of one backup set on this host: those of the parent
    snapshot (to prove), and those being made (to keep)."""

    def __init__(self, repo_id: str, key: str, warn: Callable[[str], None]):
        self.repo_id = repo_id
        self.key = key
        self.warn = warn
        self.mounts = Mounts()
        self._staging: dict[bytes, tuple[int, bytes, list[str]]] = {}  # top -> (fd, path, records)
        self._unusable: set[bytes] = set()  # tops where no anchor can be made

    def set_dir(self, top: bytes) -> bytes:
        return os.path.join(top, DIRNAME, self.repo_id.encode(), self.key.encode())

    def tops(self, roots: list[bytes]) -> list[bytes]:
        """The mounts where this set's files (and anchors) are."""
        out: list[bytes] = []
        for r in roots:
            d = r if os.path.isdir(r) else os.path.dirname(r)
            for t in [self.mounts.top(d), *self.mounts.under(d)]:
                if t not in out:
                    out.append(t)
        return out

    # -- the parent's anchors ---------------------------------------------------------

    def previous(self, tops: list[bytes], parent: str | None, alive: set[str],
                 tidy: bool = True) -> list[Anchor]:
        """Open the anchors of snapshot ``parent`` that are untouched; with
        ``tidy``, delete what is left of killed backups and of snapshots no
        longer in the repository (``alive``: its snapshot ids)."""
        out: list[Anchor] = []
        for top in tops:
            d = self.set_dir(top)
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in sorted(os.fsdecode(x) for x in names):
                full = os.path.join(d, os.fsencode(n))
                m = STAGING.match(n)
                if not tidy and n != parent:
                    continue
                if m and not pid_alive(int(m.group(1))):
                    shutil.rmtree(full, ignore_errors=True)
                elif SNAP.match(n) and n != parent and n not in alive:
                    shutil.rmtree(full, ignore_errors=True)  # its snapshot was forgotten
                elif n == parent:
                    out += self._open(full)
        return out

    def _open(self, d: bytes) -> list[Anchor]:
        try:
            with open(os.path.join(d, RECORD.encode())) as f:
                lines = f.read(64 << 20).splitlines()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not text"
            self.warn(f"{os.fsdecode(d)}: its {RECORD} record cannot be read ({why}); the "
                      "files of the last backup are read again")
            return []
        out = []
        bad = 0
        for line in lines:
            try:
                eid, ino, size, mtime, ctime = (int(x) for x in line.split())
            except ValueError:
                bad += 1
                continue
            p = os.path.join(d, str(eid).encode())
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME)
            except OSError:
                bad += 1
                continue
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (ino, size, mtime,
                                                                          ctime):
                os.close(fd)
                bad += 1  # written since it was made: it proves nothing
                continue
            out.append(Anchor(eid, fd, p))
        if bad:
            self.warn(f"{os.fsdecode(d)}: {bad} anchor{'s' if bad > 1 else ''} changed or "
                      "missing since the last backup; those files are read again")
        return out

    # -- the new anchors ------------------------------------------------------------------

    def staging(self, top: bytes) -> int | None:
        """A directory on mount ``top`` where clones to keep are made."""
        got = self._staging.get(top)
        if got is not None:
            return got[0]
        if top in self._unusable:
            return None
        base = os.path.join(top, DIRNAME)
        try:
            os.makedirs(self.set_dir(top), mode=0o700, exist_ok=True)
            marker = os.path.join(base, MARKER)
            if not os.path.exists(marker):
                with open(marker, "wb") as f:
                    f.write(MARKER_TEXT)
            path = os.path.join(self.set_dir(top),
                                b"new-%d-%s" % (os.getpid(), secrets.token_hex(4).encode()))
            os.mkdir(path, 0o700)
            fd = os.open(path, DIR_FLAGS)
        except OSError as e:
            self._unusable.add(top)
            self.warn(f"{os.fsdecode(base)}: cannot keep anchors there ({e.strerror}); the "
                      "next backup of its files falls back to the metadata rule")
            return None
        self._staging[top] = (fd, path, [])
        return fd

    def keep(self, top: bytes, entry_id: int, fd: int, captured: bool) -> bool:
        """Keep ``fd`` as the anchor of entry ``entry_id``: link the clone
        (``captured``), or clone ``fd`` first (a file read from a snapshot)."""
        dfd = self.staging(top)
        if dfd is None:
            return False
        name = str(entry_id).encode()
        tfd = None
        try:
            if not captured:
                tfd = os.open(b".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o400, dir_fd=dfd)
                native.ficlone(tfd, fd)
                fd = tfd
            os.fchmod(fd, 0o400)
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EOPNOTSUPP, errno.EXDEV,
                           errno.EACCES, errno.EPERM, errno.EINVAL):
                return False
            raise
        finally:
            if tfd is not None:
                os.close(tfd)
        self._staging[top][2].append(
            f"{entry_id} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}")
        return True

    def commit(self, snapshot_id: str) -> None:
        """The snapshot is written: its anchors take its name and replace the
        set's older ones."""
        for top, (fd, path, records) in self._staging.items():
            rec = os.open(RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=fd)
            try:
                os.write(rec, ("\n".join(records) + "\n").encode())
                os.fsync(rec)
            finally:
                os.close(rec)
            os.fsync(fd)
            os.close(fd)
            final = os.path.join(self.set_dir(top), snapshot_id.encode())
            os.rename(path, final)
            for n in os.listdir(self.set_dir(top)):
                if SNAP.match(os.fsdecode(n)) and os.fsdecode(n) != snapshot_id:
                    shutil.rmtree(os.path.join(self.set_dir(top), n), ignore_errors=True)
        self._staging.clear()

    def abort(self) -> None:
        for _fd, path, _r in self._staging.values():
            os.close(_fd)
            shutil.rmtree(path, ignore_errors=True)
        self._staging.clear()


def drop_snapshots(repo_id: str, tops: list[bytes], snapshot_ids: set[str]) -> int:
    """Delete the anchors of these snapshots on these mounts (forget)."""
    n = 0
    for top in tops:
        base = os.path.join(top, DIRNAME, repo_id.encode())
        try:
            sets = os.listdir(base)
        except OSError:
            continue
        for s in sets:
            for sid in snapshot_ids:
                d = os.path.join(base, s, sid.encode())
                if os.path.isdir(d):
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
    return n
