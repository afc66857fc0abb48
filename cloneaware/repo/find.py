"""``find``: the entries of every snapshot whose path a pattern matches (as
``--include`` takes patterns: a name at any depth, or a path with a ``/``),
with the snapshot, the entry's type, size and mtime.  Each snapshot's
manifest is listed from its index (no file data read), and only the
entries that match are decoded for their mtime."""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from cloneaware.archive import format as fmt
from cloneaware.archive.catalog import entry_at, read_index
from cloneaware.patterns import Patterns
from cloneaware.repo.repository import Repository
from cloneaware.repo.snapshots import Snapshot


@dataclass
class Found:
    snapshot: Snapshot
    path: bytes
    kind: int
    size: int
    mtime_ns: int


def find(repo: Repository, snaps: list[Snapshot], patterns: list[str]) -> Iterator[Found]:
    """What each of ``snaps`` (in the order given) holds that ``patterns``
    match, in archive order."""
    pats = Patterns(patterns)
    for s in snaps:
        f = io.BytesIO(repo.manifest(s))
        listing = read_index(f)
        v = listing.header.version
        sizes: dict[int, int] | None = None  # id -> size, made at a hard link's first match
        for it in listing.items:
            if pats.match(it.path, None, it.kind == fmt.K_DIR):
                e = entry_at(f, it.offset, v, it.id)
                size = it.size
                if it.kind == fmt.K_HARDLINK:  # the size of the file it links to
                    if sizes is None:
                        sizes = {x.id: x.size for x in listing.items}
                    size = sizes.get(e.link, 0)
                yield Found(s, it.path, it.kind, size, e.mtime_ns)
