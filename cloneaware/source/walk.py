"""Walk source trees: iterative (no recursion limit), sorted by name, never
following symlinks, staying on one filesystem unless told otherwise.

"One filesystem" is a filesystem identity (fsinfo.FsInfo.key), so Btrfs
subvolumes and snapshots inside the tree are included: they are where the
sharing is.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cloneaware import fsinfo
from cloneaware.errors import UsageError

OnError = Callable[[bytes, str], None]

#: A repository's anchors (docs/REPOSITORY.md) live in this directory, marked
#: by this file; a walk never enters it: anchors are not the user's data.
ANCHOR_DIR = b".cloneaware-anchors"
ANCHOR_MARKER = b"CLONEAWARE-ANCHORS"


@dataclass(slots=True)
class Node:
    #: archive path: relative, '/'-separated bytes, starting with the root's basename
    name: bytes
    #: source path on this host
    src: bytes
    st: os.stat_result


def root_names(paths: list, unique_names: bool = True) -> list[tuple[bytes, bytes]]:
    """(archive name, source path) per PATH argument; a path named twice is
    kept once; two paths with the same basename are refused when the names
    must be unique (an archive stores each PATH under its basename)."""
    out: list[tuple[bytes, bytes]] = []
    seen_real: set[bytes] = set()
    names: dict[bytes, bytes] = {}
    for p in paths:
        if not os.fsencode(p):
            raise UsageError("an empty PATH was given")
        src = os.path.abspath(os.fsencode(p))
        try:
            os.lstat(src)
        except OSError as e:
            raise UsageError(f"{os.fsdecode(p)}: {e.strerror}") from None
        real = os.path.realpath(src) if not os.path.islink(src) else src
        if real in seen_real:
            continue
        seen_real.add(real)
        name = os.path.basename(os.path.normpath(src))
        if name in (b"", b".", b".."):
            raise UsageError(f"{os.fsdecode(p)}: cannot name the root directory; "
                             "give a directory inside it")
        if name in names and unique_names:
            raise UsageError(
                f"{os.fsdecode(p)} and {os.fsdecode(names[name])} would both be stored "
                f"as {os.fsdecode(name)!r}")
        names[name] = src
        out.append((name, src))
    return out


def _fs_key(path: bytes, st: os.stat_result) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return fsinfo.fs_info(fd, st.st_dev, path).key
    finally:
        os.close(fd)


def walk(paths: list, on_error: OnError, one_file_system: bool = True,
         unique_names: bool = True, redirect: dict[bytes, bytes] | None = None
         ) -> Iterator[Node]:
    """Yield a Node per entry, parents before children, in sorted name order.
    ``redirect``: read the tree of a PATH (absolute) from another place (its
    snapshot), naming its entries as if read from the PATH."""
    fsinfo.forget()  # st_dev numbers may have been reused since the last walk
    for name, src in root_names(paths, unique_names):
        if redirect:
            src = redirect.get(src, src)
        try:
            st = os.lstat(src)
        except OSError as e:
            on_error(src, e.strerror or str(e))
            continue
        yield Node(name, src, st)
        if not stat.S_ISDIR(st.st_mode):
            continue
        root_key = None
        if one_file_system:
            try:
                root_key = _fs_key(src, st)
            except OSError as e:
                on_error(src, e.strerror or str(e))
                continue
        dev_ok = {st.st_dev: True}
        stack: list[tuple[bytes, bytes]] = [(name, src)]
        while stack:
            dname, dsrc = stack.pop()
            try:
                with os.scandir(dsrc) as it:
                    children = sorted(e.name for e in it)
            except OSError as e:
                on_error(dsrc, e.strerror or str(e))
                continue
            subdirs = []
            for c in children:
                csrc = dsrc + b"/" + c
                cname = dname + b"/" + c
                try:
                    cst = os.lstat(csrc)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        on_error(csrc, e.strerror or str(e))
                    continue
                if c == ANCHOR_DIR and stat.S_ISDIR(cst.st_mode) \
                        and os.path.lexists(csrc + b"/" + ANCHOR_MARKER):
                    continue
                if stat.S_ISDIR(cst.st_mode) and root_key is not None:
                    ok = dev_ok.get(cst.st_dev)
                    if ok is None:
                        try:
                            ok = _fs_key(csrc, cst) == root_key
                        except OSError:
                            ok = False
                        dev_ok[cst.st_dev] = ok
                    if not ok:
                        # the mount point itself is kept, as tar does; not its content
                        yield Node(cname, csrc, cst)
                        continue
                yield Node(cname, csrc, cst)
                if stat.S_ISDIR(cst.st_mode):
                    subdirs.append((cname, csrc))
            stack.extend(reversed(subdirs))
