#!/usr/bin/env python3
"""Night to night: cloneaware's repository beside restic, Borg and
``btrfs send -p`` on the same data, in one run (issue 16).

Day 1 backs up a clone family from a Btrfs subvolume; then the night's
changes (1% of the golden image rewritten in scattered 64 KiB blocks, a
new clone, a clone renamed, one deleted, a new file, an edited small file,
an unshared database file overwritten in place); day 2 backs it up again.
Every step starts from a cold page cache (sync, drop_caches) and ends
synced.  For each tool: seconds, the bytes read from the source's block
device (/sys/block/DEV/stat: what it really read, metadata included), and
the bytes its repository grew by.  ``btrfs send -p`` works in the kernel on
two read-only snapshots, Btrfs to Btrfs only: it is printed as the limit.
restic and Borg are Debian's packages (restic, borgbackup); both keep a
repository without encryption here, as cloneaware's.

    python3 bench/incremental.py            # the default family (~3 min)
    python3 bench/incremental.py --size 64  # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (bench/bench.py: the shared helpers)

MiB = 1 << 20
TARGETS = {"day2_vs_restic": 0.25, "read_vs_changed": 2.0, "added_vs_changed": 1.25}


def device(path: Path) -> str:
    """The block device a mount point's filesystem is on."""
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        if f[4] == str(path):
            return os.path.basename(os.path.realpath(f[f.index("-") + 2]))
    raise b.BenchError(f"no mount at {path}")


def reads(dev: str) -> int:
    return int(open(f"/sys/block/{dev}/stat").read().split()[2]) * 512


def tree_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def measure(dev: str, store: Path, fn) -> dict:
    before, size0 = reads(dev), tree_bytes(store) if store.exists() else 0
    t = b.timed(fn)
    return {"seconds": t["seconds"], "cpu_seconds": t["cpu_seconds"],
            "read_bytes": reads(dev) - before, "added_bytes": tree_bytes(store) - size0}


def changes(fam: Path, seed: int) -> int:
    """The night's changes; returns the bytes of new content."""
    from cloneaware.testing import reflink_copy, rewrite_blocks, write_random

    img = fam / "images"
    changed = rewrite_blocks(img / "base.img", 0.01, seed + 500)
    reflink_copy(img / "base.img", img / "clone-new.img")
    os.rename(img / "clone01.img", img / "clone01-renamed.img")
    os.unlink(img / "clone02.img")
    write_random(fam / "new.bin", 2 * MiB, seed + 501)
    changed += 2 * MiB
    conf = next((fam / "etc").rglob("*.conf"))
    conf.write_bytes(b"edited on day 2\n")
    changed += 16
    with open(fam / "db.bin", "r+b") as f:
        for k in range(16):
            f.seek(k * 2 * MiB)
            f.write(os.urandom(64 << 10))
        f.flush()
        os.fsync(f.fileno())
    changed += 16 * (64 << 10)
    os.sync()
    return changed


def run_bench(args, root: Path, mounted: list) -> dict:
    from cloneaware.testing import make_loopfs, write_random

    size = args.size * MiB
    src_fs = make_loopfs(root, "btrfs", max(4 << 30, size * 6))
    mounted.append(src_fs)
    disk = make_loopfs(root, "ext4", max(4 << 30, size * 12))
    mounted.append(disk)
    dev = device(src_fs.path)
    vol = src_fs.path / "vol"
    b.run(["btrfs", "-q", "subvolume", "create", vol])
    fam = vol / "fam"
    b.log(f"building the family: {args.size} MiB base, {args.clones} clones")
    info = b.build_family(fam, size, args.clones, args.change, args.files, args.seed)
    write_random(fam / "db.bin", 32 * MiB, args.seed + 9)
    os.sync()
    phys = b.scan(fam)["physical_bytes"]
    ca = b.CLONEAWARE
    repos = {"cloneaware": disk.path / "ca-repo", "restic": disk.path / "restic-repo",
             "borg": disk.path / "borg-repo", "send": disk.path / "send"}
    env = dict(os.environ, RESTIC_PASSWORD="bench",
               BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
               BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", RESTIC_CACHE_DIR=str(disk.path / "rcache"),
               BORG_CACHE_DIR=str(disk.path / "bcache"), BORG_BASE_DIR=str(disk.path / "bbase"))
    b.run(ca + ["init", "-r", repos["cloneaware"]])
    b.run(["restic", "init", "--repo", repos["restic"]], env=env)
    b.run(["borg", "init", "--encryption=none", repos["borg"]], env=env)
    repos["send"].mkdir()
    steps = {
        "cloneaware": lambda day: b.run(ca + ["backup", "--json", "-r", repos["cloneaware"],
                                              fam]),
        "restic": lambda day: b.run(["restic", "backup", "--repo", repos["restic"], "--quiet",
                                     fam], env=env),
        "borg": lambda day: b.run(["borg", "create", f"{repos['borg']}::day{day}", fam],
                                  env=env),
    }
    res: dict = {"physical_bytes": phys, "logical_bytes": info["logical_bytes"],
                 "tools": {}}
    for day in (1, 2):
        if day == 2:
            res["changed_bytes"] = changes(fam, args.seed)
        snap = src_fs.path / f"day{day}"
        b.run(["btrfs", "-q", "subvolume", "snapshot", "-r", vol, snap])
        for tool, fn in steps.items():
            b.log(f"day {day}: {tool}")
            res["tools"].setdefault(tool, {})[f"day{day}"] = measure(
                dev, repos[tool], lambda fn=fn, day=day: fn(day))
        stream = repos["send"] / f"day{day}.stream"
        parent = ["-p", str(src_fs.path / "day1")] if day == 2 else []
        b.log(f"day {day}: btrfs send{' -p' if parent else ''}")

        def send(stream=stream, parent=parent, snap=snap):
            with open(stream, "wb") as out:
                r = b.subprocess.run(["btrfs", "send", "-q", *parent, str(snap)], stdout=out,
                                     stderr=b.subprocess.PIPE)
                if r.returncode:
                    raise b.BenchError(f"btrfs send: {r.stderr.decode()[-500:]}")
        res["tools"].setdefault("btrfs send -p", {})[f"day{day}"] = measure(dev, stream, send)
    res["cloneaware_day2_json"] = json.loads(b.run(
        ca + ["snapshots", "--json", "-r", repos["cloneaware"]]).stdout)[-1]["summary"]
    # restores of day 2, for the record
    dest = src_fs.path / "restored"
    t = b.timed(lambda: b.run(ca + ["restore", "-r", repos["cloneaware"], "latest", dest]))
    res["cloneaware_restore_day2_seconds"] = t["seconds"]
    shutil.rmtree(dest, ignore_errors=True)
    return res


def table(res: dict) -> str:
    ch = res["changed_bytes"]
    out = [f"cloneaware bench-incremental: source {res['logical_bytes'] / MiB:.0f} MiB logical,"
           f" {res['physical_bytes'] / MiB:.1f} MiB physical; day 2 changed "
           f"{ch / MiB:.1f} MiB", "",
           f"{'tool':<16} {'day 1 s':>8} {'day 2 s':>8} {'day 2 read MiB':>15} "
           f"{'day 2 added MiB':>16} {'read/changed':>13} {'added/changed':>14}",
           "-" * 96]
    for tool, d in res["tools"].items():
        d1, d2 = d["day1"], d["day2"]
        out.append(f"{tool:<16} {d1['seconds']:>8.2f} {d2['seconds']:>8.2f} "
                   f"{d2['read_bytes'] / MiB:>15.1f} {d2['added_bytes'] / MiB:>16.1f} "
                   f"{d2['read_bytes'] / ch:>13.2f} {d2['added_bytes'] / ch:>14.2f}")
    ca, rs = res["tools"]["cloneaware"]["day2"], res["tools"]["restic"]["day2"]
    got = {"day2_vs_restic": ca["seconds"] / rs["seconds"],
           "read_vs_changed": ca["read_bytes"] / ch,
           "added_vs_changed": ca["added_bytes"] / ch}
    out += ["", f"{'ratio (cloneaware, day 2)':<40} {'value':>8} {'target':>8}  result",
            "-" * 66]
    for k, v in got.items():
        out.append(f"{k:<40} {v:>8.3f} {'<= ' + str(TARGETS[k]):>8}  "
                   f"{'met' if v <= TARGETS[k] else 'MISSED'}")
    out.append(f"\ncloneaware restore of day 2: {res['cloneaware_restore_day2_seconds']:.2f} s; "
               f"its summary: {res['cloneaware_day2_json']}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="golden image size, MiB (256)")
    ap.add_argument("--clones", type=int, default=4, help="clones (4)")
    ap.add_argument("--change", type=float, default=0.02, help="rewritten per clone (0.02)")
    ap.add_argument("--files", type=int, default=300, help="small files (300)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.clones < 3:
        ap.error("--clones must be at least 3 (one is renamed and one deleted)")
    return b.tool_main(args, ["restic", "borg", "btrfs"], "make bench-incremental",
                       "cloneaware-bench-inc-", run_bench, table)


if __name__ == "__main__":
    sys.exit(main())
