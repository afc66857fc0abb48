"""What the command line prints, as a new user reads it (issue 21): numbers
rounded, the base named, one offset per message, names that cannot be
misread, scan's ratio without the holes, known progress totals in one unit
system.  Run as a user runs it, on real filesystems."""
from __future__ import annotations

import os
import re

import pytest
from helpers.cli import assert_one_line_error, cli, cli_json

from cloneaware.errors import EXIT_ARCHIVE
from cloneaware.testing import reflink_copy, rewrite_blocks, write_random

pytestmark = pytest.mark.root


def test_defect_17_rounded_seconds_the_bases_name_one_offset(btrfs_dir, tmp_path):
    """Defect 17: verify printed "seconds 0.1482089540000402"; ls of a thin
    backup said "base file . (67108864 bytes)"; a truncated archive's
    message nested two offsets."""
    g = btrfs_dir / "golden.img"
    write_random(g, 4 << 20, 1)
    c = btrfs_dir / "clone.img"
    reflink_copy(g, c)
    rewrite_blocks(c, 0.1, 2)
    thin = tmp_path / "thin.caw"
    cli("backup", "--base", g, "-o", thin, c, check_rc=0)
    out = cli("verify", thin, check_rc=0).out
    m = re.search(r"seconds (\d+(?:\.\d+)?)", out)
    assert m and len(m.group(1).partition(".")[2]) <= 2, out
    v = cli_json("verify", "--json", thin)
    assert round(v["seconds"], 2) == v["seconds"], v
    for cmd in (["backup", "--json", "-o", tmp_path / "x.caw", c], ["restore", "--json", thin,
                                                                     tmp_path / "d",
                                                                     "--base", g]):
        s = cli_json(*cmd)
        assert round(s["seconds"], 3) == s["seconds"], s
    listing = cli("ls", thin, check_rc=0).out
    assert f"  base file {g} (4.0 MiB, 4194304 bytes)" in listing.splitlines(), listing
    assert "base file . " not in listing
    cut = tmp_path / "cut.caw"
    data = thin.read_bytes()
    cut.write_bytes(data[:-30])
    for cmd in ("ls", "verify"):
        line = assert_one_line_error(cli(cmd, cut), EXIT_ARCHIVE)
        assert line.count("archive offset") == 1, line


def test_defect_15_scan_does_not_count_holes_as_a_saving(btrfs_dir):
    """Defect 15: scan of sparse images said "saving 1966x", holes counted
    as saved.  Now the saving is data bytes over physical bytes (1.00x for
    sparse images that share nothing), and the holes are shown apart; a
    clone family still shows its real saving."""
    imgs = btrfs_dir / "imgs"
    imgs.mkdir()
    for i in range(4):
        with open(imgs / f"disk{i}.img", "wb") as f:
            f.truncate(1 << 30)  # 1 GiB
            f.seek(i << 20)
            f.write(bytes([i + 1]) * (128 << 10))
    s = cli_json("scan", "--json", imgs)
    assert s["saving"] == pytest.approx(1.0, abs=0.01), s
    assert s["hole_bytes"] == 4 * ((1 << 30) - (128 << 10))
    out = cli("scan", imgs, check_rc=0).out
    rows = dict(re.split(r"\s{2,}", ln.strip(), maxsplit=1) for ln in out.splitlines() if ln)
    assert rows["holes"] == "4.0 GiB" and rows["saving (data / physical)"] == "1.00x", out
    fam = btrfs_dir / "fam"
    fam.mkdir()
    write_random(fam / "base.img", 8 << 20, 3)
    for i in range(3):
        reflink_copy(fam / "base.img", fam / f"clone{i}.img")
    assert cli_json("scan", "--json", fam)["saving"] == pytest.approx(4.0, rel=0.02)


def _on_a_terminal(args: list, timeout: float = 120) -> str:
    """Run ``cloneaware ARGS`` with its stderr on a pseudo-terminal (so the
    progress bar is drawn); everything drawn there, escape codes removed."""
    import os
    import pty
    import select
    import time

    from helpers.cli import cli_popen

    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm", COLUMNS="160")
    p = cli_popen(*args, stderr=slave, env=env)
    os.close(slave)
    got = bytearray()
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    b = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    break
                if not b:
                    break
                got += b
            elif p.poll() is not None:
                break
        p.wait(timeout=30)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, got.decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", got.decode(errors="replace"))


def test_defect_18_progress_knows_the_total_and_speaks_binary_units(btrfs_dir, xfs_dir):
    """Defect 18: the bar of a restore from a file showed "65.5/? MiB" though
    the index knows the total, and its speed was in MB/s beside MiB."""
    src = btrfs_dir / "src"
    src.mkdir()
    for i in range(6):
        write_random(src / f"f{i}", 48 << 20, i)
    arch = btrfs_dir / "a.caw"
    cli("backup", "--compress", "none", "-o", arch, src, check_rc=0)
    for args, total in ((["restore", arch, xfs_dir / "d"], "288.0 MiB"),
                        (["verify", arch], "288.0 MiB")):
        drawn = _on_a_terminal(args)
        assert f"of {total}" in drawn, drawn[-2000:]
        assert "/?" not in drawn and "MB/s" not in drawn and "kB/s" not in drawn, drawn[-2000:]
        assert re.search(r"\d+\.\d (KiB|MiB|GiB)/s", drawn), drawn[-2000:]


def test_no_progress_and_numeric_owner(btrfs_dir, xfs_dir):
    """--no-progress: no bar even on a terminal (a log of a cron job run under
    script(1), say); restore --numeric-owner is accepted and is what restore
    does anyway (archives hold numbers)."""
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "f", 96 << 20, 1)
    os.chown(src / "f", 4321, 8765)
    arch = btrfs_dir / "a.caw"
    cli("backup", "--compress", "none", "-o", arch, src, check_rc=0)
    drawn = _on_a_terminal(["verify", arch])
    assert "of 96.0 MiB" in drawn, drawn[-2000:]
    quiet = _on_a_terminal(["verify", "--no-progress", arch])
    assert quiet == "", quiet[-2000:]  # stderr (the terminal) stays empty
    quiet = _on_a_terminal(["restore", "--no-progress", "--numeric-owner", arch,
                            xfs_dir / "d"])
    assert quiet == "", quiet[-2000:]
    st = os.stat(xfs_dir / "d" / "src" / "f")
    assert (st.st_uid, st.st_gid) == (4321, 8765)


ODD = [b"bad\xff\xfename", b"new\nline", b"back\\slash", "caf\u00e9".encode(), b"\x01ctl",
       b"tab\there", "zero\u200bwidth".encode()]


def test_defect_11_names_that_are_not_utf8_are_shown_losslessly(btrfs_dir, tmp_path):
    """Defect 11: ls printed surrogates for the bytes \\xff\\xfe, and ls --json
    emitted lone surrogates that JSON tools turn into U+FFFD.  Now both show
    an escaped form that maps back to the bytes, and --json adds the bytes
    themselves in base64."""
    import base64
    import os

    from cloneaware.display import show

    top = btrfs_dir / "odd"
    top.mkdir()
    for n in ODD:
        with open(os.path.join(os.fsencode(top), n), "wb") as f:
            f.write(n)
    os.symlink(b"bad\xff\xfename", os.path.join(os.fsencode(top), b"link\xfe"))
    arch = tmp_path / "odd.caw"
    cli("backup", "-o", arch, top, check_rc=0)
    r = cli("ls", "--json", arch, check_rc=0)
    assert b"\\ud" not in r.stdout.lower() and b"\\ufffd" not in r.stdout.lower()
    r.stdout.decode("ascii")  # plain ASCII JSON, nothing a tool could mangle
    got = {base64.b64decode(e["path_b64"]): e["path"] for e in r.json()["entries"]}
    for n in ODD + [b"link\xfe"]:
        p = b"odd/" + n
        assert got[p] == show(p) and unshow(got[p]) == p, (p, got.get(p))
    assert got[b"odd/bad\xff\xfename"] == "odd/bad\\xff\\xfename"
    assert got[b"odd/new\nline"] == "odd/new\\nline"
    assert got[b"odd/back\\slash"] == "odd/back\\\\slash"
    assert got["odd/caf\u00e9".encode()] == "odd/caf\u00e9"
    assert got[b"odd/\x01ctl"] == "odd/\\u0001ctl"
    text = cli("ls", arch, check_rc=0).out
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + len(ODD) + 1, text  # header, odd/, the names, the link
    for n in ODD:
        assert any(ln.endswith(" " + show(b"odd/" + n)) for ln in lines), (n, text)
    long = cli("ls", "-l", arch, check_rc=0).out
    assert "odd/link\\xfe -> bad\\xff\\xfename" in long, long


def unshow(text: str) -> bytes:
    """The bytes ``show`` was given: the inverse of display.show, which the
    test checks it is."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        kind = text[i + 1]
        if kind == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif kind in "uU":
            n = 4 if kind == "u" else 8
            out += chr(int(text[i + 2:i + 2 + n], 16)).encode("utf-8", "surrogatepass")
            i += 2 + n
        else:
            out += {"\\": b"\\", "n": b"\n", "t": b"\t", "r": b"\r"}[kind]
            i += 2
    return bytes(out)
