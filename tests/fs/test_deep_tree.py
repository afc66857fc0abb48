"""A tree deeper than PATH_MAX (issue 21, defect 4): 60 directories of 100
characters, as the report had it, and 110 of them (more directories than
either side keeps descriptors for).  Everything is stored and restored: the
walk and the restore reach every directory by descriptor, one component at
a time, and the archive (format 5) takes paths up to 65535 bytes.  The
trees are compared by a walk of this test's own, by descriptor too."""
from __future__ import annotations

import hashlib
import os
import stat

import pytest
from helpers.cli import cli

from cloneaware.testing import write_random

pytestmark = pytest.mark.root

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _component(i: int) -> bytes:
    return b"%03d" % i + b"x" * 97  # 100 bytes


def build_deep(top, depth: int) -> None:
    """top/deep/C0/C1/...: a file at each level, a symlink, an xattr and a
    2 MiB file (cloned before it is read) at the bottom."""
    os.mkdir(top / "deep")
    fd = os.open(top / "deep", _DIR)
    for i in range(depth):
        os.mkdir(_component(i), dir_fd=fd)
        nfd = os.open(_component(i), _DIR, dir_fd=fd)
        os.close(fd)
        fd = nfd
        f = os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(f, b"depth %d\n" % i)
        os.close(f)
    os.symlink(b"f", b"link", dir_fd=fd)
    os.setxattr(f"/proc/self/fd/{fd}/f", "user.depth", b"%d" % depth)
    big = f"/proc/self/fd/{fd}/big"
    write_random(big, 2 << 20, depth)  # type: ignore[arg-type]
    os.close(fd)


def tree_by_fd(top) -> dict[bytes, tuple]:
    """{relative path: (type, mode, size, sha256 or target, user xattrs)},
    walked by descriptor (the paths are longer than any system call takes)."""
    out: dict[bytes, tuple] = {}
    stack = [(b"", os.open(top, _DIR))]
    while stack:
        rel, dfd = stack.pop()
        try:
            for name in sorted(os.fsencode(n) for n in os.listdir(dfd)):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                crel = rel + b"/" + name if rel else name
                proc = f"/proc/self/fd/{dfd}/{os.fsdecode(name)}"
                xa = tuple(sorted((n, os.getxattr(proc, n, follow_symlinks=False))
                                  for n in os.listxattr(proc, follow_symlinks=False)
                                  if n.startswith("user.")))
                if stat.S_ISDIR(st.st_mode):
                    out[crel] = ("dir", stat.S_IMODE(st.st_mode), 0, b"", xa)
                    stack.append((crel, os.open(name, _DIR, dir_fd=dfd)))
                elif stat.S_ISLNK(st.st_mode):
                    out[crel] = ("link", 0, 0, os.readlink(name, dir_fd=dfd), xa)
                else:
                    f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                    with os.fdopen(f, "rb") as fh:
                        digest = hashlib.sha256(fh.read()).digest()
                    out[crel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest, xa)
        finally:
            os.close(dfd)
    return out


@pytest.mark.parametrize("depth", [60, 110])
def test_defect_4_a_tree_deeper_than_path_max_is_stored_and_restored(btrfs_dir, xfs_dir,
                                                                     depth):
    """Defect 4: everything below depth 41 was skipped ("File name too
    long", exit 1).  Now the whole tree is backed up (exit 0), listed, and
    restored onto another filesystem exactly."""
    build_deep(btrfs_dir, depth)
    want = tree_by_fd(btrfs_dir / "deep")
    deepest = max(want, key=len)
    assert len(deepest) > 4096 + 1000 and len(want) == 2 * depth + 2
    arch = xfs_dir / "deep.caw"
    r = cli("backup", "--json", "-o", arch, btrfs_dir / "deep", check_rc=0)
    s = r.json()
    assert s["skipped"] == [] and s["files"] == depth + 1 and s["captured_by_clone"] == 1, s
    listing = cli("ls", "--json", arch, check_rc=0).json()["entries"]
    assert len(listing) == len(want) + 1
    cli("verify", arch, check_rc=0)
    dest = xfs_dir / "restored"
    cli("restore", arch, dest, check_rc=0)
    assert tree_by_fd(dest / "deep") == want
    # and again over it with --force, which removes nothing and replaces all
    cli("restore", "--force", arch, dest, check_rc=0)
    assert tree_by_fd(dest / "deep") == want


def test_defect_4_the_same_tree_in_a_repository(btrfs_dir, xfs_dir):
    """backup -r and restore -r of the 60-deep tree: the anchors of the
    point-in-time clones are kept by descriptor too."""
    build_deep(btrfs_dir, 60)
    want = tree_by_fd(btrfs_dir / "deep")
    repo = xfs_dir / "repo"
    cli("init", "-r", repo, check_rc=0)
    s = cli("backup", "--json", "-r", repo, btrfs_dir / "deep", check_rc=0).json()
    assert s["skipped"] == [] and s["files"] == 61, s
    s = cli("backup", "--json", "-r", repo, btrfs_dir / "deep", check_rc=0).json()
    assert s["unchanged_bytes"] >= 2 << 20, s  # the second one reads nothing again
    cli("restore", "-r", repo, "latest", xfs_dir / "r", check_rc=0)
    assert tree_by_fd(xfs_dir / "r" / "deep") == want
