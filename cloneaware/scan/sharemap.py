"""``scan --save-map``: the sharing map of a live tree, for ``reshare``.

A sharing map (docs/FORMAT.md, "Sharing maps") is an archive's records
after a magic of its own, without data: an ENTRY for every directory and
regular file of the walk (a HARDLINK entry for each further name of a
file), and for each regular file one REF per range that shares physical
blocks with an earlier place, as the sharing index found it.  What a file
owns is left out: in a map, the bytes between REFs are unknown, not holes.
It is small (about 50 bytes per reference) and reads no file data, so a
user who copied a tree with rsync can run ``scan --save-map`` on the source
and ``reshare --from MAP DEST`` on the copy.

Compressed ranges that merely name the same extent as an earlier place
(candidates, docs/KERNEL.md F10) are not proved shared without reading
their bytes, so they are not in the map; they are counted.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass

import numpy as np

from cloneaware.archive import format as fmt
from cloneaware.archive.writer import Writer
from cloneaware.index.plan import CHECK_CANDIDATE
from cloneaware.scan.report import ScanResult


@dataclass
class MapSummary:
    entries: int = 0
    files: int = 0
    references: int = 0
    referenced_bytes: int = 0
    #: compressed ranges left out: the same extent as an earlier place, not proved
    unproved_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _entry(item, kind: int) -> fmt.Entry:
    st = item.node.st
    return fmt.Entry(id=0, kind=kind, path=item.node.name, mode=stat.S_IMODE(st.st_mode),
                     uid=st.st_uid, gid=st.st_gid, atime_ns=st.st_atime_ns,
                     mtime_ns=st.st_mtime_ns)


def write_map(res: ScanResult, out, name: str | None = None) -> MapSummary:
    """Write the sharing map of ``res`` (a scan with ``tree=True``) to ``out``."""
    plan = res.plan
    p = plan.pieces
    proved = (p["ref_file"] >= 0) & (p["check"] != CHECK_CANDIDATE)
    referenced = set(np.unique(p["ref_file"][proved]).tolist())
    s = MapSummary(unproved_bytes=int(p["length"][p["check"] == CHECK_CANDIDATE].sum()))
    w = Writer(out, name=name, magic=fmt.MAP_MAGIC)
    entry_of_file: dict[int, int] = {}
    for item in res.tree:
        if item.link >= 0:
            first = entry_of_file.get(item.link)
            if first is None:
                continue
            e = _entry(item, fmt.K_HARDLINK)
            e.link = first
            w.entry(e)
        elif item.fileno >= 0:
            e = _entry(item, fmt.K_REG)
            e.size = item.node.st.st_size
            if item.fileno in referenced:
                e.eflags |= fmt.EF_REFERENCED
            w.entry(e)
            entry_of_file[item.fileno] = e.id
            fp = plan.file_pieces(item.fileno)
            ok = (fp["ref_file"] >= 0) & (fp["check"] != CHECK_CANDIDATE)
            for logical, length, ref_file, ref_logical in zip(
                    fp["logical"][ok].tolist(), fp["length"][ok].tolist(),
                    fp["ref_file"][ok].tolist(), fp["ref_logical"][ok].tolist()):
                w.ref(logical, length, entry_of_file[ref_file], ref_logical)
                s.references += 1
                s.referenced_bytes += length
            w.end()
            s.files += 1
        elif stat.S_ISDIR(item.node.st.st_mode):
            w.entry(_entry(item, fmt.K_DIR))
        else:
            continue  # symlinks and special files hold no data to share
        s.entries += 1
    w.finish()
    return s
