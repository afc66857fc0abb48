"""Patterns that pick entries by path: ``backup --exclude`` and ``restore
--include``, gitignore-style (README.md, "Choosing what is backed up and
restored").

- ``*`` matches any run of characters but '/', ``?`` one character but '/',
  ``[...]`` one of a set (``[!...]`` one not in it), ``**`` any number of
  whole components (``**/cache``, ``logs/**``, ``a/**/b``).
- A pattern without a '/' (or with one only at its end) matches an entry's
  name at any depth: ``cache``, ``*.tmp``.
- A pattern with a '/' inside is matched against the whole path as ``ls``
  shows it (the PATH's basename first): ``tree/vm/*.img``.  For ``--exclude``,
  one that starts with '/' is matched against the absolute path on this
  host instead: ``/home/u/Downloads``.
- A pattern ending in '/' matches only directories.
- An entry that matches takes everything below it along: an excluded
  directory is not entered, an included one is restored whole.

Names are bytes; patterns are given as the shell gives them (os.fsencode)."""
from __future__ import annotations

import os
import re

from cloneaware.errors import UsageError

#: the signature a CACHEDIR.TAG begins with (https://bford.info/cachedir/)
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


def _component_regex(glob: bytes, pattern: str) -> bytes:
    out = b""
    i = 0
    while i < len(glob):
        c = glob[i:i + 1]
        if c == b"*":
            out += b"[^/]*"
        elif c == b"?":
            out += b"[^/]"
        elif c == b"[":
            j = glob.find(b"]", i + 2 if glob[i + 1:i + 2] in (b"!", b"^") else i + 1)
            if j < 0:
                raise UsageError(f"pattern {pattern!r}: '[' without its ']'")
            body = glob[i + 1:j]
            if body[:1] in (b"!", b"^"):
                body = b"^" + body[1:]
            out += b"[" + body.replace(b"\\", b"\\\\") + b"]"
            i = j
        elif c == b"\\" and i + 1 < len(glob):
            out += re.escape(glob[i + 1:i + 2])
            i += 1
        else:
            out += re.escape(c)
        i += 1
    return out


class Pattern:
    def __init__(self, text: str):
        self.text = text
        raw = os.fsencode(text)
        if not raw or raw in (b"/", b"!"):
            raise UsageError(f"empty pattern {text!r}")
        self.dir_only = raw.endswith(b"/")
        raw = raw.rstrip(b"/")
        self.absolute = raw.startswith(b"/")
        body = raw.lstrip(b"/")
        self.anchored = self.absolute or b"/" in body
        parts = body.split(b"/")
        rx = []
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            if part == b"**":
                rx.append(b"(?:[^/]+/)*" if not last else b"(?:[^/]+(?:/[^/]+)*)?")
            else:
                rx.append(_component_regex(part, text) + (b"" if last else b"/"))
        full = b"".join(rx)
        if rx and parts[-1] == b"**":
            full = full[:-len(rx[-1])].rstrip(b"/") + b"(?:/.*)?" if len(parts) > 1 else b".*"
        lead = b"/" if self.absolute else b""
        self.rx = re.compile(lead + full + b"\\Z", re.S)

    def matches(self, path: bytes, abs_path: bytes | None, is_dir: bool) -> bool:
        """``path`` as ls shows it (relative), ``abs_path`` on this host."""
        if self.dir_only and not is_dir:
            return False
        if self.absolute:
            return abs_path is not None and self.rx.match(abs_path) is not None
        if self.anchored:
            return self.rx.match(path) is not None
        return self.rx.match(path.rpartition(b"/")[2]) is not None


class Patterns:
    def __init__(self, texts: list[str]):
        self.patterns = [Pattern(t) for t in texts]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def match(self, path: bytes, abs_path: bytes | None = None, is_dir: bool = False) -> bool:
        return any(p.matches(path, abs_path, is_dir) for p in self.patterns)


class Chooser:
    """Entries in archive order (a directory before what is below it), as
    ``--include`` and ``ls`` choose them: one a pattern matches, and
    everything below a directory chosen."""

    def __init__(self, patterns: Patterns):
        self.patterns = patterns
        self.inside: set[bytes] = set()  # directories chosen (their trees come along)

    def take(self, path: bytes, is_dir: bool) -> bool:
        if path.rpartition(b"/")[0] in self.inside or self.patterns.match(path, None, is_dir):
            if is_dir:
                self.inside.add(path)
            return True
        return False


def read_list(path: str, what: str) -> list[str]:
    """The lines of --exclude-from or --files-from FILE ('-': standard
    input): blank lines and lines starting with '#' are left out."""
    import sys

    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    out = []
    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        if line and not line.startswith(b"#"):
            out.append(os.fsdecode(line))
    return out


class Exclusions:
    """What a backup leaves out: --exclude patterns, and with --exclude-caches
    the content of every directory holding a CACHEDIR.TAG (the directory and
    its tag are kept, as tar and restic keep them).  ``count`` is how many
    entries were left out (a directory counts once, whatever is in it)."""

    def __init__(self, patterns: list[str] | None = None, caches: bool = False):
        self.patterns = Patterns(patterns or [])
        self.caches = caches
        self.count = 0

    def __bool__(self) -> bool:
        return bool(self.patterns) or self.caches

    def skip(self, name: bytes, src: bytes, is_dir: bool) -> bool:
        if self.patterns and self.patterns.match(name, src, is_dir):
            self.count += 1
            return True
        return False

    def cache_children(self, dfd: int, children: list[bytes]) -> list[bytes]:
        """The children of a directory to walk: all, or for a cache directory
        only its CACHEDIR.TAG."""
        if not self.caches or b"CACHEDIR.TAG" not in children:
            return children
        try:
            fd = os.open(b"CACHEDIR.TAG", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, dir_fd=dfd)
        except OSError:
            return children
        try:
            head = os.read(fd, len(CACHEDIR_SIGNATURE))
        except OSError:
            return children
        finally:
            os.close(fd)
        if head != CACHEDIR_SIGNATURE:
            return children
        self.count += len(children) - 1
        return [b"CACHEDIR.TAG"]
