#!/usr/bin/env python3
"""``mount`` against the restored tree (issue 32), in one run, root, cold
caches before each step, medians of ``--runs`` alternating runs:

- ``ls -lR`` of a snapshot of a real tree (this machine's /usr/share, or
  ``--tree``) through the mount, and of the same tree restored;
- reading a 1 GiB file through the mount, and ``restore`` of it (synced).

    python3 bench/mount.py [--tree /usr/share] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (bench/bench.py: the shared helpers)
from cloneaware.testing import write_random  # noqa: E402

CA = b.CLONEAWARE


def _mounted(path: Path) -> bool:
    want = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == want for line in f)


def mount(repo: Path, mnt: Path) -> subprocess.Popen:
    mnt.mkdir(exist_ok=True)
    p = subprocess.Popen(CA + ["mount", "-r", str(repo), str(mnt)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not _mounted(mnt):
        if p.poll() is not None or time.monotonic() > deadline:
            raise b.BenchError(f"mount did not come up: {p.stderr.read()!r}")
        time.sleep(0.05)
    return p


def unmount(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    p.wait(60)


def seconds(cmd: list, **kw) -> float:
    b.drop_caches()
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default="/usr/share")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ca-bench-mount-") as d:
        root = Path(d)
        repo, big = root / "repo", root / "big"
        big.mkdir()
        write_random(big / "one.img", 1 << 30, 7)
        b.run(CA + ["init", "-r", str(repo)])
        b.run(CA + ["backup", "-q", "-r", str(repo), args.tree])
        b.run(CA + ["backup", "-q", "-r", str(repo), str(big)])
        tree_snap = b.run(CA + ["snapshots", "--json", "-r", str(repo)]).stdout

        ids = [s["short_id"] for s in json.loads(tree_snap)]
        restored = root / "restored"
        b.run(CA + ["restore", "-q", "-r", str(repo), ids[0], str(restored)])
        mnt = root / "mnt"
        ls_mount, ls_tree, cat_mount, restore = [], [], [], []
        for _ in range(args.runs):
            p = mount(repo, mnt)
            try:
                snaps = sorted(os.listdir(mnt / "snapshots"))
                first = next(n for n in snaps if n.endswith(ids[0]))
                second = next(n for n in snaps if n.endswith(ids[1]))
                ls_mount.append(seconds(["ls", "-lR", str(mnt / "snapshots" / first)]))
                cat_mount.append(seconds(["cat", str(mnt / "snapshots" / second / "big" /
                                                     "one.img")]))
            finally:
                unmount(p)
            ls_tree.append(seconds(["ls", "-lR", str(restored)]))
            out = root / "r"
            b.remove(out)
            b.drop_caches()
            t = time.monotonic()
            b.run(CA + ["restore", "-q", "-r", str(repo), ids[1], str(out)])
            os.sync()
            restore.append(time.monotonic() - t)
            b.remove(out)
        m = statistics.median
        files = sum(len(fs) + len(ds) for _, ds, fs in os.walk(restored))
        print(f"ls -lR of {files} entries: mount {m(ls_mount):.2f} s, restored tree "
              f"{m(ls_tree):.2f} s, ratio {m(ls_mount) / m(ls_tree):.1f}")
        print(f"1 GiB file: read through the mount {m(cat_mount):.2f} s, restore of it "
              f"{m(restore):.2f} s, speed ratio {m(restore) / m(cat_mount):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
