"""Helpers for the backup/restore tests: build a tree with every kind of
entry and metadata the archive claims to keep, take an independent snapshot
of a tree (os.lstat, xattrs, sparse-aware content hashes, hard-link groups,
``getfacl``), compare two snapshots, and back up and restore through the CLI.

Nothing here uses cloneaware's own walking, hashing or metadata code: the
snapshot is the yardstick the restore is measured against."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import subprocess
from collections import defaultdict
from pathlib import Path

from cloneaware import native
from cloneaware.archive.events import EntryEvent
from cloneaware.archive.reader import Stream
from cloneaware.testing import make_family, reflink_copy, rewrite_blocks, write_random  # noqa: F401
from helpers.cli import cli, cli_json, cli_popen, finished

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# XFS's private copy of a POSIX ACL (docs/KERNEL.md X1): not part of what is compared.
XATTR_IGNORE = {b"trusted.SGI_ACL_FILE", b"trusted.SGI_ACL_DEFAULT"}

ODD_NAMES = [b"bad\xff\xfename", b"new\nline", b"with space", b"-leading-dash",
             b"tab\there", b"\xe9t\xe9 latin-1", b"--", b"*?[glob]"]


# --- running the CLI (helpers/cli.py) ----------------------------------------

def backup_json(archive, *paths, compress: str = "none", extra=(), env=None) -> dict:
    return cli_json("backup", "--json", "--compress", compress, *extra, "-o", archive, *paths,
                    env=env)


def restore_json(archive, dest, extra=(), timeout: float = 300, env=None) -> tuple[dict, str]:
    r = cli("restore", "--json", *extra, archive, dest, check_rc=0, timeout=timeout, env=env)
    return r.json(), r.err


def pipe_backup_restore(paths, dest, compress: str = "zstd") -> tuple[int, int, str, str]:
    """``cloneaware backup -o - PATHS | cloneaware restore - DEST``; returns both
    exit codes and both stderrs (neither with a traceback)."""
    b = cli_popen("backup", "--compress", compress, "-o", "-", *paths)
    r = cli_popen("restore", "-", dest, stdin=b.stdout)
    b.stdout.close()  # restore holds the only read end now
    rr = finished(r, ["restore", "-", dest], timeout=300)
    b_err = b.stderr.read()
    b.stderr.close()
    b.wait(timeout=60)
    assert "Traceback" not in b_err.decode(errors="replace"), b_err
    return b.returncode, rr.returncode, b_err.decode(errors="replace"), rr.err


def physical_bytes(path) -> int:
    """Physical usage of a tree: the union of its files' physical extents, as
    ``cloneaware scan`` counts it (in-process: a CLI start costs a second)."""
    from cloneaware.scan import scan

    res = scan([os.fsencode(path)])
    assert not res.skipped, res.skipped
    return int(res.plan.totals.physical_bytes)


def assert_close(got: int, want: int, rel: float = 0.02, what: str = "") -> None:
    assert abs(got - want) <= rel * want, \
        f"{what}: {got} is not within {rel:.0%} of {want} (ratio {got / max(want, 1):.4f})"


# --- building trees --------------------------------------------------------

def _text(size: int, seed: int = 0) -> bytes:
    line = b"%08d the quick brown fox jumps over the lazy cloneaware dog\n"
    out = bytearray()
    i = seed
    while len(out) < size:
        out += line % i
        i += 1
    return bytes(out[:size])


def make_text_family(root: Path, base_size: int = 8 * MiB, clones: int = 3,
                     change: float = 0.05, seed: int = 3) -> dict:
    """A clone family whose base compresses well (repeated text)."""
    images = root / "images"
    images.mkdir(parents=True)
    base = images / "base.txt"
    with open(base, "wb") as f:
        f.write(_text(base_size, seed))
        os.fsync(f.fileno())
    cl = []
    for i in range(clones):
        c = images / f"clone{i}.txt"
        reflink_copy(base, c)
        rewrite_blocks(c, change, seed + 10 + i)
        cl.append(c)
    return {"base": base, "clones": cl, "root": root}


def _setfacl(*args) -> None:
    subprocess.run(["setfacl", *map(str, args)], check=True, capture_output=True)


def _set_times_everywhere(roots: list[Path], seed: int) -> None:
    """Give every entry distinct atime/mtime with odd nanoseconds, deepest
    first (utime on a child does not touch its parent's mtime)."""
    paths: list[bytes] = []
    for r in roots:
        rb = os.fsencode(r)
        paths.append(rb)
        for dirpath, dirnames, filenames in os.walk(rb):
            for n in dirnames + filenames:
                paths.append(os.path.join(dirpath, n))
    paths.sort(key=lambda p: -p.count(b"/"))
    base = 1_500_000_000_000_000_000 + seed * 1_000_000_000
    for i, p in enumerate(paths):
        mtime = base + i * 1_000_003_007 + 123_457
        atime = mtime + 86_400_000_000_000 + 987_651
        os.utime(p, ns=(atime, mtime), follow_symlinks=False)


def build_tree(top: Path, *, base_size: int = 8 * MiB, clones: int = 3, seed: int = 1,
               specials: bool = True, text: bool = False) -> list[Path]:
    """Make ``top/data`` (a clone family plus one of everything) and
    ``top/other`` (holding a hard link whose first name is in ``data``).
    Returns the PATHs to give ``cloneaware backup``, in that order."""
    data = top / "data"
    other = top / "other"
    if text:
        make_text_family(data, base_size=base_size, clones=clones, seed=seed)
        (data / "etc").mkdir()
        for i in range(5):
            (data / "etc" / f"conf{i}").write_bytes(b"k=%d\n" % i * (i + 1))
    else:
        make_family(data, base_size=base_size, clones=clones, change=0.05, small_files=8,
                    sparse=True, seed=seed)
    other.mkdir()
    db = os.fsencode(data)

    # a file that shares with itself: second half cloned from the first
    selfc = data / "selfclone.img"
    write_random(selfc, 1 * MiB, seed + 7)
    with open(selfc, "r+b") as f:
        f.truncate(2 * MiB)
        native.ficlonerange(f.fileno(), f.fileno(), 0, 1 * MiB, 1 * MiB, str(selfc))

    # symlinks: relative, absolute, dangling, to a directory
    links = data / "links"
    links.mkdir()
    os.symlink("../images/" + ("base.txt" if text else "base.img"), links / "rel")
    os.symlink("/nonexistent/absolute/target", links / "abs")
    os.symlink("no/such/file", links / "dangling")
    os.symlink("..", links / "updir")

    # hard links: two names in one PATH, a third in another PATH
    hard = data / "hard"
    hard.mkdir()
    (hard / "a").write_bytes(b"hard-linked content\n" * 100)
    os.link(hard / "a", hard / "b")
    os.link(hard / "a", other / "peer")
    (other / "own").write_bytes(b"a file of its own\n")
    # a hard-linked clone: a name that is both a link and shares extents
    reflink_copy(data / "images" / ("base.txt" if text else "base.img"), hard / "clone")
    os.link(hard / "clone", hard / "clone2")

    # xattrs (user.*), on a file and a directory
    xd = data / "xattrs"
    xd.mkdir()
    xf = xd / "file"
    xf.write_bytes(b"has xattrs\n")
    os.setxattr(xf, "user.comment", b"hello world")
    os.setxattr(xf, "user.binary", bytes(range(256)))
    os.setxattr(xf, "user.empty", b"")
    os.setxattr(xf, "user.big", os.urandom(3000))
    os.setxattr(xd, "user.dir", b"on a directory")

    # POSIX ACLs: access on a file, access and default on a directory (its
    # children inherit: they carry access ACLs of their own)
    ad = data / "acl"
    ad.mkdir()
    af = ad / "file"
    af.write_bytes(b"acl\n")
    _setfacl("-m", "u:1234:rw-,g:5678:r--,m::rw-", af)
    dd = ad / "dir"
    dd.mkdir()
    _setfacl("-m", "u:1234:rwx", dd)
    _setfacl("-d", "-m", "u:1234:rwx,g:5678:r-x,o::---", dd)
    (dd / "child").write_bytes(b"inherits\n")
    (dd / "subdir").mkdir()

    # sparse and empty
    sp = data / "holes.bin"
    with open(sp, "wb") as f:
        f.truncate(6 * MiB + 5)
        f.seek(1 * MiB)
        f.write(os.urandom(64 * KiB))
        f.seek(5 * MiB)
        f.write(b"tail data")
    (data / "empty").write_bytes(b"")
    (data / "emptydir").mkdir()
    with open(data / "hole_only", "wb") as f:
        f.truncate(3 * MiB)

    # odd names, including one directory with an odd name
    odd = data / "odd"
    odd.mkdir()
    oddb = os.fsencode(odd)
    for i, n in enumerate(ODD_NAMES):
        with open(os.path.join(oddb, n), "wb") as f:
            f.write(b"odd %d " % i + n)
    os.mkdir(os.path.join(oddb, b"dir\xff\nx"))
    with open(os.path.join(oddb, b"dir\xff\nx", b"inner -file"), "wb") as f:
        f.write(b"inside an odd directory")
    os.symlink(b"bad\xff\xfename", os.path.join(oddb, b"link\xfe"))

    # modes and owners (chown before chmod: chown clears setuid)
    md = data / "modes"
    md.mkdir()
    for name, mode, owner in [("setuid", 0o4755, (1234, 5678)), ("setgid", 0o2711, (0, 5678)),
                              ("none", 0o000, (4321, 4321)), ("private", 0o600, (1, 2)),
                              ("odd", 0o1751, (65534, 65534))]:
        p = md / name
        p.write_bytes(name.encode() * 10)
        os.chown(p, *owner)
        os.chmod(p, mode)
    for name, mode, owner in [("sticky", 0o1777, (0, 0)), ("sgid", 0o2750, (1234, 5678)),
                              ("closed", 0o500, (4321, 8765))]:
        p = md / name
        p.mkdir()
        (p / "inside").write_bytes(b"x")
        os.chown(p, *owner)
        os.chmod(p, mode)
    os.chown(links / "rel", 4321, 8765, follow_symlinks=False)
    os.chown(other, 1234, 5678)

    # FIFO and device nodes (root)
    if specials:
        dv = data / "dev"
        dv.mkdir()
        os.mkfifo(dv / "fifo", 0o640)
        os.mknod(dv / "null", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(dv / "blk", 0o660 | stat.S_IFBLK, os.makedev(7, 254))
        os.chown(dv / "fifo", 1234, 5678)

    _set_times_everywhere([data, other], seed)
    # make everything durable so FIEMAP sees real extents
    fd = os.open(db, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.syncfs(fd) if hasattr(os, "syncfs") else os.sync()
    finally:
        os.close(fd)
    return [data, other]


# --- snapshots ---------------------------------------------------------------

GRID = 64 * KiB


def content_digest(fd: int, size: int) -> str:
    """SHA-256 of a file's logical content, reading only its data regions
    (SEEK_DATA/SEEK_HOLE) and hashing the non-zero 64 KiB blocks with their
    offsets: independent of where holes are, cheap on huge sparse files."""
    h = hashlib.sha256()
    h.update(struct.pack("<Q", size))
    zero = bytes(GRID)
    pos = 0
    next_block = 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        e_ = os.lseek(fd, d, os.SEEK_HOLE)
        b = max(d // GRID, next_block)
        while b * GRID < e_:
            blk = os.pread(fd, GRID, b * GRID)
            if blk != zero[:len(blk)]:
                h.update(struct.pack("<Q", b))
                h.update(blk)
            b += 1
        next_block = b
        pos = max(e_, b * GRID)
    return h.hexdigest()


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out = {}
    for n in names:
        bn = os.fsencode(n)
        if bn in XATTR_IGNORE:
            continue
        out[bn] = os.getxattr(path, n, follow_symlinks=False)
    return out


def _record(full: bytes, st: os.stat_result) -> dict:
    m = st.st_mode
    rec = {
        "type": stat.S_IFMT(m),
        "mode": oct(stat.S_IMODE(m)),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
        "xattrs": _xattrs(full),
    }
    if stat.S_ISREG(m):
        rec["size"] = st.st_size
        rec["atime_ns"] = st.st_atime_ns
        rec["nlink"] = st.st_nlink
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC)
        try:
            rec["sha256"] = content_digest(fd, st.st_size)
        finally:
            os.close(fd)
    elif stat.S_ISLNK(m):
        rec["target"] = os.readlink(full)
    elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
        rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return rec


class Snapshot:
    """Every entry under ROOT (not ROOT itself), keyed by relative bytes path."""

    def __init__(self, root, ignore: tuple[bytes, ...] = (), atime: bool = True):
        """``atime=False``: the tree as a repository snapshot restores it
        without --atime, each file's access time its modification time."""
        self.root = os.fsencode(root)
        self.entries: dict[bytes, dict] = {}
        inodes: dict[int, list[bytes]] = defaultdict(list)
        stack = [b""]
        while stack:
            rel = stack.pop()
            full = os.path.join(self.root, rel) if rel else self.root
            # open with O_NOATIME: listing must not move the directory's atime
            dfd = os.open(full, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOATIME)
            try:
                names = sorted(os.listdir(dfd))
            finally:
                os.close(dfd)
            names = [os.fsencode(n) for n in names]
            for n in names:
                crel = os.path.join(rel, n) if rel else n
                if crel in ignore:
                    continue
                cfull = os.path.join(self.root, crel)
                st = os.lstat(cfull)
                self.entries[crel] = rec = _record(cfull, st)
                if not atime and "atime_ns" in rec:
                    rec["atime_ns"] = rec["mtime_ns"]
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    inodes[st.st_ino].append(crel)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(crel)
        self.link_groups = sorted(tuple(sorted(g)) for g in inodes.values())

    def __getitem__(self, rel: bytes) -> dict:
        return self.entries[rel]

    def user_xattrs(self) -> dict[str, list[str]]:
        """{path: [user.* xattr names]} of the entries that have any."""
        out = {}
        for rel, rec in self.entries.items():
            names = sorted(n.decode() for n in rec.get("xattrs") or {} if n.startswith(b"user."))
            if names:
                out[os.fsdecode(rel)] = names
        return out

    def without_user_xattrs(self) -> Snapshot:
        """A copy with the user.* xattrs left out (tmpfs before Linux 6.6)."""
        import copy

        c = copy.deepcopy(self)
        for rec in c.entries.values():
            if rec.get("xattrs"):
                rec["xattrs"] = {n: v for n, v in rec["xattrs"].items()
                                 if not n.startswith(b"user.")}
        return c


def diff(a: Snapshot, b: Snapshot) -> list[str]:
    """Human-readable differences between two snapshots (empty if equal)."""
    out = []
    for p in sorted(a.entries.keys() - b.entries.keys()):
        out.append(f"missing in {b.root!r}: {p!r}")
    for p in sorted(b.entries.keys() - a.entries.keys()):
        out.append(f"extra in {b.root!r}: {p!r}")
    for p in sorted(a.entries.keys() & b.entries.keys()):
        ra, rb = a.entries[p], b.entries[p]
        for k in sorted(ra.keys() | rb.keys()):
            if ra.get(k) != rb.get(k):
                va, vb = ra.get(k), rb.get(k)
                if k == "xattrs":
                    va = {n: v[:40] for n, v in (va or {}).items()}
                    vb = {n: v[:40] for n, v in (vb or {}).items()}
                out.append(f"{p!r}: {k}: {va!r} != {vb!r}")
    if a.link_groups != b.link_groups:
        out.append(f"hard-link groups differ: {a.link_groups!r} != {b.link_groups!r}")
    return out


def assert_same_tree(a: Snapshot, b: Snapshot) -> None:
    d = diff(a, b)
    assert not d, f"{len(d)} differences:\n" + "\n".join(d[:60])


def getfacl(root) -> dict[bytes, bytes]:
    """``getfacl -R -P -n`` of a tree, as {path: block}, independent of
    directory order."""
    r = subprocess.run(["getfacl", "-R", "-P", "-n", "-p", "."], cwd=root,
                       capture_output=True, check=True)
    blocks = {}
    for block in r.stdout.split(b"\n\n"):
        lines = block.strip(b"\n").split(b"\n")
        if not lines or not lines[0].startswith(b"# file: "):
            continue
        name = lines[0][len(b"# file: "):]
        if name == b".":
            continue
        blocks[name] = b"\n".join(sorted(lines[1:]))
    return blocks


# --- reading archives in-process (setup and cross-checks, not under test) ----

def read_listing(archive):
    """(index items, footer) of an archive, from its index."""
    from cloneaware.archive.catalog import read_index

    with open(archive, "rb") as f:
        r = read_index(f)
    if isinstance(r, tuple):
        return r[1], r[2]
    return r.items, r.footer


def read_whole(archive) -> int:
    """Read every record and check every hash, as verify does; the number of
    entries."""
    with open(archive, "rb") as f:
        return sum(1 for ev in Stream(f).events() if isinstance(ev, EntryEvent))
