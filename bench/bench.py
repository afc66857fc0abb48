#!/usr/bin/env python3
"""cloneaware beside tar, rsync, cp --reflink and btrfs send/receive, in one run;
and, for a copy that rsync made, ``cloneaware reshare`` beside ``duperemove -dr``.

Builds a clone family on throwaway loopback filesystems, times every tool
from a cold page cache, and prints seconds, sizes and the ratios the project
is judged by (issue 5).  Absolute times on a shared machine are noise; the
ratios between tools measured in the same run are the result.

Layout (three sparse images under a temporary directory; TMPDIR is honoured):

- Btrfs: the source.  The family is built in the subvolume ``src`` and a
  read-only snapshot ``snap`` of it is what every tool reads (btrfs send
  needs one).  Btrfs restores go to directories next to it, outside the
  subvolume, and are deleted once measured.
- XFS (reflink=1): the second restore target.
- ext4: the "archive disk".  The cloneaware archives, the tar file and the
  btrfs send stream are written here, and restores read them from here, so
  every tool reads from one filesystem and writes to another.

The physical limit reads each physical byte of the family once (1 MiB
preads, like cat).  The physical copy does the same reads and writes them,
one after another, to a file on the archive disk, then fsyncs it: what a
backup whose archive is as large as the data cannot go below, whatever
the tool.  "backup within 3x of the physical limit" (issue 20) is read
against both.

Many clones: a subvolume with one 4 MiB image and 2,000 reflink clones of
it (--many-clones), backed up and sent, then restored by both tools into
the Btrfs.  btrfs send stops looking for clone sources past a limit of
references per extent, so its stream, and its receive, hold every copy.

Every timed step starts after ``sync`` and ``echo 3 > /proc/sys/vm/drop_caches``
and ends after ``sync`` (cloneaware restore syncs its destination itself;
the others get the same for fairness).  A deleted Btrfs subvolume is
cleaned up (``btrfs subvolume sync``) before the next step, so that no step
pays for the cleaning of another's restore.  Needs root.

The steps of the targets against btrfs send and receive (cloneaware
backup and btrfs send; cloneaware restore and btrfs receive, to Btrfs; with
--compressed also send --compressed-data and its receive) are timed
--rounds times (3), the tools taking turns, and their rows give the
median, with every sample beside it.  On this project's shared 2-core
machine one cold sample of the same command varies by a factor of up to
1.9 within minutes (the virtual disk, the kernel's
writeback workers), so a ratio of single samples says more about the noise
than about the tools.

Re-sharing a copy: the copy that the rsync row made on each filesystem is
given its sharing back by ``cloneaware reshare --from MAP`` (the sharing
map that ``cloneaware scan --save-map`` wrote of the source, on the
archive disk), and another rsync copy, made the same way (not timed), is
deduped by Debian's ``duperemove -dr`` with its defaults.  Both rows give
the seconds and the usage that results (duperemove's row is left out, with
a note, when it is not installed).

    python3 bench/bench.py                         # the default family (~5 min)
    python3 bench/bench.py --size 64 --clones 3 --files 50   # a quick check
    python3 bench/bench.py --compressed            # compress-force=zstd source
    python3 bench/bench.py --compressed compress=zstd:1   # Fedora's default

With --compressed the source Btrfs (and the Btrfs restore target) is
mounted with those options (compress-force=zstd by default) and the base
holds letters that compress to about half, so the family's extents are
compressed ones.  As root, cloneaware finds their sharing in Btrfs's file
extent items and stores each extent as it is on disk (README, "Compressed
Btrfs").  Disk usage on Btrfs is then counted by ``compsize`` (each extent
once, as stored); ``btrfs send --proto 2 --compressed-data`` and its
receive are measured beside plain send/receive.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
CLONEAWARE = [sys.executable, "-P", "-m", "cloneaware"]

# Targets from issue 5: ratio name -> upper bound.
TARGETS = {
    "backup_vs_send": 1.0,
    "backup_vs_tar": 0.2,
    "restore_btrfs_vs_receive": 1.0,
    "archive_vs_physical": 1.02,
    "usage_btrfs": 1.02,
    "usage_xfs": 1.02,
    "backup_vs_limit": 3.0,
    "backup_vs_send_compressed": 1.0,
    "restore_btrfs_vs_receive_compressed": 1.0,
    "archive_vs_disk": 1.0,
    "usage_btrfs_disk": 1.02,
    "reshare_usage_btrfs": 1.10,
    "reshare_usage_xfs": 1.10,
    "restore_many_vs_receive": 0.5,
    "usage_many": 1.02,
}


class BenchError(Exception):
    pass


def _on_term(signum, frame):
    raise KeyboardInterrupt


def log(msg: str) -> None:
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


def guarded(body: Callable[[], None], root: Path, mounted: list, keep: bool = False,
            errors: tuple[type[Exception], ...] = (BenchError,),
            say: Callable[[str], None] = log, close: Callable[[], None] | None = None) -> int:
    """What every bench's main does around its work: run ``body``; exit 1
    with one line for an error of ``errors``, 130 on SIGINT or SIGTERM; then,
    unless ``keep``, ``close`` what the body started and unmount the loopback
    filesystems and remove ROOT, with SIGINT ignored so the clean-up finishes."""
    signal.signal(signal.SIGTERM, _on_term)
    try:
        body()
        return 0
    except errors as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        if keep:
            say(f"kept: {', '.join(str(m.path) for m in mounted)} (images in {root})")
        else:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if close is not None:
                close()
            for m in reversed(mounted):
                m.unmount()
            shutil.rmtree(root, ignore_errors=True)


def run(cmd: list, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))} exited {r.returncode}: "
                         f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return r


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn) -> dict:
    """Cold cache, run fn, sync; wall and CPU seconds (children and self)."""
    drop_caches()
    c0, s0 = child_cpu(), self_cpu()
    t0 = time.monotonic()
    out = fn()
    os.sync()
    t = time.monotonic() - t0
    return {"seconds": t, "cpu_seconds": (child_cpu() - c0) + (self_cpu() - s0), "out": out}


def compsize(path: Path) -> int | None:
    """Disk usage of a Btrfs tree by ``compsize -b`` (btrfs-compsize), each
    extent once, as stored; None without compsize."""
    if shutil.which("compsize") is None:
        return None
    r = run(["compsize", "-b", path], check=False)
    for line in r.stdout.splitlines():
        f = line.split()
        if f and f[0] == "TOTAL":
            return int(f[2])
    return None


def scan(path: Path) -> dict:
    """cloneaware scan --json totals (exit 0, or 1 for warnings, both give JSON)."""
    r = run(CLONEAWARE + ["scan", "--json", path], check=False)
    try:
        return json.loads(r.stdout)["totals"]
    except (ValueError, KeyError):
        raise BenchError(f"cloneaware scan {path} failed ({r.returncode}): "
                         f"{r.stderr.strip()[-2000:]}") from None


# --- the family -----------------------------------------------------------------

def build_family(root: Path, size: int, clones: int, change: float, files: int,
                 seed: int, compressible: bool = False) -> dict:
    """A base image, reflinked clones each partly rewritten in scattered 64 KiB
    blocks, and a tree of small files of mixed sizes and compressibility."""
    from cloneaware.testing import reflink_copy, rewrite_blocks, write_letters, write_random

    images = root / "images"
    images.mkdir(parents=True)
    base = images / "base.img"
    (write_letters if compressible else write_random)(base, size, seed)
    rewritten = 0
    for i in range(clones):
        c = images / f"clone{i:02d}.img"
        reflink_copy(base, c)
        rewritten += rewrite_blocks(c, change, seed + 100 + i)
    rng = random.Random(seed + 7)
    small = 0
    ndirs = max(1, files // 50)
    for i in range(files):
        d = root / "etc" / f"d{i % ndirs:02d}"
        d.mkdir(parents=True, exist_ok=True)
        n = int(2 ** rng.uniform(6, 16))  # 64 B .. 64 KiB, log-uniform
        if i % 2:
            data = rng.randbytes(n)
        else:
            line = b"option_%d = %d\n" % (i, rng.randrange(1 << 30))
            data = (line * (n // len(line) + 1))[:n]
        (d / f"f{i:04d}.conf").write_bytes(data)
        small += n
    os.sync()
    return {"base": base, "rewritten_bytes": rewritten, "small_bytes": small,
            "logical_bytes": size * (clones + 1) + small}


# --- the physical limit -----------------------------------------------------------

def physical_reads(tree: Path) -> list[tuple[Path, int, int]]:
    """(file, offset, length) reads that cover each physical byte of the tree
    once, the first place (in sorted walk order) that maps it: all of the
    base, the clones' rewritten extents, and the small files' data.
    Inline extents, and compressed ones whose place in their extent is not
    known (no tree search), are read as the file's own."""
    from cloneaware.index.plan import data_ranges, is_own
    from cloneaware.source import mapping

    starts: list[int] = []  # disjoint physical intervals seen, sorted
    ends: list[int] = []

    def uncovered(a: int, b: int) -> list[tuple[int, int]]:
        out = []
        i = bisect_left(ends, a + 1)  # first interval ending after a
        pos = a
        while pos < b and i < len(starts) and starts[i] < b:
            if starts[i] > pos:
                out.append((pos, starts[i]))
            pos = max(pos, ends[i])
            i += 1
        if pos < b:
            out.append((pos, b))
        return out

    def add(a: int, b: int) -> None:
        i = bisect_left(ends, a)
        j = i
        while j < len(starts) and starts[j] <= b:
            a, b = min(a, starts[j]), max(b, ends[j])
            j += 1
        starts[i:j] = [a]
        ends[i:j] = [b]

    reads = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                # compressed ranges with their place in the extent, where
                # the extent items can be read (root): each byte once
                d = data_ranges(mapping.extent_map(f.fileno(), size, str(p)), size)
            own = is_own(d["flags"], d["physical"])
            for (lg, ph, ln), o in zip(d[["logical", "physical", "length"]].tolist(),
                                       own.tolist()):
                if o:
                    reads.append((p, lg, ln))
                    continue
                for a, b in uncovered(ph, ph + ln):
                    reads.append((p, lg + (a - ph), b - a))
                    add(a, b)
    # merge logically contiguous reads of one file
    merged: list[tuple[Path, int, int]] = []
    for p, off, ln in sorted(reads, key=lambda r: (str(r[0]), r[1])):
        if merged and merged[-1][0] == p and merged[-1][1] + merged[-1][2] == off:
            merged[-1] = (p, merged[-1][1], merged[-1][2] + ln)
        else:
            merged.append((p, off, ln))
    return merged


def read_ranges(reads: list[tuple[Path, int, int]], chunk: int = 1 << 20,
                out: Path | None = None) -> int:
    """Read each range once, in order, with 1 MiB preads (like cat); with
    ``out``, also write what was read to that new file, one after another,
    and fsync it (like ``cat ... > out; sync``): the least a backup that
    writes an archive as large as the data can cost."""
    total = 0
    wfd = -1 if out is None else os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    buf = bytearray(chunk)
    mv = memoryview(buf)
    cur, fd = None, -1
    try:
        for p, off, ln in reads:
            if p != cur:
                if fd >= 0:
                    os.close(fd)
                fd, cur = os.open(p, os.O_RDONLY), p
            end = off + ln
            while off < end:
                n = os.preadv(fd, [mv[:min(chunk, end - off)]], off)
                if n <= 0:
                    break
                if wfd >= 0:
                    w = 0
                    while w < n:
                        w += os.write(wfd, mv[w:n])
                off += n
                total += n
        if wfd >= 0:
            os.fsync(wfd)
    finally:
        if fd >= 0:
            os.close(fd)
        if wfd >= 0:
            os.close(wfd)
    return total


# --- the run ----------------------------------------------------------------------

def df_used(path: Path) -> int:
    """The used space of path's filesystem as df shows it (statfs: blocks -
    free), after two syncs: Btrfs releases extents at the commit a sync
    makes.  The judge of every usage figure here; FIEMAP's (cloneaware scan)
    is a second opinion that sees a deduplicated range as shared whether or
    not the old extent was released."""
    os.sync()
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def remove(path: Path, subvol: Path | None = None) -> None:
    """Delete a restore (a received subvolume with btrfs subvolume delete)."""
    if subvol is not None and subvol.exists():
        run(["btrfs", "subvolume", "delete", "-c", subvol])
        # the cleaner frees its extents in the background: not in the next step
        run(["btrfs", "subvolume", "sync", subvol.parent])
    shutil.rmtree(path, ignore_errors=True)
    os.sync()



def tool_main(args, tools: list[str], make: str, prefix: str,
              run_bench: Callable[[Any, Path, list], dict], table: Callable[[dict], str]) -> int:
    """The main of a bench that compares with other tools: check that
    ``tools`` are installed (``make`` installs them), run ``run_bench`` on
    loopback filesystems under a temporary directory, print its table (or
    JSON with --json), and clean up whatever happens (``guarded``)."""
    for tool in tools:
        if shutil.which(tool) is None:
            log(f"error: {tool} is not installed ({make} installs it)")
            return 1
    mounted: list = []
    root = Path(tempfile.mkdtemp(prefix=prefix))
    t0 = time.monotonic()

    def body() -> None:
        check_tools()
        res = run_bench(args, root, mounted)
        res["total_seconds"] = time.monotonic() - t0
        print(json.dumps(res, indent=2, default=str) if args.json else table(res))

    return guarded(body, root, mounted)

def check_tools() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (loop mounts, drop_caches)")
    need = ["mkfs.btrfs", "btrfs", "mkfs.xfs", "mkfs.ext4", "tar", "rsync", "cp", "losetup"]
    missing = [c for c in need if shutil.which(c) is None]
    if missing:
        raise BenchError(f"missing tools: {' '.join(missing)} (run 'make setup')")
    from cloneaware.testing import missing_capability

    for kind in ("btrfs", "xfs", "ext4"):
        why = missing_capability(kind)
        if why:
            raise BenchError(f"{kind}: {why}")


def bench(args, root: Path, mounted: list) -> dict:
    from cloneaware.testing import make_loopfs

    size = args.size * MiB
    logical = size * (args.clones + 1) + args.files * 64 * 1024
    physical = int(size * (1 + args.clones * args.change)) + args.files * 64 * 1024
    sizes = {
        # family + one logical restore at a time + the small restores, with room
        # for Btrfs metadata (DUP) and space freed only at the next commit
        "btrfs": int(1.5 * logical + 3 * physical) + GiB
        + int(1.3 * args.many_clones * MANY_SIZE),  # btrfs receive writes every copy
        "xfs": int(1.3 * logical + 2 * physical) + GiB // 2,
        "ext4": int(1.1 * logical + 4 * physical) + GiB // 2
        + int(1.1 * args.many_clones * MANY_SIZE),  # and its send stream holds them
    }
    free = shutil.disk_usage(root).free
    if free < sum(sizes.values()):
        log(f"warning: {root} has {free / GiB:.1f} GiB free; the sparse images may grow "
            f"to {sum(sizes.values()) / GiB:.1f} GiB")
    fss = {}
    for kind in ("btrfs", "xfs", "ext4"):
        opts = args.compressed if kind == "btrfs" and args.compressed else ""
        fss[kind] = make_loopfs(root, kind, sizes[kind], mount_options=opts)
        mounted.append(fss[kind])
    bt, xf, ar = fss["btrfs"].path, fss["xfs"].path, fss["ext4"].path

    log(f"building the family: {args.size} MiB base, {args.clones} clones, "
        f"{args.change:.1%} rewritten, {args.files} small files"
        + (f", Btrfs {args.compressed}" if args.compressed else ""))
    t0 = time.monotonic()
    bt_empty = df_used(bt)
    run(["btrfs", "subvolume", "create", bt / "src"])
    fam = build_family(bt / "src", size, args.clones, args.change, args.files, args.seed,
                       args.compressed)
    snap = bt / "snap"
    run(["btrfs", "subvolume", "snapshot", "-r", bt / "src", snap])
    os.sync()
    log(f"built in {time.monotonic() - t0:.1f} s")
    src = scan(snap)
    src["df_bytes"] = src_df = df_used(bt) - bt_empty
    src_phys = src["physical_bytes"]
    src_disk = compsize(snap) if args.compressed else None
    if src_disk is not None:
        src["disk_bytes"] = src_disk
    log(f"source: {src['files']} files, {src['logical_bytes'] / MiB:.1f} MiB logical, "
        f"{src_phys / MiB:.1f} MiB physical, {src['extents']} extents")

    steps: dict[str, dict] = {}

    def step(name: str, fn, **extra) -> dict:
        log(f"{name} ...")
        r = timed(fn)
        r["loadavg"] = os.getloadavg()[0]
        out = r.pop("out")
        r.update(extra)
        if isinstance(out, dict):
            r.update(out)
        steps[name] = r
        log(f"{name}: {r['seconds']:.2f} s")
        return r

    # the physical limit: read each physical byte of the family once
    reads = physical_reads(snap)
    step("physical limit (read once)", lambda: {"bytes": read_ranges(reads)},
         what="bytes read")
    # and the least any archive of that size costs: the same reads, written
    # once to the archive disk and synced (no tool, no format, no checks)
    copy = ar / "physical.copy"
    step("physical copy (read once, write once)",
         lambda: {"bytes": read_ranges(reads, out=copy)}, what="bytes written")
    copy.unlink()

    def ca_backup(out: Path, compress: str | None):
        cmd = CLONEAWARE + ["backup", "--json", "-o", out]
        if compress:
            cmd += ["--compress", compress]
        r = run(cmd + [snap])
        return {"bytes": out.stat().st_size, "detail": json.loads(r.stdout)}

    # fixed cost of every cloneaware command: interpreter and imports, cold
    step("cloneaware startup (--version)", lambda: run(CLONEAWARE + ["--version"]) and None,
         what="fixed cost in each cloneaware row")

    archive = ar / "family.ca"
    step("cloneaware backup", lambda: ca_backup(archive, None), what="archive bytes",
         args="default (--compress zstd)")
    step("cloneaware backup --compress none",
         lambda: ca_backup(ar / "family-none.ca", "none"), what="archive bytes")
    (ar / "family-none.ca").unlink()

    tarfile = ar / "family.tar"

    def tar_c():
        run(["tar", "-c", "--sparse", "-f", tarfile, "-C", snap, "."])
        return {"bytes": tarfile.stat().st_size}

    step("tar -c --sparse", tar_c, what="tar bytes")

    stream = ar / "snap.send"

    def send():
        run(["btrfs", "send", "-q", "-f", stream, snap])
        return {"bytes": stream.stat().st_size}

    step("btrfs send", send, what="stream bytes")

    zstream = ar / "snap.send2"
    if args.compressed:
        def send_compressed():
            run(["btrfs", "send", "-q", "--proto", "2", "--compressed-data", "-f", zstream,
                 snap])
            return {"bytes": zstream.stat().st_size}

        step("btrfs send --proto 2 --compressed-data", send_compressed, what="stream bytes")

    sharemap = ar / "family.map"

    def save_map():
        run(CLONEAWARE + ["scan", "--json", "--save-map", sharemap, snap])
        return {"bytes": sharemap.stat().st_size}

    step("cloneaware scan --save-map", save_map, what="sharing map bytes")

    # restores: time, then usage over the source's (statfs before and after,
    # on the filesystem of dest; cloneaware scan's as a second opinion), then delete
    def restore_step(name: str, fn, dest: Path, measured: Path | None = None,
                     subvol: Path | None = None, keep: bool = False,
                     df_from: int | None = None) -> int:
        fs_root = bt if str(dest).startswith(str(bt)) else xf
        before = df_used(fs_root)
        r = step(name, fn)
        r["df_bytes"] = df_used(fs_root) - (before if df_from is None else df_from)
        r["df_ratio"] = r["df_bytes"] / src_df
        got = scan(measured or dest)
        r["bytes"] = got["physical_bytes"]
        r["what"] = "restored physical bytes"
        r["usage_ratio"] = got["physical_bytes"] / src_phys
        disk = compsize(measured or dest) if src_disk and str(dest).startswith(str(bt)) \
            else None
        if disk is not None and src_disk:
            r["disk_bytes"] = disk
            r["disk_ratio"] = disk / src_disk
        if (got["files"], got["logical_bytes"]) != (src["files"], src["logical_bytes"]):
            r["mismatch"] = (f"restored {got['files']} files, {got['logical_bytes']} bytes; "
                             f"source has {src['files']}, {src['logical_bytes']}")
            log(f"WARNING {name}: {r['mismatch']}")
        if not keep:
            remove(dest, subvol)
        return before

    def ca_restore(dest: Path):
        r = run(CLONEAWARE + ["restore", "--json", archive, dest], check=False)
        d = json.loads(r.stdout) if r.stdout.strip() else {}
        # exit 1 only for the one warning a restore off Btrfs gives: the
        # snapshot the family is read from becomes a plain directory there
        if r.returncode != 0 and not (r.returncode == 1 and d.get("not_exact") and all(
                "subvolume" in x["reason"] for x in d["not_exact"])):
            raise BenchError(f"cloneaware restore exited {r.returncode}: {r.stderr.strip()}")
        return {"detail": d}

    for fsname, base in (("Btrfs", bt), ("XFS", xf)):
        d = base / "r-cloneaware"
        # on Btrfs the snapshot is restored as a (read-only) subvolume again
        restore_step(f"cloneaware restore -> {fsname}", lambda d=d: ca_restore(d), d,
                     d / "snap", subvol=d / "snap" if fsname == "Btrfs" else None)
    d = bt / "r-receive"
    d.mkdir()
    restore_step("btrfs receive -> Btrfs",
                 lambda: run(["btrfs", "receive", "-q", "-f", stream, d]), d, d / "snap",
                 subvol=d / "snap")
    if args.compressed:
        d = bt / "r-receive2"
        d.mkdir()
        restore_step("btrfs receive (--compressed-data) -> Btrfs",
                     lambda: run(["btrfs", "receive", "-q", "-f", zstream, d]), d, d / "snap",
                     subvol=d / "snap")
    # more samples of the steps the send/receive targets compare,
    # taking turns; each of their rows becomes the median
    def again(name: str, fn, after: Callable[[], None]) -> None:
        r = timed(fn)
        after()
        st = steps[name]
        st.setdefault("samples", [st["seconds"]]).append(r["seconds"])
        st.setdefault("cpu_samples", [st["cpu_seconds"]]).append(r["cpu_seconds"])
        st["seconds"] = statistics.median(st["samples"])
        st["cpu_seconds"] = statistics.median(st["cpu_samples"])
        log(f"{name}, again: {r['seconds']:.2f} s")

    extra_archive, extra_stream = ar / "again.ca", ar / "again.send"
    d_ca, d_rcv, d_rcv2 = bt / "r-cloneaware", bt / "r-receive", bt / "r-receive2"
    for _ in range(args.rounds - 1):
        again("cloneaware backup", lambda: ca_backup(extra_archive, None),
              extra_archive.unlink)
        again("btrfs send",
              lambda: run(["btrfs", "send", "-q", "-f", extra_stream, snap]),
              extra_stream.unlink)
        again("cloneaware restore -> Btrfs", lambda: ca_restore(d_ca),
              lambda: remove(d_ca, d_ca / "snap"))
        again("btrfs receive -> Btrfs",
              lambda: d_rcv.mkdir() or run(["btrfs", "receive", "-q", "-f", stream, d_rcv]),
              lambda: remove(d_rcv, d_rcv / "snap"))
        if args.compressed:  # the pair the compressed ratios compare with, likewise
            again("btrfs send --proto 2 --compressed-data",
                  lambda: run(["btrfs", "send", "-q", "--proto", "2", "--compressed-data",
                               "-f", extra_stream, snap]),
                  extra_stream.unlink)
            again("btrfs receive (--compressed-data) -> Btrfs",
                  lambda: d_rcv2.mkdir() or run(["btrfs", "receive", "-q", "-f", zstream,
                                                 d_rcv2]),
                  lambda: remove(d_rcv2, d_rcv2 / "snap"))

    for fsname, base in (("Btrfs", bt), ("XFS", xf)):
        d = base / "r-tar"
        d.mkdir()
        restore_step(f"tar -x -> {fsname}",
                     lambda d=d: run(["tar", "-x", "-f", tarfile, "-C", d]), d)
    def ca_reshare(dest: Path):
        r = run(CLONEAWARE + ["reshare", "--json", "--from", sharemap, dest], check=False)
        if r.returncode not in (0, 1):
            raise BenchError(f"cloneaware reshare exited {r.returncode}: "
                             f"{r.stderr.strip()[-2000:]}")
        return {"detail": json.loads(r.stdout)}

    duperemove = shutil.which("duperemove")
    for fsname, base in (("Btrfs", bt), ("XFS", xf)):
        d = base / "r-rsync"
        # into d/snap: the top-level name the sharing map gives the tree; the
        # rows after the copy give the copy's usage once they are done
        empty = restore_step(f"rsync -aSH -> {fsname}",
                             lambda d=d: run(["rsync", "-aSH", snap, f"{d}/"]), d, d / "snap",
                             keep=True)
        restore_step(f"  then cloneaware reshare -> {fsname}", lambda d=d: ca_reshare(d), d,
                     d / "snap", df_from=empty)
        if duperemove is None:
            log("duperemove is not installed: its row is left out")
            continue
        empty = df_used(base)
        run(["rsync", "-aSH", snap, f"{d}/"])  # the same copy again, not timed
        restore_step(f"  rsync, then duperemove -dr -> {fsname}",
                     lambda d=d: run([duperemove, "-dr", d / "snap"]), d, d / "snap",
                     df_from=empty)
    d = bt / "r-cp"
    restore_step("cp -a --reflink=always (same fs)",
                 lambda: run(["cp", "-a", "--reflink=always", snap, d]), d)
    if args.many_clones:
        many_clones(args.many_clones, bt, ar, step, steps)

    return {"params": {"size_mib": args.size, "clones": args.clones, "change": args.change,
                       "files": args.files, "seed": args.seed, "compressed": args.compressed,
                       "rounds": args.rounds},
            "layout": {"source": "Btrfs loop fs, read-only snapshot of subvolume 'src'",
                       "archives": "ext4 loop fs (tar file, send stream, cloneaware archive)",
                       "restores": "Btrfs (same fs as the source, outside the subvolume) "
                                   "and XFS loop fs (reflink=1)",
                       "images": str(root)},
            "family": {"rewritten_bytes": fam["rewritten_bytes"],
                       "small_bytes": fam["small_bytes"]},
            "source": src, "steps": steps}


MANY_SIZE = 4 * MiB


def many_clones(n: int, bt: Path, ar: Path, step, steps: dict) -> None:
    """One 4 MiB image and ``n`` reflink clones of it: cloneaware restores
    one copy of the data and ``n`` clone calls; btrfs send gives up on
    sharing past its limit of references per extent and its receive writes
    every copy.  Both restores are timed until synced, from a cold cache."""
    from cloneaware import native

    log(f"building {n} reflink clones of one {MANY_SIZE // MiB} MiB image")
    run(["btrfs", "subvolume", "create", bt / "many-src"])
    img = bt / "many-src" / "image"
    img.write_bytes(random.Random(7).randbytes(MANY_SIZE))
    with open(img, "rb") as src:
        for i in range(n):
            with open(bt / "many-src" / f"clone-{i:05d}", "wb") as dst:
                native.ficlone(dst.fileno(), src.fileno())
    snap = bt / "many"
    run(["btrfs", "subvolume", "snapshot", "-r", bt / "many-src", snap])
    os.sync()
    archive, stream = ar / "many.ca", ar / "many.send"

    def send():
        run(["btrfs", "send", "-q", "-f", stream, snap])
        return {"bytes": stream.stat().st_size}

    step(f"{n} clones: cloneaware backup",
         lambda: run(CLONEAWARE + ["backup", "-o", archive, snap]) and
         {"bytes": archive.stat().st_size}, what="archive bytes")
    step(f"{n} clones: btrfs send", send, what="stream bytes")
    for name, fn, dest, subvol in (
            (f"{n} clones: cloneaware restore -> Btrfs",
             lambda: run(CLONEAWARE + ["restore", archive, bt / "m-ca"]),
             bt / "m-ca", None),
            (f"{n} clones: btrfs receive -> Btrfs",
             lambda: (bt / "m-rcv").mkdir() or run(["btrfs", "receive", "-q", "-f", stream,
                                                    bt / "m-rcv"]),
             bt / "m-rcv", bt / "m-rcv" / "many")):
        r = step(name, fn)
        got = scan(dest / "many")
        r["bytes"] = got["physical_bytes"]
        r["what"] = "restored physical bytes"
        r["usage_ratio"] = got["physical_bytes"] / MANY_SIZE
        if got["files"] != n + 1:
            r["mismatch"] = f"restored {got['files']} files of {n + 1}"
            log(f"WARNING {name}: {r['mismatch']}")
        remove(dest, subvol)
    archive.unlink()
    stream.unlink()
    run(["btrfs", "subvolume", "delete", "-c", snap, bt / "many-src"])


# --- report -----------------------------------------------------------------------

def ratios(res: dict) -> list[dict]:
    s = res["steps"]
    phys = res["source"]["physical_bytes"]
    df = res["source"]["df_bytes"]
    sec = {k: v["seconds"] for k, v in s.items()}

    def r(key, name, num, den, target=None):
        v = num / den if den else None
        t = TARGETS.get(key) if target is None else target
        out = {"key": key, "name": name, "value": v, "target": t}
        if t is not None and v is not None:
            out["met"] = v <= t
        return out

    ca_b = sec["cloneaware backup"]
    ca_bn = sec["cloneaware backup --compress none"]
    out = [
        r("backup_vs_send", "cloneaware backup / btrfs send", ca_b, sec["btrfs send"]),
        r("backup_vs_tar", "cloneaware backup / tar -c", ca_b, sec["tar -c --sparse"]),
        r("backup_none_vs_send", "cloneaware backup --compress none / btrfs send", ca_bn,
          sec["btrfs send"]),
        r("backup_none_vs_tar", "cloneaware backup --compress none / tar -c", ca_bn,
          sec["tar -c --sparse"]),
        r("backup_vs_limit", "cloneaware backup / physical limit", ca_b,
          sec["physical limit (read once)"]),
        r("backup_none_vs_limit", "cloneaware backup --compress none / physical limit",
          ca_bn, sec["physical limit (read once)"]),
        r("backup_vs_copy", "cloneaware backup / physical copy (read + write + fsync)",
          ca_b, sec["physical copy (read once, write once)"]),
        r("copy_vs_limit", "physical copy / physical limit",
          sec["physical copy (read once, write once)"], sec["physical limit (read once)"]),
        r("restore_btrfs_vs_receive", "cloneaware restore / btrfs receive (Btrfs)",
          sec["cloneaware restore -> Btrfs"], sec["btrfs receive -> Btrfs"]),
        r("restore_btrfs_vs_tar", "cloneaware restore / tar -x (Btrfs)",
          sec["cloneaware restore -> Btrfs"], sec["tar -x -> Btrfs"]),
        r("restore_xfs_vs_tar", "cloneaware restore / tar -x (XFS)",
          sec["cloneaware restore -> XFS"], sec["tar -x -> XFS"]),
        r("restore_btrfs_vs_cp", "cloneaware restore / cp --reflink (Btrfs, the floor)",
          sec["cloneaware restore -> Btrfs"], sec["cp -a --reflink=always (same fs)"]),
        r("archive_vs_physical", "archive bytes / source physical bytes",
          s["cloneaware backup"]["bytes"], phys),
        r("send_vs_physical", "send stream bytes / source physical bytes",
          s["btrfs send"]["bytes"], phys),
        r("tar_vs_physical", "tar bytes / source physical bytes",
          s["tar -c --sparse"]["bytes"], phys),
        r("usage_btrfs", "restored usage / source usage, df (cloneaware -> Btrfs)",
          s["cloneaware restore -> Btrfs"]["df_bytes"], df),
        r("usage_xfs", "restored usage / source usage, df (cloneaware -> XFS)",
          s["cloneaware restore -> XFS"]["df_bytes"], df),
        r("usage_receive", "restored usage / source usage, df (btrfs receive)",
          s["btrfs receive -> Btrfs"]["df_bytes"], df),
        r("reshare_usage_btrfs", "rsync copy after reshare / source usage, df (Btrfs)",
          s["  then cloneaware reshare -> Btrfs"]["df_bytes"], df),
        r("reshare_usage_xfs", "rsync copy after reshare / source usage, df (XFS)",
          s["  then cloneaware reshare -> XFS"]["df_bytes"], df),
    ] + [
        r(f"duperemove_usage_{fs.lower()}",
          f"rsync copy after duperemove -dr / source usage, df ({fs})",
          s[f"  rsync, then duperemove -dr -> {fs}"]["df_bytes"], df)
        for fs in ("Btrfs", "XFS") if f"  rsync, then duperemove -dr -> {fs}" in s
    ] + [
        r(f"reshare_vs_duperemove_{fs.lower()}",
          f"cloneaware reshare / duperemove -dr, seconds ({fs})",
          sec[f"  then cloneaware reshare -> {fs}"],
          sec[f"  rsync, then duperemove -dr -> {fs}"])
        for fs in ("Btrfs", "XFS") if f"  rsync, then duperemove -dr -> {fs}" in s
    ]
    many = [k for k in s if k.endswith("clones: cloneaware restore -> Btrfs")]
    if many:
        n = many[0].split()[0]
        out += [
            r("restore_many_vs_receive", f"{n} clones: cloneaware restore / btrfs receive",
              sec[many[0]], sec[f"{n} clones: btrfs receive -> Btrfs"]),
            r("usage_many", f"{n} clones: restored usage / one image",
              s[many[0]]["bytes"], MANY_SIZE),
        ]
    if "btrfs send --proto 2 --compressed-data" in s:
        disk = res["source"].get("disk_bytes")
        out += [
            r("backup_vs_send_compressed",
              "cloneaware backup / btrfs send --compressed-data", ca_b,
              sec["btrfs send --proto 2 --compressed-data"]),
            r("restore_btrfs_vs_receive_compressed",
              "cloneaware restore / btrfs receive (compressed-data)",
              sec["cloneaware restore -> Btrfs"],
              sec["btrfs receive (--compressed-data) -> Btrfs"]),
            r("send_compressed_vs_disk", "send --compressed-data stream / source disk",
              s["btrfs send --proto 2 --compressed-data"]["bytes"], disk or 0),
        ]
        if disk:
            out += [
                r("archive_vs_disk", "archive bytes / source disk (compsize)",
                  s["cloneaware backup"]["bytes"], disk),
                r("usage_btrfs_disk", "restored disk / source disk (compsize, cloneaware)",
                  s["cloneaware restore -> Btrfs"].get("disk_bytes", 0), disk),
                r("usage_receive_disk", "restored disk / source disk (compsize, receive)",
                  s["btrfs receive -> Btrfs"].get("disk_bytes", 0), disk),
                r("usage_receive2_disk",
                  "restored disk / source disk (compsize, receive compressed-data)",
                  s["btrfs receive (--compressed-data) -> Btrfs"].get("disk_bytes", 0), disk),
            ]
    return out


def table(res: dict) -> str:
    src = res["source"]
    p = res["params"]
    lines = [
        f"cloneaware bench: {p['size_mib']} MiB base, {p['clones']} clones, "
        f"{p['change']:.1%} rewritten in 64 KiB blocks, {p['files']} small files"
        + (f"; source Btrfs {p['compressed']}" if p.get("compressed") else ""),
        f"source: {src['files']} files, {src['logical_bytes'] / MiB:.1f} MiB logical, "
        f"{src['physical_bytes'] / MiB:.1f} MiB physical, {src['extents']} extents, "
        f"{src['df_bytes'] / MiB:.1f} MiB used by df"
        + (f", {src['disk_bytes'] / MiB:.1f} MiB on disk (compsize)"
           if src.get("disk_bytes") else ""),
        f"archives on: {res['layout']['archives']}; cold cache before every step",
        "load average (1 min) after each step: "
        + ", ".join(f"{s['loadavg']:.1f}" for s in res["steps"].values())
        + f" on {os.cpu_count()} CPUs",
        "",
        f"{'step':<40} {'seconds':>8} {'cpu s':>7} {'MiB':>9} {'df':>6} {'fiemap':>6}  what",
        "-" * 99,
    ]
    for name, s in res["steps"].items():
        usage = f"{s['usage_ratio']:.2f}x" if "usage_ratio" in s else ""
        if "disk_ratio" in s:
            usage = f"{s['disk_ratio']:.2f}x"
        mib = f"{s['bytes'] / MiB:.1f}" if "bytes" in s else ""
        what = s.get("what", "")
        if name == "physical limit (read once)":
            rate = s["bytes"] / MiB / s["seconds"] if s["seconds"] else 0
            what += f" ({rate:.0f} MiB/s)"
        df = f"{s['df_ratio']:.2f}x" if "df_ratio" in s else ""
        lines.append(f"{name:<40} {s['seconds']:>8.2f} {s['cpu_seconds']:>7.2f} {mib:>9} "
                     f"{df:>6} {usage:>6}  {what}")
        if "samples" in s:
            lines.append(f"{'':<40} median of " + ", ".join(f"{x:.2f}" for x in s["samples"])
                         + " s, in turns with the tool it is compared with")
        if "mismatch" in s:
            lines.append(f"{'':<40} !! {s['mismatch']}")
        det = s.get("detail") or {}
        if det.get("checked_bytes") or det.get("check_mismatch_bytes"):
            lines.append(f"{'':<40} compressed ranges referenced after the content check: "
                         f"{det.get('checked_bytes', 0) / MiB:.1f} MiB, stored after a "
                         f"mismatch: {det.get('check_mismatch_bytes', 0) / MiB:.1f} MiB")
        if det.get("encoded_stored_bytes") or det.get("encoded_written_bytes"):
            lines.append(f"{'':<40} as Btrfs extents as they are on disk: "
                         + (f"stored {det['encoded_stored_bytes'] / MiB:.1f} MiB "
                            f"({det.get('encoded_extent_bytes', 0) / MiB:.1f} MiB encoded)"
                            if det.get("encoded_stored_bytes") else
                            f"written {det['encoded_written_bytes'] / MiB:.1f} MiB"))
        if "shared_bytes" in det:  # cloneaware reshare
            lines.append(f"{'':<40} shared {det['shared_bytes'] / MiB:.1f} MiB in "
                         f"{det['dedupe_calls']} calls, already shared "
                         f"{det['already_shared_bytes'] / MiB:.1f} MiB, differing "
                         f"{det['differing_bytes'] / MiB:.1f} MiB, skipped "
                         f"{len(det['skipped'])} files")
        if det.get("copied_bytes"):
            lines.append(f"{'':<40} copied instead of reflinked: "
                         f"{det['copied_bytes'] / MiB:.1f} MiB {det.get('copy_reasons')}")
    lines += ["", f"{'ratio':<58} {'value':>7} {'target':>8}  result", "-" * 86]
    for r in res["ratios"]:
        v = f"{r['value']:.3f}" if r["value"] is not None else "n/a"
        t = f"<= {r['target']:g}" if r["target"] is not None else ""
        m = ("met" if r["met"] else "MISSED") if "met" in r else ""
        lines.append(f"{r['name']:<58} {v:>7} {t:>8}  {m}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="base file size, MiB (512)")
    ap.add_argument("--clones", type=int, default=8, help="reflinked clones (8)")
    ap.add_argument("--change", type=float, default=0.02,
                    help="fraction of each clone rewritten in 64 KiB blocks (0.02)")
    ap.add_argument("--files", type=int, default=300, help="small files (300)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (1)")
    ap.add_argument("--many-clones", type=int, default=2000, metavar="N",
                    help="also restore N reflink clones of one 4 MiB image (2000; 0: no)")
    ap.add_argument("--compressed", nargs="?", const="compress-force=zstd", default="",
                    metavar="OPTIONS",
                    help="mount the Btrfs with these options (compress-force=zstd), "
                         "compressible base")
    ap.add_argument("--rounds", type=int, default=3,
                    help="samples of backup, send, restore and receive (and of the "
                         "--compressed-data pair), in turns; their rows give the median (3)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--keep", action="store_true",
                    help="leave the filesystems mounted and the images in place")
    args = ap.parse_args()
    if args.size < 1 or args.clones < 1 or not 0 <= args.change <= 1 or args.files < 0 \
            or args.many_clones < 0 or args.rounds < 1:
        ap.error("need --size >= 1, --clones >= 1, 0 <= --change <= 1, --files >= 0, "
                 "--many-clones >= 0, --rounds >= 1")

    mounted: list = []
    root = Path(tempfile.mkdtemp(prefix="cloneaware-bench-"))
    t0 = time.monotonic()

    def body() -> None:
        check_tools()
        res = bench(args, root, mounted)
        res["ratios"] = ratios(res)
        res["total_seconds"] = time.monotonic() - t0
        if args.json:
            print(json.dumps(res, indent=2, default=str))
        else:
            print(table(res))
            print(f"\n(total {res['total_seconds']:.0f} s)")

    return guarded(body, root, mounted, keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
