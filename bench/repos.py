#!/usr/bin/env python3
"""Repositories side by side, in one run (issues 17 and 18): the bench
family (bench/bench.py) backed up into and restored from a local
repository, an encrypted local repository, and an s3:// repository on a
real Ceph RADOS Gateway started for the run (tests/helpers/ceph.py; its
OSD keeps the data in memory), encrypted and not.  Cold page cache before
every step, every step until synced.  Prints seconds, throughput (the
source's physical bytes per second: what is read and stored) and the
ratios: encrypted against unencrypted, s3:// against local.

    python3 bench/repos.py               # the default family (~4 min)
    python3 bench/repos.py --size 64     # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers.ceph import Ceph  # noqa: E402
from helpers.ceph import missing as ceph_missing  # noqa: E402

import bench as b  # noqa: E402

MiB = 1 << 20
TARGETS = {"encrypted_backup_vs_plain": 1.15}


def run_bench(args, root: Path, mounted: list, ceph: Ceph | None) -> dict:
    from cloneaware.testing import make_loopfs

    size = args.size * MiB
    src = make_loopfs(root, "btrfs", max(4 << 30, size * 4))
    mounted.append(src)
    disk = make_loopfs(root, "ext4", max(4 << 30, size * 6))
    mounted.append(disk)
    fam = src.path / "fam"
    b.log(f"building the family: {args.size} MiB base, {args.clones} clones")
    b.build_family(fam, size, args.clones, args.change, args.files, args.seed)
    phys = b.scan(fam)["physical_bytes"]
    pw = root / "pw"
    pw.write_text("bench password\n")
    ca = b.CLONEAWARE
    targets = {"local": (str(disk.path / "plain"), []),
               "local, encrypted": (str(disk.path / "enc"), ["--password-file", str(pw)])}
    env = dict(os.environ)
    if ceph is not None:
        env.update(ceph.env)
        targets["s3://"] = ("s3://bench/plain", [])
        targets["s3://, encrypted"] = ("s3://bench/enc", ["--password-file", str(pw)])
    res: dict = {"physical_bytes": phys, "rows": {}}
    for name, (url, extra) in targets.items():
        init = ["--encrypt", "--kdf-n", "16384"] if extra else []
        b.run(ca + ["init", "-r", url, *init, *extra], env=env)
        b.log(f"{name}: backup")
        t = b.timed(lambda url=url, extra=extra: b.run(
            ca + ["backup", "-r", url, *extra, "--s3-connections", str(args.connections), fam],
            env=env))
        dest = src.path / "restored"
        b.log(f"{name}: restore")
        r = b.timed(lambda url=url, extra=extra, dest=dest: b.run(
            ca + ["restore", "-r", url, *extra, "--s3-connections", str(args.connections),
                  "latest", dest], env=env))
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()
        res["rows"][name] = {"backup_seconds": t["seconds"], "restore_seconds": r["seconds"],
                             "backup_cpu": t["cpu_seconds"], "restore_cpu": r["cpu_seconds"]}
    if ceph is not None:  # issue 33: the local repository copied off-site, beside a backup
        local = targets["local"][0]
        for name, url, extra in (("copy local -> s3://", "s3://bench/copy", []),
                                 ("copy local -> s3://, encrypted", "s3://bench/copyenc",
                                  ["--to-password-file", str(pw)])):
            init = ["--encrypt", "--kdf-n", "16384", "--password-file", str(pw)] \
                if extra else []
            b.run(ca + ["init", "-r", url, *init], env=env)
            b.log(f"{name}")
            t = b.timed(lambda url=url, extra=extra: b.run(
                ca + ["copy", "-q", "-r", local, "--to", url, *extra], env=env))
            res["rows"][name] = {"backup_seconds": t["seconds"], "restore_seconds": 0.0,
                                 "backup_cpu": t["cpu_seconds"], "restore_cpu": 0.0}
    return res


def table(res: dict) -> str:
    phys = res["physical_bytes"]
    out = [f"cloneaware bench-repo: the bench family, {phys / MiB:.1f} MiB physical; "
           "cold cache before every step", "",
           f"{'repository':<32} {'backup s':>9} {'MB/s':>7} {'restore s':>10} {'MB/s':>7}",
           "-" * 70]
    rows = res["rows"]
    for name, r in rows.items():
        rs = r["restore_seconds"]
        out.append(f"{name:<32} {r['backup_seconds']:>9.2f} "
                   f"{phys / r['backup_seconds'] / 1e6:>7.0f} "
                   + (f"{rs:>10.2f} {phys / rs / 1e6:>7.0f}" if rs else f"{'':>10} {'':>7}"))
    out += ["", f"{'ratio':<44} {'value':>7} {'target':>8}  result", "-" * 70]

    def ratio(label: str, a: str, bb: str, key: str, target: float | None = None) -> None:
        if a in rows and bb in rows:
            v = rows[a][key] / rows[bb][key]
            t = f"<= {target}" if target else ""
            verdict = ("met" if v <= target else "MISSED") if target else ""
            out.append(f"{label:<44} {v:>7.3f} {t:>8}  {verdict}")

    ratio("encrypted / plain backup (local)", "local, encrypted", "local", "backup_seconds",
          TARGETS["encrypted_backup_vs_plain"])
    ratio("encrypted / plain restore (local)", "local, encrypted", "local", "restore_seconds")
    ratio("s3:// / local backup", "s3://", "local", "backup_seconds")
    ratio("s3:// / local restore", "s3://", "local", "restore_seconds")
    ratio("encrypted / plain backup (s3://)", "s3://, encrypted", "s3://", "backup_seconds")
    ratio("copy local -> s3:// / backup to s3://", "copy local -> s3://", "s3://",
          "backup_seconds")
    ratio("copy -> s3://, encrypted / backup to it", "copy local -> s3://, encrypted",
          "s3://, encrypted", "backup_seconds")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="base file size, MiB (512)")
    ap.add_argument("--clones", type=int, default=8)
    ap.add_argument("--change", type=float, default=0.02)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--connections", type=int, default=4, help="--s3-connections (4)")
    ap.add_argument("--no-s3", action="store_true", help="local repositories only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    mounted: list = []
    root = Path(tempfile.mkdtemp(prefix="cloneaware-bench-repo-"))
    started: list[Ceph] = []  # the cluster, once it runs

    def body() -> None:
        b.check_tools()
        if not args.no_s3:
            why = ceph_missing()
            if why:
                b.log(f"no s3:// rows: {why}")
            else:
                (root / "ceph").mkdir()
                started.append(Ceph(root / "ceph").start())
        res = run_bench(args, root, mounted, started[0] if started else None)
        print(json.dumps(res, indent=2) if args.json else table(res))

    def close() -> None:
        for c in started:
            c.close()

    return b.guarded(body, root, mounted, close=close)


if __name__ == "__main__":
    sys.exit(main())
