"""Extent maps and the sharing index.  Pure logic over numpy arrays.

A file's extent map (EXTENT_DTYPE rows from FIEMAP) is first reduced to its
*data ranges*: extents clamped to the file size, unwritten extents dropped
(they read as zeros).  Each data range is either

- *sweepable*: a plain extent whose physical address locates its bytes, or
- *own*: inline, encoded (compressed), delalloc, unknown or encrypted data,
  whose physical address does not locate bytes (docs/KERNEL.md), so it is never
  treated as shared on physical overlap.

The index takes every sweepable range of the backup set, keyed by the
filesystem it lives on, and works out for each byte of physical space which
place (file, logical offset) comes first in walk order: the *owner*.  The
result is a *plan*: for each file, its data cut into pieces that are either
stored (the file owns them) or a reference to an earlier place.

Complexity: sorting (O(E log E)), a vectorised segment tree for "minimum
order over the ranges covering each elementary segment" (O(E log E)), and a
vectorised expansion of each range over the owner runs it crosses.  No Python
loop runs per extent.
"""
from __future__ import annotations

import array
from dataclasses import dataclass, field

import numpy as np

from cloneaware.source.flags import (
    CA_EXACT,
    EXACT_SHIFT,
    EXTENT_DTYPE,
    FE_DATA_INLINE,
    FE_ENCODED,
    FE_SHARED,
    FE_UNWRITTEN,
    NOT_CANDIDATE,
    OWN_FLAGS,
)

#: A piece of a file in the plan.  ``ref_file`` is -1 for stored data.
#: ``check``: 0 for a piece whose sharing the physical addresses prove;
#: 1 for a candidate reference (an encoded range), to use only if its bytes
#: hash the same as those of the place it names; 2 for stored data that a
#: candidate names (its hash is needed); 3 for stored data that is the whole
#: window of a file onto one compressed extent, and the only stored piece of
#: that extent: it may be stored as the extent's bytes as they are on disk
#: (an encoded DATA record).  See the module docstring.
PIECE_DTYPE = np.dtype(
    [("file", "<i8"), ("logical", "<u8"), ("length", "<u8"),
     ("ref_file", "<i8"), ("ref_logical", "<u8"), ("check", "u1")]
)
CHECK_NONE, CHECK_CANDIDATE, CHECK_HASHED, CHECK_ENCODED = 0, 1, 2, 3


def data_ranges(ext: np.ndarray, size: int) -> np.ndarray:
    """Clamp an extent map to the file size and drop what is not data.

    XFS reports whole blocks, so the last extent may run past EOF; unwritten
    (preallocated) extents read as zeros and are holes for our purposes.
    """
    if len(ext) == 0:
        return ext
    keep = (ext["logical"] < size) & ((ext["flags"] & FE_UNWRITTEN) == 0) & (ext["length"] > 0)
    out = ext[keep].copy()
    end = np.minimum(out["logical"] + out["length"], np.uint64(size))
    out["length"] = end - out["logical"]
    return out


def is_own(flags: np.ndarray, physical: np.ndarray) -> np.ndarray:
    """Ranges that are the file's own data: never shared on physical overlap.
    An encoded range with an exact address (CA_EXACT) is not own."""
    return (((flags & OWN_FLAGS) != 0) & ((flags & CA_EXACT) == 0)) | (physical == 0)


@dataclass
class Totals:
    files: int = 0
    extents: int = 0
    logical_bytes: int = 0
    data_bytes: int = 0
    physical_bytes: int = 0
    shared_bytes: int = 0
    external_shared_bytes: int = 0
    encoded_bytes: int = 0
    #: of encoded_bytes: ranges whose place inside their compressed extent is
    #: known from Btrfs's file extent items (root): shared exactly, unread
    encoded_exact_bytes: int = 0
    #: encoded bytes that name the same compressed extent and length as an
    #: earlier place: shared if their content matches (checked by backup)
    encoded_candidate_bytes: int = 0
    inline_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Plan:
    """The output of the index."""

    totals: Totals
    #: pieces sorted by (file, logical); holes are the gaps between them.
    pieces: np.ndarray
    #: pieces[file_start[f]:file_start[f+1]] are file f's pieces.
    file_start: np.ndarray
    sizes: np.ndarray = field(repr=False)

    def file_pieces(self, f: int) -> np.ndarray:
        return self.pieces[self.file_start[f]:self.file_start[f + 1]]

    def stored_bytes(self) -> int:
        """Bytes the plan stores for sure (candidates may add to them)."""
        own = self.pieces["ref_file"] < 0
        return int(self.pieces["length"][own].sum())

    def referenced_bytes(self) -> int:
        """Bytes proved shared with an earlier place (candidates not counted)."""
        ref = (self.pieces["ref_file"] >= 0) & (self.pieces["check"] != CHECK_CANDIDATE)
        return int(self.pieces["length"][ref].sum())

    def candidate_bytes(self) -> int:
        c = self.pieces["check"] == CHECK_CANDIDATE
        return int(self.pieces["length"][c].sum())

    def families(self) -> list[np.ndarray]:
        """Clone families: sets of files connected by references, largest first.

        Files with no sharing inside the set are not listed.
        """
        ref = self.pieces["ref_file"] >= 0
        a = self.pieces["file"][ref]
        b = self.pieces["ref_file"][ref]
        a, b = a[a != b], b[a != b]
        if len(a) == 0:
            return []
        pairs = np.unique(np.stack([a, b], axis=1), axis=0)
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            root = x
            while parent.get(root, root) != root:
                root = parent[root]
            while parent.get(x, x) != root:
                parent[x], x = root, parent[x]
            return root

        for x, y in pairs.tolist():
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
        groups: dict[int, list[int]] = {}
        for x in set(pairs.ravel().tolist()):
            groups.setdefault(find(x), []).append(x)
        fams = [np.array(sorted(g), dtype=np.int64) for g in groups.values()]
        fams.sort(key=lambda g: (-int(self.sizes[g].sum()), int(g[0])))
        return fams


class IndexBuilder:
    """Collects extent maps in walk order, then builds the plan.

    Memory is each file's map as given (32 bytes an extent; a backup keeps
    it anyway, for its files cache) until the plan is built, when the maps
    are clamped to data ranges and concatenated in one sweep, with their
    file and filesystem numbers (4 bytes each).  build() may be called
    again after more add() calls: that plan covers every file added (scan
    adds the anchors after the scanned files).
    """

    def __init__(self) -> None:
        self._fs: list[np.ndarray] = []
        self._maps: list[np.ndarray] = []
        self._files: list[np.ndarray] = []
        self._sizes: list[int] = []
        self.extent_count = 0
        #: maps added since the last build, as given, with their file and
        #: filesystem numbers: clamped to data ranges in one sweep when the
        #: plan is built (data_ranges on each map cost 20 us a file)
        self._added: list[np.ndarray] = []
        self._added_file = array.array("q")
        self._added_fs = array.array("q")

    def add(self, fs: int, size: int, ext: np.ndarray) -> int:
        """Add file number n (returned) on filesystem ``fs`` (a small int)."""
        n = len(self._sizes)
        self._sizes.append(size)
        self.extent_count += len(ext)
        if len(ext):
            self._added.append(ext)
            self._added_file.append(n)
            self._added_fs.append(fs)
        return n

    def _settle(self, sizes: np.ndarray) -> None:
        """The data ranges of the maps added since the last build, as
        data_ranges makes them, file by file."""
        if not self._added:
            return
        counts = np.fromiter((len(x) for x in self._added), dtype=np.int64,
                             count=len(self._added))
        ext = _join(self._added)
        files = np.repeat(np.frombuffer(self._added_file, dtype=np.int64), counts)
        fs = np.repeat(np.frombuffer(self._added_fs, dtype=np.int64), counts)
        self._added_file, self._added_fs = array.array("q"), array.array("q")
        size = sizes[files]
        keep = (ext["logical"] < size) & ((ext["flags"] & FE_UNWRITTEN) == 0) \
            & (ext["length"] > 0)
        d = ext[keep]  # a copy: the callers' maps are not changed
        d["length"] = np.minimum(d["logical"] + d["length"], size[keep]) - d["logical"]
        if len(d):
            self._maps.append(d)
            self._files.append(files[keep].astype(np.int32))
            self._fs.append(fs[keep].astype(np.int32))

    def build(self) -> Plan:
        sizes = np.array(self._sizes, dtype=np.uint64)
        self._settle(sizes)
        if self._maps:
            # one array each from now on (the lists' arrays go as each is joined)
            ext, files, fs = (_join(parts) for parts in (self._maps, self._files, self._fs))
            self._maps, self._files, self._fs = [ext], [files], [fs]
        else:
            ext = np.zeros(0, dtype=EXTENT_DTYPE)
            files = np.zeros(0, dtype=np.int64)
            fs = np.zeros(0, dtype=np.int32)
        return build_plan(ext, files, fs, sizes, self.extent_count)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate and empty ``parts``."""
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    parts.clear()
    return out


def build_plan(ext: np.ndarray, files: np.ndarray, fs: np.ndarray,
               sizes: np.ndarray, extent_count: int | None = None) -> Plan:
    """Build the plan from data ranges in walk order.

    ``ext`` holds data ranges (see data_ranges) of all files, grouped by file
    in walk order and sorted by logical offset inside each file; ``files``
    and ``fs`` give each range's file number and filesystem number.

    Memory: the pieces (PIECE_DTYPE, 41 bytes each) and a few arrays per
    range; _sweep keeps its temporaries short-lived (module docstring).
    """
    t = Totals()
    t.files = len(sizes)
    t.extents = len(ext) if extent_count is None else extent_count
    t.logical_bytes = int(sizes.sum()) if len(sizes) else 0
    length = ext["length"]
    t.data_bytes = int(length.sum()) if len(ext) else 0

    own = is_own(ext["flags"], ext["physical"])
    parts = []
    # Own data: stored by its file, never a reference.
    if own.any():
        o = np.nonzero(own)[0]
        p = np.zeros(len(o), dtype=PIECE_DTYPE)
        p["file"] = files[o]
        p["logical"] = ext["logical"][o]
        p["length"] = length[o]
        p["ref_file"] = -1
        t.encoded_candidate_bytes = _candidates(p, ext[o], fs[o])
        parts.append(p)
        t.inline_bytes = int(length[o][(ext["flags"][o] & FE_DATA_INLINE) != 0].sum())
        t.physical_bytes += _encoded_physical(ext[o], fs[o])
        t.external_shared_bytes += int(length[o][(ext["flags"][o] & FE_SHARED) != 0].sum())
        del o, p

    if len(ext):
        enc = (ext["flags"] & FE_ENCODED) != 0
        t.encoded_bytes = int(length[enc].sum())
        t.encoded_exact_bytes = int(length[enc & ~own].sum())
        del enc
    sweep = np.nonzero(~own)[0]
    del own
    if len(sweep):
        # exact compressed addresses are an address space of their own
        space = fs[sweep].astype(np.int64) * 2 \
            + ((ext["flags"][sweep] & CA_EXACT) != 0).astype(np.int64)
        groups = _unique(space)
        if len(groups) == 1 and len(sweep) == len(ext):
            # the common case, one filesystem and nothing own: no copy of the input
            del sweep, space
            parts.append(_sweep(ext, files, t, exact=bool(groups[0] & 1)))
        else:
            for g in groups:
                idx = sweep[space == g]
                parts.append(_sweep(ext[idx], files[idx], t, exact=bool(g & 1)))
                del idx
            del sweep, space

    if len(parts) == 1:
        pieces = parts.pop()
    elif parts:
        pieces = np.concatenate(parts)
        del parts
    else:
        pieces = np.zeros(0, dtype=PIECE_DTYPE)
    if not _sorted_by_file(pieces):
        pieces = pieces[np.lexsort((pieces["logical"], pieces["file"]))]
    pieces = _merge(pieces)
    file_start = np.searchsorted(pieces["file"], np.arange(len(sizes) + 1))
    return Plan(totals=t, pieces=pieces, file_start=file_start, sizes=sizes)


def _sorted_by_file(p: np.ndarray) -> bool:
    """Whether pieces are already in (file, logical) order, as one address
    space's pieces come out of _sweep: then no sort (and no copy) is needed.
    (A stable sort of sorted pieces would leave them as they are.)"""
    if len(p) < 2:
        return True
    f, lg = p["file"], p["logical"]
    up = f[1:] > f[:-1]
    up |= (f[1:] == f[:-1]) & (lg[1:] >= lg[:-1])
    return bool(up.all())


def _encoded_physical(ext: np.ndarray, fs: np.ndarray) -> int:
    """Physical bytes of own ranges.

    Inline and other own ranges count as their length.  Encoded ranges that
    name the same (filesystem, physical start) are one extent on disk, seen
    through different windows: count the longest window once (the logical
    size of the compressed extent, the best FIEMAP can tell).
    """
    enc = ((ext["flags"] & FE_ENCODED) != 0) & (ext["physical"] != 0)
    total = int(ext["length"][~enc].sum())
    if enc.any():
        e = ext[enc]
        key = np.stack([fs[enc].astype(np.uint64), e["physical"]], axis=1)
        _, inv = np.unique(key, axis=0, return_inverse=True)
        inv = inv.ravel()
        best = np.zeros(inv.max() + 1, dtype=np.uint64)
        np.maximum.at(best, inv, e["length"])
        total += int(best.sum())
    return total


def _candidates(p: np.ndarray, ext: np.ndarray, fs: np.ndarray) -> int:
    """Mark encoded own pieces ``p`` (rows of ``ext`` on ``fs``, in walk
    order) that name the same (filesystem, compressed extent, length) as an
    earlier one: candidate references to the first.  -> candidate bytes."""
    ok = (((ext["flags"] & FE_ENCODED) != 0) & ((ext["flags"] & NOT_CANDIDATE) == 0)
          & (ext["physical"] != 0))
    c = np.nonzero(ok)[0]
    if len(c) < 2:
        return 0
    ln = ext["length"][c]
    ph = ext["physical"][c]
    f = fs[c]
    order = np.lexsort((c, ln, ph, f))  # groups of equal keys, walk order inside
    c, ln, ph, f = c[order], ln[order], ph[order], f[order]
    new = np.ones(len(c), dtype=bool)
    new[1:] = (f[1:] != f[:-1]) | (ph[1:] != ph[:-1]) | (ln[1:] != ln[:-1])
    first = c[np.maximum.accumulate(np.where(new, np.arange(len(c)), 0))]
    member = ~new
    if not member.any():
        return 0
    m = c[member]
    src = first[member]
    p["ref_file"][m] = p["file"][src]
    p["ref_logical"][m] = p["logical"][src]
    p["check"][m] = CHECK_CANDIDATE
    p["check"][np.unique(src)] = CHECK_HASHED
    return int(ln[member].sum())


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values: np.unique without its overhead (numpy 2.x's
    np.unique is many times slower than a sort on millions of values)."""
    if len(a) == 0:
        return a
    return _distinct_sorted(np.sort(a))


def _distinct_sorted(a: np.ndarray) -> np.ndarray:
    """The distinct values of a sorted array."""
    if len(a) == 0:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _min_cover(si: np.ndarray, ei: np.ndarray, val: np.ndarray | None,
               nseg: int) -> np.ndarray:
    """For each segment j in [0, nseg), the minimum val[r] over ranges with
    si[r] <= j < ei[r]; -1 where no range covers j.  ``val`` None: each
    range's own number r.  The result is int32 when the values fit.

    A bottom-up segment tree whose range updates are applied for all ranges
    at once, one tree level per step, then pushed down level by level.
    """
    n = 1
    while n < max(nseg, 1):
        n *= 2
    r = len(si)
    dt = np.int32 if 2 * n < 2**31 and r < 2**31 - 1 else np.int64
    if val is not None and len(val) and (val.min() < np.iinfo(dt).min
                                          or val.max() >= np.iinfo(dt).max):
        dt = np.int64
    big = np.iinfo(dt).max
    tree = np.full(2 * n, big, dtype=dt)
    lo: np.ndarray = si.astype(dt) + n
    hi: np.ndarray = ei.astype(dt) + n
    v: np.ndarray = np.arange(r, dtype=dt) if val is None else val.astype(dt)
    while True:
        act = lo < hi
        if not act.any():
            break
        m = act & ((lo & 1) == 1)
        np.minimum.at(tree, lo[m], v[m])
        lo[m] += 1
        m = act & ((hi & 1) == 1)
        hi[m] -= 1
        np.minimum.at(tree, hi[m], v[m])
        keep = lo < hi
        lo, hi, v = lo[keep] >> 1, hi[keep] >> 1, v[keep]
    del lo, hi, v
    k = 1
    while k < n:
        parent = tree[k:2 * k]
        np.minimum(tree[2 * k:4 * k:2], parent, out=tree[2 * k:4 * k:2])
        np.minimum(tree[2 * k + 1:4 * k:2], parent, out=tree[2 * k + 1:4 * k:2])
        k *= 2
    out = tree[n:n + nseg].copy()  # the tree can go
    del tree
    out[out == big] = -1
    return out


#: Pieces made per step of _sweep's expansion: bounds its temporaries (a
#: few arrays of this length) whatever the number of pieces.
EXPAND_STEP = 1 << 17


def _sweep(ext: np.ndarray, files: np.ndarray, t: Totals, exact: bool = False) -> np.ndarray:
    """Index sweepable ranges ``ext`` (all on one filesystem, in walk order;
    ``files``: the file number of each).  ``exact``: they are exact
    compressed addresses (CA_EXACT); an owner piece that is a whole range
    and the only owner piece of its compressed extent is marked
    CHECK_ENCODED.

    The physical addresses where ranges start or end cut the address space
    into elementary segments; each segment's owner is the first range (in
    walk order) covering it, and consecutive segments with the same owner
    form a run.  A range becomes one piece per run it crosses: a stored
    piece where it is the run's owner, else a reference to the owner's
    place.  Temporaries are freed as soon as they are used, and the pieces
    are made EXPAND_STEP at a time into the output: the peak is the output
    plus a few arrays per range.
    """
    ps = ext["physical"]
    ln = ext["length"]
    r = len(ext)

    pe = ps + ln
    points = np.concatenate([ps, pe])
    points.sort()
    points = _distinct_sorted(points)
    idx_t = np.int32 if len(points) < 2**31 else np.int64
    si = np.searchsorted(points, ps).astype(idx_t)
    ei = np.searchsorted(points, pe).astype(idx_t)
    del pe
    nseg = len(points) - 1

    # Totals, from how many ranges cover each segment.
    cover = np.bincount(si, minlength=nseg + 1)
    cover -= np.bincount(ei, minlength=nseg + 1)
    np.cumsum(cover, out=cover)
    cover = cover[:nseg]
    owner = _min_cover(si, ei, None, nseg)
    seglen = (points[1:] - points[:-1]).astype(np.uint64)
    t.physical_bytes += int(seglen[cover > 0].sum())
    multi = cover >= 2
    t.shared_bytes += int((seglen[multi] * cover[multi].astype(np.uint64)).sum())
    del multi
    single = np.nonzero(cover == 1)[0]
    del cover
    ext_shared = (ext["flags"][owner[single]] & FE_SHARED) != 0
    t.external_shared_bytes += int(seglen[single][ext_shared].sum())
    del single, ext_shared, seglen

    # Runs of consecutive segments with the same owner.
    new_run = np.ones(nseg, dtype=bool)
    np.not_equal(owner[1:], owner[:-1], out=new_run[1:])
    run_id: np.ndarray = np.cumsum(new_run, dtype=idx_t)
    run_id -= 1
    run_first = np.nonzero(new_run)[0]
    del new_run
    run_owner = owner[run_first]
    del owner
    run_pstart = points[run_first]
    run_pend = points[np.append(run_first[1:], nseg)]
    del run_first, points

    # The runs each range crosses: k0 .. k0 + count - 1.
    k0 = run_id[si]
    count = run_id[ei - 1].astype(np.int64)
    del run_id, si, ei
    count -= k0
    count += 1
    end_at = np.cumsum(count)  # pieces of range i end at end_at[i]
    total = int(end_at[-1]) if r else 0
    # k of piece j of range i is k0[i] + j - (end_at[i] - count[i])
    k_shift = k0 - (end_at - count)
    del k0

    lg = ext["logical"]
    out = np.zeros(total, dtype=PIECE_DTYPE)
    if exact:
        extent_of = np.empty(total, dtype=np.uint64)
        whole = np.empty(total, dtype=bool)
    r0 = 0
    while r0 < r:
        p0 = int(end_at[r0] - count[r0])
        r1 = max(int(np.searchsorted(end_at, p0 + EXPAND_STEP, side="right")), r0 + 1)
        p1 = int(end_at[r1 - 1])
        rep = np.repeat(np.arange(r0, r1, dtype=np.int64), count[r0:r1])
        k = np.arange(p0, p1, dtype=np.int64)
        k += np.repeat(k_shift[r0:r1], count[r0:r1])
        p_rep = ps[rep]
        start = np.maximum(p_rep, run_pstart[k])
        end = np.minimum(p_rep + ln[rep], run_pend[k])
        own_of = run_owner[k]
        del k
        o = out[p0:p1]
        o["file"] = files[rep]
        o["logical"] = lg[rep] + (start - p_rep)
        o["length"] = end - start
        is_ref = own_of != rep
        o["ref_file"] = np.where(is_ref, files[own_of], -1)
        o["ref_logical"] = np.where(is_ref, lg[own_of] + (start - ps[own_of]), 0)
        if exact:
            whole[p0:p1] = ~is_ref & (end > start) & (start == p_rep) \
                & (end == p_rep + ln[rep])
            extent_of[p0:p1] = p_rep >> np.uint64(12 + EXACT_SHIFT)
        del rep, p_rep, start, end, own_of, is_ref, o
        r0 = r1
    if exact:
        # how many stored pieces each compressed extent has
        stored = (out["ref_file"] < 0) & (out["length"] > 0)
        ks = np.sort(extent_of[stored])
        del stored
        n_owner = np.searchsorted(ks, extent_of, side="right") \
            - np.searchsorted(ks, extent_of)
        out["check"][whole & (n_owner == 1)] = CHECK_ENCODED
    keep = out["length"] > 0
    return out if keep.all() else out[keep]


def _merge(p: np.ndarray) -> np.ndarray:
    """Merge logically adjacent pieces of one file that continue each other."""
    if len(p) < 2:
        return p
    same = (
        (p["check"][1:] == 0) & (p["check"][:-1] == 0)
        & (p["file"][1:] == p["file"][:-1])
        & (p["logical"][1:] == p["logical"][:-1] + p["length"][:-1])
        & (p["ref_file"][1:] == p["ref_file"][:-1])
        & ((p["ref_file"][1:] < 0)
           | (p["ref_logical"][1:] == p["ref_logical"][:-1] + p["length"][:-1]))
    )
    start = np.ones(len(p), dtype=bool)
    start[1:] = ~same
    firsts = np.nonzero(start)[0]
    out = p[firsts]  # fancy indexing: already a copy
    out["length"] = np.add.reduceat(p["length"], firsts)
    return out
