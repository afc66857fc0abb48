"""Property tests of the sharing index against a brute-force per-byte model.

Synthetic extent maps use small integers (a "byte" here stands for any unit),
so the model can enumerate every byte: each (file, logical) place of data,
and for each sweepable place the (filesystem, physical) byte it maps to.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloneaware.index import plan as ex
from cloneaware.source import flags

# Flags drawn for synthetic extents, plain data most often.
FLAG_CHOICES = (
    [0] * 8
    + [flags.FE_SHARED] * 3
    + [flags.FE_LAST,
       flags.FE_ENCODED,
       flags.FE_ENCODED | flags.FE_SHARED,
       flags.FE_DATA_INLINE | flags.FE_NOT_ALIGNED | flags.FE_LAST,
       flags.FE_UNWRITTEN,
       flags.FE_UNWRITTEN | flags.FE_SHARED,
       flags.FE_DELALLOC | flags.FE_UNKNOWN,
       flags.FE_UNKNOWN,
       flags.FE_DATA_ENCRYPTED,
       flags.FE_DATA_TAIL | flags.FE_NOT_ALIGNED,
       0x1000]  # MERGED: not an own flag, the range is swept
)


@st.composite
def file_sets(draw, max_files: int = 5, max_extents: int = 6, max_phys: int = 40,
              flag_choices=FLAG_CHOICES, max_length: int = 12):
    """A list of (fs, size, rows) in walk order; rows are (logical, physical,
    length, flags) sorted by logical and not overlapping (gaps are holes)."""
    nfs = draw(st.integers(1, 2))
    nfiles = draw(st.integers(1, max_files))
    out = []
    for _ in range(nfiles):
        fs = draw(st.integers(0, nfs - 1))
        rows = []
        pos = draw(st.integers(0, 3))
        for _ in range(draw(st.integers(0, max_extents))):
            length = draw(st.integers(1, max_length))
            phys = draw(st.integers(0, max_phys))
            flags = draw(st.sampled_from(flag_choices))
            rows.append((pos, phys, length, flags))
            pos += length + draw(st.integers(0, 4))
        end = rows[-1][0] + rows[-1][2] if rows else 0
        # Sizes below the end clamp (or drop) the last extents, as XFS's
        # whole-block extents and a truncated file do; above it, a tail hole.
        size = draw(st.integers(max(0, end - 14), end + 5))
        out.append((fs, size, rows))
    return out


def to_array(rows) -> np.ndarray:
    a = np.zeros(len(rows), dtype=flags.EXTENT_DTYPE)
    for i, (lg, ph, ln, fl) in enumerate(rows):
        a[i] = (lg, ph, ln, fl, 0)
    return a


def plan_of(files) -> ex.Plan:
    b = ex.IndexBuilder()
    for n, (fs, size, rows) in enumerate(files):
        assert b.add(fs, size, to_array(rows)) == n
    return b.build()


class Model:
    """What the plan must say, computed byte by byte."""

    def __init__(self, files):
        self.places: dict[tuple[int, int], tuple] = {}
        self.first: dict[tuple[int, int], tuple[int, int]] = {}
        self.count: Counter = Counter()
        self.flags_of: dict[tuple[int, int], int] = {}
        own_phys = 0
        encoded_windows: dict[tuple[int, int], int] = {}
        # candidates: encoded ranges naming the same (fs, physical, length)
        first_window: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.hashed: set[tuple[int, int]] = set()  # first places that a candidate names
        t = ex.Totals()
        t.files = len(files)
        t.extents = sum(len(r) for _, _, r in files)
        t.logical_bytes = sum(s for _, s, _ in files)
        for f, (fs, size, rows) in enumerate(files):
            for lg, ph, ln, fl in rows:
                if fl & flags.FE_UNWRITTEN:
                    continue  # reads as zeros: a hole
                own = bool(fl & flags.OWN_FLAGS) or ph == 0
                clamped = max(0, min(lg + ln, size) - lg)
                cand_of = None
                if own and clamped:
                    if fl & flags.FE_ENCODED and ph != 0:
                        key = (fs, ph)
                        encoded_windows[key] = max(encoded_windows.get(key, 0), clamped)
                        if not fl & flags.NOT_CANDIDATE:
                            first = first_window.setdefault((fs, ph, clamped), (f, lg))
                            if first != (f, lg):
                                cand_of = first
                                self.hashed.add(first)
                                t.encoded_candidate_bytes += clamped
                    else:
                        own_phys += clamped
                for b in range(clamped):
                    place = (f, lg + b)
                    assert place not in self.places, "generator made overlapping extents"
                    self.flags_of[place] = fl
                    if own:
                        self.places[place] = (("cand", (cand_of[0], cand_of[1] + b))
                                              if cand_of else ("own", (f, lg)))
                        if fl & flags.FE_SHARED:
                            t.external_shared_bytes += 1
                        if fl & flags.FE_ENCODED:
                            t.encoded_bytes += 1
                        if fl & flags.FE_DATA_INLINE:
                            t.inline_bytes += 1
                    else:
                        key = (fs, ph + b)
                        self.places[place] = ("phys", key)
                        self.count[key] += 1
                        self.first.setdefault(key, place)  # places come in walk order
        t.data_bytes = len(self.places)
        t.physical_bytes = len(self.count) + own_phys + sum(encoded_windows.values())
        t.shared_bytes = sum(c for c in self.count.values() if c >= 2)
        t.external_shared_bytes += sum(
            1 for key, c in self.count.items()
            if c == 1 and self.flags_of[self.first[key]] & flags.FE_SHARED)
        self.totals = t


def expand(plan: ex.Plan):
    """Per byte: None if stored, else the (file, logical) it refers to; and
    per byte, the piece's check mark and the piece's first place."""
    out: dict[tuple[int, int], tuple[int, int] | None] = {}
    check: dict[tuple[int, int], tuple[int, tuple[int, int]]] = {}
    for p in plan.pieces.tolist():
        f, lg, ln, rf, rl, ck = p
        assert ln > 0, f"empty piece {p}"
        assert (rf >= 0) == (ck != ex.CHECK_HASHED) or ck == ex.CHECK_NONE, p
        for i in range(ln):
            place = (f, lg + i)
            assert place not in out, f"byte {place} in two pieces"
            out[place] = None if rf < 0 else (rf, rl + i)
            check[place] = (ck, (f, lg))
    return out, check


def check_plan(files, plan: ex.Plan) -> None:
    m = Model(files)
    assert plan.totals == m.totals

    # Every byte of data is in exactly one piece; every other byte is a hole.
    got, check = expand(plan)
    assert set(got) == set(m.places)

    for place, kind in m.places.items():
        target = got[place]
        ck, piece_first = check[place]
        if kind[0] == "own":
            # Encoded, inline and other own data: stored, never a proved reference...
            assert target is None, f"own byte {place} became a reference"
            # ...and hashed, in a piece of its own, if a candidate names its range
            if kind[1] in m.hashed:
                assert ck == ex.CHECK_HASHED and piece_first == kind[1]
            else:
                assert ck == ex.CHECK_NONE
            continue
        if kind[0] == "cand":
            # a compressed range naming the same extent and length as an earlier
            # one: a candidate reference to that first place, byte for byte
            assert ck == ex.CHECK_CANDIDATE and target == kind[1], (place, target, kind)
            assert got[target] is None and target < place
            continue
        assert ck == ex.CHECK_NONE
        key = kind[1]
        if m.first[key] == place:
            assert target is None, f"{place} is the first place of {key} but not stored"
            continue
        assert target is not None, f"{place} maps {key}, first mapped at {m.first[key]}"
        # ...the referenced place maps the same physical byte on the same fs,
        assert m.places[target] == ("phys", key)
        # comes earlier in walk order,
        assert target < place
        # is itself stored data, and is the first place of that byte.
        assert got[target] is None
        assert target == m.first[key]
    # ...and never referenced.
    for place, target in got.items():
        if target is not None:
            assert m.places[target][0] == ("own" if m.places[place][0] == "cand" else "phys")

    # Layout of the pieces: sorted, per-file slices, maximal.
    p = plan.pieces
    keys = list(zip(p["file"].tolist(), p["logical"].tolist(), strict=True))
    assert keys == sorted(keys)
    assert len(plan.file_start) == len(files) + 1
    for f in range(len(files)):
        fp = plan.file_pieces(f)
        assert (fp["file"] == f).all()
        ends = fp["logical"][:-1] + fp["length"][:-1]
        assert (ends <= fp["logical"][1:]).all()
    for a, b in zip(p[:-1].tolist(), p[1:].tolist(), strict=True):
        if a[0] == b[0] and a[1] + a[2] == b[1] and a[3] == b[3] and a[5] == b[5] == 0:
            assert a[3] >= 0 and a[4] + a[2] != b[4], f"{a} and {b} should be one piece"
    assert plan.stored_bytes() == sum(1 for t in got.values() if t is None)
    assert plan.candidate_bytes() == m.totals.encoded_candidate_bytes
    assert plan.referenced_bytes() == sum(1 for t in got.values() if t is not None) \
        - plan.candidate_bytes()
    assert plan.stored_bytes() + plan.referenced_bytes() + plan.candidate_bytes() \
        == m.totals.data_bytes

    check_families(plan, got, len(files))


def check_families(plan: ex.Plan, got, nfiles: int) -> None:
    parent = list(range(nfiles))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    linked = set()
    for (f, _), t in got.items():
        if t is not None and t[0] != f:
            parent[find(f)] = find(t[0])
            linked.update((f, t[0]))
    groups: dict[int, set] = {}
    for f in linked:
        groups.setdefault(find(f), set()).add(f)
    fams = plan.families()
    assert sorted(sorted(g.tolist()) for g in fams) == sorted(sorted(g) for g in groups.values())
    sizes = [int(plan.sizes[g].sum()) for g in fams]
    assert sizes == sorted(sizes, reverse=True)


SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(file_sets())
def test_plan_matches_byte_model(files):
    check_plan(files, plan_of(files))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file_sets(max_files=3, max_extents=10, max_phys=12))
def test_plan_matches_byte_model_dense_self_sharing(files):
    """Few physical bytes, many extents: heavy self-sharing within a file."""
    check_plan(files, plan_of(files))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file_sets(max_files=4, max_extents=6, max_phys=6, max_length=4,
                 flag_choices=[flags.FE_ENCODED] * 4 + [flags.FE_ENCODED | flags.FE_SHARED,
                                                     flags.FE_ENCODED | flags.FE_DELALLOC, 0]))
def test_plan_matches_byte_model_compressed(files):
    """Mostly compressed ranges on few extent starts: many candidates, some in
    the same file, some with other flags that rule them out."""
    check_plan(files, plan_of(files))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file_sets())
def test_plan_is_scale_invariant(files):
    """Real maps: 4 KiB units and physical addresses far above 2**32.
    The plan must be the small plan, scaled."""
    unit, base = 4096, 1 << 44
    big = [(fs, size * unit,
            [(lg * unit, ph * unit + base if ph else 0, ln * unit, fl)
             for lg, ph, ln, fl in rows])
           for fs, size, rows in files]
    small, large = plan_of(files), plan_of(big)
    t = small.totals.as_dict()
    for k in ("logical_bytes", "data_bytes", "physical_bytes", "shared_bytes",
              "external_shared_bytes", "encoded_bytes", "encoded_candidate_bytes",
              "inline_bytes"):
        t[k] *= unit
    assert large.totals.as_dict() == t
    assert len(small.pieces) == len(large.pieces)
    assert (large.pieces["file"] == small.pieces["file"]).all()
    assert (large.pieces["ref_file"] == small.pieces["ref_file"]).all()
    for k in ("logical", "length", "ref_logical"):
        assert (large.pieces[k] == small.pieces[k] * np.uint64(unit)).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 10), st.integers(0, 50)),
                max_size=30),
       st.integers(0, 3))
def test_min_cover_brute_force(ranges, extra):
    nseg = max([s + n for s, n, _ in ranges] + [0]) + extra
    si = np.array([s for s, _, _ in ranges], dtype=np.int64)
    ei = np.array([s + n for s, n, _ in ranges], dtype=np.int64)
    val = np.array([v for _, _, v in ranges], dtype=np.int64)
    got = ex._min_cover(si, ei, val, nseg)
    want = [min([v for s, n, v in ranges if s <= j < s + n], default=-1) for j in range(nseg)]
    assert got.tolist() == want


def test_build_plan_direct_matches_builder():
    """build_plan on hand-made data ranges, without IndexBuilder."""
    files = [(0, 40, [(0, 100, 20, 0), (24, 110, 10, 0)]),   # self-sharing 110..120
             (0, 30, [(0, 105, 30, flags.FE_SHARED)])]
    ext = np.concatenate([to_array(r) for _, _, r in files])
    fl = np.array([0, 0, 1], dtype=np.int64)
    fs = np.zeros(3, dtype=np.int32)
    plan = ex.build_plan(ext, fl, fs, np.array([40, 30], dtype=np.uint64))
    check_plan(files, plan)
    assert plan.totals.extents == 3
    # file 0: 20..24 is a hole; 24..34 maps 110..120, first mapped at logical 10..20
    assert plan.file_pieces(0).tolist() == [(0, 0, 20, -1, 0, 0), (0, 24, 10, 0, 10, 0)]
    # file 1: 105..110 first seen at 5, 110..120 at 10, 120..135 is new.
    assert plan.file_pieces(1).tolist() == [(1, 0, 15, 0, 5, 0), (1, 15, 15, -1, 0, 0)]
    assert plan.totals.physical_bytes == 35
    assert plan.totals.shared_bytes == 5 * 2 + 10 * 3
    assert plan.totals.external_shared_bytes == 15  # SHARED, covered once: 120..135
