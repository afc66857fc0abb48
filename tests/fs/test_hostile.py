"""Hostile and damaged archives (issue 6): restore, ls and verify.

Each hostile archive is built record by record
(tests/helpers/archivecraft.py) so that it breaks one rule of
docs/FORMAT.md and nothing else, then given to ``cloneaware restore ARCHIVE
DEST``, ``verify`` and ``ls`` as separate processes.  A restore, and a
verify unless the case says verify cannot know, must give one line on
stderr, no traceback and a non-zero exit (3 for archive problems); ``ls``
must do exactly what the case says (refuse, naming the fault, where the
fault is in what ls reads; else list exactly the index).  A restore must
write nothing outside DEST: DEST sits in a sandbox directory on a loopback
filesystem together with a canary file, a directory the symlinks point at
and the restore's working directory; the sandbox outside DEST is compared
before and after, and the file name the attack tries to create (unique per
test) must exist nowhere on the filesystem outside DEST, nor in /, /etc,
/tmp or any parent of DEST.

Then real archives (``cloneaware backup`` of a tiny family with a hard link,
a symlink, a FIFO and a reflinked clone) are truncated at every record
boundary and at random offsets and get single bit flips: exit 0 only with
the tree exactly restored, otherwise exit 3 with the archive offset or
"truncated" in the message; never a file with wrong content under its final
name, never a leftover temporary file.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers.archivecraft import (
    Craft,
    diff_states,
    entry_payload,
    find_name,
    path_parents,
    records,
    sandbox_state,
    temp_files,
    tree_state,
)
from helpers.cli import CliServer, assert_one_line_error, cli

from cloneaware.archive import format as fmt
from cloneaware.archive import thin
from cloneaware.archive.format import IndexItem
from cloneaware.testing import reflink_copy, write_random

pytestmark = pytest.mark.root

EXIT_USAGE, EXIT_ARCHIVE, EXIT_BASE = 2, 3, 5
#: a hostile archive must not make a restore or verify grow beyond this
#: (the forked CLI starts near 100 MiB: numpy, zstandard and typer loaded)
MAX_RSS_KIB = 400 << 10


@pytest.fixture(scope="module")
def server():
    with CliServer() as s:
        yield s


# --- the sandbox ------------------------------------------------------------------

@dataclass
class Ctx:
    sandbox: Path
    dest: Path
    outside: Path
    cwd: Path
    archive: Path
    pw: bytes  # the file name an attack tries to create outside DEST

    @property
    def out(self) -> bytes:
        return os.fsencode(self.outside)


@pytest.fixture
def ctx(btrfs_dir) -> Ctx:
    sb = btrfs_dir / "sandbox"
    sb.mkdir()
    (sb / "canary").write_bytes(b"canary: must not change\n")
    outside = sb / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"victim: must not change\n")
    (sb / "cwd").mkdir()
    return Ctx(sb, sb / "dest", outside, sb / "cwd", sb / "archive.cla",
               b"pwned-" + secrets.token_hex(6).encode())


def _assert_nothing_outside(c: Ctx, before: dict, mount: Path) -> None:
    hits = find_name(mount, c.pw, exclude=c.dest)
    for d in [Path("/"), Path("/etc"), Path("/tmp"), *path_parents(c.dest.parent)]:
        p = os.path.join(os.fsencode(d), c.pw)
        if os.path.lexists(p):
            hits.append(p)
    for p in hits:  # the name is unique to this test: clean up, then fail
        if not os.path.isdir(p) or os.path.islink(p):
            os.unlink(p)
    assert not hits, f"the attack created {hits}"
    after = sandbox_state(c.sandbox, c.dest)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the sandbox outside DEST changed: {changed}"
    assert not temp_files(c.dest), temp_files(c.dest)


# --- the cases ------------------------------------------------------------------------

# What ``ls ARCHIVE`` must do with each case.  ls reads the magic, the HEADER
# and the BASE records right after it, the FOOTER and the INDEX, and nothing
# else: a fault there must be refused (exit 3, one line with the words given);
# a fault in the records ls does not read (ENTRY payloads, DATA, REF, BASEREF,
# EXTERNAL, END) leaves a listing of exactly what the index holds, which is
# what the case's builder put there.


@dataclass(frozen=True)
class Lists:
    """ls exits 0 and lists exactly ENTRIES, in index order: (type, path,
    size, stored, referenced, base-referenced bytes), ``{pw}`` in a path
    standing for the case's attack name; BASE is (path, kind, ((rel, size),
    ...)) for a thin backup."""
    entries: tuple = ()
    base: tuple | None = None


@dataclass(frozen=True)
class Refused:
    """ls exits 3 with one line on stderr that holds every one of WORDS
    (``{pw}``: the attack name, ``{out}``: the outside directory) and, when
    OFFSET, the archive offset; nothing on stdout.  (No words for the cases
    ls does not refuse yet: the message is for the fix to choose.)"""
    words: tuple[str, ...]
    offset: bool = True


def lists(*entries, base: tuple | None = None) -> Lists:
    return Lists(tuple(entries), base)


def refused(*words: str, offset: bool = True) -> Refused:
    return Refused(words, offset)


def F(path: str, size: int, stored: int | None = None, ref: int = 0, base: int = 0) -> tuple:
    """A regular file in a listing; stored bytes default to its size."""
    return ("file", path, size, size if stored is None else stored, ref, base)


def D(path: str) -> tuple:
    return ("dir", path, 0, 0, 0, 0)


def S(path: str) -> tuple:
    return ("symlink", path, 0, 0, 0, 0)


def H(path: str) -> tuple:
    return ("hardlink", path, 0, 0, 0, 0)


PW = "{pw}"
BASEFILE = ("basefile", "file", (("", 4096),))

@dataclass
class Case:
    build: Callable[[Ctx], bytes]
    rc: int | tuple = EXIT_ARCHIVE  # restore's exit code
    #: what ls must do (the fault is in what ls reads, or it is not)
    ls: Lists | Refused | None = None
    #: verify must fail (False where verify cannot know: EXTERNAL records)
    verify_fails: bool = True
    args: Callable[[Ctx], list] = field(default=lambda c: [])
    setup: Callable[[Ctx], None] | None = None
    #: the archive is a sparse thin backup: zeros plus a manifest xattr
    sparse: bool = False


CASES: dict[str, Case] = {}


def case(name: str, **kw):
    def deco(fn):
        assert name not in CASES
        CASES[name] = Case(fn, **kw)
        assert isinstance(CASES[name].ls, Lists | Refused), f"{name}: say what ls must do"
        return fn
    return deco


Z = fmt.CODEC_ZSTD
PAYLOAD = b"pwned\n"


def _pwfile(c: Craft, path: bytes) -> int:
    return c.file(path, PAYLOAD)


# paths --------------------------------------------------------------------

@case("abs_path_outside", ls=refused("absolute path", "{out}/{pw}"))
def _(x):
    c = Craft()
    _pwfile(c, x.out + b"/" + x.pw)
    return c.finish()


@case("abs_path_etc", ls=refused("absolute path", "/etc/{pw}"))
def _(x):
    c = Craft()
    _pwfile(c, b"/etc/" + x.pw)
    return c.finish()


@case("abs_dir_then_file", ls=refused("absolute path", "{out}"))
def _(x):
    c = Craft()
    c.dir(x.out)
    _pwfile(c, x.out + b"/" + x.pw)
    return c.finish()


@case("dotdot_top", ls=refused("../{pw}", "'.' or '..' component"))
def _(x):
    c = Craft()
    _pwfile(c, b"../" + x.pw)
    return c.finish()


@case("dotdot_deep", ls=refused("a/../../{pw}", "'.' or '..' component"))
def _(x):
    c = Craft()
    c.dir(b"a")
    _pwfile(c, b"a/../../" + x.pw)
    return c.finish()


@case("dotdot_dir_entry", ls=refused("b'..'", "'.' or '..' component"))
def _(x):
    c = Craft()
    c.dir(b"..")
    _pwfile(c, b"../" + x.pw)
    return c.finish()


@case("dot_component", ls=refused("a/./{pw}", "'.' or '..' component"))
def _(x):
    c = Craft()
    c.dir(b"a")
    _pwfile(c, b"a/./" + x.pw)
    return c.finish()


@case("empty_path", ls=refused("empty path"))
def _(x):
    c = Craft()
    _pwfile(c, b"")
    return c.finish()


@case("empty_component", ls=refused("a//{pw}", "an empty, '.' or '..' component"))
def _(x):
    c = Craft()
    c.dir(b"a")
    _pwfile(c, b"a//" + x.pw)  # a name with '/' inside a component is not representable
    return c.finish()


@case("trailing_slash", ls=refused("b'a/'", "an empty, '.' or '..' component"))
def _(x):
    c = Craft()
    c.dir(b"a/")
    _pwfile(c, b"a/" + x.pw)
    return c.finish()


@case("nul_in_name", ls=refused("contains NUL"))
def _(x):
    c = Craft()
    _pwfile(c, x.pw + b"\0/../../x")
    return c.finish()


@case("nul_in_dir_name", ls=refused("contains NUL"))
def _(x):
    c = Craft()
    c.dir(b"a\0b")
    return c.finish()


@case("component_over_name_max", ls=refused("component over 255 bytes"))
def _(x):
    c = Craft()
    _pwfile(c, b"n" * 256)
    return c.finish()


@case("path_of_65535_bytes", ls=refused("INDEX", "65535 bytes exceeds its limit of 4096"))
def _(x):
    c = Craft(version=4)  # version 5 takes paths of 65535 bytes (issue 21, defect 4)
    comps = [b"d" * 200] * 327
    for i in range(1, 21):  # a few real parents, then a path far beyond PATH_MAX
        c.dir(b"/".join(comps[:i]))
    _pwfile(c, b"/".join(comps)[:65535 - 1] + b"x")
    return c.finish()


@case("path_length_field_lies", ls=lists(F(PW, 6)))
def _(x):
    c = Craft()
    e = fmt.Entry(0, fmt.K_REG, x.pw, size=len(PAYLOAD))
    c.reg(x.pw, len(PAYLOAD), payload=entry_payload(e, path_len=0xFFFF))
    c.data(0, PAYLOAD)
    c.end()
    return c.finish()


@case("symlink_empty_target", ls=lists(S("s")))
def _(x):
    c = Craft()
    c.symlink(b"s", b"")
    return c.finish()


@case("symlink_target_nul", ls=lists(S("s")))
def _(x):
    c = Craft()
    c.symlink(b"s", x.out + b"\0")
    return c.finish()


@case("target_on_a_file", ls=lists(F(PW, 0)))
def _(x):
    c = Craft()
    c.entry(fmt.K_REG, x.pw, size=0, target=x.out)
    c.end()
    return c.finish()


# the tar-style symlink attack ---------------------------------------------------

@case("symlink_to_etc_then_child", ls=refused("parent of 'd/link/{pw}' is not a directory"))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.symlink(b"d/link", b"/etc")
    _pwfile(c, b"d/link/" + x.pw)
    return c.finish()


@case("symlink_to_outside_then_child", ls=refused("parent of 'd/link/{pw}' is not a directory"))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.symlink(b"d/link", x.out)
    _pwfile(c, b"d/link/" + x.pw)
    return c.finish()


@case("symlink_to_dotdot_then_child", ls=refused("parent of 'd/link/{pw}' is not a directory"))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.symlink(b"d/link", b"..")
    _pwfile(c, b"d/link/" + x.pw)
    return c.finish()


@case("symlink_to_dotdot2_then_child", ls=refused("parent of 'd/link/{pw}' is not a directory"))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.symlink(b"d/link", b"../..")
    _pwfile(c, b"d/link/" + x.pw)
    return c.finish()


@case("toplevel_symlink_then_child", ls=refused("parent of 'link/sub' is not a directory"))
def _(x):
    c = Craft()
    c.symlink(b"link", x.out)
    c.dir(b"link/sub")
    _pwfile(c, b"link/sub/" + x.pw)
    return c.finish()


@case("symlink_then_dir_of_same_name", ls=refused("duplicate entry 'link'"))
def _(x):
    c = Craft()
    c.symlink(b"link", x.out)
    c.dir(b"link")
    _pwfile(c, b"link/" + x.pw)
    return c.finish()


@case("symlink_over_victim_file", ls=refused("duplicate entry 'v'"))
def _(x):
    # a symlink to an outside file, then a regular file of the same name
    c = Craft()
    c.symlink(b"v", x.out + b"/victim")
    _pwfile(c, b"v")
    return c.finish()


# hard links ----------------------------------------------------------------------

@case("hardlink_to_itself", ls=lists(H(PW)))
def _(x):
    c = Craft()
    c.hardlink(x.pw, 0)
    return c.finish()


@case("hardlink_to_later_entry", ls=lists(H(PW), F("later", 6)))
def _(x):
    c = Craft()
    c.hardlink(x.pw, 1)
    _pwfile(c, b"later")
    return c.finish()


@case("hardlink_to_dir", ls=lists(D("d"), H(PW)))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.hardlink(x.pw, 0)
    return c.finish()


@case("hardlink_to_symlink_outside", ls=lists(S("s"), H(PW)))
def _(x):
    c = Craft()
    c.symlink(b"s", x.out + b"/victim")
    c.hardlink(x.pw, 0)
    return c.finish()


@case("hardlink_to_hardlink", ls=lists(F("f", 6), H("h1"), H(PW)))
def _(x):
    c = Craft()
    _pwfile(c, b"f")
    c.hardlink(b"h1", 0)
    c.hardlink(x.pw, 1)
    return c.finish()


@case("hardlink_to_huge_id", ls=lists(F("f", 6), H(PW)))
def _(x):
    c = Craft()
    _pwfile(c, b"f")
    c.hardlink(x.pw, (1 << 64) - 1)
    return c.finish()


@case("hardlink_to_unfinished_file", ls=lists(F("f", 6), H(PW)))
def _(x):
    c = Craft()
    c.reg(b"f", len(PAYLOAD))
    c.data(0, PAYLOAD)
    c.hardlink(x.pw, 0)  # before f's END: f is not restored yet
    c.end()
    return c.finish()


# references ----------------------------------------------------------------------

BLK = bytes(range(256)) * 16  # 4 KiB


@case("ref_forwards", ls=lists(F(PW, 4096, 0, ref=4096), F("later", 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.ref(0, 4096, 1, 0)
    c.end()
    c.file(b"later", BLK)
    return c.finish()


@case("ref_beyond_source_size", ls=lists(F("src", 4096), F(PW, 8192, 0, ref=8192)))
def _(x):
    c = Craft()
    c.file(b"src", BLK)
    c.reg(x.pw, 8192)
    c.ref(0, 8192, 0, 0)
    c.end()
    return c.finish()


@case("ref_source_offset_huge", ls=lists(F("src", 4096), F(PW, 4096, 0, ref=4096)))
def _(x):
    c = Craft()
    c.file(b"src", BLK)
    c.reg(x.pw, 4096)
    c.ref(0, 4096, 0, (1 << 63) - 1)
    c.end()
    return c.finish()


@case("ref_to_dir", ls=lists(D("d"), F(PW, 4096, 0, ref=4096)))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.reg(x.pw, 4096)
    c.ref(0, 4096, 0, 0)
    c.end()
    return c.finish()


@case("ref_to_symlink_outside", ls=lists(S("s"), F(PW, 24, 0, ref=24)))
def _(x):
    c = Craft()
    c.symlink(b"s", x.out + b"/victim")
    c.reg(x.pw, 24)
    c.ref(0, 24, 0, 0)
    c.end()
    return c.finish()


@case("ref_to_hardlink_entry", ls=lists(F("src", 4096), H("h"), F(PW, 4096, 0, ref=4096)))
def _(x):
    c = Craft()
    c.file(b"src", BLK)
    c.hardlink(b"h", 0)
    c.reg(x.pw, 4096)
    c.ref(0, 4096, 1, 0)
    c.end()
    return c.finish()


@case("ref_to_itself_overlapping", ls=lists(F(PW, 8192, 4096, ref=4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 8192)
    c.data(0, BLK)
    c.ref(4096, 4096, 0, 1)  # source range [1, 4097) is not written yet
    c.end()
    return c.finish()


@case("ref_to_itself_forwards", ls=lists(F(PW, 8192, 4096, ref=4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 8192)
    c.ref(0, 4096, 0, 4096)
    c.data(4096, BLK)
    c.end()
    return c.finish()


@case("ref_to_huge_id", ls=lists(F("src", 4096), F(PW, 4096, 0, ref=4096)))
def _(x):
    c = Craft()
    c.file(b"src", BLK)
    c.reg(x.pw, 4096)
    c.ref(0, 4096, (1 << 64) - 1, 0)
    c.end()
    return c.finish()


@case("ref_beyond_own_size", ls=refused())
def _(x):
    c = Craft()
    c.file(b"src", BLK * 4)
    c.reg(x.pw, 4096)
    c.ref(0, 16384, 0, 0)
    c.end()
    return c.finish()


@case("ref_zero_length", ls=lists(F("src", 4096), F(PW, 4096)))
def _(x):
    c = Craft()
    c.file(b"src", BLK)
    c.reg(x.pw, 4096)
    c.ref(0, 0, 0, 0)
    c.data(0, BLK)
    c.end()
    return c.finish()


@case("ref_overlapping_data", ls=refused())
def _(x):
    c = Craft()
    c.file(b"src", BLK)
    c.reg(x.pw, 4096)
    c.data(0, BLK)
    c.ref(0, 4096, 0, 0)
    c.end()
    return c.finish()


@case("ref_outside_a_file", ls=lists(F("src", 4096)))
def _(x):
    c = Craft()
    c.file(b"src", BLK)
    c.ref(0, 4096, 0, 0, count=False)
    return c.finish()


@case("data_beyond_file_size", ls=lists(F(PW, 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(4096, BLK)
    c.end()
    return c.finish()


@case("data_wrong_sha256", ls=lists(F(PW, 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, BLK, sha=hashlib.sha256(b"other").digest())
    c.end()
    return c.finish()


# sizes and counts that would allocate gigabytes ------------------------------------

@case("xattr_count_2_31", ls=lists(F(PW, 0)))
def _(x):
    c = Craft()
    e = fmt.Entry(0, fmt.K_REG, x.pw, size=0)
    c.reg(x.pw, 0, payload=entry_payload(e, xattr_count=1 << 31))
    c.end()
    return c.finish()


@case("xattr_value_length_4g", ls=lists(F(PW, 0)))
def _(x):
    c = Craft()
    e = fmt.Entry(0, fmt.K_REG, x.pw, size=0, xattrs=[(b"user.a", b"v")])
    p = bytearray(e.encode())
    p[-5:-1] = struct.pack("<I", 0xFFFFFFFF)
    c.reg(x.pw, 0, payload=bytes(p))
    c.end()
    return c.finish()


@case("record_length_4g", ls=refused("no valid footer"))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.raw(fmt.FRAME.pack(fmt.T_DATA, 0, 0xFFFFFFFF) + BLK)
    return c.finish(index=False, footer=False)


@case("entry_record_over_its_limit", ls=refused("ENTRY record of 1048577 bytes exceeds the limit"))
def _(x):
    c = Craft()
    c.raw(fmt.FRAME.pack(fmt.T_ENTRY, 0, (1 << 20) + 1) + b"\0" * 4096)
    return c.bytes()


@case("ancillary_record_over_its_limit",
      ls=refused("ancillary record type 0x8001", "exceeds the limit"))
def _(x):
    c = Craft()
    c.raw(fmt.FRAME.pack(0x8001, 0, (16 << 20) + 1) + b"\0" * 4096)
    return c.bytes()


@case("zstd_frame_claims_8mib_in_4kib_record", ls=lists(F(PW, 4096)))
def _(x):
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(8 << 20))
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, bytes(4096), codec=Z, coded=bomb)
    c.end()
    return c.finish()


@case("zstd_frame_expands_to_8mib_no_size", ls=lists(F(PW, 4096)))
def _(x):
    import zstandard

    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8 << 20))
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, bytes(4096), codec=Z, coded=bomb)
    c.end()
    return c.finish()


_BOMB: list[bytes] = []


def _gib_bomb() -> bytes:
    """One zstd frame of 1 GiB of zeros, no content size in its header:
    32 KiB that a decoder without an output limit would inflate."""
    if not _BOMB:
        import zstandard

        co = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
        zeros = bytes(16 << 20)
        _BOMB.append(b"".join([co.compress(zeros) for _ in range(64)] + [co.flush()]))
    return _BOMB[0]


@case("zstd_frame_expands_to_1gib_no_size", ls=lists(F(PW, 4 << 20)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4 << 20)
    c.data(0, bytes(4 << 20), codec=Z, coded=_gib_bomb())
    c.end()
    return c.finish()


@case("zstd_frame_expands_to_less", ls=lists(F(PW, 4096)))
def _(x):
    import zstandard

    short = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000))
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, bytes(4096), codec=Z, coded=short)
    c.end()
    return c.finish()


@case("zstd_garbage", ls=lists(F(PW, 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, bytes(4096), codec=Z, coded=b"\x28\xb5\x2f\xfd" + b"\xff" * 64)
    c.end()
    return c.finish()


@case("data_chunk_over_4mib", ls=lists(F(PW, 8 << 20, (4 << 20) + 1)))
def _(x):
    c = Craft()
    c.reg(x.pw, 8 << 20)
    c.data(0, BLK, length=(4 << 20) + 1)
    c.end()
    return c.finish()


@case("stored_data_shorter_than_length", ls=lists(F(PW, 8192)))
def _(x):
    c = Craft()
    c.reg(x.pw, 8192)
    c.data(0, BLK, length=8192)
    c.end()
    return c.finish()


@case("unknown_codec", ls=lists(F(PW, 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, BLK, codec=7)
    c.end()
    return c.finish()


@case("entry_size_over_2_63", ls=refused())
def _(x):
    c = Craft()
    c.reg(x.pw, (1 << 64) - 1)
    c.end()
    return c.finish()


@case("entry_unknown_kind", ls=lists())
def _(x):
    c = Craft()
    c.entry(99, x.pw, index=False)
    return c.finish()


@case("mode_beyond_0o7777", ls=lists(D("d")))
def _(x):
    c = Craft()
    c.entry(fmt.K_DIR, b"d", mode=0o170755)
    return c.finish()


# structure -----------------------------------------------------------------------------

@case("duplicate_file", ls=refused("duplicate entry 'a'"))
def _(x):
    c = Craft()
    c.file(b"a", b"first\n")
    c.file(b"a", PAYLOAD)
    return c.finish()


@case("duplicate_dir", ls=refused("duplicate entry 'd'"))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.dir(b"d")
    return c.finish()


@case("dir_then_file_of_same_name", ls=refused("duplicate entry 'd'"))
def _(x):
    c = Craft()
    c.dir(b"d")
    _pwfile(c, b"d")
    return c.finish()


@case("file_then_dir_of_same_name", ls=refused("duplicate entry 'd'"))
def _(x):
    c = Craft()
    _pwfile(c, b"d")
    c.dir(b"d")
    _pwfile(c, b"d/" + x.pw)
    return c.finish()


@case("entry_id_out_of_sequence", ls=refused("index item 5 out of sequence (expected 1)"))
def _(x):
    c = Craft(version=5)
    c.dir(b"a")
    c.dir(b"b", id=5)
    return c.finish()


@case("entry_id_not_implicit", ls=refused("INDEX: id field is not 0"))
def _(x):
    c = Craft()  # version 6 on: an entry's id is its place, and the field 0
    c.dir(b"a")
    c.dir(b"b", id=5)
    return c.finish()


@case("parent_missing", ls=refused("parent of 'a/{pw}' is not a directory"))
def _(x):
    c = Craft()
    _pwfile(c, b"a/" + x.pw)
    return c.finish()


@case("parent_is_a_file", ls=refused("parent of 'a/{pw}' is not a directory"))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    _pwfile(c, b"a/" + x.pw)
    return c.finish()


@case("entry_before_end", ls=lists(F("a", 4096, 0), F(PW, 6)))
def _(x):
    c = Craft()
    c.reg(b"a", 4096)
    c.data(0, BLK)
    c.cur = None
    _pwfile(c, x.pw)
    return c.finish()


@case("end_counts_mismatch", ls=lists(F(PW, 8192)))
def _(x):
    c = Craft()
    c.reg(x.pw, 8192)
    c.data(0, BLK)
    c.end(data_records=2, stored_bytes=8192)  # a DATA record went missing
    return c.finish()


@case("end_wrong_id", ls=lists(F(PW, 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, BLK)
    c.end(id=7)
    return c.finish()


@case("end_outside_a_file", ls=lists(D("d")))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.end()
    return c.finish()


@case("data_outside_a_file", ls=lists(D("d")))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.data(0, BLK, count=False)
    return c.finish()


@case("file_without_end", ls=lists(F(PW, 4096, 0)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, BLK)
    return c.finish()


# header, magic, framing --------------------------------------------------------------

@case("newer_format_version", ls=refused(f"version {fmt.WRITE_VERSION + 1} is newer", "upgrade"))
def _(x):
    c = Craft(version=fmt.WRITE_VERSION + 1)
    _pwfile(c, x.pw)
    return c.finish()


@case("format_version_0", ls=refused("unknown archive format version 0"))
def _(x):
    c = Craft(version=0)
    _pwfile(c, x.pw)
    return c.finish()


@case("unknown_hash_algorithm", ls=refused("unknown hash algorithm 9"))
def _(x):
    c = Craft(header=False)
    c.record(fmt.T_HEADER, struct.pack("<IB3xq", fmt.WRITE_VERSION, 9, 0) + b"\0\0")
    _pwfile(c, x.pw)
    return c.finish()


@case("wrong_magic", ls=refused("not a cloneaware archive (wrong magic)"))
def _(x):
    c = Craft(magic=b"\x89CLONEAX")
    _pwfile(c, x.pw)
    return c.finish()


@case("tar_file_not_an_archive", ls=refused("not a cloneaware archive (wrong magic)"))
def _(x):
    return b"pwned\0" + b"\0" * 506


@case("empty_file", ls=refused("empty file", "not a cloneaware archive", offset=False))
def _(x):
    return b""


@case("magic_only", ls=refused("no HEADER after the magic"))
def _(x):
    return fmt.MAGIC


@case("half_magic", ls=refused("truncated inside the magic"))
def _(x):
    return fmt.MAGIC[:5]


@case("no_header", ls=refused("no HEADER after the magic"))
def _(x):
    c = Craft(header=False)
    _pwfile(c, x.pw)
    return c.finish()


@case("two_headers", ls=refused())
def _(x):
    c = Craft()
    c.record(fmt.T_HEADER, fmt.Header(created_ns=1).encode())
    _pwfile(c, x.pw)
    return c.finish()


@case("unknown_record_type", ls=lists(F(PW, 6)))
def _(x):
    c = Craft()
    _pwfile(c, x.pw)
    c.record(99, b"")
    return c.finish()


@case("record_flags_set", ls=lists(F(PW, 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, BLK, flags=1)
    c.end()
    return c.finish()


@case("bad_crc", ls=lists(F(PW, 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.data(0, BLK, crc=0x12345678)
    c.end()
    return c.finish()


@case("data_after_footer", ls=refused("no valid footer"))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    return c.finish() + fmt.frame(fmt.T_ENTRY, fmt.Entry(1, fmt.K_REG, x.pw).encode())


@case("footer_points_elsewhere", ls=refused("unknown record type", "at archive offset 9)"))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    return c.finish(index_offset=9)


@case("footer_wrong_entry_count", ls=refused("index and footer disagree on the number of entries"))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    return c.finish(entries=5)


@case("index_disagrees_with_entries", ls=lists(F("b", 6)))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    c.items[0].path = b"b"
    return c.finish()


# The index alone lies (issue 36: the full read checks it against the
# entries it has read, not as a second copy): each breaks one rule.

@case("index_id_not_zero", ls=refused("INDEX: id field is not 0"))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    c.items[0].id = 3
    return c.finish()


@case("index_id_out_of_sequence", ls=refused("index item 3 out of sequence (expected 0)"))
def _(x):
    c = Craft(version=5)
    _pwfile(c, b"a")
    c.items[0].id = 3
    return c.finish()


@case("index_data_on_a_directory", ls=refused("has data but is not a regular file"))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.items[0].stored_bytes = 1
    c.stored += 1
    return c.finish()


@case("index_more_bytes_than_the_file", ls=refused("more bytes stored and referenced"))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    c.items[0].stored_bytes += 1
    c.stored += 1
    return c.finish()


@case("index_base_bytes_without_a_base", ls=refused("bytes from a base, but the archive "
                                                    "names no base"))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    c.items[0].stored_bytes -= 1
    c.items[0].base_ref_bytes = 1
    c.stored -= 1
    c.based += 1
    return c.finish()


@case("footer_byte_counts_not_the_index", ls=refused("byte counts are not those of the index"))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    c.stored += 1
    return c.finish()


def _dest_made(x: Ctx) -> None:
    x.dest.mkdir()


# DEST exists: DEST/.. would be refused as an existing name, not as the
# archive's fault, if the names read before writing were not checked
@case("index_top_level_dotdot", setup=_dest_made, ls=refused("'..' component"))
def _(x):
    c = Craft()  # the restore's check before writing reads these names alone
    _pwfile(c, b"a")
    c.items[0].path = b".."
    return c.finish()


@case("index_item_beyond_the_entries", ls=lists(F("a", 6), D("zz")))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    c.items.append(IndexItem(1, fmt.K_DIR, 0, 0, 0, 0, c.items[0].offset, b"zz"))
    return c.finish()


@case("index_short_of_the_entries", ls=lists(F("a", 6)))
def _(x):
    c = Craft()
    _pwfile(c, b"a")
    _pwfile(c, b"b")
    c.stored -= c.items.pop().stored_bytes
    return c.finish()


# a restore refuses any sharing map (exit 2, "use reshare"); verify reads it
@case("sharing_map_that_says_it_holds_data", rc=EXIT_USAGE,
      ls=refused("a sharing map that says it holds data"))
def _(x):
    c = Craft(magic=fmt.MAP_MAGIC)
    c.reg(b"a", 6)
    c.end()
    c.items[0].stored_bytes = 1
    c.stored += 1
    return c.finish()


@case("no_footer", ls=refused("no valid footer"))
def _(x):
    c = Craft()
    _pwfile(c, x.pw)
    return c.finish(footer=False)


# thin backups: BASE, BASEREF, EXTERNAL misuse ----------------------------------------------

def _basefile(x: Ctx) -> None:
    (x.sandbox / "basefile").write_bytes(BLK)


@case("baseref_without_base", ls=refused())
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.baseref(0, 4096, 0, 0, hashlib.sha256(BLK).digest())
    c.end()
    return c.finish()


@case("base_after_first_entry", ls=lists(D("d")))
def _(x):
    c = Craft()
    c.dir(b"d")
    c.base(b"basefile", thin.BASE_FILE, [(0, 4096, b"")])
    return c.finish()


@case("base_rel_path_dotdot", rc=(EXIT_ARCHIVE,), ls=refused("../outside/victim", "'..' component"))
def _(x):
    c = Craft()
    c.base(b"base", thin.BASE_DIR, [(0, 24, b"../outside/victim")])
    c.reg(x.pw, 24)
    c.baseref(0, 24, 0, 0)
    c.end()
    return c.finish()


@case("base_rel_path_absolute", ls=refused("absolute path", "{out}/victim"))
def _(x):
    c = Craft()
    c.base(b"base", thin.BASE_DIR, [(0, 24, x.out + b"/victim")])
    c.reg(x.pw, 24)
    c.baseref(0, 24, 0, 0)
    c.end()
    return c.finish()


@case("baseref_number_not_listed", setup=_basefile,
      args=lambda x: ["--base", x.sandbox / "basefile"],
      ls=lists(F(PW, 4096, 0, base=4096), base=BASEFILE))
def _(x):
    c = Craft()
    c.base(b"basefile", thin.BASE_FILE, [(0, 4096, b"")])
    c.reg(x.pw, 4096)
    c.baseref(0, 4096, 1, 0, hashlib.sha256(BLK).digest())
    c.end()
    return c.finish()


@case("baseref_beyond_base_file", setup=_basefile,
      args=lambda x: ["--base", x.sandbox / "basefile"],
      ls=lists(F(PW, 8192, 0, base=8192), base=BASEFILE))
def _(x):
    c = Craft()
    c.base(b"basefile", thin.BASE_FILE, [(0, 4096, b"")])
    c.reg(x.pw, 8192)
    c.baseref(0, 8192, 0, 0, hashlib.sha256(BLK + BLK).digest())
    c.end()
    return c.finish()


@case("base_number_listed_twice", setup=_basefile,
      args=lambda x: ["--base", x.sandbox / "basefile"],
      ls=refused())
def _(x):
    c = Craft()
    c.base(b"basefile", thin.BASE_FILE, [(0, 4096, b""), (0, 4096, b"")])
    c.reg(x.pw, 4096)
    c.baseref(0, 4096, 0, 0, hashlib.sha256(BLK).digest())
    c.end()
    return c.finish()


@case("base_records_disagree", setup=_basefile, args=lambda x: ["--base", x.sandbox / "basefile"],
      ls=refused())
def _(x):
    c = Craft()
    c.base(b"basefile", thin.BASE_FILE, [(0, 4096, b"")])
    c.base(b"otherfile", thin.BASE_FILE, [(1, 4096, b"")])
    c.reg(x.pw, 4096)
    c.baseref(0, 4096, 0, 0, hashlib.sha256(BLK).digest())
    c.end()
    return c.finish()


@case("baseref_wrong_sha256", setup=_basefile, rc=EXIT_BASE, verify_fails=False,
      args=lambda x: ["--base", x.sandbox / "basefile"],
      ls=lists(F(PW, 4096, 0, base=4096), base=BASEFILE))
def _(x):
    c = Craft()
    c.base(b"basefile", thin.BASE_FILE, [(0, 4096, b"")])
    c.reg(x.pw, 4096)
    c.baseref(0, 4096, 0, 0, hashlib.sha256(b"something else").digest())
    c.end()
    return c.finish()


@case("external_in_a_plain_archive", verify_fails=False, ls=lists(F(PW, 4096)))
def _(x):
    # verify cannot tell a plain archive from a sparse backup's sidecar
    # manifest; restore can
    c = Craft()
    c.reg(x.pw, 4096)
    c.external(0, 4096, hashlib.sha256(BLK).digest())
    c.end()
    return c.finish()


@case("sparse_external_beyond_the_file", sparse=True, rc=(EXIT_ARCHIVE, EXIT_BASE),
      ls=lists(F(PW, 1 << 20)))
def _(x):
    c = Craft()
    c.reg(x.pw, 1 << 20)
    c.external(0, 1 << 20, hashlib.sha256(bytes(1 << 20)).digest())
    c.end()
    return c.finish()


@case("sparse_external_wrong_sha256", sparse=True, rc=EXIT_BASE,
      ls=lists(F(PW, 4096)))
def _(x):
    c = Craft()
    c.reg(x.pw, 4096)
    c.external(0, 4096, hashlib.sha256(BLK).digest())
    c.end()
    return c.finish()


@case("sparse_manifest_path_dotdot", sparse=True,
      ls=refused("../{pw}", "'.' or '..' component"))
def _(x):
    c = Craft()
    c.reg(b"../" + x.pw, 4096)
    c.external(0, 4096, hashlib.sha256(bytes(4096)).digest())
    c.end()
    return c.finish()


def _write_archive(x: Ctx, cs: Case) -> None:
    data = cs.build(x)
    if cs.sparse:
        with open(x.archive, "wb") as f:
            f.truncate(64 << 10)
        os.setxattr(x.archive, "user.cloneaware.manifest", data)
    else:
        x.archive.write_bytes(data)
    if cs.setup:
        cs.setup(x)


def _must_fail_cleanly(r, must_fail: bool) -> None:
    """MUST_FAIL: exit 3 and one line; else (verify cannot know) the archive
    passes as whole."""
    assert "Traceback" not in r.err, str(r)
    if must_fail:
        line = assert_one_line_error(r, EXIT_ARCHIVE)
        assert "offset" in line or "truncated" in line or "empty" in line or \
            "archive" in line, line
    else:
        assert r.returncode == 0 and r.stderr == b"", str(r)
        assert r.out.startswith("archive is whole: "), str(r)


NAMES = sorted(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_hostile_restore(name, ctx, server, btrfs_dir):
    cs = CASES[name]
    _write_archive(ctx, cs)
    before = sandbox_state(ctx.sandbox, ctx.dest)
    r = server.run("restore", ctx.archive, ctx.dest, *cs.args(ctx), cwd=ctx.cwd)
    assert_one_line_error(r, cs.rc)
    _assert_nothing_outside(ctx, before, btrfs_dir.parent)
    # sizes and counts are bounded before anything is allocated
    assert r.maxrss_kib < MAX_RSS_KIB, f"peak RSS {r.maxrss_kib} KiB\n{r}"


@pytest.mark.parametrize("name", NAMES)
def test_hostile_verify(name, ctx, server):
    cs = CASES[name]
    _write_archive(ctx, cs)
    r = server.run("verify", ctx.archive, cwd=ctx.cwd)
    _must_fail_cleanly(r, cs.verify_fails)
    assert r.maxrss_kib < MAX_RSS_KIB, f"peak RSS {r.maxrss_kib} KiB\n{r}"


def _plain_listing(out: str, base: bool) -> tuple[list[str], list[tuple]]:
    """``ls`` (not --json): the lines before the column header, and the rows
    as (type, path, size, stored, referenced, base-referenced)."""
    lines = out.splitlines()
    head = next((i for i, ln in enumerate(lines) if ln.split()[:1] == ["type"]), None)
    assert head is not None, f"no column header in {out!r}"
    assert lines[head].split() == ["type", "size", "stored", "referenced",
                                   *(["in", "base"] if base else []), "path"], lines[head]
    rows = []
    for ln in lines[head + 1:]:
        f = ln.split(None, 5 if base else 4)
        nums = [int(v) for v in f[1:-1]]
        rows.append((f[0], f[-1], *nums, *([0] if not base else [])))
    return lines[:head], rows


@pytest.mark.parametrize("name", NAMES)
def test_hostile_ls(name, ctx, server):
    """Each case's exact ls outcome (the table above): the same with and
    without --json, exit 3 and one line naming the fault where the fault
    is in what ls reads, else exactly the entries of the index."""
    cs = CASES[name]
    _write_archive(ctx, cs)
    subst = {"pw": os.fsdecode(ctx.pw), "out": os.fsdecode(ctx.out)}
    plain = server.run("ls", ctx.archive, cwd=ctx.cwd)
    js = server.run("ls", "--json", ctx.archive, cwd=ctx.cwd)
    want = cs.ls
    if isinstance(want, Refused):
        for r in (plain, js):
            line = assert_one_line_error(r, EXIT_ARCHIVE)
            # no listing: with --json, only the error object (issue 21, defect 13)
            want_out = b"" if r is plain else (json.dumps(
                {"ok": False, "error": line[len("cloneaware: "):], "exit": EXIT_ARCHIVE})
                + "\n").encode()
            assert r.stdout == want_out, f"ls printed a listing and refused it\n{r}"
            for w in want.words:
                assert w.format(**subst) in line, f"{w.format(**subst)!r} not in {line!r}"
            if want.offset:
                assert "(at archive offset " in line, line
        assert plain.err == js.err, f"{plain}\n{js}"
        return
    entries = [tuple(v.format(**subst) if isinstance(v, str) else v for v in e)
               for e in want.entries]
    for r in (plain, js):
        assert r.returncode == 0 and r.stderr == b"", str(r)
    doc = js.json()
    got = [(e["type"], e["path"], e["size"], e["stored_bytes"], e["referenced_bytes"],
            e["base_referenced_bytes"]) for e in doc["entries"]]
    assert got == entries, f"{got}\n{js}"
    assert [e["id"] for e in doc["entries"]] == list(range(len(entries)))
    assert (doc["version"], doc["tool"]) == (fmt.WRITE_VERSION, "archivecraft")
    assert (doc["stored_bytes"], doc["referenced_bytes"], doc["base_referenced_bytes"]) == \
        tuple(sum(e[i] for e in entries) for i in (3, 4, 5))
    if want.base is None:
        assert doc["base"] is None, doc["base"]
    else:
        path, kind, files = want.base
        assert doc["base"] == {"path": path, "kind": kind,
                               "files": [{"path": p, "size": n} for p, n in files]}
    # the table says the same
    pre, rows = _plain_listing(plain.out, want.base is not None)
    assert rows == [(t, p, n, s, r, b) for t, p, n, s, r, b in entries], plain.out
    if want.base is None:
        assert pre == [], plain.out
    else:
        path, _kind, files = want.base
        assert len(pre) == 1 + len(files) and repr(path) in pre[0], plain.out
        for ln, (rel, n) in zip(pre[1:], files):
            # the base named, not '.' (issue 21, defect 17)
            name = os.path.join(path, rel) if rel else path
            assert ln.startswith(f"  base file {name} (") and f", {n} bytes)" in ln, plain.out


def test_hostile_cases_are_many():
    assert len(CASES) >= 80, len(CASES)


def test_real_entry_point_agrees(ctx, server, btrfs_dir):
    """The forked CLI behaves as ``python -m cloneaware.cli`` does."""
    for name in ("symlink_to_outside_then_child", "zstd_frame_claims_8mib_in_4kib_record"):
        _write_archive(ctx, CASES[name])
        before = sandbox_state(ctx.sandbox, ctx.dest)
        a = cli("restore", ctx.archive, ctx.dest / "a", cwd=ctx.cwd)
        b = server.run("restore", ctx.archive, ctx.dest / "b", cwd=ctx.cwd)
        assert (a.returncode, a.err.replace("/a/", "/b/")) == (b.returncode, b.err), \
            f"{a}\n{b}"
        assert_one_line_error(a, EXIT_ARCHIVE)
        _assert_nothing_outside(ctx, before, btrfs_dir.parent)


def test_control_archive_restores(ctx, server):
    """The builder makes valid archives: without the fault, a restore works
    (so that the hostile cases fail for their fault, not the builder's)."""
    c = Craft()
    c.dir(b"d")
    x_target = b"../elsewhere"
    c.symlink(b"d/link", x_target)
    c.file(b"d/f", BLK, codec=Z)
    c.reg(b"d/g", 8192)
    c.ref(0, 4096, 2, 0)
    c.data(4096, BLK[::-1])
    c.end()
    c.hardlink(b"d/h", 2)
    c.fifo(b"d/p")
    ctx.archive.write_bytes(c.finish())
    for cmd in (["verify", ctx.archive], ["ls", ctx.archive]):
        r = server.run(*cmd)
        assert r.returncode == 0, str(r)
    r = server.run("restore", ctx.archive, ctx.dest)
    assert r.returncode == 0, str(r)
    d = ctx.dest / "d"
    assert (d / "f").read_bytes() == BLK
    assert (d / "g").read_bytes() == BLK + BLK[::-1]
    assert os.readlink(d / "link") == os.fsdecode(x_target)
    assert (d / "h").stat().st_ino == (d / "f").stat().st_ino
    assert stat.S_ISFIFO((d / "p").lstat().st_mode)


# --- DEST already holds a symlink that points outside ------------------------------------

def _dest_symlink_archive(x: Ctx, deep: bool) -> bytes:
    c = Craft()
    c.dir(b"top")
    p = b"top"
    if deep:
        c.dir(b"top/sub")
        p = b"top/sub"
    c.dir(p + b"/newdir")
    _pwfile(c, p + b"/" + x.pw)
    _pwfile(c, p + b"/newdir/" + x.pw)
    c.symlink(p + b"/lnk", b"target")
    return c.finish()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("deep", [False, True], ids=["top", "deep"])
def test_dest_holds_symlink_pointing_outside(ctx, server, btrfs_dir, deep, force):
    ctx.dest.mkdir()
    if deep:
        (ctx.dest / "top").mkdir()
        os.symlink(ctx.outside, ctx.dest / "top" / "sub")
    else:
        os.symlink(ctx.outside, ctx.dest / "top")
    ctx.archive.write_bytes(_dest_symlink_archive(ctx, deep))
    before = sandbox_state(ctx.sandbox, ctx.dest)
    r = server.run("restore", *(["--force"] if force else []), ctx.archive, ctx.dest,
                   cwd=ctx.cwd)
    assert_one_line_error(r, (EXIT_USAGE, EXIT_ARCHIVE))
    _assert_nothing_outside(ctx, before, btrfs_dir.parent)
    assert not os.path.lexists(ctx.outside / os.fsdecode(ctx.pw))
    assert not os.path.lexists(ctx.outside / "newdir")
    assert not os.path.lexists(ctx.outside / "lnk")


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_dest_symlink_to_outside_file_replaced_not_followed(ctx, server, btrfs_dir, force):
    """DEST/top -> outside/victim and the archive holds a file 'top': without
    --force it is refused; with --force the symlink itself is replaced, and
    the victim outside is untouched."""
    ctx.dest.mkdir()
    os.symlink(ctx.outside / "victim", ctx.dest / "top")
    c = Craft()
    _pwfile(c, b"top")
    ctx.archive.write_bytes(c.finish())
    before = sandbox_state(ctx.sandbox, ctx.dest)
    r = server.run("restore", *(["--force"] if force else []), ctx.archive, ctx.dest,
                   cwd=ctx.cwd)
    if force:
        assert r.returncode == 0, str(r)
        assert stat.S_ISREG((ctx.dest / "top").lstat().st_mode)
        assert (ctx.dest / "top").read_bytes() == PAYLOAD
    else:
        assert_one_line_error(r, EXIT_USAGE)
        assert os.readlink(ctx.dest / "top") == str(ctx.outside / "victim")
    _assert_nothing_outside(ctx, before, btrfs_dir.parent)


# --- real archives: truncation and bit flips ----------------------------------------------

@pytest.fixture(scope="module")
def real_archive(loopfs_session):
    """A small archive made by ``cloneaware backup`` of a family with a
    reflinked clone (so REF records), a hard link, a symlink, a FIFO, an
    empty file, a compressible file with an xattr and a subdirectory, on
    this worker's Btrfs."""
    from cloneaware.testing import _shared_fs

    fs = _shared_fs(loopfs_session, "btrfs")
    top = fs.path / f"trunc-{os.getpid()}-{secrets.token_hex(4)}"
    src = top / "src" / "fam"
    (src / "sub").mkdir(parents=True)
    try:
        write_random(src / "a.bin", 96 << 10, seed=6)
        reflink_copy(src / "a.bin", src / "clone.bin")
        with open(src / "clone.bin", "r+b") as f:
            f.seek(32 << 10)
            f.write(random.Random(7).randbytes(4096))
        os.link(src / "a.bin", src / "sub" / "hard")
        os.symlink("../a.bin", src / "sub" / "sym")
        os.mkfifo(src / "sub" / "fifo", 0o640)
        (src / "sub" / "empty").write_bytes(b"")
        (src / "sub" / "text.txt").write_bytes(b"the quick brown fox\n" * 2000)
        os.chmod(src / "sub" / "text.txt", 0o600)
        os.setxattr(src / "sub" / "text.txt", "user.note", b"hello")
        fs.sync()
        arch = top / "fam.cla"
        r = cli("backup", "--compress", "zstd", "-o", arch, src)
        assert r.returncode == 0, str(r)
        data = arch.read_bytes()
        recs = records(data)
        assert {fmt.T_REF, fmt.T_DATA, fmt.T_END} <= {x.type for x in recs}, recs
        assert any(x.type == fmt.T_ENTRY and data[x.payload_offset + 8] == fmt.K_HARDLINK
                   for x in recs)
        yield top, src, data, tree_state(src)
    finally:
        import shutil

        shutil.rmtree(top, ignore_errors=True)


def _check_damaged(server, top, src, want, data: bytes, label: str) -> int:
    """Restore ``data``; assert the rules; return the exit code."""
    work = top / f"w-{secrets.token_hex(4)}"
    work.mkdir()
    arch = work / "a.cla"
    arch.write_bytes(data)
    dest = work / "dest"
    try:
        r = server.run("restore", arch, dest, cwd=work)
        assert "Traceback" not in r.err, f"{label}\n{r}"
        if r.returncode == 0:
            got = tree_state(dest / "fam")
            assert got == want, f"{label}: exit 0 but the tree differs:\n" + "\n".join(
                diff_states(want, got))
        else:
            line = assert_one_line_error(r, EXIT_ARCHIVE)
            assert "offset" in line or "truncated" in line or (
                not data and "empty" in line), f"{label}: {line}"
        assert not temp_files(work), f"{label}: {temp_files(work)}\n{r}"
        # no file with wrong content under its final name
        top = dest / "fam"
        if top.exists():
            for dirpath, _dirs, files in os.walk(top):
                for f in files:
                    p = Path(dirpath) / f
                    rel = os.fsencode(p.relative_to(top))
                    if p.is_symlink() or not p.is_file():
                        continue
                    assert rel in want, f"{label}: unexpected file {p}"
                    exp = dict(want[rel])
                    assert p.stat().st_size == exp["size"] and \
                        hashlib.sha256(p.read_bytes()).hexdigest() == exp["sha"], \
                        f"{label}: {p} has wrong content\n{r}"
        return r.returncode
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def test_intact_archive_restores_exactly(server, real_archive):
    top, src, data, want = real_archive
    assert _check_damaged(server, top, src, want, data, "intact") == 0


def test_truncated_at_every_record_boundary(server, real_archive):
    top, src, data, want = real_archive
    cuts = [0, 4] + [r.offset for r in records(data)] + [len(data) - 1]
    print(f"\n{len(cuts)} record-boundary truncations of a {len(data)}-byte archive")
    for cut in cuts:
        rc = _check_damaged(server, top, src, want, data[:cut], f"cut at {cut}")
        assert rc == EXIT_ARCHIVE, f"an archive cut at {cut} of {len(data)} was accepted"


def test_truncated_at_random_offsets(server, real_archive):
    top, src, data, want = real_archive
    rng = random.Random(20240606)
    cuts = sorted(rng.sample(range(1, len(data)), 20))
    for cut in cuts:
        rc = _check_damaged(server, top, src, want, data[:cut], f"cut at {cut}")
        assert rc == EXIT_ARCHIVE, f"an archive cut at {cut} of {len(data)} was accepted"


def test_single_bit_flips(server, real_archive):
    top, src, data, want = real_archive
    rng = random.Random(6)
    recs = records(data)
    # half anywhere, half in the small records where structure lives
    small = [r for r in recs if r.type != fmt.T_DATA]
    positions = [rng.randrange(len(data)) for _ in range(25)]
    for _ in range(25):
        r = rng.choice(small)
        positions.append(rng.randrange(r.offset, r.end))
    codes = []
    for pos in positions:
        bit = rng.randrange(8)
        mutated = bytearray(data)
        mutated[pos] ^= 1 << bit
        codes.append(_check_damaged(server, top, src, want, bytes(mutated),
                                    f"bit {bit} of byte {pos} flipped"))
    # every byte is under the magic or a CRC: no flip may pass unnoticed
    assert all(c == EXIT_ARCHIVE for c in codes), codes


def test_bad_small_record_fails_in_its_turn(btrfs_dir):
    """A small DATA record is decoded on the reading thread, ahead of the
    large ones before it (decoded on workers): its bad hash must still end
    the restore where it stands, after the files before it, which are
    whole and under their names; the bad file is not."""
    big = secrets.token_bytes(512 << 10)  # above reader INLINE: on a worker
    c = Craft()
    c.dir(b"d")
    c.file(b"d/big", big)
    c.reg(b"d/bad", 4096)
    c.data(0, b"\1" * 4096, sha=hashlib.sha256(b"other").digest())
    c.end()
    archive = btrfs_dir / "a.ca"
    archive.write_bytes(c.finish())
    dest = btrfs_dir / "out"
    r = cli("restore", archive, dest, check_rc=None)
    line = assert_one_line_error(r, EXIT_ARCHIVE)
    assert "SHA-256" in line or "hash" in line, line
    assert (dest / "d" / "big").read_bytes() == big
    assert sorted(os.listdir(dest / "d")) == ["big"]
