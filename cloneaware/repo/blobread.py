"""Many blobs read at once: those that lie near each other in a pack in
one ranged read (a manifest's pieces are thousands of small blobs, written
together: a few reads, not one a piece).  Apart from the Repository, whose
``read_blob`` and ``decode_blob`` it uses, as blobindex.load_into is."""
from __future__ import annotations

from cloneaware.errors import RepositoryError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import pack_name

#: one ranged read covers blobs of a pack up to this much ...
READ_MAX = 8 << 20
#: ... and reads through gaps of at most this much between them
READ_GAP = 64 << 10


def read_blobs(repo, ids: list[bytes]) -> list[bytes]:
    """The bytes of each blob of ``ids`` (in ``repo``, a
    repository.Repository whose index is loaded), in order; a blob that
    does not decode where the run read it is read again on its own (its
    error, or another copy)."""
    where: dict[bytes, rf.IndexEntry] = {}
    for bid in ids:
        e = repo.index.get(bid)
        if e is None:
            raise RepositoryError(f"{repo.where}: blob {bid.hex()} is in no index "
                                  "(the repository is damaged; run cloneaware check)")
        where[bid] = e
    got: dict[bytes, bytes] = {}
    run: list[tuple[bytes, rf.IndexEntry]] = []
    for bid, e in sorted(where.items(), key=lambda x: (x[1].pack, x[1].offset)):
        if run:
            first, last = run[0][1], run[-1][1]
            if e.pack != first.pack or e.offset - (last.offset + last.stored_length) \
                    > READ_GAP or e.offset + e.stored_length - first.offset > READ_MAX:
                got.update(zip((b for b, _ in run), read_run(repo, run)))
                run = []
        run.append((bid, e))
    if run:
        got.update(zip((b for b, _ in run), read_run(repo, run)))
    return [got[b] for b in ids]


def read_run(repo, run: list[tuple[bytes, rf.IndexEntry]], keep_errors: bool = False
             ) -> list:
    """The blobs of ``run`` (blob ids and their places, in one pack, in
    increasing offsets) from one ranged read; a blob that does not decode
    there (or a read that fails) is read from another of its copies, if
    the index lists one (Repository.read_blob), else its error is raised
    (``keep_errors``: put in the blob's place, so that the other blobs of
    the run still come: the restore's Fetcher, which restores around a
    damaged blob)."""
    first = run[0][1]
    end = run[-1][1].offset + run[-1][1].stored_length
    pid = first.pack.hex()
    failed: RepositoryError | None = None
    try:
        raw = memoryview(repo.backend.read(pack_name(pid), first.offset, end - first.offset))
    except RepositoryError as ex:
        failed, raw = ex, memoryview(b"")
    out = []
    for bid, e in run:
        err = failed
        if err is None:
            start = e.offset - first.offset
            try:
                if start + e.stored_length > len(raw):
                    raise RepositoryError(f"{repo.where}: pack {pid[:16]} is shorter than "
                                          "its index says")
                out.append(repo.decode_blob(bid, e, raw[start:start + e.stored_length],
                                            f"{repo.where}: blob {bid.hex()[:16]} in pack "
                                            f"{pid[:16]}"))
                continue
            except RepositoryError as ex:
                err = ex
        try:
            if len(repo.index.locations(bid)) < 2:
                raise err
            repo.warn(f"{err}; trying another copy")
            out.append(repo.read_blob(bid, skip=e))
        except RepositoryError as ex:
            if not keep_errors:
                raise
            out.append(ex)
    return out
