"""Anchors: the point-in-time clones of a backup, kept on the source
filesystems so that the next backup can prove what did not change
(docs/REPOSITORY.md, "Anchors").

    <mount>/.cloneaware-anchors/CLONEAWARE-ANCHORS                 the marker
    <mount>/.cloneaware-anchors/<repo id>/<set>/<snapshot id>/<entry id>
    <mount>/.cloneaware-anchors/<repo id>/<set>/<snapshot id>/ANCHORS
    <mount>/.cloneaware-anchors/<repo id>/<set>/new-<pid>-<hex>/    being made

An anchor is trusted only while its inode, size, mtime and ctime are those
recorded in ANCHORS when it was linked: any write to it changes its ctime.

The directory may sit on a filesystem other users can write to (a per-user
mount, a shared scratch filesystem).  So every step is taken through
directory descriptors without following symlinks, and the anchor directory,
its marker, each set's directories, records and anchors are used only if
they are owned by the user running the backup and writable by no one else
(said once, else); anchors are opened O_NONBLOCK and must be regular files
of one link.  The walk skips ``.cloneaware-anchors`` only at the top of a
mount, and only when it is such a directory: a user cannot hide data from
root's backups by naming a directory so.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloneaware import native
from cloneaware.safeio import lexists, pid_alive, remove_tree

#: A repository's anchors (docs/REPOSITORY.md) live in this directory at the
#: top of a mount, marked by this file; a walk never enters it there.
DIRNAME = b".cloneaware-anchors"
MARKER = b"CLONEAWARE-ANCHORS"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MARKER_TEXT = (b"This directory holds cloneaware's anchors: point-in-time clones of backed-up\n"
               b"files, kept so that the next backup reads only what changed.  They share\n"
               b"their blocks with the live files and cost about what changed since the last\n"
               b"backup.  Removing this directory is safe: the next backup reads every file.\n")
STAGING = re.compile(r"\Anew-(\d+)-[0-9a-f]{8}\Z")
SNAP = re.compile(r"\A[0-9a-f]{64}\Z")
RECORD = "ANCHORS"
#: what a set is (its repository's location, host, PATHs) and when it was
#: last renewed, for ``cloneaware anchors``
INFO = "SET"
INFO_MAX = 1 << 20


def set_key(hostname: str, paths: list[str], location: str | None = None) -> str:
    """The backup set: the same PATHs from the same host into the
    repository at the same ``location`` (a copy of a repository, which keeps
    its id, is another set: backups into it neither use nor replace the
    original's anchors).  ``location`` None: the key of versions before it
    was part of the key (what a set is adopted from)."""
    what: list = [hostname, sorted(paths)]
    if location is not None:
        what.append(location)
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


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
        self.point_set = set(self.points)
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


def ours(st: os.stat_result) -> bool:
    """Owned by the user running cloneaware, and writable by no one else."""
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def open_dir(pfd: int, name: bytes, create: bool = False) -> int | None:
    """Directory ``name`` in ``pfd``, opened without following a symlink (made
    0700 if missing and ``create``), and only if it is ours: else None.
    FileNotFoundError if it is missing (and not ``create``)."""
    try:
        fd = os.open(name, _DIR, dir_fd=pfd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        fd = os.open(name, _DIR, dir_fd=pfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return None  # a symlink or a file where a directory of ours should be
        raise
    if not ours(os.fstat(fd)):
        os.close(fd)
        return None
    return fd


def our_file(dfd: int, name: bytes | str) -> int | None:
    """A regular file of ours, of one link, in ``dfd``, opened read-only
    without following a symlink or blocking on a FIFO; else None."""
    try:
        fd = os.open(name, _FILE, dir_fd=dfd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not ours(st):
        os.close(fd)
        return None
    return fd


def open_anchor_dir(top: bytes, create: bool = False) -> tuple[int | None, str | None]:
    """(descriptor of TOP/.cloneaware-anchors, None), or (None, why it is not
    usable: it is not ours), or (None, None) where there is none (and
    ``create`` is false).  ``create`` makes it, with its marker."""
    try:
        tfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return None, e.strerror
    try:
        try:
            fd = open_dir(tfd, DIRNAME, create)
        except FileNotFoundError:
            return None, None
        except PermissionError:
            return None, "not readable by this user (another user's anchors)"
        if fd is None:
            return None, ("not a directory of this user's that no one else may write "
                          "(a symlink, or another owner or mode)")
    finally:
        os.close(tfd)
    mfd = our_file(fd, MARKER)
    if mfd is not None:
        os.close(mfd)
        return fd, None
    if lexists(fd, MARKER):  # there, but a symlink, a FIFO, another's
        os.close(fd)
        return None, "its marker is not a regular file of this user's"
    if not create:
        os.close(fd)
        return None, None
    try:
        wfd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=fd)
        try:
            os.write(wfd, MARKER_TEXT)
        finally:
            os.close(wfd)
    except OSError:
        os.close(fd)
        raise
    return fd, None


def is_anchor_dir(pfd: int, parent: bytes, st: os.stat_result, mounts: Mounts) -> bool:
    """Whether ``.cloneaware-anchors`` in directory ``pfd`` (the path
    ``parent``) is the anchors of this host, which a walk skips: at the top
    of a mount, ours, with our marker.  Anywhere else it is a user's data."""
    if not stat.S_ISDIR(st.st_mode) or not ours(st):
        return False
    if os.path.realpath(parent) not in mounts.point_set:
        return False
    try:
        fd = open_dir(pfd, DIRNAME)
    except FileNotFoundError:
        return False
    if fd is None:
        return False
    try:
        mfd = our_file(fd, MARKER)
        if mfd is None:
            return False
        os.close(mfd)
        return True
    finally:
        os.close(fd)


@dataclass
class Anchor:
    entry_id: int
    fd: int  # open, read-only
    path: bytes


class AnchorSets:
    """The anchors of one backup set on this host: those of the parent
    snapshot (to prove), and those being made (to keep)."""

    def __init__(self, repo_id: str, key: str, warn: Callable[[str], None],
                 info: dict | None = None, legacy_key: str | None = None):
        self.repo_id = repo_id
        self.key = key
        self.warn = warn
        #: written to the set's INFO file at each commit (location, host, paths)
        self.info = info or {}
        #: the key the same set had before the location was part of it: its
        #: anchors are taken over (renamed) where there is no set of this key
        self.legacy_key = legacy_key
        self.mounts = Mounts()
        #: top -> (descriptor of the set's directory, name of the one being
        #: made, its descriptor, its records)
        self._staging: dict[bytes, tuple[int, bytes, int, list[str]]] = {}
        self._unusable: set[bytes] = set()  # tops where no anchor can be made
        self._said: set[bytes] = set()
        #: top -> (descriptor of the parent's set, its records by entry id)
        self._parents: dict[bytes, tuple[int, dict[int, tuple[int, int, int, int]]]] = {}
        self._had: set[int] = set()

    def set_dir(self, top: bytes) -> bytes:
        """The set's directory on mount ``top`` (for messages)."""
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

    def _set_fd(self, top: bytes, create: bool) -> int | None:
        """The set's directory on mount ``top``, every step ours (else None,
        said once)."""
        afd, why = open_anchor_dir(top, create)
        if afd is None:
            if why is not None and top not in self._said:
                self._said.add(top)
                self.warn(f"{os.fsdecode(os.path.join(top, DIRNAME))}: {why}; anchors are "
                          "neither used nor kept there (its files are read in full)")
            return None
        try:
            rfd = open_dir(afd, self.repo_id.encode(), create)
        except FileNotFoundError:
            return None  # no anchors of this repository there yet
        finally:
            os.close(afd)
        if rfd is None:
            self._refused(top)
            return None
        if self.legacy_key and self.legacy_key != self.key:
            _adopt(rfd, self.legacy_key.encode(), self.key.encode())
        try:
            sfd = open_dir(rfd, self.key.encode(), create)
        except FileNotFoundError:
            return None
        finally:
            os.close(rfd)
        if sfd is None:
            self._refused(top)
        return sfd

    def _refused(self, top: bytes) -> None:
        if top not in self._said:
            self._said.add(top)
            self.warn(f"{os.fsdecode(self.set_dir(top))}: not a directory of this user's "
                      "that no one else may write; anchors are neither used nor kept there")

    # -- the parent's anchors ---------------------------------------------------------

    def previous(self, tops: list[bytes], parent: str | None, alive: set[str],
                 tidy: bool = True, wanted: set[int] | None = None) -> list[Anchor]:
        """Open the anchors of snapshot ``parent`` that are untouched (of
        entries ``wanted`` only, if given: the others may be carried into the
        new set, ``carry``); with ``tidy``, delete what is left of killed
        backups and of snapshots no longer in the repository (``alive``: its
        snapshot ids)."""
        out: list[Anchor] = []
        for top in tops:
            sfd = self._set_fd(top, create=False)
            if sfd is None:
                continue
            try:
                for n in sorted(os.fsdecode(x) for x in os.listdir(sfd)):
                    m = STAGING.match(n)
                    if not tidy and n != parent:
                        continue
                    if m and not pid_alive(int(m.group(1))):
                        _remove(sfd, n)
                    elif SNAP.match(n) and n != parent and n not in alive:
                        _remove(sfd, n)  # its snapshot was forgotten
                    elif n == parent:
                        out += self._open(sfd, n, os.path.join(self.set_dir(top),
                                                               n.encode()), top, wanted)
            finally:
                os.close(sfd)
        return out

    def _open(self, sfd: int, name: str, path: bytes, top: bytes,
              wanted: set[int] | None) -> list[Anchor]:
        try:
            dfd = open_dir(sfd, name.encode())
        except FileNotFoundError:
            return []
        if dfd is None:
            self.warn(f"{os.fsdecode(path)}: not a directory of this user's; the files of "
                      "the last backup are read again")
            return []
        try:
            got = self._anchors(dfd, path, top, wanted)
        except BaseException:
            os.close(dfd)
            raise
        if self._parents.get(top, (None,))[0] != dfd:
            os.close(dfd)  # else kept for carry(), until commit or abort
        return got

    def _anchors(self, dfd: int, path: bytes, top: bytes,
                 wanted: set[int] | None) -> list[Anchor]:
        rfd = our_file(dfd, RECORD)
        lines: list[str] = []
        why: str | None = "not a regular file of this user's"
        if rfd is not None:
            try:
                with os.fdopen(rfd, "rb") as f:
                    lines = f.read(64 << 20).decode().splitlines()
                why = ""
            except (OSError, UnicodeDecodeError) as e:
                why = e.strerror if isinstance(e, OSError) else "not text"
        if why:
            self.warn(f"{os.fsdecode(path)}: its {RECORD} record cannot be read ({why}); the "
                      "files of the last backup are read again")
            return []
        out = []
        bad = 0
        records: dict[int, tuple[int, int, int, int]] = {}
        for line in lines:
            try:
                eid, ino, size, mtime, ctime = (int(x) for x in line.split())
            except ValueError:
                bad += 1
                continue
            records[eid] = (ino, size, mtime, ctime)
            if wanted is not None and eid not in wanted:
                continue
            fd = our_file(dfd, str(eid).encode())
            if fd is None:
                bad += 1
                continue
            st = os.fstat(fd)
            if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (ino, size, mtime,
                                                                          ctime):
                os.close(fd)
                bad += 1  # written since it was made: it proves nothing
                continue
            out.append(Anchor(eid, fd, os.path.join(path, str(eid).encode())))
        if bad:
            self.warn(f"{os.fsdecode(path)}: {bad} anchor{'s' if bad > 1 else ''} changed or "
                      "missing since the last backup; those files are read again")
        if wanted is not None and top not in self._parents:
            self._parents[top] = (dfd, records)
            self._had.update(records)
        return out

    def had(self, entry_id: int) -> bool:
        """Whether the parent's set lists an anchor for ``entry_id``."""
        return entry_id in self._had

    def carry(self, top: bytes, old: int, new: int) -> bool:
        """Keep the parent's anchor of entry ``old`` (a file unchanged since)
        as the anchor of entry ``new``: moved into the new set, if it is
        still untouched."""
        got = self._parents.get(top)
        if got is None:
            return False
        pfd, records = got
        want = records.get(old)
        sfd = self.staging(top) if want is not None else None
        if sfd is None:
            return False
        name = str(new).encode()
        try:
            st = os.stat(str(old), dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not ours(st) \
                    or (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != want:
                return False  # written since: it proves nothing
            # Moved, not linked: removing the parent's name later would set
            # its ctime after it is recorded.  A backup that fails leaves the
            # parent without it: its file is read again (speed, not data).
            os.rename(str(old), name, src_dir_fd=pfd, dst_dir_fd=sfd)
            st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOSPC, errno.EDQUOT, errno.EMLINK,
                           errno.EACCES, errno.EPERM):
                return False
            raise
        self._staging[top][3].append(
            f"{new} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}")
        return True

    def _close_parents(self) -> None:
        for fd, _r in self._parents.values():
            os.close(fd)
        self._parents.clear()
        self._had.clear()

    # -- the new anchors ------------------------------------------------------------------

    def staging(self, top: bytes) -> int | None:
        """A directory on mount ``top`` where clones to keep are made."""
        got = self._staging.get(top)
        if got is not None:
            return got[2]
        if top in self._unusable:
            return None
        try:
            sfd = self._set_fd(top, create=True)
            if sfd is None:
                self._unusable.add(top)
                return None
            name = b"new-%d-%s" % (os.getpid(), secrets.token_hex(4).encode())
            os.mkdir(name, 0o700, dir_fd=sfd)
            fd = os.open(name, _DIR, dir_fd=sfd)
        except OSError as e:
            self._unusable.add(top)
            self.warn(f"{os.fsdecode(os.path.join(top, DIRNAME))}: cannot keep anchors there "
                      f"({e.strerror}); the next backup of its files falls back to the "
                      "metadata rule")
            return None
        self._staging[top] = (sfd, name, fd, [])
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
        self._staging[top][3].append(
            f"{entry_id} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}")
        return True

    def commit(self, snapshot_id: str) -> None:
        """The snapshot is written: its anchors take its name and replace the
        set's older ones."""
        self._close_parents()
        for sfd, name, fd, records in self._staging.values():
            try:
                rec = os.open(RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600, dir_fd=fd)
                try:
                    os.write(rec, ("\n".join(records) + "\n").encode())
                    os.fsync(rec)
                finally:
                    os.close(rec)
                os.fsync(fd)
                os.rename(name, snapshot_id.encode(), src_dir_fd=sfd, dst_dir_fd=sfd)
                _write_info(sfd, {**self.info, "snapshot": snapshot_id,
                                  "time_ns": time.time_ns()})
                os.fsync(sfd)
                for n in os.listdir(sfd):
                    if SNAP.match(os.fsdecode(n)) and os.fsdecode(n) != snapshot_id:
                        _remove(sfd, n)
            finally:
                os.close(fd)
                os.close(sfd)
        self._staging.clear()

    def abort(self) -> None:
        self._close_parents()
        for sfd, name, fd, _r in self._staging.values():
            os.close(fd)
            _remove(sfd, name)
            os.close(sfd)
        self._staging.clear()


def _adopt(rfd: int, old: bytes, new: bytes) -> None:
    """Rename set ``old`` (a key of an earlier version) to ``new`` if it is
    ours and there is no ``new``: the first location to back up the set
    after an upgrade keeps its anchors."""
    if lexists(rfd, new) or not lexists(rfd, old):
        return
    try:
        fd = open_dir(rfd, old)
    except FileNotFoundError:
        return
    if fd is None:
        return
    os.close(fd)
    try:
        os.rename(old, new, src_dir_fd=rfd, dst_dir_fd=rfd)
    except OSError:
        pass


def _write_info(sfd: int, info: dict) -> None:
    """The set's INFO file, replaced atomically (best effort: it only
    describes the set)."""
    tmp = b"%s.new-%d" % (INFO.encode(), os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=sfd)
        try:
            os.write(fd, json.dumps({"cloneaware_anchor_set": 1, **info},
                                    sort_keys=True).encode())
        finally:
            os.close(fd)
        os.rename(tmp, INFO.encode(), src_dir_fd=sfd, dst_dir_fd=sfd)
    except OSError:
        try:
            os.unlink(tmp, dir_fd=sfd)
        except OSError:
            pass


def _remove(dfd: int, name: str | bytes) -> None:
    try:
        remove_tree(dfd, os.fsencode(name))
    except OSError:
        pass


def drop_snapshots(repo_id: str, tops: list[bytes], snapshot_ids: set[str]) -> int:
    """Delete the anchors of these snapshots on these mounts (forget)."""
    n = 0
    for top in tops:
        afd, _why = open_anchor_dir(top)
        if afd is None:
            continue
        try:
            rfd = open_dir(afd, repo_id.encode())
        except FileNotFoundError:
            rfd = None
        finally:
            os.close(afd)
        if rfd is None:
            continue
        try:
            for s in os.listdir(rfd):
                try:
                    sfd = open_dir(rfd, os.fsencode(s))
                except FileNotFoundError:
                    sfd = None
                if sfd is None:
                    continue
                try:
                    for sid in snapshot_ids:
                        if lexists(sfd, sid.encode()):
                            _remove(sfd, sid)
                            n += 1
                finally:
                    os.close(sfd)
        finally:
            os.close(rfd)
    return n
