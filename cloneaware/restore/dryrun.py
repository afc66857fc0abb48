"""restore --dry-run: what a restore would make in DEST, and how each file's
bytes would get there (written, reflinked, from the base, holes), from the
archive's entries alone.

Nothing in DEST is made or changed, not even DEST itself: the checks a
restore makes before it writes (DEST is a directory or absent, a
top-level name that exists needs --force unless a failed restore left it,
the base of a thin backup is where --base says) are made the same way and
fail the same way.  An archive file is read through its index; a pipe is
read whole (its records checked, not its data hashes); a repository's
manifests are read, and no blob is fetched.
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import NamedTuple

import cloneaware.restore.partial as partial
from cloneaware import native
from cloneaware.archive import format as fmt
from cloneaware.archive.events import BlobEvent, EntryEvent
from cloneaware.archive.manifest import open_manifest
from cloneaware.archive.reader import Stream, open_archive
from cloneaware.errors import SharingMapGiven, UsageError
from cloneaware.fsinfo import BTRFS_MAGIC
from cloneaware.listing import Contents, read_contents
from cloneaware.repo.repository import Repository
from cloneaware.repo.restore import Coverage, Place
from cloneaware.repo.snapshots import Snapshot
from cloneaware.restore.base import open_base
from cloneaware.restore.receive import RestoreSummary, check_dest
from cloneaware.restore.select import Plan, Selection, plan
from cloneaware.restore.subvol import describe

#: (written, reflinked, from the base) bytes of one file, by entry id
Bytes = dict[int, tuple[int, int, int]]


class Source(NamedTuple):
    """One archive or snapshot and where it would go."""

    dest: str  # the directory it is restored into
    prefix: bytes  # what -v prints before each path (several snapshots: b"<id>/")
    entries: list[fmt.Entry]
    bytes_of: Bytes
    #: files left out that restored ones share with are staged (an archive);
    #: a repository fetches their blobs instead
    stage_referenced: bool
    #: the whole list of entries is known before the restore begins (not a pipe)
    seekable: bool = True


def archive_bytes(c: Contents) -> Bytes:
    return {r.id: (r.stored_bytes, r.ref_bytes, r.base_ref_bytes) for r in c.rows}


def archive_source(archive, dest: str, base: str | None,
                   warn: Callable[[str], None]) -> Source:
    """An archive file (a path, '-', a sparse thin backup) or an open
    stream (ssh://), read as restore would read it before writing."""
    path: str | None = archive if isinstance(archive, str) else None
    _check_dest(dest)
    ext_fd = None
    if path is None:
        f = archive
    else:
        sparse = open_manifest(path) if path != "-" else None
        if sparse is not None:
            f, ext_fd = sparse
        else:
            f = open_archive(path)
    try:
        seekable = f.seekable()
        c = read_contents(f, full=True)
    finally:
        if path not in (None, "-"):
            f.close()
        if ext_fd is not None:
            os.close(ext_fd)
    if c.is_map:
        raise SharingMapGiven(path if path not in (None, "-") else None)
    if c.base is not None:
        for fd in open_base(c.base, base).values():  # there, and of the sizes it had
            os.close(fd)
    elif base is not None:
        warn("--base given, but this archive is not a thin backup")
    got = archive_bytes(c)
    if ext_fd is not None:  # a sparse thin backup: its own ranges are cloned from it
        got = {k: (0, w + r, b) for k, (w, r, b) in got.items()}
    return Source(dest, b"", [r.entry for r in c.rows if r.entry is not None],
                  got, True, seekable)


def snapshot_sources(repo: Repository, snaps: list[Snapshot], dest: str,
                     select: Selection) -> list[Source]:
    """Snapshots of a repository, placed as SnapshotsRestore places them:
    one as DEST/<name>, several as DEST/<short id>/<name>."""
    repo.load_index()
    manifests = [repo.manifest(sn) for sn in snaps]
    several = len(snaps) > 1
    entries = [[ev.entry for ev in Stream(io.BytesIO(m), check_hashes=False).events()
                if isinstance(ev, EntryEvent)] for m in manifests]
    wanted = [plan(select, es).with_data for es in entries] if select else None
    out = []
    for sn, es, b in zip(snaps, entries, manifest_bytes(manifests, wanted)):
        out.append(Source(os.path.join(dest, sn.short_id) if several else dest,
                          sn.short_id.encode() + b"/" if several else b"", es, b, False))
    return out


def manifest_bytes(manifests: list[bytes], wanted: list[set[int]] | None) -> list[Bytes]:
    """For each manifest, its files' bytes as a restore of all of them in
    one run would get them: a blob range is written where it is first
    needed and reflinked everywhere after (the rule of repo/restore.py's
    Coverage, which the restore itself follows)."""
    cov = Coverage()
    out: list[Bytes] = []
    for owner, m in enumerate(manifests):
        got: Bytes = {}
        files = wanted[owner] if wanted is not None else None
        entry = -1
        for ev in Stream(io.BytesIO(m), check_hashes=False).events():
            if isinstance(ev, EntryEvent):
                entry = ev.entry.id
            elif isinstance(ev, BlobEvent) and (files is None or entry in files):
                w, r, _ = got.get(entry, (0, 0, 0))
                for lo, hi, place in cov.split(ev.blob_id, ev.blob_offset, ev.length):
                    if place is None:
                        w += hi - lo
                        cov.add(ev.blob_id, Place(owner, entry, ev.offset - ev.blob_offset,
                                                  lo, hi))
                    else:
                        r += hi - lo
                got[entry] = (w, r, 0)
        out.append(got)
    return out


def dry_run(sources: list[Source], select: Selection, force: bool,
            listed: Callable[[bytes, bool], None] | None = None) -> RestoreSummary:
    """The summary a restore of ``sources`` would report, with nothing done;
    ``listed(path, replaces)`` for each entry it would make, in order
    (``replaces``: something of that name is in DEST, and --force replaces
    it)."""
    s = RestoreSummary()
    plans = []
    for src in sources:
        _check_dest(src.dest)
        got = plan(select, src.entries)
        if not src.seekable:
            got = got._replace(stage=set())  # a pipe cannot say it beforehand
        plans.append(got)
        if select and not got.tops:
            continue
        if not force:
            left = partial.read(dest=src.dest)
            for top in sorted(got.tops - left):
                if os.path.lexists(os.path.join(os.fsencode(src.dest), top)):
                    raise UsageError(f"{os.path.join(src.dest, os.fsdecode(top))} exists; "
                                     "use --force to overwrite it")
    if select and not any(p.tops for p in plans):
        what = "the archive" if sources and sources[0].stage_referenced else \
            "the snapshots" if len(sources) > 1 else "the snapshot"
        raise UsageError(f"{select.what()} leaves nothing of {what} to restore")
    for src, got in zip(sources, plans):
        _walk(s, src, got, select.fresh(), listed)
    return s


def _check_dest(dest: str) -> None:
    """What a restore refuses before it writes, and what it would fail on
    when it makes DEST: a component that is not a directory."""
    check_dest(dest)
    p = os.path.abspath(dest)
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UsageError(f"{dest}: not a directory (or a component of it is not)")


def _on_btrfs(dest: str) -> bool:
    """Whether DEST (or, if it is not there yet, where it would be made) is
    on Btrfs: there a subvolume is made again, elsewhere a directory."""
    p = os.path.abspath(dest)
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return native.fstatfs(fd, p)[0] == BTRFS_MAGIC
    finally:
        os.close(fd)


def _walk(s: RestoreSummary, src: Source, got: Plan, sel: Selection,
          listed: Callable[[bytes, bool], None] | None) -> None:
    """One source's entries, in order, as Restore.on_entry takes them."""
    made: set[int] = set()
    staged: set[int] = set()  # left out, restored to clone or link from
    unmade: dict[bytes, fmt.Entry] = {}  # directories left out, made if needed below
    paths = {e.id: e.path for e in src.entries}
    btrfs = _on_btrfs(src.dest)
    subvols: set[int] = set()  # subvolumes made again (Btrfs)

    def make(e: fmt.Entry, to: bytes) -> None:
        made.add(e.id)
        if e.kind == fmt.K_REG:
            s.files += 1
            _data(s, e, src.bytes_of)
        elif e.kind == fmt.K_DIR:
            s.dirs += 1
            if e.subvol:
                what = describe(e, paths.__getitem__)
                if not btrfs:
                    s.not_exact.append((os.fsdecode(to), f"{what}: restored as a plain "
                                        "directory (the destination is not Btrfs)"))
                else:
                    s.subvolumes += 1
                    subvols.add(e.id)
                    if e.subvol & fmt.SV_SNAPSHOT and e.origin not in subvols:
                        s.not_exact.append((os.fsdecode(to), f"{what}: restored as a "
                                            "subvolume of its own, not as a snapshot (its "
                                            "origin was not restored before it)"))
        elif e.kind == fmt.K_SYMLINK:
            s.symlinks += 1
        elif e.kind == fmt.K_HARDLINK:
            s.hardlinks += 1
        else:
            s.specials += 1
        if listed is not None:
            where = os.path.join(os.fsencode(src.dest), to)
            replaces = os.path.lexists(where) and not (
                e.kind == fmt.K_DIR and os.path.isdir(where))
            listed(src.prefix + to, replaces)

    for e in src.entries:
        to = sel.mapped(e.path) if sel.take(e.path, e.kind) else None
        if to is None:
            s.left_out += 1
            if e.kind == fmt.K_DIR:
                unmade[e.path] = e
            elif e.kind == fmt.K_REG and (e.id in got.stage or (
                    src.stage_referenced and e.eflags & fmt.EF_REFERENCED)):
                _data(s, e, src.bytes_of, staged=True)  # to clone from, then removed
                staged.add(e.id)
            continue
        if e.kind == fmt.K_HARDLINK and e.link not in made and e.link not in staged:
            s.left_out += 1
            s.not_exact.append((os.fsdecode(to), "not restored: the file it is a hard "
                                "link to was left out (from a pipe; restore from the "
                                "archive file to get it)"))
            continue
        # the directories above a chosen entry that were left out, as restore makes them
        up, chain = e.path.rpartition(b"/")[0], []
        while up and up in unmade:
            chain.append(up)
            up = up.rpartition(b"/")[0]
        for a in reversed(chain):
            d = unmade.pop(a)
            dto = sel.mapped(a)
            if dto is not None:
                s.left_out -= 1
                make(d, dto)
        make(e, to)


def _data(s: RestoreSummary, e: fmt.Entry, bytes_of: Bytes, staged: bool = False) -> None:
    w, r, b = bytes_of.get(e.id, (0, 0, 0))
    s.written_bytes += w
    s.reflinked_bytes += r + b  # a base's ranges are cloned too (copied off its fs)
    s.base_bytes += b
    if not staged:
        s.logical_bytes += e.size
        s.hole_bytes += max(0, e.size - w - r - b)
