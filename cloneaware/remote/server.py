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

from cloneaware.archive.reader import read_index
from cloneaware.errors import (
    EXIT_IO,
    EXIT_USAGE,
    ArchiveError,
    CloneawareError,
    Interrupted,
    UsageError,
    describe_oserror,
)
from cloneaware.remote.client import OPS, PROTOCOL, REQUEST_MAX
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
                out.commit(0o644)
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

    def _restore(self, stdin, stdout, real: str, req: dict) -> int:
        base = req.get("base")
        if base is not None:
            base = self._inside(base)
        s = Restore(stdin, real, force=bool(req.get("force")), base=base,
                    trust_base=bool(req.get("trust_base")),
                    warn=lambda m: sys.stderr.write(f"cloneaware serve: {m}\n"),
                    open_dest=lambda: self._open_dir(real, create=True)).run()
        d = s.as_dict()
        d["not_exact"] = [{"path": p, "reason": r} for p, r in s.not_exact]
        return self._reply(stdout, True, summary=d)


def serve(restrict: list[str], allow: list[str]) -> int:
    def stop(signum, frame):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed channel is an EPIPE we report
    return Server(restrict, allow).handle(sys.stdin.buffer, sys.stdout.buffer)
