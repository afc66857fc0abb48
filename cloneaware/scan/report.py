"""``scan``: what a tree really occupies and how much of it is shared,
from the extent maps alone (no data is read).  The first thing a user runs."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cloneaware import fsinfo
from cloneaware.errors import FileSkipped, Warnings
from cloneaware.index.plan import CHECK_CANDIDATE, IndexBuilder, Plan
from cloneaware.source.anchors import DIRNAME, Mounts, open_anchor_dir
from cloneaware.source.anchorsets import list_sets, measure_set
from cloneaware.source.mapping import (
    READING_NOTE,
    TREE_SEARCH,
    FsTable,
    Mapped,
    Skipped,
    map_tree,
)
from cloneaware.source.pinned import sum_pinned
from cloneaware.source.walk import Node


@dataclass
class AnchorUsage:
    """Anchors (docs/REPOSITORY.md) on the scanned filesystems: how many, and
    the bytes only they hold (what dropping them gives back,
    source/pinned.py); ``exact``: by the Btrfs extent tree, else a lower
    bound by FIEMAP's shared flag."""

    files: int = 0
    pinned_bytes: int = 0
    dirs: list[str] = field(default_factory=list)
    exact: bool = True


@dataclass(slots=True)
class TreeItem:
    """An entry of the walk, in walk order (``scan(tree=True)``)."""

    node: Node
    fileno: int = -1  # a regular file: its number in the plan
    link: int = -1  # a further name of a file: the number of its first name


@dataclass
class ScanResult:
    plan: Plan
    files: list[Node]
    #: what could not be mapped (FileSkipped)
    skipped: Warnings
    filesystems: list[fsinfo.FsInfo]
    anchors: AnchorUsage = field(default_factory=AnchorUsage)
    #: every entry walked, with tree=True (else empty)
    tree: list[TreeItem] = field(default_factory=list)

    def to_json(self, families: int = 0) -> dict:
        t = self.plan.totals.as_dict()
        phys = t["physical_bytes"]
        out = {
            "totals": t,
            # holes are not a saving: every tool keeps them (issue 21, defect 15)
            "hole_bytes": t["logical_bytes"] - t["data_bytes"],
            "saving": (t["data_bytes"] / phys) if phys else None,
            **self.skipped.as_json(FileSkipped),
            "filesystems": [{"key": i.key, "type": i.type, "block_size": i.block_size}
                            for i in self.filesystems],
        }
        if families:
            out["families"] = [self.family_info(f) for f in self.plan.families()[:families]]
        out["anchors"] = {"files": self.anchors.files,
                          "pinned_bytes": self.anchors.pinned_bytes,
                          "pinned_exact": self.anchors.exact,
                          "dirs": self.anchors.dirs}
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
         progress: Callable[[int], None] | None = None, tree: bool = False) -> ScanResult:
    """``tree``: also keep every entry in walk order (for a sharing map,
    scan/sharemap.py); each PATH then needs a basename of its own, as in an
    archive."""
    fstab = FsTable()
    builder = IndexBuilder()
    files: list[Node] = []
    skipped = Warnings()
    inodes: dict[tuple[int, int], int] = {}
    items: list[TreeItem] = []
    anchor_dirs = find_anchor_dirs(paths)
    # scan alone stores nothing: two PATHs may share a basename
    for item in map_tree(paths, one_file_system, unique_names=tree):
        if isinstance(item, Mapped):
            node = item.node
            if node.st.st_nlink > 1:
                # another name of a file already counted: it occupies nothing
                # more and shares nothing (backup stores it as a hard link)
                key = (node.st.st_dev, node.st.st_ino)
                if key in inodes:
                    if tree:
                        items.append(TreeItem(node, link=inodes[key]))
                    continue
                inodes[key] = len(files)
            fs = fstab.number(item.fs)
            fileno = builder.add(fs, node.st.st_size, item.ext)
            files.append(node)
            if tree:
                items.append(TreeItem(node, fileno))
            if progress:
                progress(node.st.st_size)
        elif isinstance(item, Skipped):
            skipped.append(FileSkipped(os.fsdecode(item.path), item.reason))
        elif tree:
            items.append(TreeItem(item.node))
    plan = builder.build()
    anchors = AnchorUsage(dirs=[os.fsdecode(d) for d in anchor_dirs])
    if anchor_dirs:
        # what dropping them would give back: measured per set from the
        # extents only its anchors hold, whatever PATH was scanned
        got = sum_pinned([measure_set(s) for s in
                          list_sets([os.path.dirname(d) for d in anchor_dirs])])
        anchors.files, anchors.pinned_bytes, anchors.exact = got.files, got.bytes, got.exact
    return ScanResult(plan=plan, files=files, skipped=skipped, filesystems=fstab.infos,
                      anchors=anchors, tree=items)


def find_anchor_dirs(paths: list) -> list[bytes]:
    """The anchor directories at the tops of the mounts the PATHs are on."""
    mounts = Mounts()
    out: list[bytes] = []
    for p in paths:
        d = os.path.abspath(os.fsencode(p))
        d = d if os.path.isdir(d) else os.path.dirname(d)
        for top in [mounts.top(d), *mounts.under(d)]:
            base = os.path.join(top, DIRNAME)
            if base in out:
                continue
            fd, _why = open_anchor_dir(top)  # only this host's: ours, marked
            if fd is not None:
                os.close(fd)
                out.append(base)
    return out
