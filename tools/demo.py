#!/usr/bin/env python3
"""`make demo`: cloneaware on a built-in clone family, end to end.

Makes a loopback Btrfs and a loopback XFS, builds a family on Btrfs (a
golden image, reflinked clones each partly rewritten, small files), scans it,
backs it up, restores it onto XFS, and prints what each step cost beside
what tar would need.  Then two nights of a repository: night 1 backs the
family up, the night's changes follow (the golden image 1% rewritten, a new
clone, a new file, an edited small file), night 2 reads only what changed
and the snapshot restores onto XFS with its sharing.  Then the thin case: a
clone backed up relative to its base and restored by reflinking from the
base.  Everything is removed at the end.  Needs root (loop mounts).
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

from cloneaware.testing import make_family, make_loopfs, reflink_copy, rewrite_blocks, write_random

MiB = 1 << 20


def sh(*cmd: str) -> dict | None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        sys.exit(f"demo: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    if "--json" in cmd:
        return json.loads(r.stdout)
    return None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="base image MiB (default 256)")
    ap.add_argument("--clones", type=int, default=8)
    ap.add_argument("--change", type=float, default=0.02)
    ap.add_argument("--thin-size", type=int, default=1024,
                    help="base MiB for the thin case (default 1024)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("demo: needs root to mount loopback filesystems (try: sudo make demo)")

    work = Path(tempfile.mkdtemp(prefix="cloneaware-demo-"))
    mounted = []
    try:
        logical_need = a.size * MiB * (a.clones + 1) + a.thin_size * MiB * 3
        btrfs = make_loopfs(work, "btrfs", size=logical_need + (1 << 30))
        mounted.append(btrfs)
        xfs = make_loopfs(work, "xfs", size=logical_need + (1 << 30))
        mounted.append(xfs)

        print(f"== a clone family on Btrfs: a {a.size} MiB image, {a.clones} reflinked clones, "
              f"{a.change:.0%} of each rewritten, small files")
        src = btrfs.path / "family"
        make_family(src, base_size=a.size * MiB, clones=a.clones, change=a.change,
                    small_files=200, sparse=True)
        scan = sh("cloneaware", "scan", "--json", str(src))["totals"]
        print(f"   logical {human(scan['logical_bytes'])}, on disk {human(scan['physical_bytes'])}"
              f" ({scan['logical_bytes'] / scan['physical_bytes']:.1f}x shared)")

        archive = btrfs.path / "family.caw"
        t = time.monotonic()
        b = sh("cloneaware", "backup", "--json", "-o", str(archive), str(src))
        tb = time.monotonic() - t
        print(f"== backup: archive {human(b['archive_bytes'])} in {tb:.1f} s, "
              f"read {human(b['bytes_read'])}")

        t = time.monotonic()
        r = sh("cloneaware", "restore", "--json", str(archive), str(xfs.path / "restored"))
        tr = time.monotonic() - t
        rest = sh("cloneaware", "scan", "--json", str(xfs.path / "restored"))["totals"]
        print(f"== restore onto XFS in {tr:.1f} s: wrote {human(r['written_bytes'])}, "
              f"reflinked {human(r['reflinked_bytes'])}; restored tree uses "
              f"{human(rest['physical_bytes'])} on disk")
        subprocess.run(["diff", "-r", str(src), str(xfs.path / "restored" / "family")],
                       check=True)
        print("   restored tree is identical (diff -r)")
        print(f"== tar would write an archive of about {human(scan['data_bytes'])} and need "
              f"{human(scan['data_bytes'])} on disk to restore it: "
              f"{scan['data_bytes'] / max(b['archive_bytes'], 1):.1f}x the archive, "
              f"{scan['data_bytes'] / max(rest['physical_bytes'], 1):.1f}x the restored usage")

        print("\n== a repository, two nights")
        repo = work / "repo"
        sh("cloneaware", "init", "-r", str(repo))
        t = time.monotonic()
        n1 = sh("cloneaware", "backup", "--json", "-r", str(repo), str(src))
        print(f"   night 1: snapshot {n1['snapshot'][:8]} in {time.monotonic() - t:.1f} s: read "
              f"{human(n1['bytes_read'])}, added {human(n1['added_bytes'])}")
        changed = rewrite_blocks(src / "images" / "base.img", 0.01, seed=21)
        reflink_copy(src / "images" / "base.img", src / "images" / "clone-new.img")
        write_random(src / "new-file.bin", 4 * MiB, seed=22)
        (src / "etc" / "conf000").write_bytes(b"edited\n")
        changed += 4 * MiB + 7
        print(f"   the day's changes: {human(changed)} new (1% of the base rewritten in "
              "64 KiB blocks, a new clone, a new file, an edited file)")
        t = time.monotonic()
        n2 = sh("cloneaware", "backup", "--json", "-r", str(repo), str(src))
        print(f"   night 2: snapshot {n2['snapshot'][:8]} in {time.monotonic() - t:.1f} s: read "
              f"{human(n2['bytes_read'])}, added {human(n2['added_bytes'])}; "
              f"{human(n2['unchanged_bytes'])} proved unchanged, not read "
              f"({n2['unopened_files']} files by their stat alone, the rest by sharing "
              "with the anchors)")
        t = time.monotonic()
        dest = xfs.path / "from-repo"
        sh("cloneaware", "restore", "--json", "-r", str(repo), "latest", str(dest))
        rs = sh("cloneaware", "scan", "--json", str(dest))["totals"]
        now = sh("cloneaware", "scan", "--json", str(src))["totals"]
        print(f"   night 2 restored onto XFS in {time.monotonic() - t:.1f} s, using "
              f"{human(rs['physical_bytes'])} on disk (the source: "
              f"{human(now['physical_bytes'])})")
        subprocess.run(["diff", "-r", str(src), str(dest / "family")], check=True)
        print("   restored tree is identical (diff -r)")
        subprocess.run(["cloneaware", "snapshots", "-r", str(repo)], check=True)

        print(f"\n== thin backup: a {a.thin_size} MiB base image and one clone, 1% rewritten")
        tdir = btrfs.path / "vm"
        tdir.mkdir()
        write_random(tdir / "golden.img", a.thin_size * MiB, seed=11)
        reflink_copy(tdir / "golden.img", tdir / "guest.img")
        rewrite_blocks(tdir / "guest.img", 0.01, seed=12)
        thin = btrfs.path / "guest.thin.caw"
        b = sh("cloneaware", "backup", "--json", "--base", str(tdir / "golden.img"), "-o",
               str(thin), str(tdir / "guest.img"))
        print(f"   clone {human(b['logical_bytes'])} logical -> thin archive "
              f"{human(b['archive_bytes'])} ({b['archive_bytes'] / b['logical_bytes']:.1%})")
        t = time.monotonic()
        r = sh("cloneaware", "restore", "--json", "--base", str(tdir / "golden.img"), str(thin),
               str(btrfs.path / "thin-restored"))
        print(f"   restored next to its base in {time.monotonic() - t:.1f} s: wrote "
              f"{human(r['written_bytes'])}, reflinked {human(r['reflinked_bytes'])} from the "
              f"base and verified {human(r['verified_bytes'])} by SHA-256")
        subprocess.run(["cmp", str(tdir / "guest.img"),
                        str(btrfs.path / "thin-restored" / "guest.img")], check=True)
        print("   restored clone is identical (cmp)")
    finally:
        for m in reversed(mounted):
            m.unmount()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
