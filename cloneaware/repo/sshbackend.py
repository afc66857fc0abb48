"""ssh:// repositories: the objects of a repository on another host, through
``cloneaware serve`` (serve.py) over the system's ssh client.

After the request line ``{"v": 1, "op": "repo", "path": ..., "create": bool}``
and the server's status line, the channel carries requests and answers in
turn: a JSON line (at most 64 KiB), then, where its ``length`` says so, that
many bytes.  Requests: ``read`` (name, offset, length), ``write`` (name,
length, create_only; the bytes follow), ``delete``, ``list`` (dir),
``exists``, ``sync``, ``is_empty``, ``create``.  An answer is
``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "kind": ...}``.
One request is in flight at a time.
"""
from __future__ import annotations

import json
import posixpath
import threading

from cloneaware.errors import RemoteError, RepositoryError, UsageError
from cloneaware.remote.client import REQUEST_MAX, Channel, parse_url
from cloneaware.repo.backend import WHOLE_MAX, Listed, check_name

#: error kinds the server sends, as the exceptions a backend raises
KINDS = {"missing": RepositoryError, "usage": UsageError, "repository": RepositoryError}


class SshBackend:
    def __init__(self, url: str, rsh: str | None = None, create: bool = False):
        self.url = parse_url(url)
        self.where = url
        u = self.url
        self.location = (f"ssh://{u.user or ''}@{u.host}:{u.port or 22}"
                         f"{posixpath.normpath(u.path)}")
        self.ch = Channel(self.url, rsh, {"op": "repo", "path": self.url.path,
                                          "create": create})
        self.ch.status()
        self.lock = threading.Lock()

    def _call(self, req: dict, payload=b"", limit: int = 64 << 10) -> tuple[dict, bytes]:
        """One request and its answer; the answer's bytes may be at most
        ``limit`` (the other end says how many: that is checked, not
        trusted, before they are read)."""
        with self.lock:
            try:
                self.ch.stdin.write(json.dumps(req).encode() + b"\n")
                if payload:
                    self.ch.stdin.write(payload)
                self.ch.stdin.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.ch.fail()
            line = self.ch.stdout.readline(REQUEST_MAX)
            if not line:
                self.ch.fail()
            try:
                ans = json.loads(line)
            except ValueError:
                raise RemoteError(f"{self.where}: garbled answer from cloneaware serve") \
                    from None
            data = b""
            n = ans.get("length", 0) if isinstance(ans, dict) and ans.get("ok") else 0
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= limit:
                self.ch.close()
                raise RemoteError(f"{self.where}: cloneaware serve announced {n!r} bytes, "
                                  f"not 0 to {limit}")
            if n:
                data = self.ch.stdout.read(n)
                if len(data) != n:
                    self.ch.fail()
        if not ans.get("ok"):
            kind = ans.get("kind")
            if kind == "exists":
                raise FileExistsError(17, "exists", f"{self.where}/{req.get('name')}")
            raise KINDS.get(kind, RemoteError)(f"{self.where}: {ans.get('error')}")
        return ans, data

    def read(self, name: str, offset: int = 0, length: int | None = None,
             limit: int = WHOLE_MAX) -> bytes:
        check_name(name)
        data = self._call({"cmd": "read", "name": name, "offset": offset, "length": length},
                          limit=limit if length is None else length)[1]
        if length is not None and len(data) != length:
            raise RepositoryError(f"{self.where}/{name} is shorter than expected")
        return data

    def write(self, name: str, data, create_only: bool = False) -> None:
        check_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = b"".join(data)
        self._call({"cmd": "write", "name": name, "length": len(data),
                    "create_only": create_only}, data)

    def delete(self, name: str) -> None:
        check_name(name)
        self._call({"cmd": "delete", "name": name})

    def listing(self, directory: str) -> list[Listed]:
        ans, _ = self._call({"cmd": "list", "dir": directory})
        out = []
        for name, size, mtime in ans["items"]:
            check_name(name)
            out.append(Listed(name, int(size), float(mtime)))
        return out

    def exists(self, name: str) -> bool:
        check_name(name)
        return bool(self._call({"cmd": "exists", "name": name})[0]["exists"])

    def sync(self) -> None:
        self._call({"cmd": "sync"})

    def is_empty(self) -> bool:
        return bool(self._call({"cmd": "is_empty"})[0]["empty"])

    def create(self) -> None:
        self._call({"cmd": "create"})

    def close(self) -> None:
        try:
            self.ch.stdin.close()
        except OSError:
            pass
        self.ch.close()
