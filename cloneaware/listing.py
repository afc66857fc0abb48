"""What ``ls`` and ``diff`` show of an archive or a snapshot's manifest: its
entries, from the index of a seekable file (no file data read), with their
metadata from the ENTRY records the index points at when asked (``ls -l``,
``diff``: still no file data), or from a full read where nothing can be
sought (a pipe, ssh://).  For a snapshot, each file's blob ranges too:
``diff`` of snapshots compares contents, not only metadata."""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.catalog import entry_at, read_index
from cloneaware.archive.events import (
    BlobEvent,
    EndEvent,
    EntryEvent,
    FooterEvent,
    Handler,
    dispatch,
)
from cloneaware.archive.reader import Stream
from cloneaware.display import b64, show, when, when_rfc3339
from cloneaware.errors import ArchiveError, UsageError
from cloneaware.patterns import Chooser, Patterns


@dataclass
class Row:
    id: int
    kind: int
    path: bytes
    size: int
    stored_bytes: int
    ref_bytes: int
    base_ref_bytes: int
    entry: fmt.Entry | None = None  # the whole ENTRY (ls -l, diff)
    content: bytes | None = None  # snapshots: a digest of the file's blob ranges


@dataclass
class Contents:
    header: fmt.Header
    rows: list[Row]
    base: thin.Base | None
    stored_bytes: int = 0
    ref_bytes: int = 0
    base_ref_bytes: int = 0
    by_id: dict[int, Row] = field(default_factory=dict)
    is_map: bool = False  # a sharing map (scan --save-map): entries and references, no data

    def __post_init__(self) -> None:
        self.by_id = {r.id: r for r in self.rows}

    def under(self, pattern: str | None, what: str = "the archive") -> list[Row]:
        """The rows PATTERN chooses as ``restore --include`` does (a path as
        ls shows it, or a glob: home/*/app.log, *.img; a directory comes
        with what is below it), or all; UsageError naming ``what`` if there
        are none."""
        if not pattern:
            return self.rows
        pick = Chooser(Patterns([pattern]))
        got = [r for r in self.rows if pick.take(r.path, r.kind == fmt.K_DIR)]
        if not got:
            raise UsageError(f"{pattern}: no entry of {what} matches it")
        return got


def read_contents(f, full: bool = False, blobs: bool = False) -> Contents:
    """The entries of the archive in file object ``f``; ``full``: with their
    ENTRY records; ``blobs``: with a digest of each file's blob ranges
    (a repository manifest, read whole)."""
    if f.seekable() and not blobs:
        listing = read_index(f)
        rows: list[Row] = [Row(i.id, i.kind, i.path, i.size, i.stored_bytes, i.ref_bytes,
                    i.base_ref_bytes) for i in listing.items]
        if full:
            v = listing.header.version
            for r, it in zip(rows, listing.items):
                e = entry_at(f, it.offset, v, it.id)
                if (e.id, e.kind, e.path, e.size) != (it.id, it.kind, it.path, it.size):
                    raise ArchiveError(f"index item {it.id} does not match its entry", it.offset)
                r.entry = e
        ft = listing.footer
        return Contents(listing.header, rows, listing.base, ft.stored_bytes, ft.ref_bytes,
                        ft.base_ref_bytes, is_map=listing.is_map)
    # a full read: every record checked, as restore checks them
    stream = Stream(f, check_hashes=False, maps=True, decode=False, skip_data=True)
    rows_of = _Rows(blobs)
    dispatch(rows_of, stream.events())
    footer = rows_of.footer
    assert stream.header is not None and footer is not None
    return Contents(stream.header, rows_of.rows, stream.base, footer.stored_bytes,
                    footer.ref_bytes, footer.base_ref_bytes, is_map=stream.is_map)


class _Rows(Handler):
    """The rows of a full read: each entry, with its byte counts from its
    END, and with ``blobs`` a digest of each file's blob ranges."""

    def __init__(self, blobs: bool):
        self.blobs = blobs
        self.rows: list[Row] = []
        self.digest: Any = None  # a hashlib object while a file's blobs are read
        self.footer: fmt.Footer | None = None

    def on_entry(self, ev: EntryEvent) -> None:
        e = ev.entry
        self.rows.append(Row(e.id, e.kind, e.path, e.size, 0, 0, 0, e))
        self.digest = hashlib.sha256() if self.blobs and e.kind == fmt.K_REG else None

    def on_blob(self, ev: BlobEvent) -> None:
        if self.digest is not None:
            self.digest.update(b"%d %d %d " % (ev.offset, ev.length, ev.blob_offset)
                               + ev.blob_id)

    def on_end(self, ev: EndEvent) -> None:
        r = self.rows[-1]
        end = ev.end
        r.stored_bytes = end.stored_bytes + end.external_bytes + end.blob_bytes
        r.ref_bytes, r.base_ref_bytes = end.ref_bytes, end.base_ref_bytes
        if self.digest is not None:
            r.content = self.digest.digest()
            self.digest = None

    def on_footer(self, ev: FooterEvent) -> None:
        self.footer = ev.footer


FILE_TYPE = {fmt.K_REG: stat.S_IFREG, fmt.K_DIR: stat.S_IFDIR, fmt.K_SYMLINK: stat.S_IFLNK,
             fmt.K_HARDLINK: stat.S_IFREG, fmt.K_FIFO: stat.S_IFIFO, fmt.K_CHR: stat.S_IFCHR,
             fmt.K_BLK: stat.S_IFBLK, fmt.K_SOCK: stat.S_IFSOCK}


def subvol_note(e: fmt.Entry, c: Contents) -> str:
    if not e.subvol:
        return ""
    what = "read-only subvolume" if e.subvol & fmt.SV_READONLY else "subvolume"
    if e.subvol & fmt.SV_SNAPSHOT and e.origin in c.by_id:
        what += f", a snapshot of {show(c.by_id[e.origin].path)}"
    return what


def long_line(r: Row, c: Contents) -> str:
    """One entry as ``ls -l`` shows it: mode, owner and group (numbers, as
    stored), size, mtime (UTC), path, and what it points at."""
    e = r.entry
    assert e is not None
    mode = stat.filemode(FILE_TYPE[r.kind] | e.mode)
    size = r.size if r.kind == fmt.K_REG else (c.by_id[e.link].size if r.kind == fmt.K_HARDLINK
                                               and e.link in c.by_id else 0)
    line = f"{mode} {e.uid:>6} {e.gid:>6} {size:>14} {when(e.mtime_ns)} {show(r.path)}"
    if r.kind == fmt.K_SYMLINK:
        line += f" -> {show(e.target)}"
    elif r.kind == fmt.K_HARDLINK and e.link in c.by_id:
        line += f" link to {show(c.by_id[e.link].path)}"
    elif r.kind in (fmt.K_CHR, fmt.K_BLK):
        line += f" (device {os.major(e.rdev)}, {os.minor(e.rdev)})"
    notes = [n for n in (subvol_note(e, c),
                         f"flags {fmt.iflag_letters(e.iflags)}" if e.iflags else "") if n]
    if notes:
        line += " [" + "; ".join(notes) + "]"
    return line


def row_json(r: Row, c: Contents, full: bool) -> dict:
    d = {"id": r.id, "type": fmt.KIND_NAMES[r.kind], "path": show(r.path),
         "path_b64": b64(r.path), "size": r.size, "stored_bytes": r.stored_bytes,
         "referenced_bytes": r.ref_bytes, "base_referenced_bytes": r.base_ref_bytes}
    if full and r.entry is not None:
        e = r.entry
        d.update(mode=f"{e.mode:04o}", uid=e.uid, gid=e.gid, mtime=when_rfc3339(e.mtime_ns),
                 mtime_ns=e.mtime_ns, atime_ns=e.atime_ns,
                 xattrs=[show(n) for n, _ in e.xattrs],
                 flags=fmt.iflag_letters(e.iflags))
        if r.kind == fmt.K_SYMLINK:
            d.update(target=show(e.target), target_b64=b64(e.target))
        if r.kind == fmt.K_HARDLINK and e.link in c.by_id:
            d["link"] = show(c.by_id[e.link].path)
        if r.kind in (fmt.K_CHR, fmt.K_BLK):
            d["rdev"] = [os.major(e.rdev), os.minor(e.rdev)]
        if e.subvol:
            d["subvolume"] = {"read_only": bool(e.subvol & fmt.SV_READONLY),
                              "snapshot_of": show(c.by_id[e.origin].path)
                              if e.subvol & fmt.SV_SNAPSHOT and e.origin in c.by_id else None}
    return d


def contents_json(c: Contents, rows: list[Row], full: bool) -> dict:
    """``ls --json``: ROWS of C (``Contents.under``), with what C says of
    itself: its format version, whether it is a sharing map, the base of a
    thin backup, and its byte counts."""
    b = c.base
    return {
        "version": c.header.version,
        "tool": c.header.tool,
        "map": c.is_map,
        "base": None if b is None else {
            "path": show(b.path),
            "kind": "dir" if b.kind == thin.BASE_DIR else "file",
            "files": [{"path": show(x.path), "size": x.size} for x in b.files]},
        "entries": [row_json(x, c, full) for x in rows],
        "stored_bytes": c.stored_bytes,
        "referenced_bytes": c.ref_bytes,
        "base_referenced_bytes": c.base_ref_bytes,
    }


# --- diff ------------------------------------------------------------------------------

@dataclass
class Change:
    path: bytes
    old: Row | None
    new: Row | None
    what: list[str] = field(default_factory=list)
    #: the old and new value, as diff shows them, of what changed (mode,
    #: owner, size, mtime, link target, hard link)
    values: dict[str, tuple[str, str]] = field(default_factory=dict)


def _link_path(r: Row, c: Contents) -> bytes | None:
    e = r.entry
    if e is None or r.kind != fmt.K_HARDLINK or e.link not in c.by_id:
        return None
    return c.by_id[e.link].path


def compare(a: Contents, b: Contents) -> list[Change]:
    """Entries added, removed and changed from A to B, in path order.  An
    entry changed when its type, size, mode, owner, mtime, link target,
    device, xattrs, inode flags or subvolume differ; or, where both sides
    know their files' blobs (snapshots), its content."""
    old = {r.path: r for r in a.rows}
    new = {r.path: r for r in b.rows}
    out = []
    for p in sorted(old.keys() | new.keys()):
        ra, rb = old.get(p), new.get(p)
        if ra is None or rb is None:
            out.append(Change(p, ra, rb))
            continue
        what = []
        ea, eb = ra.entry, rb.entry
        assert ea is not None and eb is not None
        if ra.kind != rb.kind:
            what.append("type")
        elif ra.size != rb.size:
            what.append("size")
        if ra.content is not None and rb.content is not None and ra.content != rb.content \
                and "size" not in what:
            what.append("content")
        for name, x, y in (("mode", ea.mode, eb.mode), ("owner", (ea.uid, ea.gid),
                                                        (eb.uid, eb.gid)),
                           ("mtime", ea.mtime_ns, eb.mtime_ns),
                           ("target", ea.target, eb.target), ("device", ea.rdev, eb.rdev),
                           ("link", _link_path(ra, a), _link_path(rb, b)),
                           ("xattrs", ea.xattrs, eb.xattrs), ("flags", ea.iflags, eb.iflags),
                           ("subvolume", ea.subvol & ~fmt.SV_SNAPSHOT,
                            eb.subvol & ~fmt.SV_SNAPSHOT)):
            if x != y and not (name in ("target", "device") and "type" in what):
                what.append(name)
        if what:
            out.append(Change(p, ra, rb, what, _values(what, ra, rb, a, b)))
    return out


def _values(what: list[str], ra: Row, rb: Row, a: Contents, b: Contents
            ) -> dict[str, tuple[str, str]]:
    """Old and new of each of ``what`` a person reads as a value."""
    ea, eb = ra.entry, rb.entry
    assert ea is not None and eb is not None
    shown = {
        "mode": lambda r, e, c: f"{e.mode:04o}",
        "owner": lambda r, e, c: f"{e.uid}:{e.gid}",
        "size": lambda r, e, c: str(r.size),
        "mtime": lambda r, e, c: when_rfc3339(e.mtime_ns),
        "target": lambda r, e, c: show(e.target or b""),
        "link": lambda r, e, c: show(_link_path(r, c) or b"-"),
    }
    return {name: (shown[name](ra, ea, a), shown[name](rb, eb, b))
            for name in what if name in shown}


def tally(changes: list[Change]) -> dict[str, int]:
    """How many entries were added, removed and changed, and the bytes of
    the files added and removed."""
    added = [c.new for c in changes if c.old is None and c.new is not None]
    removed = [c.old for c in changes if c.new is None and c.old is not None]
    return {"added": len(added), "removed": len(removed),
            "changed": sum(c.old is not None and c.new is not None for c in changes),
            "added_bytes": sum(r.size for r in added),
            "removed_bytes": sum(r.size for r in removed)}


def diff_json(changes: list[Change]) -> dict:
    """``diff --json``: each change with its path, what changed and the
    type and size of each side, then the ``tally``."""
    def side(r: Row | None) -> dict | None:
        return None if r is None else {"type": fmt.KIND_NAMES[r.kind], "size": r.size}

    return {
        "changes": [{"path": show(c.path), "path_b64": b64(c.path),
                     "change": "added" if c.old is None else "removed"
                     if c.new is None else "changed", "what": c.what,
                     "values": {k: {"old": o, "new": n} for k, (o, n) in c.values.items()},
                     "old": side(c.old), "new": side(c.new)} for c in changes],
        **tally(changes),
    }
