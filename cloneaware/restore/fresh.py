"""New directories made under a temporary name (issue 36): a directory
the restore makes new in a directory that has its final name is made as
``.cloneaware-dir-PID-XXXXXXXX``, a *fresh root*; everything below it is
made directly under its final name (no temporary name, no rename per file),
and the root gets its own name only after a syncfs, so the durability rule
holds as for single files (restore/durable.py): nothing appears under its
final path before it is complete and on disk.

A root is renamed at a checkpoint: at the end, when the run fails (after
the file being written is removed), and after ``CHECK_FILES`` files or
``CHECK_BYTES`` bytes written below roots, so that a run killed outright
(SIGKILL, a power cut) loses at most that much work; its roots are removed
by the next run (``remove_stale_temps``, the PID in the name)."""
from __future__ import annotations

import os

from cloneaware.errors import UsageError
from cloneaware.restore.durable import Placer
from cloneaware.restore.tree import Tree, temp_dir_name
from cloneaware.safeio import remove_tree


def _check_files() -> int:
    """CLONEAWARE_FRESH_FILES, if set: a positive number, or a usage error."""
    v = os.environ.get("CLONEAWARE_FRESH_FILES")
    if v is None:
        return FreshDirs.CHECK_FILES
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"CLONEAWARE_FRESH_FILES={v!r}: not a positive number of files")
    return n


class FreshDirs:
    """The fresh roots of one output, by archive path."""

    #: a checkpoint after this many files (CLONEAWARE_FRESH_FILES: fewer,
    #: to lose less to a kill; the tests use it) or bytes written below roots
    CHECK_FILES = 100_000
    CHECK_BYTES = 2 << 30

    def __init__(self, tree: Tree, placer: Placer):
        self.tree = tree
        self.placer = placer
        self.roots: dict[bytes, bytes] = {}  # path -> temporary name
        self.memo: dict[bytes, bool] = {}  # directory path -> below a root
        self.files = 0
        self.bytes = 0
        self.check_files = _check_files()

    def inside(self, parent: bytes) -> bool:
        """Whether an entry made in directory ``parent`` is below a root
        (and so made under its final name)."""
        if not self.roots:
            return False
        v = self.memo.get(parent)
        if v is None:
            p, v = parent, False
            while p:
                if p in self.roots:
                    v = True
                    break
                p = p.rpartition(b"/")[0]
            self.memo[parent] = v
        return v

    def make_root(self, path: bytes, pfd: int) -> bytes:
        """Make directory ``path`` (new, its parent final) as a root: its
        name on disk."""
        tmp = temp_dir_name()
        os.mkdir(tmp, 0o700, dir_fd=pfd)
        self.roots[path] = tmp
        self.tree.alias[path] = tmp
        self.memo.clear()
        return tmp

    def count(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes

    def due(self) -> bool:
        return self.files >= self.check_files or self.bytes >= self.CHECK_BYTES

    def place(self) -> None:
        """Every root under its own name (the caller has synced the
        filesystems); never over an existing entry unless --force."""
        for path, tmp in list(self.roots.items()):
            parent, _, name = path.rpartition(b"/")
            self.placer.place(self.tree.dir(parent), tmp, name, path)
            del self.roots[path]
            del self.tree.alias[path]
        self.memo.clear()
        self.files = self.bytes = 0

    def discard(self) -> None:
        """The run failed and its data cannot be made durable: the roots
        are removed (best effort; else the next run removes them)."""
        for path, tmp in list(self.roots.items()):
            try:
                remove_tree(self.tree.dir(path.rpartition(b"/")[0]), tmp)
            except OSError:
                pass
        self.roots.clear()
        self.tree.alias.clear()
        self.memo.clear()
