#!/usr/bin/env python3
"""How cloneaware's cost grows with extents: scan and backup of a family with
about a million extents, and the sharing index alone on synthetic input.

The family lives on a loopback XFS (reflink=1), or Btrfs with ``--fs btrfs``
(the image under a temporary directory, TMPDIR honoured): a base file of B
4 KiB blocks written in one go; a first clone into which every other block
of the base is cloned with FICLONERANGE, the blocks between left as holes;
and C-1 more clones that are whole-file clones (FICLONE) of the first.  Each
cloned block is an extent of its own in every clone, and XFS also splits the
base's map at every shared/unshared boundary, so FIEMAP reports about
B + C*B/2 extents on XFS (C = 2 by default) and C*B/2 on Btrfs (C = 4).

Measured, each from a cold page cache, as a separate process (wall seconds;
peak RSS from wait4's rusage, also shown above a baseline process that scans
an empty directory):

- ``cloneaware scan --json``;
- ``cloneaware backup --compress none`` (archive on the same XFS);
- in this process: one FIEMAP call per file, then the index build, timed
  apart;
- in this process: ``ex.build_plan`` alone on synthetic extents, with
  tracemalloc's peak.

Target (issue 5): 1 million extents scanned and indexed in < 5 s at < 300
bytes per extent.  Needs root.

    python3 bench/scale.py                  # 1,000,000 extents
    python3 bench/scale.py --extents 100000 # quick
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (bench/bench.py: the shared helpers)

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4096
CLONEAWARE = [sys.executable, "-P", "-m", "cloneaware.cli"]
TARGET_SECONDS = 5.0
TARGET_BYTES_PER_EXTENT = 300


class ScaleError(Exception):
    pass


def log(msg: str) -> None:
    sys.stderr.write(f"scale: {msg}\n")
    sys.stderr.flush()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def measured(cmd: list, workdir: Path, cold: bool = True) -> dict:
    """Run cmd as a child; wall seconds, CPU seconds and its own peak RSS
    (wait4 rusage of that child alone).  stdout is returned as text."""
    if cold:
        drop_caches()
    out = workdir / "stdout"
    err = workdir / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        t0 = time.monotonic()
        p = subprocess.Popen([str(c) for c in cmd], stdout=o, stderr=e)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        t = time.monotonic() - t0
    text = out.read_text()
    if p.returncode not in (0, 1):  # 1: finished with warnings
        raise ScaleError(f"{' '.join(map(str, cmd))} exited {p.returncode}: "
                         f"{err.read_text().strip()[-2000:]}")
    return {"seconds": t, "cpu_seconds": ru.ru_utime + ru.ru_stime,
            "maxrss_bytes": ru.ru_maxrss * 1024, "stdout": text, "rc": p.returncode}


# --- the fragmented family ---------------------------------------------------------

def build(dirpath: Path, blocks: int, clones: int) -> dict:
    import random

    from cloneaware import native

    dirpath.mkdir()
    base = dirpath / "a-base.img"
    size = blocks * BLOCK
    t0 = time.monotonic()
    # Incompressible but cheap to make: one 8 MiB random pattern, repeated
    # (the content does not matter to the extent map or to --compress none).
    pattern = random.Random(1).randbytes(8 << 20)
    with open(base, "wb") as f:
        left = size
        while left:
            left -= f.write(pattern[:min(len(pattern), left)])
        os.fsync(f.fileno())
    t_write = time.monotonic() - t0
    t0 = time.monotonic()
    calls = 0
    first = dirpath / "b-clone00.img"
    with open(base, "rb") as s, open(first, "wb") as d:
        d.truncate(size)
        sfd, dfd = s.fileno(), d.fileno()
        for off in range(0, size, 2 * BLOCK):
            native.ficlonerange(dfd, sfd, off, BLOCK, off)
            calls += 1
        os.fsync(dfd)
    # the other clones: whole-file clones of the first (same extents, same
    # physical blocks; the kernel copies the map, no Python loop per block)
    with open(first, "rb") as s:
        for c in range(1, clones):
            with open(dirpath / f"b-clone{c:02d}.img", "wb") as d:
                native.ficlone(d.fileno(), s.fileno())
                os.fsync(d.fileno())
    os.sync()
    return {"base_bytes": size, "clones": clones, "ficlonerange_calls": calls,
            "write_seconds": t_write, "clone_seconds": time.monotonic() - t0}


def in_process_scan(dirpath: Path) -> dict:
    """FIEMAP each file (one native call each), then the index, timed apart."""
    from cloneaware.index import plan as ex
    from cloneaware.source import mapping

    drop_caches()
    b = ex.IndexBuilder()
    t0 = time.monotonic()
    n = 0
    for p in sorted(dirpath.iterdir()):
        with open(p, "rb") as f:
            ext = mapping.fiemap(f.fileno(), str(p))
            n += len(ext)
            b.add(0, os.fstat(f.fileno()).st_size, ext)
    t_map = time.monotonic() - t0
    t0 = time.monotonic()
    plan = b.build()
    t_index = time.monotonic() - t0
    return {"extents": n, "map_seconds": t_map, "index_seconds": t_index,
            "pieces": len(plan.pieces), "physical_bytes": plan.totals.physical_bytes}


# --- the index alone on synthetic extents ------------------------------------------

def synthetic(E: int):
    """1000 files of E/1000 64 KiB extents; files share with one of the first
    ten (every file f maps the physical layout of file f % 10); 5% of the
    extents rewritten (unique).  Same construction as the project's notes."""
    import numpy as np

    from cloneaware.source.flags import EXTENT_DTYPE

    rng = np.random.default_rng(1)
    F = 1000 if E >= 1000 else 1
    per = E // F
    E = per * F
    ext = np.zeros(E, dtype=EXTENT_DTYPE)
    files = np.repeat(np.arange(F, dtype=np.int64), per)
    lg = np.tile(np.arange(per, dtype=np.uint64) * 65536, F)
    ext["logical"] = lg
    ext["length"] = 65536
    base = (files % 10).astype(np.uint64) * np.uint64(per * 65536 * 2)
    phys = base + lg + np.uint64(4096 * 1000)
    rw = rng.random(E) < 0.05
    phys[rw] = np.uint64(10**12) + np.arange(rw.sum(), dtype=np.uint64) * np.uint64(65536)
    ext["physical"] = phys
    fs = np.zeros(E, dtype=np.int32)
    sizes = np.full(F, per * 65536, dtype=np.uint64)
    return ext, files, fs, sizes


def index_only(E: int, repeat: int = 3) -> dict:
    import tracemalloc

    from cloneaware.index.plan import build_plan

    ext, files, fs, sizes = synthetic(E)
    n = len(ext)
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        plan = build_plan(ext, files, fs, sizes)
        t = time.perf_counter() - t0
        best = t if best is None else min(best, t)
        del plan
    tracemalloc.start()
    plan = build_plan(ext, files, fs, sizes)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    input_bytes = ext.nbytes + files.nbytes + fs.nbytes + sizes.nbytes
    return {"extents": n, "seconds": best, "tracemalloc_peak_bytes": peak,
            "peak_bytes_per_extent": peak / n, "input_bytes_per_extent": input_bytes / n,
            "pieces": len(plan.pieces)}


# --- run ------------------------------------------------------------------------------

def run_scale(args, root: Path, mounted: list) -> dict:
    from cloneaware.testing import make_loopfs, missing_capability

    if os.geteuid() != 0:
        raise ScaleError("needs root (loop mounts, drop_caches)")
    why = missing_capability(args.fs)
    if why:
        raise ScaleError(f"{args.fs}: {why}")
    # XFS splits the base's map at each shared/unshared boundary (one extent
    # per block); Btrfs keeps the base's extents whole.
    per_block = (1 if args.fs == "xfs" else 0) + args.clones / 2
    blocks = int(args.extents / per_block + 0.5)
    blocks += blocks % 2
    size = blocks * BLOCK
    # room for the archive and for the point-in-time clone of each file, whose
    # metadata (an extent tree of the same million extents) is not small
    fs = make_loopfs(root, args.fs, int(3.5 * size) + 2 * GiB)
    mounted.append(fs)
    work = root / "work"
    work.mkdir()
    fam = fs.path / "family"
    log(f"building on {args.fs}: {size / MiB:.0f} MiB base, {args.clones} clones, every "
        f"other 4 KiB block cloned ({blocks // 2} FICLONERANGE calls, "
        f"{args.clones - 1} FICLONE)")
    b = build(fam, blocks, args.clones)
    log(f"built: write {b['write_seconds']:.1f} s, clone {b['clone_seconds']:.1f} s")

    res: dict = {"params": {"fs": args.fs, "extents_target": args.extents,
                            "clones": args.clones, "base_mib": size / MiB},
                 "build": b}
    empty = root / "empty"
    empty.mkdir()
    base_run = measured(CLONEAWARE + ["scan", "--json", empty], work)
    baseline = base_run["maxrss_bytes"]
    res["baseline"] = {"maxrss_bytes": baseline, "seconds": base_run["seconds"]}
    res["loadavg_start"] = os.getloadavg()

    log("cloneaware scan ...")
    s = measured(CLONEAWARE + ["scan", "--json", fam], work)
    totals = json.loads(s["stdout"])["totals"]
    E = totals["extents"]
    res["scan"] = {k: v for k, v in s.items() if k != "stdout"}
    res["extents"] = E
    res["totals"] = totals
    log(f"scan: {s['seconds']:.2f} s, {E} extents")

    log("in-process map + index ...")
    res["in_process"] = in_process_scan(fam)

    log("cloneaware backup --compress none ...")
    archive = fs.path / "family.ca"
    bk = measured(CLONEAWARE + ["backup", "--json", "--compress", "none", "-o", archive, fam],
                  work)
    res["backup"] = {k: v for k, v in bk.items() if k != "stdout"}
    res["backup"]["archive_bytes"] = archive.stat().st_size
    try:
        res["backup"]["summary"] = json.loads(bk["stdout"])
    except ValueError:
        pass
    archive.unlink()
    log(f"backup: {bk['seconds']:.2f} s")

    for k in ("scan", "backup"):
        r = res[k]
        r["bytes_per_extent"] = r["maxrss_bytes"] / E
        r["bytes_per_extent_above_baseline"] = (r["maxrss_bytes"] - baseline) / E
        r["us_per_extent"] = r["seconds"] / E * 1e6
        r["seconds_above_baseline"] = r["seconds"] - res["baseline"]["seconds"]

    res["loadavg_end"] = os.getloadavg()
    log(f"index only on {args.extents} synthetic extents ...")
    res["index_only"] = index_only(args.extents)
    scale = 1_000_000 / E
    per_m = res["scan"]["seconds_above_baseline"] * scale
    res["targets"] = {
        "scan_seconds_per_1M_extents": {"value": s["seconds"] * scale,
                                        "target": TARGET_SECONDS,
                                        "met": s["seconds"] * scale < TARGET_SECONDS},
        "scan_seconds_per_1M_above_startup": {"value": per_m, "target": TARGET_SECONDS,
                                              "met": per_m < TARGET_SECONDS},
        "scan_bytes_per_extent": {"value": res["scan"]["bytes_per_extent"],
                                  "target": TARGET_BYTES_PER_EXTENT,
                                  "met": res["scan"]["bytes_per_extent"]
                                  < TARGET_BYTES_PER_EXTENT},
    }
    return res


def report(res: dict) -> str:
    b = res["build"]
    E = res["extents"]
    lines = [
        f"cloneaware scale: {res['params']['fs']}, {b['base_bytes'] / MiB:.0f} MiB base + "
        f"{b['clones']} clones "
        f"of every other 4 KiB block -> {E:,} extents "
        f"(built in {b['write_seconds'] + b['clone_seconds']:.0f} s)",
        f"baseline process (scan of an empty dir, cold): {res['baseline']['seconds']:.2f} s, "
        f"{res['baseline']['maxrss_bytes'] / MiB:.0f} MiB peak RSS",
        "load average (1 min) at start/end: "
        f"{res['loadavg_start'][0]:.1f} / {res['loadavg_end'][0]:.1f}",
        "",
        f"{'step':<36} {'seconds':>8} {'s>base':>7} {'cpu s':>7} {'us/ext':>7} "
        f"{'peak MiB':>9} {'B/ext':>7} {'B/ext>base':>10}",
        "-" * 98,
    ]
    for name, k in (("cloneaware scan --json", "scan"),
                    ("cloneaware backup --compress none", "backup")):
        r = res[k]
        lines.append(f"{name:<36} {r['seconds']:>8.2f} {r['seconds_above_baseline']:>7.2f} "
                     f"{r['cpu_seconds']:>7.2f} "
                     f"{r['us_per_extent']:>7.2f} {r['maxrss_bytes'] / MiB:>9.0f} "
                     f"{r['bytes_per_extent']:>7.0f} "
                     f"{r['bytes_per_extent_above_baseline']:>10.0f}")
    ip = res["in_process"]
    lines.append(f"{'  in process: FIEMAP of all files':<36} {ip['map_seconds']:>8.2f}")
    lines.append(f"{'  in process: index build':<36} {ip['index_seconds']:>8.2f}")
    io = res["index_only"]
    lines.append(f"{'build_plan, synthetic':<36} {io['seconds']:>8.2f} {'':>7} {'':>7} "
                 f"{io['seconds'] / io['extents'] * 1e6:>7.2f} "
                 f"{io['tracemalloc_peak_bytes'] / MiB:>9.0f} "
                 f"{io['peak_bytes_per_extent']:>7.0f}   ({io['extents']:,} extents; "
                 f"tracemalloc peak, input {io['input_bytes_per_extent']:.0f} B/ext more)")
    bk = res["backup"]
    lines.append(f"\narchive {bk['archive_bytes'] / MiB:.1f} MiB for "
                 f"{res['totals']['physical_bytes'] / MiB:.1f} MiB physical")
    lines.append("")
    if abs(E - 1_000_000) > 10_000:
        lines.append(f"(per-1M values scaled linearly from {E:,} extents)")
    for k, t in res["targets"].items():
        lines.append(f"{k:<36} {t['value']:>8.2f}  target < {t['target']:g}  "
                     f"{'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extents", type=int, default=1_000_000,
                    help="extents to build (about; default 1000000)")
    ap.add_argument("--fs", choices=("xfs", "btrfs"), default="xfs",
                    help="filesystem of the family (xfs)")
    ap.add_argument("--clones", type=int, default=None,
                    help="clones of the base (2 on XFS, 4 on Btrfs)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    ap.add_argument("--keep", action="store_true",
                    help="leave the filesystem mounted and its image in place")
    args = ap.parse_args()
    if args.clones is None:
        args.clones = 2 if args.fs == "xfs" else 4
    if args.extents < 1000 or args.clones < 1:
        ap.error("need --extents >= 1000 and --clones >= 1")
    mounted: list = []
    root = Path(tempfile.mkdtemp(prefix="cloneaware-scale-"))

    def body() -> None:
        res = run_scale(args, root, mounted)
        print(json.dumps(res, indent=2) if args.json else report(res))

    return b.guarded(body, root, mounted, keep=args.keep, errors=(ScaleError,), say=log)

if __name__ == "__main__":
    sys.exit(main())
