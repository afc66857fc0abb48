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
                _read_run(repo, run, got)
                run = []
        run.append((bid, e))
    if run:
        _read_run(repo, run, got)
    return [got[b] for b in ids]


def _read_run(repo, run: list[tuple[bytes, rf.IndexEntry]], got: dict[bytes, bytes]) -> None:
    first = run[0][1]
    pid = first.pack.hex()
    end = run[-1][1].offset + run[-1][1].stored_length
    try:
        raw = memoryview(repo.backend.read(pack_name(pid), first.offset, end - first.offset))
    except RepositoryError:
        raw = memoryview(b"")
    for bid, e in run:
        start = e.offset - first.offset
        try:
            if start + e.stored_length > len(raw):
                raise RepositoryError("short read")
            got[bid] = repo.decode_blob(bid, e, raw[start:start + e.stored_length],
                                        f"{repo.where}: blob {bid.hex()[:16]} in pack "
                                        f"{pid[:16]}")
        except RepositoryError:
            got[bid] = repo.read_blob(bid)  # its own error, or another copy
