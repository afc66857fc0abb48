#!/usr/bin/env python3
"""Sharing that df can see (issue 30), by statfs on fresh loopback
filesystems, on Btrfs and on XFS, in one run (about 2 minutes, root):

- a family (a 128 MiB golden image, 5 clones, 2% of each rewritten) copied
  by ``rsync -aSHAX``, then given its sharing back by ``reshare --from
  ARCHIVE``;
- one clone of it lost and restored with ``--include`` beside its family;
- a 50 MiB file rewritten after its backup: what its anchor pins, what
  ``anchors list`` says, what ``anchors drop`` gives back.

    python3 bench/space.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (bench/bench.py: the shared helpers)

MiB = 1 << 20
CA = b.CLONEAWARE


def ca(*args) -> subprocess.CompletedProcess:
    """cloneaware; exit 0 or 1 (1: something was passed over, said)."""
    r = b.run(CA + list(args), check=False)
    if r.returncode not in (0, 1):
        raise b.BenchError(f"cloneaware {args[0]} exited {r.returncode}: {r.stderr[-2000:]}")
    return r


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def one_kind(kind: str, root: Path, mounted: list) -> None:
    from cloneaware.testing import make_family, make_loopfs, write_random

    src = make_loopfs(root, kind, 4 << 30)
    mounted.append(src)
    fam = make_family(src.path / "fam", base_size=128 * MiB, clones=5, change=0.02,
                      small_files=5, sparse=False)
    arch, repo = root / f"fam-{kind}.caw", root / f"repo-{kind}"
    ca("backup", "-q", "-o", arch, fam["root"])
    ca("init", "-r", repo)
    ca("backup", "-q", "-r", repo, fam["root"])

    copy = make_loopfs(root, kind, 4 << 30)
    mounted.append(copy)
    u0 = b.df_used(copy.path)
    b.run(["rsync", "-aSHAX", fam["root"], f"{copy.path}/"])
    u1 = b.df_used(copy.path)
    d = json.loads(ca("reshare", "--json", "--from", arch, copy.path).stdout)
    u2 = b.df_used(copy.path)
    print(f"{kind}: rsync copy {mib(u1 - u0)}; after reshare {mib(u2 - u0)} (shared "
          f"{mib(d['shared_bytes'])}, freed {mib(d['freed_bytes'])}, bookends rewritten "
          f"{mib(d['bookends']['rewritten_bytes'])})"
          + (f"; compsize {mib(b.compsize(copy.path / 'fam') or 0)}" if kind == "btrfs"
             else ""))

    dest = make_loopfs(root, kind, 4 << 30)
    mounted.append(dest)
    ca("restore", "-q", "-r", repo, "latest", dest.path)
    lost = dest.path / "fam" / "images" / "clone2.img"
    before = b.df_used(dest.path)
    lost.unlink()
    gone = b.df_used(dest.path)
    r = json.loads(ca("restore", "--json", "-r", repo, "latest", "--include",
                      "fam/images/clone2.img", "--force", dest.path).stdout)
    after = b.df_used(dest.path)
    print(f"   one clone lost and restored beside its family: took {mib(after - gone)} "
          f"(the loss freed {mib(before - gone)}); cloned beside {mib(r['beside_bytes'])}")

    anchored = src.path / "anchored"
    anchored.mkdir()
    write_random(anchored / "x.img", 50 * MiB, 5)
    repo2 = root / f"repo2-{kind}"
    ca("init", "-r", repo2)
    ca("backup", "-q", "-r", repo2, anchored)
    u0 = b.df_used(src.path)
    write_random(anchored / "x.img", 50 * MiB, 6)
    u1 = b.df_used(src.path)
    sets = json.loads(ca("anchors", "list", "--json", anchored).stdout)
    pin = sum(s["pinned_bytes"] for s in sets if s["paths"] == [str(anchored)])
    ca("anchors", "drop", "-r", repo2, anchored)
    u2 = b.df_used(src.path)
    print(f"   50 MiB anchored file rewritten: +{mib(u1 - u0)}; anchors list: {mib(pin)} "
          f"pinned; anchors drop: {(u2 - u1) / MiB:+.1f} MiB")


def main() -> int:
    mounted: list = []
    root = Path(tempfile.mkdtemp(prefix="cloneaware-bench-space-"))

    def body() -> None:
        b.check_tools()
        for kind in ("btrfs", "xfs"):
            one_kind(kind, root, mounted)

    return b.guarded(body, root, mounted)


if __name__ == "__main__":
    sys.exit(main())
