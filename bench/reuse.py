#!/usr/bin/env python3
"""Does ``restore --reshare-existing`` pay off?  Day 2's archive restored over a
restore of day 1, with ``--force`` (every stored byte written again) and with
``--reshare-existing`` (each stored range cloned from the file already there,
read back, and written only where it differs), on Btrfs and XFS.

The family: a base image and reflinked clones; on day 2, 2% of the base and
of every clone is rewritten in scattered 64 KiB blocks.  Archives are on a
loopback ext4.  Each restore starts from a cold page cache and ends after a
sync.  Reported per restore: seconds, the bytes the restore wrote (its JSON
summary) and the bytes the loop device wrote and read (``/sys/block``), the
usage of DEST after it, and the usage of DEST together with a reflink copy
of day 1 kept beside it (what a snapshot of DEST would hold: unchanged data
that is written again is no longer shared with it).  Needs root.

    python3 bench/reuse.py               # 512 MiB base, 8 clones (~3 min)
    python3 bench/reuse.py --size 64     # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (bench/bench.py: the shared helpers)

MiB = 1 << 20
GiB = 1 << 30
CLONEAWARE = [sys.executable, "-P", "-m", "cloneaware.cli"]


def log(msg: str) -> None:
    sys.stderr.write(f"reuse: {msg}\n")
    sys.stderr.flush()


def run(cmd: list) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"reuse: {' '.join(map(str, cmd))} exited {r.returncode}: "
                         f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def device_io(mnt: Path) -> tuple[int, int]:
    """(bytes written, bytes read) so far by the loop device mounted at mnt."""
    dev = run(["findmnt", "-no", "SOURCE", mnt]).strip()
    fields = Path(f"/sys/block/{os.path.basename(dev)}/stat").read_text().split()
    return int(fields[6]) * 512, int(fields[2]) * 512


def physical(*paths) -> int:
    return json.loads(run(CLONEAWARE + ["scan", "--json", *paths]))["totals"]["physical_bytes"]


def bench(args, root: Path, mounted: list) -> list[dict]:
    from cloneaware.testing import make_loopfs, reflink_copy, rewrite_blocks, write_random

    size = args.size * MiB
    logical = size * (args.clones + 1)
    ar = make_loopfs(root, "ext4", 3 * logical // 2 + GiB)
    mounted.append(ar)
    rows = []
    for kind in ("btrfs", "xfs"):
        fs = make_loopfs(root, kind, 5 * logical + 2 * GiB)
        mounted.append(fs)
        src = fs.path / "src" / "fam"
        (src / "images").mkdir(parents=True)
        base = src / "images" / "base.img"
        write_random(base, size, 1)
        clones = [src / "images" / f"clone{i}.img" for i in range(args.clones)]
        for i, c in enumerate(clones):
            reflink_copy(base, c)
            rewrite_blocks(c, args.change, 100 + i)
        os.sync()
        day1, day2 = ar.path / f"{kind}-day1.ca", ar.path / f"{kind}-day2.ca"
        run(CLONEAWARE + ["backup", "-o", day1, src])
        for i, f in enumerate([base, *clones]):
            rewrite_blocks(f, args.change, 200 + i)
        os.sync()
        run(CLONEAWARE + ["backup", "-o", day2, src])
        for mode in ("--force", "--reshare-existing"):
            dest, kept = fs.path / "dest", fs.path / "kept"
            run(CLONEAWARE + ["restore", day1, dest])
            run(["cp", "-a", "--reflink=always", dest, kept])
            log(f"{kind}: restore {mode} ...")
            drop_caches()
            w0, r0 = device_io(fs.path)
            t0 = time.monotonic()
            out = json.loads(run(CLONEAWARE + ["restore", "--json", mode, day2, dest]))
            os.sync()
            t = time.monotonic() - t0
            w1, r1 = device_io(fs.path)
            rows.append({"fs": kind, "mode": mode, "seconds": t,
                         "written_bytes": out["written_bytes"],
                         "reused_bytes": out.get("reused_bytes", 0),
                         "device_written_bytes": w1 - w0, "device_read_bytes": r1 - r0,
                         "usage": physical(dest), "usage_with_day1": physical(dest, kept),
                         "source_usage": physical(src)})
            log(f"{kind}: restore {mode}: {t:.2f} s")
            shutil.rmtree(dest)
            shutil.rmtree(kept)
            os.sync()
    return rows


def table(args, rows: list[dict]) -> str:
    lines = [f"restore of day 2 over day 1: {args.size} MiB base, {args.clones} clones, "
             f"{args.change:.1%} of every file rewritten in 64 KiB blocks each day; cold cache",
             "",
             f"{'fs':<6} {'restore':<20} {'seconds':>8} {'wrote MiB':>10} {'reused MiB':>11} "
             f"{'dev w MiB':>10} {'dev r MiB':>10} {'usage':>9} {'+day 1':>9}",
             "-" * 100]
    for r in rows:
        lines.append(f"{r['fs']:<6} {r['mode']:<20} {r['seconds']:>8.2f} "
                     f"{r['written_bytes'] / MiB:>10.1f} {r['reused_bytes'] / MiB:>11.1f} "
                     f"{r['device_written_bytes'] / MiB:>10.1f} "
                     f"{r['device_read_bytes'] / MiB:>10.1f} {r['usage'] / MiB:>9.1f} "
                     f"{r['usage_with_day1'] / MiB:>9.1f}")
    src = ", ".join(f"{r['source_usage'] / MiB:.1f} MiB on {r['fs']}" for r in rows[::2])
    lines.append(f"(usage: MiB of DEST after the restore; +day 1: with a reflink copy of day "
                 f"1 kept beside it; the source uses {src})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="base file size, MiB (512)")
    ap.add_argument("--clones", type=int, default=8, help="reflinked clones (8)")
    ap.add_argument("--change", type=float, default=0.02,
                    help="fraction of every file rewritten each day (0.02)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("needs root (loop mounts, drop_caches)")
        return 1
    mounted: list = []
    root = Path(tempfile.mkdtemp(prefix="cloneaware-reuse-"))

    def body() -> None:
        rows = bench(args, root, mounted)
        print(json.dumps(rows, indent=2) if args.json else table(args, rows))

    return b.guarded(body, root, mounted, errors=(), say=log)


if __name__ == "__main__":
    sys.exit(main())
