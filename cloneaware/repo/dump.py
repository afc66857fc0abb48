"""``dump -r``: one entry of a snapshot to a stream, without restoring it
(archive/tarout.py writes it).  The snapshot's manifest is read through
its index (archive/view.py): only the entries at or below PATH are
decoded, and the files' ranges.  The blobs are read ahead in the order
the output needs them (the restore's Planner and Fetcher,
repo/restore.py), each once while it is cached."""
from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from cloneaware.archive import tarout
from cloneaware.archive.view import ArchiveView, ManifestBytes
from cloneaware.repo.repository import Repository
from cloneaware.repo.restore import Fetcher, Planner
from cloneaware.repo.snapshots import Snapshot


def dump(repo: Repository, snap: Snapshot, path: str, out: BinaryIO,
         warn: Callable[[str], None] | None = None) -> tarout.DumpResult:
    """Write entry ``path`` (as ``ls`` shows it) of ``snap`` to ``out``: a
    file's bytes, anything else as a tar stream."""
    view = ArchiveView(ManifestBytes(repo.manifest(snap)), f"snapshot {snap.short_id}")
    p = tarout.pick(view, path, f"snapshot {snap.short_id}")
    repo.load_index(check_packs=True)
    planner = Planner(repo)
    for fid in tarout.data_order(p):
        for r in p.ranges[fid]:
            if r[3] >= 0:
                planner.get(r[2])
    fetcher = Fetcher(repo, planner.order, sizes=planner.sizes)
    try:
        return tarout.write(p, out, fetcher.get, warn)
    finally:
        fetcher.close()
