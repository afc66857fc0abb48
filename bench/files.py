#!/usr/bin/env python3
"""Many files: a container host's tree beside restic, Borg, tar and
``btrfs send -p`` on the same data, in one run (issue 36).

The source is a real tree nobody here wrote: a copy of this machine's
``/usr/share`` and ``/usr/include`` (``--source`` to choose), in a Btrfs
subvolume, and ``--copies`` reflinked copies of it (``cp -a
--reflink=always``, as container layers and rootfs copies are).
Repositories, archives and the tar file are on an ext4 "archive disk";
restores go to XFS.  Every step starts from a cold page cache and ends
synced.  Each row gives wall seconds and the peak resident memory of the
tool's process (wait4's ru_maxrss).

- night 1: the first backup into an empty repository;
- night 2: after the night's changes (``--changed`` files each given a
  line more, spread over the tree, and one new file): cloneaware, restic,
  Borg, and ``btrfs send -p`` between read-only snapshots of night 1 and
  night 2 (Btrfs to Btrfs only: printed as the limit);
- night 3: one 2-byte file added; the bytes each repository grew by;
- restore of night 2 from the repository onto XFS: cloneaware, restic;
- an archive: ``cloneaware backup -o`` beside ``tar -c``, and its restore
  onto XFS beside ``tar -x``;
- check: ``cloneaware check`` and ``restic check`` of a repository holding
  one night of a ``--check-files``-file part of the tree, and again once it
  holds 60 nights (one file changed each night): the target is 60 within
  2x of one;
- scale: ``--scale-files`` small synthetic files (1,000,000; 0 to skip) in
  a subvolume of their own, cloneaware alone: night 1, night 2 (3,000
  files changed) and the restore onto XFS, with seconds and peak memory
  per file.

restic and Borg are Debian's packages, repositories without encryption as
cloneaware's.

    python3 bench/files.py                          # /usr/share + /usr/include, 3 copies
    python3 bench/files.py --source /usr/include    # a quick check
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as b  # noqa: E402  (bench/bench.py: the shared helpers)

MiB = 1 << 20
#: issue 36's targets: cloneaware / the other tool
TARGETS = {
    "night 1 / restic": 1.0,
    "night 2 / restic": 0.5,
    "night 2 / btrfs send -p": 1.0,
    "restore -r / restic restore": 1.0,
    "archive backup / tar -c": 1.0,
    "archive restore / tar -x": 1.0,
}


def run_peak(cmd: list, env: dict | None = None, cwd: Path | None = None,
             stdout=None) -> dict:
    """Cold cache, run ``cmd``, sync: wall seconds and the peak resident
    memory of its process (MiB): the largest VmHWM of /proc/PID/status seen
    while it runs, read every 20 ms (wait4's ru_maxrss would count this
    bench's own memory, which the child had before its exec)."""
    import threading

    b.drop_caches()
    t0 = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd,
                         stdout=stdout if stdout is not None else subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]))
            except (OSError, ValueError):
                pass
            done.wait(0.02)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    err = p.stderr.read() if p.stderr else b""
    p.wait()
    done.set()
    th.join()
    os.sync()
    t = time.monotonic() - t0
    if p.returncode not in (0, 1):
        raise b.BenchError(f"{' '.join(map(str, cmd))} exited {p.returncode}: "
                           f"{err.decode(errors='replace').strip()[-2000:]}")
    return {"seconds": t, "peak_mib": peak[0] / 1024}


def tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def count_files(p: Path) -> tuple[int, int]:
    n = size = 0
    for top, _dirs, files in os.walk(p):
        for f in files:
            try:
                st = os.lstat(os.path.join(top, f))
            except OSError:
                continue
            n += 1
            size += st.st_size
    return n, size


def night2_changes(vol: Path, count: int, seed: int) -> tuple[int, int]:
    """Give ``count`` regular files, spread over the tree, a line more, and
    add one new file; returns (files changed, bytes of new content)."""
    import random

    rng = random.Random(seed)
    files = []
    for top, dirs, names in os.walk(vol):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(top, n)
            if os.path.isfile(p) and not os.path.islink(p):
                files.append(p)
    chosen = rng.sample(files, min(count, len(files)))
    added = 0
    for p in chosen:
        line = b"changed on night 2 %d\n" % rng.randrange(1 << 30)
        with open(p, "ab") as f:
            f.write(line)
        added += len(line)
    new = vol / "layer0" / "night2-new.bin"
    new.write_bytes(os.urandom(4 * MiB))
    os.sync()
    return len(chosen) + 1, added + 4 * MiB


def run_bench(args, root: Path, mounted: list) -> dict:
    from cloneaware.testing import make_loopfs

    src_fs = make_loopfs(root, "btrfs", 16 << 30)
    mounted.append(src_fs)
    disk = make_loopfs(root, "ext4", 16 << 30)
    mounted.append(disk)
    xfs = make_loopfs(root, "xfs", 16 << 30)
    mounted.append(xfs)
    if args.scale_only:
        ca, env = b.CLONEAWARE, dict(os.environ,
                                     CLONEAWARE_STATE_DIR=str(disk.path / "castate"))
        return {"scale": scale_point(args.scale_files, src_fs.path / "scale", disk.path,
                                     xfs.path, ca, env)}
    vol = src_fs.path / "vol"
    b.run(["btrfs", "-q", "subvolume", "create", vol])
    layer0 = vol / "layer0"
    layer0.mkdir()
    b.log(f"copying {' '.join(args.source)} into the source")
    for s in args.source:
        b.run(["cp", "-a", "--parents", os.path.relpath(s, "/"), layer0], cwd="/")
    for i in range(1, args.copies + 1):
        b.run(["cp", "-a", "--reflink=always", layer0, vol / f"layer{i}"])
    os.sync()
    files, logical = count_files(vol)
    phys = b.scan(vol)["physical_bytes"]
    b.log(f"source: {files} files, {logical / MiB:.0f} MiB logical, {phys / MiB:.0f} MiB "
          "physical")
    ca = b.CLONEAWARE
    repos = {"cloneaware": disk.path / "ca-repo", "restic": disk.path / "restic-repo",
             "borg": disk.path / "borg-repo"}
    env = dict(os.environ, RESTIC_PASSWORD="bench",
               BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
               BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
               RESTIC_CACHE_DIR=str(disk.path / "rcache"),
               BORG_CACHE_DIR=str(disk.path / "bcache"), BORG_BASE_DIR=str(disk.path / "bbase"),
               CLONEAWARE_STATE_DIR=str(disk.path / "castate"))
    b.run(ca + ["init", "-r", repos["cloneaware"]], env=env)
    b.run(["restic", "init", "--repo", repos["restic"]], env=env)
    b.run(["borg", "init", "--encryption=none", repos["borg"]], env=env)
    steps = {
        "cloneaware": lambda n: ca + ["backup", "-q", "-r", repos["cloneaware"], vol],
        "restic": lambda n: ["restic", "backup", "--repo", repos["restic"], "--quiet", vol],
        "borg": lambda n: ["borg", "create", f"{repos['borg']}::night{n}", vol],
    }
    res: dict = {"files": files, "logical_bytes": logical, "physical_bytes": phys,
                 "rows": {}, "growth": {}}
    rows = res["rows"]
    for night in (1, 2, 3):
        if night == 2:
            res["changed_files"], res["changed_bytes"] = night2_changes(vol, args.changed,
                                                                        args.seed)
        if night == 3:
            (vol / "layer0" / "night3.txt").write_bytes(b"x\n")
            os.sync()
        snap = src_fs.path / f"night{night}"
        b.run(["btrfs", "-q", "subvolume", "snapshot", "-r", vol, snap])
        for tool, cmd in steps.items():
            b.log(f"night {night}: {tool}")
            size0 = tree_bytes(repos[tool])
            got = run_peak(cmd(night), env=env)
            grown = tree_bytes(repos[tool]) - size0
            if night < 3:
                rows[f"{tool}: night {night}"] = got
            else:
                res["growth"][tool] = grown
        if night == 2:
            b.log("night 2: btrfs send -p")
            stream = disk.path / "night2.stream"
            with open(stream, "wb") as out:
                rows["btrfs send -p: night 2"] = run_peak(
                    ["btrfs", "send", "-q", "-p", src_fs.path / "night1", snap], stdout=out)
    # restores of night 3 (the latest) onto XFS
    b.log("restore -r: cloneaware")
    rows["cloneaware: restore -r"] = run_peak(
        ca + ["restore", "-q", "-r", repos["cloneaware"], "latest", xfs.path / "ca"], env=env)
    res["restored_usage_cloneaware"] = b.df_used(xfs.path)
    shutil.rmtree(xfs.path / "ca")
    b.log("restore -r: restic")
    rows["restic: restore"] = run_peak(
        ["restic", "restore", "--repo", repos["restic"], "latest", "--target",
         xfs.path / "restic"], env=env)
    shutil.rmtree(xfs.path / "restic")
    os.sync()
    # an archive beside tar
    arch, tarf = disk.path / "tree.caw", disk.path / "tree.tar"
    b.log("archive: cloneaware backup -o")
    rows["cloneaware: backup -o"] = run_peak(ca + ["backup", "-q", "-o", arch, vol], env=env)
    b.log("archive: tar -c")
    rows["tar -c"] = run_peak(["tar", "-C", vol.parent, "-cf", tarf, "--xattrs",
                               "--sparse", vol.name])
    b.log("archive: cloneaware restore")
    rows["cloneaware: restore archive"] = run_peak(ca + ["restore", "-q", arch, xfs.path / "ca"],
                                                   env=env)
    shutil.rmtree(xfs.path / "ca")
    b.log("archive: tar -x")
    (xfs.path / "tar").mkdir()
    rows["tar -x"] = run_peak(["tar", "-C", xfs.path / "tar", "-xf", tarf, "--xattrs"])
    shutil.rmtree(xfs.path / "tar")
    res["archive_bytes"] = arch.stat().st_size
    res["tar_bytes"] = tarf.stat().st_size
    res["check"] = check_nights(args, layer0, src_fs.path / "small", disk.path, ca, env)
    if args.scale_files:
        res["scale"] = scale_point(args.scale_files, src_fs.path / "scale", disk.path,
                                   xfs.path, ca, env)
    return res


def scale_point(count: int, top: Path, disk: Path, xfs: Path, ca: list, env: dict) -> dict:
    """Night 1, night 2 and the restore of ``count`` small files."""
    b.run(["btrfs", "-q", "subvolume", "create", top])
    b.log(f"scale: making {count} files")
    per = 1000
    for d in range(0, count, per):
        sub = top / f"d{d // per // 100:03d}" / f"{d // per:05d}"
        sub.mkdir(parents=True)
        for i in range(d, min(d + per, count)):
            with open(sub / f"f{i:07d}.txt", "wb") as f:
                f.write(b"small file %d\n" % i * (1 + i % 97))
    os.sync()
    repo = disk / "ca-scale"
    b.run(ca + ["init", "-r", repo], env=env)
    rows = {}
    for night in (1, 2):
        if night == 2:
            for i in range(0, count, max(1, count // 3000)):
                d = i // per
                with open(top / f"d{d // 100:03d}" / f"{d:05d}" / f"f{i:07d}.txt", "ab") as f:
                    f.write(b"night 2\n")
            (top / "new.txt").write_bytes(b"x\n")
            os.sync()
        b.log(f"scale: night {night}")
        rows[f"night {night}"] = run_peak(ca + ["backup", "-q", "-r", repo, top], env=env)
    b.log("scale: restore -r")
    rows["restore -r"] = run_peak(ca + ["restore", "-q", "-r", repo, "latest", xfs / "scale"],
                                  env=env)
    shutil.rmtree(xfs / "scale")
    b.run(["btrfs", "-q", "subvolume", "delete", top])
    return {"files": count, "rows": rows}


def check_nights(args, layer0: Path, small: Path, disk: Path, ca: list, env: dict) -> dict:
    """Seconds of check with 1 and with 60 nights in the repository."""
    n = 0
    for dirpath, dirs, names in os.walk(layer0):
        dirs.sort()
        for name in sorted(names):
            p = Path(dirpath, name)
            if n < args.check_files and p.is_file() and not p.is_symlink():
                dst = small / p.relative_to(layer0)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dst)
                n += 1
    repos = {"cloneaware": disk / "ca-check", "restic": disk / "restic-check"}
    b.run(ca + ["init", "-r", repos["cloneaware"]], env=env)
    b.run(["restic", "init", "--repo", repos["restic"]], env=env)
    backup = {"cloneaware": ca + ["backup", "-q", "-r", repos["cloneaware"], small],
              "restic": ["restic", "backup", "--repo", repos["restic"], "--quiet", small]}
    check = {"cloneaware": ca + ["check", "-q", "-r", repos["cloneaware"]],
             "restic": ["restic", "check", "--repo", repos["restic"]]}
    out: dict = {"files": n, "cloneaware": {}, "restic": {}}
    b.log(f"check: 60 nights of {n} files")
    for night in range(1, 61):
        (small / "night.txt").write_text(f"night {night}\n")
        for tool in backup:
            b.run(backup[tool], env=env)
        if night in (1, 60):
            for tool in check:
                out[tool][night] = run_peak(check[tool], env=env)["seconds"]
    return out


def ratios(res: dict) -> dict:
    r = res["rows"]

    def q(a: str, c: str) -> float:
        return r[a]["seconds"] / r[c]["seconds"]

    return {
        "night 1 / restic": q("cloneaware: night 1", "restic: night 1"),
        "night 2 / restic": q("cloneaware: night 2", "restic: night 2"),
        "night 2 / btrfs send -p": q("cloneaware: night 2", "btrfs send -p: night 2"),
        "restore -r / restic restore": q("cloneaware: restore -r", "restic: restore"),
        "archive backup / tar -c": q("cloneaware: backup -o", "tar -c"),
        "archive restore / tar -x": q("cloneaware: restore archive", "tar -x"),
    }


def scale_table(sc: dict) -> list[str]:
    out = [f"\nscale, {sc['files']} small files, cloneaware:  seconds  peak MiB  "
           "us/file  bytes/file"]
    for k, v in sc["rows"].items():
        out.append(f"  {k:<12} {v['seconds']:>24.1f} {v['peak_mib']:>9.0f} "
                   f"{v['seconds'] * 1e6 / sc['files']:>8.1f} "
                   f"{v['peak_mib'] * MiB / sc['files']:>11.0f}")
    return out


def table(res: dict) -> str:
    if "files" not in res:  # --scale-only
        return "\n".join(scale_table(res["scale"]))
    n = res["files"]
    out = [f"cloneaware bench-files: {n} files, {res['logical_bytes'] / MiB:.0f} MiB logical, "
           f"{res['physical_bytes'] / MiB:.0f} MiB physical; night 2 changed "
           f"{res['changed_files']} files, {res['changed_bytes'] / MiB:.1f} MiB", "",
           f"{'step':<32} {'seconds':>8} {'peak MiB':>9} {'bytes/file':>11}", "-" * 64]
    for k, v in res["rows"].items():
        out.append(f"{k:<32} {v['seconds']:>8.2f} {v['peak_mib']:>9.0f} "
                   f"{v['peak_mib'] * MiB / n:>11.0f}")
    out += ["", "night 3 (one 2-byte file added), repository growth:"]
    for tool, g in res["growth"].items():
        out.append(f"  {tool:<12} {g / 1024:>10.1f} KiB")
    out += ["", f"{'ratio (cloneaware / other)':<36} {'value':>8} {'target':>8}  result",
            "-" * 64]
    for k, v in ratios(res).items():
        out.append(f"{k:<36} {v:>8.3f} {'<= ' + str(TARGETS[k]):>8}  "
                   f"{'met' if v <= TARGETS[k] else 'MISSED'}")
    peaks = [(t, res["rows"][f"cloneaware: {s}"]["peak_mib"], res["rows"][o]["peak_mib"])
             for t, s, o in (("night 1", "night 1", "restic: night 1"),
                             ("night 2", "night 2", "restic: night 2"),
                             ("restore -r", "restore -r", "restic: restore"))]
    for t, a, o in peaks:
        out.append(f"{'peak memory, ' + t + ' / restic':<36} {a / o:>8.3f} {'<= 1':>8}  "
                   f"{'met' if a <= o else 'MISSED'}")
    out.append(f"{'night 3 growth, cloneaware':<36} "
               f"{res['growth']['cloneaware'] / 1024:>7.0f}K {'<= 64K':>8}  "
               f"{'met' if res['growth']['cloneaware'] <= 64 * 1024 + 2 else 'MISSED'}")
    c = res["check"]
    out.append(f"\ncheck, {c['files']} files:  1 night   60 nights   60 / 1")
    for tool in ("cloneaware", "restic"):
        out.append(f"  {tool:<12} {c[tool][1]:>8.2f}s {c[tool][60]:>9.2f}s "
                   f"{c[tool][60] / c[tool][1]:>8.2f}")
    r60 = c["cloneaware"][60] / c["cloneaware"][1]
    out.append(f"{'check of 60 nights / of one':<36} {r60:>8.3f} {'<= 2':>8}  "
               f"{'met' if r60 <= 2 else 'MISSED'}")
    if "scale" in res:
        out += scale_table(res["scale"])
    out.append(f"\narchive {res['archive_bytes'] / MiB:.0f} MiB, tar {res['tar_bytes'] / MiB:.0f}"
               f" MiB; restored usage (cloneaware, df of the XFS) "
               f"{res['restored_usage_cloneaware'] / MiB:.0f} MiB")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", nargs="+", default=["/usr/share", "/usr/include"],
                    help="trees to copy into the source (/usr/share /usr/include)")
    ap.add_argument("--copies", type=int, default=3, help="reflinked copies (3)")
    ap.add_argument("--changed", type=int, default=3000, help="files changed on night 2")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check-files", type=int, default=4600,
                    help="files of the tree the check of 60 nights backs up (4600)")
    ap.add_argument("--scale-files", type=int, default=1_000_000,
                    help="small files of the scale point (1000000; 0: none)")
    ap.add_argument("--scale-only", action="store_true",
                    help="run the scale point only (its table row)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    return b.tool_main(args, ["restic", "borg", "btrfs", "tar"], "make bench-files",
                       "cloneaware-bench-files-", run_bench, table)


if __name__ == "__main__":
    sys.exit(main())
