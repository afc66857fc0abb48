"""``repair index``: the index rebuilt from the packs' own trailers, for a
repository whose index objects were lost, damaged or left out of date (an
interrupted prune, a store restored without its ``index/``).

Every pack's trailer says which blobs lie where in it (sealed with the
repository's key where it is encrypted; repo/survey.py reads them all).
The new index lists every pack by its trailer; a pack whose trailer cannot
be read keeps the records the old index had for it, so that prune still
never deletes it; a pack that no index named and whose trailer cannot be
read is left alone and named.  The new index objects are durable before
the old ones are deleted, so a repair killed at any moment leaves an index
at least as complete as before (records listed twice are harmless).  The
blobs' bytes are not read: a restore, prune and ``check --read-data``
check each against its id as they read it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cloneaware.repo import format as rf
from cloneaware.repo.repository import Repository
from cloneaware.repo.survey import survey


@dataclass
class RepairResult:
    #: packs the new index lists, and their blobs
    packs: int = 0
    blobs: int = 0
    #: packs listed by the old index's records, their trailers unreadable
    kept_by_old_index: int = 0
    #: packs no index named whose trailer cannot be read (left alone)
    unreadable: list[str] = field(default_factory=list)
    index_written: int = 0
    index_removed: int = 0


def repair_index(repo: Repository, dry_run: bool = False,
                 say: Callable[[str], None] | None = None) -> RepairResult:
    """Write an index of every pack from its trailer, then delete the old
    index objects (``dry_run``: count, write nothing)."""
    say = say or (lambda msg: None)
    res = RepairResult()
    sv = survey(repo)
    for msg in sv.problems:
        say(msg)
    packs: list[rf.IndexPack] = []
    for pid, held in sorted(sv.trailers.items()):
        if held is not None:
            if held:
                packs.append(rf.IndexPack(pid, list(held)))
        elif pid in sv.claims:  # never dropped: prune must not take it for an orphan
            packs.append(rf.IndexPack(pid, sorted(sv.claims[pid])))
            res.kept_by_old_index += 1
        else:
            res.unreadable.append(pid.hex())
            say(f"{repo.where}: pack {pid.hex()}: no trailer that decodes and in no index; "
                "left alone (check --read-data reads it)")
    res.packs = len(packs)
    res.blobs = sum(len(p.blobs) for p in packs)
    old = sv.index_objects + sv.bad_index
    if dry_run:
        res.index_removed = len(old)
        return res
    new = repo.write_index(packs)
    res.index_written = len(new)
    for name in old:
        if name not in new:
            repo.check_lock()
            repo.backend.delete(name)
            res.index_removed += 1
    repo.backend.sync()
    return res


@dataclass
class PacksResult:
    #: packs read, and those with a blob that does not decode there (or gone, or short)
    read: int = 0
    damaged: list[str] = field(default_factory=list)
    #: blobs of damaged packs written again into new packs, and their bytes
    salvaged: int = 0
    salvaged_bytes: int = 0
    #: blobs of damaged packs that decode from another pack: nothing to do
    elsewhere: int = 0
    #: blob ids lost: in no other pack, and not decodable here
    lost: list[str] = field(default_factory=list)
    packs_written: int = 0
    #: where each damaged pack's bytes were put before it was removed
    aside: list[str] = field(default_factory=list)
    index: RepairResult | None = None


def repair_packs(repo: Repository, only: list[str] | None, aside: str, dry_run: bool = False,
                 say: Callable[[str], None] | None = None, connections: int = 2
                 ) -> PacksResult:
    """Salvage the blobs that still decode from damaged packs (``only``:
    these pack ids or unique prefixes; else every pack the index names is
    read) into new packs, put each damaged pack's bytes in directory
    ``aside`` (on this host), remove it from the repository, and rebuild
    the index.  A blob lost with it is then in no index: ``check`` names
    the files that had it, and a new backup of the same source stores it
    again (the snapshots that name it are whole again)."""
    import os

    from cloneaware.errors import RepositoryError, StillRetained, UsageError
    from cloneaware.repo.backend import pack_name
    from cloneaware.repo.packer import Packer
    from cloneaware.safeio import AtomicFile

    say = say or (lambda msg: None)
    res = PacksResult()
    repo.load_index()
    by_pack: dict[bytes, list[tuple[bytes, rf.IndexEntry]]] = {}
    for bid, e in repo.index.items():
        by_pack.setdefault(e.pack, []).append((bid, e))
    if only:
        chosen = []
        for p in only:
            hits = [pid for pid in by_pack if pid.hex().startswith(p.lower())]
            if len(hits) != 1:
                raise UsageError(f"{p}: {'no' if not hits else 'more than one'} pack the index "
                                 "names has an id that begins so")
            chosen.append(hits[0])
    else:
        chosen = sorted(by_pack)
    keep: dict[bytes, tuple[int, int, bytes]] = {}  # blob id -> (type, raw length, stored)
    bad_packs: dict[bytes, bytes] = {}  # pack id -> its bytes as read (b"" if gone)
    bad_blobs: dict[bytes, set[bytes]] = {}
    for pid in chosen:
        res.read += 1
        blobs = sorted(by_pack[pid], key=lambda x: x[1].offset)
        name = pack_name(pid.hex())
        try:
            raw = repo.backend.read(name)
        except RepositoryError as ex:
            say(f"{ex}")
            raw = b""
        broken: set[bytes] = set()
        for bid, e in blobs:
            stored = raw[e.offset:e.offset + e.stored_length]
            try:
                if len(stored) != e.stored_length:
                    raise RepositoryError("short")
                repo.decode_blob(bid, e, stored, name)
                keep.setdefault(bid, (e.type, e.raw_length, bytes(stored)))
            except RepositoryError:
                broken.add(bid)
        if broken:
            bad_packs[pid] = bytes(raw)
            bad_blobs[pid] = broken
            res.damaged.append(pid.hex())
            say(f"{repo.where}: pack {pid.hex()[:16]}: {len(broken)} of its {len(blobs)} blobs "
                "do not decode" + (" (it is gone)" if not raw else ""))
    # what the damaged packs held: written again unless another pack has it
    salvage: list[bytes] = []
    for pid, blobs in ((p, by_pack[p]) for p in bad_packs):
        for bid, _ in blobs:
            other = [x for x in repo.index.locations(bid) if x.pack not in bad_packs]
            if other:
                res.elsewhere += 1
            elif bid in keep and bid not in salvage:
                salvage.append(bid)
            elif bid in bad_blobs[pid] and bid not in keep:
                res.lost.append(bid.hex())
    res.lost = sorted(set(res.lost))
    res.salvaged = len(salvage)
    res.salvaged_bytes = sum(len(keep[b][2]) for b in salvage)
    if dry_run or not bad_packs:
        return res
    # 1. the salvaged blobs in new packs, indexed, before anything is removed
    repo.index.clear()
    packer = Packer(repo, connections)
    try:
        for bid in salvage:
            t, raw_length, stored = keep[bid]
            packer.add(bid, t, raw_length, stored)
        packer.flush()
    finally:
        packer.close()
    res.packs_written = packer.packs_written
    # 2. each damaged pack's bytes on this host, durable, then out of the repository
    os.makedirs(aside, mode=0o700, exist_ok=True)
    for pid, raw in bad_packs.items():
        if raw:  # (a pack that is gone has nothing to keep)
            path = os.path.join(aside, pid.hex())
            with AtomicFile(path, replace=True) as f:
                f.write(raw)
                f.commit(0o600)
            res.aside.append(path)
        repo.check_lock()
        try:
            repo.backend.delete(pack_name(pid.hex()))
        except RepositoryError:
            pass  # gone already
        except StillRetained as e:  # Object Lock: it stays, its blobs read elsewhere first
            say(f"{e}: the damaged pack stays until then (its blobs that decode are in new "
                "packs too)")
    repo.backend.sync()
    # 3. an index of what is there now
    repo.index.clear()
    res.index = repair_index(repo, False, say)
    return res


#: the xattr ``repair snapshots`` gives a file with bytes it could not keep
DAMAGED_XATTR = b"user.cloneaware.damaged"
#: and the tag of a snapshot it wrote
REPAIRED_TAG = "repaired"


@dataclass
class SnapshotsResult:
    #: snapshot id -> the new one written without what is lost
    rewritten: dict[str, str] = field(default_factory=dict)
    #: (snapshot id, path, bytes lost) of each file marked damaged
    damaged_files: list[tuple[str, str, int]] = field(default_factory=list)
    #: snapshots that cannot be rewritten (their manifest lost), and why
    unreadable: dict[str, str] = field(default_factory=dict)
    #: snapshot objects that do not decode
    bad_objects: list[str] = field(default_factory=list)
    #: what --forget removed
    forgotten: list[str] = field(default_factory=list)


def repair_snapshots(repo: Repository, forget: bool, dry_run: bool = False,
                     say: Callable[[str], None] | None = None,
                     warn: Callable[[str], None] | None = None) -> SnapshotsResult:
    """Write each snapshot that names a blob the repository no longer has
    (in no index: ``repair packs`` leaves lost blobs so) again without it:
    the same entries, each range in a lost blob left out (it reads as
    zeros), and each file that lost bytes marked with the xattr
    ``user.cloneaware.damaged`` (how many bytes, and of which snapshot).
    The new snapshot keeps the old one's time, host, PATHs and tags, adds
    the tag ``repaired``, and names the old one as its ``original``.  With
    ``forget``, the old snapshots are removed, and so are those whose
    manifest cannot be read and snapshot objects that do not decode."""
    import io

    from cloneaware.archive.events import BlobEvent, EndEvent, EntryEvent, Handler, dispatch
    from cloneaware.archive.reader import Stream
    from cloneaware.backup.summary import Summary
    from cloneaware.errors import ArchiveError, RepositoryError
    from cloneaware.repo.sink import RepositorySink
    from cloneaware.repo.snapshots import Snapshot

    say = say or (lambda msg: None)
    res = SnapshotsResult()
    repo.load_index(check_packs=True)
    problems: list[str] = []
    snaps = repo.snapshots(problems)
    index = repo.index

    class Lost(Handler):
        """Each file's bytes in blobs the index lacks."""

        def __init__(self) -> None:
            self.lost: dict[int, int] = {}
            self.paths: dict[int, bytes] = {}
            self.cur = -1

        def on_entry(self, ev: EntryEvent) -> None:
            self.cur = ev.entry.id
            self.paths[self.cur] = ev.entry.path

        def on_blob(self, ev: BlobEvent) -> None:
            if ev.blob_id not in index:
                self.lost[self.cur] = self.lost.get(self.cur, 0) + ev.length

    class Rewrite(Handler):
        def __init__(self, sink: RepositorySink, lost: dict[int, int], snap: Snapshot):
            self.sink, self.lost, self.snap = sink, lost, snap

        def on_entry(self, ev: EntryEvent) -> None:
            e = ev.entry
            n = self.lost.get(e.id)
            if n:
                note = f"{n} bytes lost (read as zeros), repair of snapshot {self.snap.id}"
                e.xattrs = [x for x in e.xattrs if x[0] != DAMAGED_XATTR] + \
                    [(DAMAGED_XATTR, note.encode())]
            self.sink.entry(e)

        def on_blob(self, ev: BlobEvent) -> None:
            if ev.blob_id in index:
                self.sink.blob(ev.offset, ev.length, ev.blob_id, ev.blob_offset)

        def on_end(self, ev: EndEvent) -> None:
            self.sink.end()

    for s in snaps:
        try:
            manifest = repo.manifest(s)
            found = Lost()
            dispatch(found, Stream(io.BytesIO(manifest), check_hashes=False).events())
        except (RepositoryError, ArchiveError) as e:
            res.unreadable[s.id] = str(e)
            say(f"snapshot {s.short_id}: its manifest cannot be read ({e})"
                + ("" if forget else "; --forget removes it"))
            continue
        if not found.lost:
            continue
        for fid, n in sorted(found.lost.items()):
            res.damaged_files.append((s.id, found.paths[fid].decode("utf-8", "replace"), n))
        if dry_run:
            res.rewritten[s.id] = ""
            continue
        sink = RepositorySink(repo, list(s.paths), s.hostname, list(s.tags), 3, 2, warn,
                              anchors=False, parent=False, keep_all=True, atime=True)
        sink.copy_of = Snapshot(s.id, dict(s.data, tags=sorted({*s.tags, REPAIRED_TAG})))
        sink.summary = Summary()
        sink.prepare()
        sink.open(0, None)
        try:
            dispatch(Rewrite(sink, found.lost, s),
                     Stream(io.BytesIO(manifest), check_hashes=False).events())
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        assert sink.snapshot is not None
        res.rewritten[s.id] = sink.snapshot.id
        say(f"snapshot {s.short_id}: written again as {sink.snapshot.short_id}, "
            f"{len(found.lost)} files with bytes lost marked")
    res.bad_objects = sorted(repo.damaged)
    for msg in problems:
        say(msg + ("" if forget else "; --forget removes the object"))
    if forget and not dry_run:
        for sid in [*res.rewritten, *res.unreadable, *res.bad_objects]:
            repo.check_lock()
            repo.backend.delete(f"snapshots/{sid}")
            res.forgotten.append(sid)
    return res
