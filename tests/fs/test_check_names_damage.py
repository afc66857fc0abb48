"""``check --read-data`` names the snapshots and the files a damaged pack
holds (issue 31, item 8): each file once a snapshot, with how many of its
bytes cannot be had, and nothing else; a blob with a sound copy elsewhere
is not named.  The oracle is what the test itself wrote: which file's bytes
went into the pack it damages."""
from __future__ import annotations

import json

import pytest
from helpers.cli import cli
from helpers.packs import pack_of_only

from cloneaware.repo.backend import pack_name
from cloneaware.testing import write_random

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.mark.parametrize("how", ["damaged", "gone"])
def test_check_names_the_files_of_a_bad_pack(btrfs_dir, tmp_path, how):
    """Damaged: found by --read-data; gone: by check alone (the index names it)."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    src, other = btrfs_dir / "src", btrfs_dir / "other"
    src.mkdir()
    other.mkdir()
    write_random(src / "a", 3 * MiB, 1)
    for i in range(10):
        (src / f"small{i}").write_bytes(b"small %d\n" % i * 50)
    write_random(src / "z", 2 * MiB, 2)
    write_random(other / "o", 2 * MiB, 3)
    cli("backup", "-r", repo, src, check_rc=0)
    (src / "new").write_bytes(b"night two\n")
    cli("backup", "-r", repo, src, check_rc=0)  # a second snapshot holding z too
    cli("backup", "-r", repo, other, check_rc=0)  # a set that does not
    snaps = json.loads(cli("snapshots", "--json", "-r", repo, check_rc=0).out)
    with_z = {s["id"] for s in snaps if any(p.endswith("/src") for p in s["paths"])}
    assert len(with_z) == 2 and len(snaps) == 3, snaps
    r = cli("check", "--read-data", "-r", repo)
    assert r.returncode == 0, str(r)

    victim, held = pack_of_only(repo, (src / "z").read_bytes())
    path = repo / pack_name(victim)
    if how == "gone":
        path.unlink()
        lost, why, args = len(held) * MiB, "in no index", ()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF  # inside its first blob, the trailer intact
        path.write_bytes(bytes(data))
        lost, why, args = MiB, f"damaged in pack {victim}", ("--read-data",)
        r = cli("check", "--json", "-r", repo)  # the blobs are not read: not seen
        assert r.returncode == 0 and not json.loads(r.out)["damaged"], str(r)

    r = cli("check", *args, "--json", "-r", repo)
    assert r.returncode == 3, str(r)
    out = json.loads(r.out)
    named = {(d["snapshot"], d["path"]) for d in out["damaged"]}
    assert named == {(s, "src/z") for s in with_z}, out["damaged"]
    for d in out["damaged"]:
        assert d["bytes"] == lost and d["why"] == why, d
    lines = [ln for ln in r.err.splitlines() if "src/z" in ln]
    assert len(lines) == 2 and all(f"{lost} bytes cannot be had ({why})" in ln
                                   for ln in lines), r.err
    assert f"pack {victim}" in r.err, r.err
    assert "src/a" not in r.err and "other/o" not in r.err and "small" not in r.err, r.err



def test_read_data_subset_reads_each_pack_once_over_its_parts(btrfs_dir, tmp_path):
    """--read-data-subset n/t: parts 1 to t read every pack exactly once,
    and only the part that holds a damaged pack finds it; x% reads that
    share; a bad spec is a usage error."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    src = btrfs_dir / "src"
    src.mkdir()
    for i in range(6):
        write_random(src / f"f{i}", 2 * MiB, 10 + i)
    cli("backup", "-r", repo, src, check_rc=0)
    names = sorted(p.name for p in (repo / "data").rglob("*") if p.is_file())
    assert len(names) >= 8, names
    for bad in ("0/3", "4/3", "1/0", "0%", "101%", "half"):
        r = cli("check", "-r", repo, "--read-data-subset", bad)
        assert r.returncode == 2 and "--read-data-subset" in r.err, str(r)
    t = 3
    read = 0
    for n in range(1, t + 1):
        out = json.loads(cli("check", "--json", "-r", repo, "--read-data-subset", f"{n}/{t}",
                             check_rc=0).out)
        want = [x for x in names if int(x[:2], 16) % t == n - 1]
        assert out["read_packs"] == len(want), (n, out)
        assert out["read_bytes"] == sum((repo / pack_name(x)).stat().st_size for x in want)
        read += out["read_packs"]
    assert read == len(names)
    out = json.loads(cli("check", "--json", "-r", repo, "--read-data-subset", "25%",
                         check_rc=0).out)
    assert out["read_packs"] == -(-len(names) // 4), out

    victim, _ = pack_of_only(repo, (src / "f3").read_bytes())
    path = repo / pack_name(victim)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    holder = int(victim[:2], 16) % t + 1
    for n in range(1, t + 1):
        r = cli("check", "-r", repo, "--read-data-subset", f"{n}/{t}")
        if n == holder:
            assert r.returncode == 3 and "src/f3" in r.err and victim in r.err, str(r)
        else:
            assert r.returncode == 0, str(r)
