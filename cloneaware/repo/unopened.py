"""The manifest records of files taken unopened from the files cache, in
batches: one native call (native.encode_regulars) encodes the ENTRY, STAT,
BLOB and END records of every such file of a stretch of the walk, from the
cache's columns, as Writer.regular would one by one (issue 36: "encode
ENTRY records in batches"; a Python call per record was 2 s per 50,000
files of an unchanged night).  The sink then writes each run of them that
the walk has in a row in one write."""
from __future__ import annotations

import stat

import numpy as np

from cloneaware import native
from cloneaware.repo.filescache import FilesCache
from cloneaware.source.mapping import Unopened

#: struct ca_reg (native/cloneaware.h)
REG = np.dtype([("mode", "<u4"), ("uid", "<u4"), ("gid", "<u4"), ("iflags", "<u4"),
                ("atime", "<i8"), ("mtime", "<i8"), ("size", "<u8"), ("ino", "<u8"),
                ("ctime", "<i8"), ("path_off", "<u8"), ("path_len", "<u8"),
                ("xa_start", "<u8"), ("xa_end", "<u8"), ("seg_start", "<u8"),
                ("seg_end", "<u8")])
assert REG.itemsize == native.REG_SIZE


class Encoded:
    """The records of a batch of unopened files, file after file."""

    def __init__(self, files: FilesCache, items: list[Unopened], atime: bool):
        n = len(items)
        rows = np.fromiter((it.row for it in items), dtype=np.int64, count=n)
        r = files.rows[rows]
        sts = [it.node.st for it in items]
        reg = np.zeros(n, dtype=REG)
        reg["mode"] = [stat.S_IMODE(st.st_mode) for st in sts]
        reg["uid"] = [st.st_uid for st in sts]
        reg["gid"] = [st.st_gid for st in sts]
        reg["iflags"] = r["iflags"]
        # the metadata rule made these the row's: ino, size, mtime, ctime
        reg["mtime"], reg["size"], reg["ino"], reg["ctime"] = (
            r["mtime"], r["size"], r["ino"], r["ctime"])
        reg["atime"] = [st.st_atime_ns for st in sts] if atime else r["mtime"]
        self.paths = [it.node.name for it in items]
        lens = np.fromiter(map(len, self.paths), dtype=np.uint64, count=n)
        reg["path_len"] = lens
        reg["path_off"] = np.cumsum(lens) - lens
        before = np.maximum(rows - 1, 0)
        first = rows == 0
        reg["seg_end"] = r["seg_end"]
        reg["seg_start"] = np.where(first, 0, files.rows["seg_end"][before])
        reg["xa_end"] = r["xattr_end"]
        reg["xa_start"] = np.where(first, 0, files.rows["xattr_end"][before])
        nseg = (reg["seg_end"] - reg["seg_start"]).astype(np.int64)
        xlen = (reg["xa_end"] - reg["xa_start"]).astype(np.int64)
        bound = int((216 + lens.astype(np.int64) + xlen + 60 * nseg).sum())
        self.data, at, blob_bytes = native.encode_regulars(
            reg.view(np.uint8), n, b"".join(self.paths), files.xattrs, _contiguous(files.segs),
            _contiguous(files.blobs), bound)
        self.at = [*at.tolist(), len(self.data)]  # each file's records: at[i] .. at[i + 1]
        self.sizes = r["size"].tolist()
        self.blob_bytes = blob_bytes.tolist()
        self.rows = rows
        self.old_entries = r["entry"].tolist()


def _contiguous(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)
