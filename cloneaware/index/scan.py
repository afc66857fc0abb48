"""``scan``: what a tree really occupies and how much of it is shared,
from the extent maps alone (no data is read).  The first thing a user runs."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cloneaware import fsinfo
from cloneaware.index.plan import CHECK_CANDIDATE, IndexBuilder, Plan
from cloneaware.source.mapping import (
    READING_NOTE,
    TREE_SEARCH,
    FsTable,
    Mapped,
    Skipped,
    map_tree,
)
from cloneaware.source.walk import Node


@dataclass
class ScanResult:
    plan: Plan
    files: list[Node]
    skipped: list[tuple[bytes, str]]
    filesystems: list[fsinfo.FsInfo]

    def to_json(self, families: int = 0) -> dict:
        t = self.plan.totals.as_dict()
        phys = t["physical_bytes"]
        out = {
            "totals": t,
            "saving": (t["logical_bytes"] / phys) if phys else None,
            "skipped": [{"path": os.fsdecode(p), "reason": r} for p, r in self.skipped],
            "filesystems": [{"key": i.key, "type": i.type, "block_size": i.block_size}
                            for i in self.filesystems],
        }
        if families:
            out["families"] = [self.family_info(f) for f in self.plan.families()[:families]]
        return out

    def notes(self) -> list[str]:
        """What to say once about how the totals were found."""
        t = self.plan.totals
        if TREE_SEARCH.denied is not None and t.encoded_bytes > t.encoded_exact_bytes:
            return [READING_NOTE.format(why=TREE_SEARCH.denied)]
        return []

    def family_info(self, fam: np.ndarray) -> dict:
        p = self.plan.pieces
        inside = np.isin(p["file"], fam)
        own = inside & ((p["ref_file"] < 0) | (p["check"] == CHECK_CANDIDATE))
        return {
            "files": len(fam),
            "logical_bytes": int(self.plan.sizes[fam].sum()),
            "stored_bytes": int(p["length"][own].sum()),
            "first": os.fsdecode(self.files[int(fam[0])].name),
        }


def scan(paths: list, one_file_system: bool = True,
         progress: Callable[[int], None] | None = None) -> ScanResult:
    fstab = FsTable()
    builder = IndexBuilder()
    files: list[Node] = []
    skipped: list[tuple[bytes, str]] = []
    inodes: set[tuple[int, int]] = set()
    # scan stores nothing: two PATHs may share a basename
    for item in map_tree(paths, one_file_system, unique_names=False):
        if isinstance(item, Mapped):
            node = item.node
            if node.st.st_nlink > 1:
                # another name of a file already counted: it occupies nothing
                # more and shares nothing (backup stores it as a hard link)
                key = (node.st.st_dev, node.st.st_ino)
                if key in inodes:
                    continue
                inodes.add(key)
            builder.add(fstab.number(item.fs), node.st.st_size, item.ext)
            files.append(node)
            if progress:
                progress(node.st.st_size)
        elif isinstance(item, Skipped):
            skipped.append((item.path, item.reason))
    plan = builder.build()
    return ScanResult(plan=plan, files=files, skipped=skipped, filesystems=fstab.infos)
