"""pytest plugin: throwaway loopback filesystems and clone-family generators.

Loaded with ``-p cloneaware.testing`` (see pyproject.toml), so later test
suites, and users' own, can reuse it.  Each filesystem lives in its own sparse
image under the worker's temporary directory (unique per pytest-xdist
worker), is mounted with ``-o loop`` (the loop device is detached on unmount)
and is unmounted at teardown even when a test fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

KINDS = ("btrfs", "xfs", "ext4", "tmpfs")
MKFS = {
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
MIN_SIZE = {"btrfs": 256 << 20, "xfs": 320 << 20, "ext4": 64 << 20, "tmpfs": 1 << 20}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def missing_capability(kind: str) -> str | None:
    """Why a loopback filesystem of this kind cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to mount loopback filesystems"
    if kind != "tmpfs":
        if not os.path.exists("/dev/loop-control"):
            return "no loop devices (/dev/loop-control missing)"
        if shutil.which(MKFS[kind][0]) is None:
            return f"{MKFS[kind][0]} is not installed"
    with open("/proc/filesystems") as f:
        known = {line.split()[-1] for line in f if line.strip()}
    if kind not in known:
        subprocess.run(["modprobe", kind], capture_output=True)
        with open("/proc/filesystems") as f:
            known = {line.split()[-1] for line in f if line.strip()}
        if kind not in known:
            return f"the kernel has no {kind}"
    return None


@dataclass
class LoopFs:
    kind: str
    path: Path
    image: Path | None
    options: str

    def sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
        finally:
            os.close(fd)

    def unmount(self) -> None:
        for attempt in range(20):
            r = subprocess.run(["umount", str(self.path)], capture_output=True, text=True)
            if r.returncode == 0 or "not mounted" in r.stderr:
                break
            time.sleep(0.1 * (attempt + 1))
        else:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        if self.image is not None:
            try:
                self.image.unlink()
            except FileNotFoundError:
                pass


def make_loopfs(root: Path, kind: str, size: int = 1 << 30, mount_options: str = "",
                mkfs_args: tuple[str, ...] = ()) -> LoopFs:
    """Make and mount a filesystem under ``root``; the caller unmounts it."""
    why = missing_capability(kind)
    if why:
        pytest.skip(why)
    size = max(size, MIN_SIZE[kind])
    n = 0
    while (root / f"{kind}{n}").exists():
        n += 1
    mnt = root / f"{kind}{n}"
    mnt.mkdir(parents=True)
    if kind == "tmpfs":
        opts = f"size={size}" + (f",{mount_options}" if mount_options else "")
        _run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)])
        return LoopFs(kind, mnt, None, opts)
    image = root / f"{kind}{n}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    _run(MKFS[kind] + list(mkfs_args) + [str(image)])
    opts = "loop" + (f",{mount_options}" if mount_options else "")
    last = None
    for attempt in range(10):  # loop device allocation can race between workers
        r = subprocess.run(["mount", "-t", kind, "-o", opts, str(image), str(mnt)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            return LoopFs(kind, mnt, image, opts)
        last = r.stderr.strip()
        time.sleep(0.2 * (attempt + 1))
    image.unlink()
    raise RuntimeError(f"mount {kind} failed: {last}")


class LoopFsFactory:
    def __init__(self, root: Path):
        self.root = root
        self.mounted: list[LoopFs] = []

    def __call__(self, kind: str, size: int = 1 << 30, mount_options: str = "",
                 mkfs_args: tuple[str, ...] = ()) -> LoopFs:
        fs = make_loopfs(self.root, kind, size, mount_options, mkfs_args)
        self.mounted.append(fs)
        return fs

    def close(self) -> None:
        while self.mounted:
            self.mounted.pop().unmount()


@pytest.fixture(scope="session")
def loopfs_session(tmp_path_factory) -> Iterator[LoopFsFactory]:
    """Factory for filesystems that live for the worker's whole session."""
    f = LoopFsFactory(tmp_path_factory.mktemp("loopfs"))
    yield f
    f.close()


@pytest.fixture
def loopfs(tmp_path_factory) -> Iterator[LoopFsFactory]:
    """Factory for filesystems that live for one test (special options, sizes)."""
    f = LoopFsFactory(tmp_path_factory.mktemp("loopfs"))
    yield f
    f.close()


_shared: dict[str, LoopFs] = {}


def _shared_fs(factory: LoopFsFactory, kind: str) -> LoopFs:
    fs = _shared.get(kind)
    if fs is None or not os.path.ismount(fs.path):
        fs = _shared[kind] = factory(kind, 2 << 30 if kind != "tmpfs" else 1 << 30)
    return fs


def _fresh_dir(fs: LoopFs, request) -> Iterator[Path]:
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:80]
    d = fs.path / f"t-{name}-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _dir_fixture(kind: str):
    @pytest.fixture
    def fixture(loopfs_session, request) -> Iterator[Path]:
        fs = _shared_fs(loopfs_session, kind)
        yield from _fresh_dir(fs, request)

    fixture.__doc__ = f"A fresh directory on this worker's loopback {kind}."
    return fixture


btrfs_dir = _dir_fixture("btrfs")
xfs_dir = _dir_fixture("xfs")
ext4_dir = _dir_fixture("ext4")
tmpfs_dir = _dir_fixture("tmpfs")


@pytest.fixture(params=["btrfs", "xfs"])
def reflink_dir(request, loopfs_session) -> Iterator[Path]:
    """A fresh directory on a reflink filesystem (Btrfs, then XFS)."""
    fs = _shared_fs(loopfs_session, request.param)
    yield from _fresh_dir(fs, request)


@pytest.fixture(params=list(KINDS))
def any_dir(request, loopfs_session) -> Iterator[Path]:
    """A fresh directory on each of Btrfs, XFS, ext4 and tmpfs."""
    fs = _shared_fs(loopfs_session, request.param)
    yield from _fresh_dir(fs, request)


def timeout(seconds: float) -> float:
    """A test's time limit, scaled by CLONEAWARE_TEST_SLOWDOWN (vm/guest.sh
    sets it under TCG, where the CPU is several times slower)."""
    return seconds * float(os.environ.get("CLONEAWARE_TEST_SLOWDOWN", "1"))


# --- clone families -------------------------------------------------------

def write_random(path: Path, size: int, seed: int, chunk: int = 1 << 20) -> None:
    """Write ``size`` bytes of seeded pseudo-random (incompressible) data."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def write_letters(path: Path, size: int, seed: int, chunk: int = 1 << 20) -> None:
    """Write ``size`` bytes of seeded random letters from a 16-letter
    alphabet: zstd (and Btrfs compression) halves them, and zstd's high
    levels take seconds per MiB."""
    import random

    rng = random.Random(seed)
    table = bytes(0x61 + (i & 15) for i in range(256))
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(rng.randbytes(n).translate(table))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def reflink_copy(src: Path, dst: Path) -> None:
    from cloneaware import native

    with open(src, "rb") as s, open(dst, "wb") as d:
        native.ficlone(d.fileno(), s.fileno(), str(dst))


def rewrite_blocks(path: Path, fraction: float, seed: int, block: int = 64 << 10) -> int:
    """Overwrite a fraction of a file in scattered blocks; returns bytes written."""
    import random

    rng = random.Random(seed)
    size = path.stat().st_size
    nblocks = max(size // block, 1)
    count = int(nblocks * fraction + 0.5)
    chosen = rng.sample(range(nblocks), min(count, nblocks))
    with open(path, "r+b") as f:
        for b in chosen:
            f.seek(b * block)
            f.write(rng.randbytes(min(block, size - b * block)))
        f.flush()
        os.fsync(f.fileno())
    return len(chosen) * block


def make_family(root: Path, base_size: int = 8 << 20, clones: int = 4,
                change: float = 0.05, small_files: int = 20, sparse: bool = True,
                seed: int = 1) -> dict:
    """A clone family as users have them: a base image, reflinked clones each
    partly rewritten, a directory of small files, and a sparse file.
    Returns a description (paths and byte counts)."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    images.mkdir()
    base = images / "base.img"
    write_random(base, base_size, seed)
    clone_paths = []
    for i in range(clones):
        c = images / f"clone{i}.img"
        reflink_copy(base, c)
        rewrite_blocks(c, change, seed + 100 + i)
        clone_paths.append(c)
    etc = root / "etc"
    etc.mkdir()
    for i in range(small_files):
        (etc / f"conf{i:03d}").write_bytes(b"key=%d\n" % i * (i + 1))
    out = {"base": base, "clones": clone_paths, "root": root}
    if sparse:
        sp = root / "sparse.img"
        with open(sp, "wb") as f:
            f.truncate(64 << 20)
            f.seek(8 << 20)
            f.write(os.urandom(128 << 10))
            f.seek(40 << 20)
            f.write(os.urandom(64 << 10))
        out["sparse"] = sp
    return out


def pytest_report_header(config) -> list[str]:
    lines = []
    for kind in KINDS:
        why = missing_capability(kind)
        lines.append(f"cloneaware: {kind}: {'available' if why is None else 'skipped: ' + why}")
    return lines
