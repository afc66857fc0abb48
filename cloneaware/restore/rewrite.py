"""--reshare-existing on Btrfs, once the new files are in place and the old
copies gone: the old copies' extents that the new files refer to only in
part are rewritten where it pays, so that they are released
(cloneaware/bookends.py, docs/KERNEL.md D12)."""
from __future__ import annotations

import os

from cloneaware.bookends import Bookends
from cloneaware.restore.output import RestoreSummary
from cloneaware.safeio import open_beneath


def rewrite_bookends(b: Bookends, placed: dict[int, tuple[bytes, bytes]], root: int | None,
                     s: RestoreSummary) -> None:
    """The old copies are gone, and the new files (entry id -> parent path
    and name below DEST's descriptor ``root``, as ``placed``) refer to part
    of their extents: rewrite what it pays to, counted in ``s``."""
    fds: dict[int, int] = {}
    assert root is not None

    def open_file(eid) -> int | None:
        if eid not in fds:
            parent, name = placed[eid]
            parts = [*(parent.split(b"/") if parent else []), name]
            try:  # reading must not change the atime we restored
                fds[eid] = open_beneath(root, parts,
                                        os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
            except OSError:
                return None
        return fds[eid]

    def release() -> None:
        if len(fds) > 256:
            for fd in fds.values():
                os.close(fd)
            fds.clear()

    try:
        b.run(open_file, root, release)
    finally:
        for fd in fds.values():
            os.close(fd)
    s.bookend_rewritten_bytes += b.c.rewritten_bytes
    s.bookend_released_bytes += b.c.released_bytes
    for why, n in b.c.kept.items():
        s.bookends_kept[why] = s.bookends_kept.get(why, 0) + n

