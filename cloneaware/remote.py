"""ssh:// targets: the client spawns the system's OpenSSH client (or --rsh /
CLONEAWARE_RSH) running ``cloneaware serve`` on the other host, and streams
the archive through it.  No ssh is reimplemented here.

Protocol, over the ssh channel (stdin/stdout of ``cloneaware serve``):

1. The client sends one request line: a JSON object, at most 64 KiB, ending
   in "\\n": ``{"v": 1, "op": "put"|"get"|"restore", "path": "...",
   "force": bool, "base": str|null, "trust_base": bool}``.
2. put: the client then sends the archive and closes its side; the server
   writes it under a temporary name, fsyncs, checks that it ends with a
   whole footer and index, renames it into place, and answers one line:
   ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "code": N}``.
3. get: the server answers a status line, then (if ok) the archive bytes.
4. restore: the client sends the archive; the server restores it into
   ``path`` and answers a status line with the restore summary.

The server is meant to be a forced command in authorized_keys::

    command="cloneaware serve --restrict-to-path /backups",restrict ssh-ed25519 AAAA...

It serves only the operations it was started for (--allow), only under the
allowed paths, and its own stdin is the only input it trusts for data.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

from cloneaware.archive.writer import WRITEBACK_STEP, start_writeback
from cloneaware.errors import (
    EXIT_RESTORE,
    EXIT_USAGE,
    ArchiveError,
    CloneawareError,
    Interrupted,
    UsageError,
)

PROTOCOL = 1
REQUEST_MAX = 64 << 10
OPS = ("put", "get", "restore")
_URL = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]]+\]|[^:/]+)(?::(?P<port>\d+))?"
                  r"(?P<path>/.*)$")


@dataclass
class Url:
    user: str | None
    host: str
    port: int | None
    path: str

    def __str__(self) -> str:
        u = f"{self.user}@" if self.user else ""
        p = f":{self.port}" if self.port else ""
        return f"ssh://{u}{self.host}{p}{self.path}"


def is_url(s: str) -> bool:
    return s.startswith("ssh://")


def parse_url(s: str) -> Url:
    m = _URL.match(s)
    if not m or not m.group("path") or m.group("path") == "/":
        raise UsageError(f"bad ssh URL {s!r}; use ssh://[user@]host[:port]/path")
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"bad port in {s!r}")
    host = m.group("host").strip("[]")
    return Url(m.group("user"), host, port, m.group("path"))


def _rsh_command(url: Url, rsh: str | None) -> list[str]:
    rsh = rsh or os.environ.get("CLONEAWARE_RSH") or "ssh"
    cmd = shlex.split(rsh)
    if url.port:
        cmd += ["-p", str(url.port)]
    cmd += [f"{url.user}@{url.host}" if url.user else url.host]
    remote = os.environ.get("CLONEAWARE_REMOTE_COMMAND", "cloneaware")
    cmd += shlex.split(remote) + ["serve"]
    return cmd


class Channel:
    """A running ssh client with our request already sent."""

    def __init__(self, url: Url, rsh: str | None, request: dict):
        self.url = url
        cmd = _rsh_command(url, rsh)
        if shutil.which(cmd[0]) is None:
            raise UsageError(f"{cmd[0]}: not found (set --rsh or CLONEAWARE_RSH)")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  bufsize=1 << 20)
        req = dict(request, v=PROTOCOL)
        try:
            self.p.stdin.write(json.dumps(req).encode() + b"\n")
        except BrokenPipeError:
            self.fail()

    def status(self) -> dict:
        line = self.p.stdout.readline(REQUEST_MAX)
        if not line:
            self.fail()
        try:
            st = json.loads(line)
        except ValueError:
            raise CloneawareError(f"{self.url}: the remote side did not answer like "
                                  f"cloneaware serve: {line[:200]!r}") from None
        if not st.get("ok"):
            err = CloneawareError(f"{self.url}: {st.get('error', 'remote error')}")
            err.exit_code = int(st.get("code", EXIT_RESTORE))
            raise err
        return st

    def fail(self):
        """The channel broke: report the server's own reason if it gave one."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            line = self.p.stdout.readline(REQUEST_MAX)
            st = json.loads(line) if line else None
        except (OSError, ValueError):
            st = None
        if isinstance(st, dict) and st.get("ok") is False:
            self.close()
            err = CloneawareError(f"{self.url}: {st.get('error', 'remote error')}")
            err.exit_code = int(st.get("code", EXIT_RESTORE))
            raise err
        try:
            rc = self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        raise CloneawareError(f"{self.url}: connection failed or lost (ssh exit status {rc})")

    def close(self) -> int:
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            return self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return self.p.wait()


class RemoteOutput:
    """backup -o ssh://...: an Output (see archive/writer.py) whose bytes go to
    ``cloneaware serve`` on the other host."""

    def __init__(self, target: str, force: bool = False, rsh: str | None = None):
        self.url = parse_url(target)
        self.ch = Channel(self.url, rsh, {"op": "put", "path": self.url.path, "force": force})
        self.f = _PipeWriter(self.ch)

    def commit(self) -> None:
        self.f.flush()
        try:
            self.ch.p.stdin.close()
        except BrokenPipeError:
            self.ch.fail()
        self.result = self.ch.status()
        self.ch.close()

    def abort(self) -> None:
        # Closing without a footer: the server discards its temporary file.
        self.ch.p.kill()
        self.ch.close()


class _PipeWriter:
    def __init__(self, ch: Channel):
        self.ch = ch

    def write(self, b) -> int:
        try:
            return self.ch.p.stdin.write(b)
        except (BrokenPipeError, ConnectionResetError):
            self.ch.fail()

    def flush(self) -> None:
        try:
            self.ch.p.stdin.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.ch.fail()


def open_remote_archive(source: str, rsh: str | None = None):
    """restore ssh://...: a readable binary stream of the remote archive."""
    url = parse_url(source)
    ch = Channel(url, rsh, {"op": "get", "path": url.path})
    try:
        ch.p.stdin.close()
    except OSError:
        pass
    ch.status()
    return _RemoteReader(ch)


class _RemoteReader:
    def __init__(self, ch: Channel):
        self.ch = ch

    def read(self, n: int = -1) -> bytes:
        return self.ch.p.stdout.read(n)

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.ch.close()


def push_restore(archive: str, dest: str, force: bool, base: str | None, trust_base: bool,
                 rsh: str | None = None) -> dict:
    """restore ARCHIVE ssh://host/DEST: stream the archive to the other host,
    which restores it (and re-creates the sharing) on its own filesystem."""
    from cloneaware.archive.reader import open_archive

    url = parse_url(dest)
    src = open_archive(archive)
    ch = Channel(url, rsh, {"op": "restore", "path": url.path, "force": force, "base": base,
                            "trust_base": trust_base})
    try:
        while True:
            b = src.read(1 << 20)
            if not b:
                break
            try:
                ch.p.stdin.write(b)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server stopped reading: its status line says why
        try:
            ch.p.stdin.close()
        except OSError:
            pass
        return ch.status()
    finally:
        if archive != "-":
            src.close()
        ch.close()


# --- the server ------------------------------------------------------------------

def _rename_noreplace(dfd: int, src: bytes, dst: bytes) -> None:
    """renameat2(RENAME_NOREPLACE) through libc: importing cloneaware.ioctl
    (numpy, the extension) for this one call would cost most of a second
    after the last byte arrived; it stays the fallback."""
    import ctypes

    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        from cloneaware import ioctl

        ioctl.renameat2(dfd, src, dfd, dst, noreplace=True)
        return
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    f.restype = ctypes.c_int
    if f(dfd, src, dfd, dst, 1) != 0:  # RENAME_NOREPLACE
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(dst))


class Server:
    def __init__(self, restrict: list[str], allow: list[str]):
        self.restrict = [os.path.realpath(p) for p in restrict]
        self.allow = allow

    def _inside(self, path: str) -> str:
        if not os.path.isabs(path) or "\0" in path:
            raise UsageError(f"{path!r}: paths must be absolute")
        norm = os.path.normpath(path)
        # Resolve the nearest existing ancestor: symlinks may not lead out.
        head, tail = norm, []
        while not os.path.lexists(head):
            head, t = os.path.split(head)
            tail.append(t)
        real = os.path.join(os.path.realpath(head), *reversed(tail))
        if self.restrict and not any(real == r or real.startswith(r.rstrip("/") + "/")
                                     for r in self.restrict):
            raise UsageError(f"{path}: outside the paths this server may use")
        return real

    def _open_beneath(self, real: str, create: bool = False) -> int:
        """A descriptor for the directory ``real``, opened from the allowed
        root one component at a time with O_NOFOLLOW (creating missing ones
        if ``create``), so that a symlink swapped in after the check in
        _inside cannot lead out."""
        roots = [r for r in self.restrict
                 if real == r or real.startswith(r.rstrip("/") + "/")] or ["/"]
        root = max(roots, key=len)
        rel = os.path.relpath(real, root)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for comp in ([] if rel == "." else rel.split("/")):
                if create:
                    try:
                        os.mkdir(comp, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError:
            os.close(fd)
            raise
        return fd

    def _open_parent(self, real: str) -> tuple[int, str]:
        """(fd of real's directory, real's name), opened as _open_beneath does."""
        d, name = os.path.split(real)
        return self._open_beneath(d), name

    def handle(self, stdin, stdout) -> int:
        line = stdin.readline(REQUEST_MAX)
        if not line.endswith(b"\n"):
            return self._reply(stdout, False, "bad request line", EXIT_USAGE)
        try:
            req = json.loads(line)
            op, path = req["op"], req["path"]
            if req.get("v") != PROTOCOL or op not in OPS or not isinstance(path, str):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self._reply(stdout, False, "bad request", EXIT_USAGE)
        try:
            if op not in self.allow:
                raise UsageError(f"operation {op!r} is not allowed here")
            real = self._inside(path)
            if op == "put":
                return self._put(stdin, stdout, real, bool(req.get("force")))
            if op == "get":
                return self._get(stdout, real)
            return self._restore(stdin, stdout, real, req)
        except CloneawareError as e:
            return self._reply(stdout, False, str(e), e.exit_code)
        except OSError as e:
            from cloneaware.errors import describe_oserror

            return self._reply(stdout, False, describe_oserror(e), EXIT_RESTORE)

    def _reply(self, stdout, ok: bool, error: str = "", code: int = 0, **kw) -> int:
        msg = {"ok": ok, **kw}
        if not ok:
            msg.update(error=error, code=code)
        stdout.write(json.dumps(msg).encode() + b"\n")
        stdout.flush()
        return 0 if ok else code

    def _put(self, stdin, stdout, real: str, force: bool) -> int:
        from cloneaware.archive.reader import read_index

        dfd, name = self._open_parent(real)
        try:
            return self._put_in(stdin, stdout, real, dfd, name, force, read_index)
        finally:
            os.close(dfd)

    def _put_in(self, stdin, stdout, real, dfd, name, force, read_index) -> int:
        try:
            os.lstat(name, dir_fd=dfd)
            if not force:
                raise UsageError(f"{real} exists; use --force to overwrite it")
        except FileNotFoundError:
            pass
        tmp = f".{name}.{secrets.token_hex(4)}.partial"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600, dir_fd=dfd)
        try:
            total = queued = 0
            with os.fdopen(fd, "r+b", closefd=False) as f:
                while True:
                    b = stdin.read1(1 << 20) if hasattr(stdin, "read1") else stdin.read(1 << 20)
                    if not b:
                        break
                    f.write(b)
                    total += len(b)
                    if total - queued >= WRITEBACK_STEP:
                        # Start writing out what arrived while more arrives, so
                        # that the fsync at the end waits for the tail only.
                        f.flush()
                        start_writeback(fd, queued, total - queued)
                        queued = total
                f.flush()
                os.fsync(fd)
                try:
                    read_index(f)  # a whole footer and index, or this is not an archive
                except ArchiveError as e:
                    raise ArchiveError(f"the stream ended without a whole archive ({e}); "
                                       "nothing was kept") from None
            os.fchmod(fd, 0o644)
            if force:
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                _rename_noreplace(dfd, os.fsencode(tmp), os.fsencode(name))
            tmp = None
            return self._reply(stdout, True, bytes=total, path=real)
        finally:
            os.close(fd)
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass

    def _get(self, stdout, real: str) -> int:
        dfd, name = self._open_parent(real)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            os.close(dfd)
        with os.fdopen(fd, "rb") as f:
            self._reply(stdout, True, size=os.fstat(fd).st_size)
            shutil.copyfileobj(f, stdout, 1 << 20)
            stdout.flush()
        return 0

    def _restore(self, stdin, stdout, real: str, req: dict) -> int:
        from cloneaware.restore import Restore

        base = req.get("base")
        if base is not None:
            base = self._inside(base)
        s = Restore(stdin, real, force=bool(req.get("force")), base=base,
                    trust_base=bool(req.get("trust_base")),
                    warn=lambda m: sys.stderr.write(f"cloneaware serve: {m}\n"),
                    open_dest=lambda: self._open_beneath(real, create=True)).run()
        d = s.as_dict()
        d["not_exact"] = [{"path": p, "reason": r} for p, r in s.not_exact]
        return self._reply(stdout, True, summary=d)


def serve(restrict: list[str], allow: list[str]) -> int:
    def stop(signum, frame):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed channel is an EPIPE we report
    return Server(restrict, allow).handle(sys.stdin.buffer, sys.stdout.buffer)
