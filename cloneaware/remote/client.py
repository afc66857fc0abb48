"""ssh:// targets, the client side: spawn the system's OpenSSH client (or
--rsh / CLONEAWARE_RSH) running ``cloneaware serve`` on the other host, and
stream the archive through it.  No ssh is reimplemented here.  The server
side is serve.py.

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
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import IO

from cloneaware.archive.records import open_archive
from cloneaware.errors import EXIT_IO, RemoteError, UsageError

PROTOCOL = 1
REQUEST_MAX = 64 << 10
OPS = ("put", "get", "restore", "repo", "repo-append")
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
        # the password stays here: ssh and an --rsh command (and whatever they
        # run) are not given it
        env = {k: v for k, v in os.environ.items()
               if k not in ("CLONEAWARE_PASSWORD", "CLONEAWARE_PASSWORD_FILE")}
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  bufsize=1 << 20, env=env)
        assert self.p.stdin is not None and self.p.stdout is not None
        self.stdin: IO[bytes] = self.p.stdin
        self.stdout: IO[bytes] = self.p.stdout
        req = dict(request, v=PROTOCOL)
        try:
            self.stdin.write(json.dumps(req).encode() + b"\n")
            self.stdin.flush()  # a request/answer exchange may follow at once
        except BrokenPipeError:
            self.fail()

    def status(self) -> dict:
        line = self.stdout.readline(REQUEST_MAX)
        if not line:
            self.fail()
        try:
            st = json.loads(line)
        except ValueError:
            raise RemoteError(f"{self.url}: the remote side did not answer like "
                              f"cloneaware serve: {line[:200]!r}") from None
        if not st.get("ok"):
            raise RemoteError(f"{self.url}: {st.get('error', 'remote error')}",
                              int(st.get("code", EXIT_IO)))
        return st

    def fail(self):
        """The channel broke: report the server's own reason if it gave one."""
        try:
            self.stdin.close()
        except OSError:
            pass
        try:
            line = self.stdout.readline(REQUEST_MAX)
            st = json.loads(line) if line else None
        except (OSError, ValueError):
            st = None
        if isinstance(st, dict) and st.get("ok") is False:
            self.close()
            raise RemoteError(f"{self.url}: {st.get('error', 'remote error')}",
                              int(st.get("code", EXIT_IO)))
        try:
            rc = self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait()
        raise RemoteError(f"{self.url}: connection failed or lost (ssh exit status {rc})")

    def close(self) -> int:
        for f in (self.stdin, self.stdout):
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
    """backup -o ssh://...: an Output (backup/sinks.py) whose bytes go to
    ``cloneaware serve`` on the other host, which keeps them only if they end
    with a whole archive."""

    def __init__(self, target: str, force: bool = False, rsh: str | None = None):
        self.url = parse_url(target)
        self.ch = Channel(self.url, rsh, {"op": "put", "path": self.url.path, "force": force})
        self.result: dict = {}

    def write(self, b) -> int:
        try:
            return self.ch.stdin.write(b)
        except (BrokenPipeError, ConnectionResetError):
            self.ch.fail()
            raise  # fail() always raises

    def flush(self) -> None:
        try:
            self.ch.stdin.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.ch.fail()

    def commit(self) -> None:
        self.flush()
        try:
            self.ch.stdin.close()
        except BrokenPipeError:
            self.ch.fail()
        self.result = self.ch.status()
        self.ch.close()

    def abort(self) -> None:
        # Closing without a footer: the server discards its temporary file.
        self.ch.p.kill()
        self.ch.close()


def open_remote_archive(source: str, rsh: str | None = None):
    """restore ssh://...: a readable binary stream of the remote archive."""
    url = parse_url(source)
    ch = Channel(url, rsh, {"op": "get", "path": url.path})
    try:
        ch.stdin.close()
    except OSError:
        pass
    ch.status()
    return _RemoteReader(ch)


class _RemoteReader:
    def __init__(self, ch: Channel):
        self.ch = ch

    def read(self, n: int = -1) -> bytes:
        return self.ch.stdout.read(n)

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.ch.close()


def push_restore(archive: str, dest: str, force: bool, base: str | None, trust_base: bool,
                 rsh: str | None = None) -> dict:
    """restore ARCHIVE ssh://host/DEST: stream the archive to the other host,
    which restores it (and re-creates the sharing) on its own filesystem."""
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
                ch.stdin.write(b)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server stopped reading: its status line says why
        try:
            ch.stdin.close()
        except OSError:
            pass
        return ch.status()
    finally:
        if archive != "-":
            src.close()
        ch.close()
