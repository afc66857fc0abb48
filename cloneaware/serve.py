"""``cloneaware serve``: the other end of ssh:// targets (the protocol is in
remote/client.py).  It serves only the operations it was started for
(--allow), only under the allowed paths, opening every path beneath its
allowed root without following symlinks, and trusts nothing it reads."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys

from cloneaware.archive.catalog import read_index
from cloneaware.errors import (
    EXIT_IO,
    EXIT_USAGE,
    ArchiveError,
    CloneawareError,
    Interrupted,
    RepositoryError,
    UsageError,
    describe_oserror,
)
from cloneaware.remote.client import OPS, PROTOCOL, REQUEST_MAX
from cloneaware.repo.backend import DIRS, LocalBackend
from cloneaware.restore import Restore
from cloneaware.safeio import DIR_FLAGS, AtomicFile, open_beneath


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

    def _open_dir(self, real: str, create: bool = False) -> int:
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
            parts = [] if rel == "." else [os.fsencode(c) for c in rel.split("/")]
            return open_beneath(fd, parts, DIR_FLAGS, create_dirs=create) if parts \
                else os.dup(fd)
        finally:
            os.close(fd)

    def _open_beneath(self, real: str) -> int:
        """A descriptor of the file or directory ``real``, reached from the
        allowed root one component at a time with O_NOFOLLOW."""
        dfd, name = self._open_parent(real)
        try:
            # O_NONBLOCK: a FIFO given as the base is refused, not waited on
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                           dir_fd=dfd)
        finally:
            os.close(dfd)

    def _open_parent(self, real: str) -> tuple[int, str]:
        """(fd of real's directory, real's name), opened as _open_dir does."""
        d, name = os.path.split(real)
        return self._open_dir(d), name

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
            if op == "repo" and op not in self.allow and "repo-append" in self.allow:
                op = "repo-append"  # the client asks for a repository; it gets append-only
            if op not in self.allow:
                raise UsageError(f"operation {op!r} is not allowed here")
            real = self._inside(path)
            if op == "put":
                return self._put(stdin, stdout, real, bool(req.get("force")))
            if op == "get":
                return self._get(stdout, real)
            if op in ("repo", "repo-append"):
                return self._repo(stdin, stdout, real, bool(req.get("create")))
            return self._restore(stdin, stdout, real, req)
        except CloneawareError as e:
            return self._reply(stdout, False, str(e), e.exit_code)
        except OSError as e:
            return self._reply(stdout, False, describe_oserror(e), EXIT_IO)

    def _reply(self, stdout, ok: bool, error: str = "", code: int = 0, **kw) -> int:
        msg = {"ok": ok, **kw}
        if not ok:
            msg.update(error=error, code=code)
        stdout.write(json.dumps(msg).encode() + b"\n")
        stdout.flush()
        return 0 if ok else code

    def _put(self, stdin, stdout, real: str, force: bool) -> int:
        dfd, name = self._open_parent(real)
        try:
            try:
                os.lstat(name, dir_fd=dfd)
                if not force:
                    raise UsageError(f"{real} exists; use --force to overwrite it")
            except FileNotFoundError:
                pass
            with AtomicFile(name, dir_fd=dfd, replace=force, display=real, read=True) as out:
                total = 0
                while True:
                    b = stdin.read1(1 << 20) if hasattr(stdin, "read1") else stdin.read(1 << 20)
                    if not b:
                        break
                    out.write(b)
                    total += len(b)
                out.flush()
                os.fsync(out.fd)
                with os.fdopen(os.dup(out.fd), "rb") as f:
                    try:
                        read_index(f)  # a whole footer and index, or this is not an archive
                    except ArchiveError as e:
                        raise ArchiveError(f"the stream ended without a whole archive ({e}); "
                                           "nothing was kept") from None
                out.commit(0o600)
            return self._reply(stdout, True, bytes=total, path=real)
        finally:
            os.close(dfd)

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

    def _repo(self, stdin, stdout, real: str, create: bool) -> int:
        """Serve a repository's objects (repo/sshbackend.py has the protocol)."""
        if create:
            parent, name = os.path.split(real)
            pfd = self._open_dir(parent, create=True)
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                pass
            finally:
                os.close(pfd)
        root = self._open_dir(real)
        backend = LocalBackend(real, real, root_fd=root,
                               append_only="repo" not in self.allow, check_names=True)
        try:
            self._reply(stdout, True)
            return RepoServer(backend, stdin, stdout).run()
        finally:
            backend.close()

    def _restore(self, stdin, stdout, real: str, req: dict) -> int:
        """Restore the stream into ``real``.  The base of a thin archive is
        opened beneath the allowed root without following symlinks (a path
        checked as a string could be swapped for a symlink before it is
        opened), and every byte cloned from it is hashed: --trust-base is
        the user's choice on their own host, never a remote client's."""
        base = req.get("base")
        if base is not None:
            if not isinstance(base, str):
                raise UsageError("bad base path")
            base = self._inside(base)
        s = Restore(stdin, real, force=bool(req.get("force")), base=base, trust_base=False,
                    warn=lambda m: sys.stderr.write(f"cloneaware serve: {m}\n"),
                    open_dest=lambda: self._open_dir(real, create=True),
                    open_base_at=self._open_beneath).run()
        d = s.as_dict()
        return self._reply(stdout, True, summary=d)


class RepoServer:
    """Requests on the channel, answered by a LocalBackend below the root."""

    def __init__(self, backend: LocalBackend, stdin, stdout):
        self.b = backend
        self.stdin = stdin
        self.stdout = stdout

    def _answer(self, ans: dict, data: bytes = b"") -> None:
        if data:
            ans["length"] = len(data)
        self.stdout.write(json.dumps(ans).encode() + b"\n")
        if data:
            self.stdout.write(data)
        self.stdout.flush()

    def run(self) -> int:
        while True:
            line = self.stdin.readline(REQUEST_MAX)
            if not line:
                return 0
            try:
                req = json.loads(line)
                cmd = req["cmd"]
            except (ValueError, KeyError, TypeError):
                self._answer({"ok": False, "error": "bad request", "kind": "usage"})
                return EXIT_USAGE
            payload = b""
            if cmd == "write":
                n = req.get("length")
                if not isinstance(n, int) or not 0 <= n <= (4 << 30):
                    self._answer({"ok": False, "error": "bad length", "kind": "usage"})
                    return EXIT_USAGE
                payload = self.stdin.read(n)
                if len(payload) != n:
                    return EXIT_IO
            try:
                self._do(cmd, req, payload)
            except FileExistsError:
                self._answer({"ok": False, "error": f"{req.get('name')} exists",
                              "kind": "exists"})
            except RepositoryError as e:
                self._answer({"ok": False, "error": str(e), "kind": "missing"})
            except UsageError as e:
                self._answer({"ok": False, "error": str(e), "kind": "usage"})
            except OSError as e:
                self._answer({"ok": False, "error": describe_oserror(e), "kind": "io"})

    def _do(self, cmd: str, req: dict, payload: bytes) -> None:
        b = self.b
        if cmd == "read":
            off, n = req.get("offset", 0), req.get("length")
            if not isinstance(off, int) or off < 0 or (n is not None and (
                    not isinstance(n, int) or not 0 <= n <= (1 << 30))):
                raise UsageError("bad range")
            name = req.get("name")
            if not isinstance(name, str):
                raise UsageError("bad name")
            self._answer({"ok": True}, b.read(name, off, n))
        elif cmd == "write":
            b.write(req["name"], payload, bool(req.get("create_only")))
            self._answer({"ok": True})
        elif cmd == "delete":
            b.delete(req["name"])
            self._answer({"ok": True})
        elif cmd == "list":
            d = req.get("dir")
            if d not in DIRS:
                raise UsageError("bad directory")
            self._answer({"ok": True, "items": [[o.name, o.size, o.mtime]
                                                for o in b.listing(d)]})
        elif cmd == "exists":
            self._answer({"ok": True, "exists": b.exists(req["name"])})
        elif cmd == "sync":
            b.sync()
            self._answer({"ok": True})
        elif cmd == "is_empty":
            self._answer({"ok": True, "empty": b.is_empty()})
        elif cmd == "create":
            b.create()
            self._answer({"ok": True})
        else:
            raise UsageError(f"unknown request {cmd!r}")


def serve(restrict: list[str], allow: list[str]) -> int:
    def stop(signum, frame):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed channel is an EPIPE we report
    return Server(restrict, allow).handle(sys.stdin.buffer, sys.stdout.buffer)
