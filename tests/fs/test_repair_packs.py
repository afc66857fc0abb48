"""``repair packs`` (issue 33): a pack with flipped bytes, a truncated pack,
a pack deleted.  check names the damage; repair salvages every blob of the
pack that still decodes into new packs, puts the pack's bytes aside on
this host and removes it; a restore of the old snapshot then restores
every file the damage did not touch exactly (hashed against the source)
and names the others; a new backup of the same source stores what was
lost, after which ``check --read-data`` passes and the old snapshot
restores whole.  The oracle for which blobs were hit is what the test
itself wrote into the pack it damages."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
from helpers.cli import cli, cli_json

from cloneaware.repo.backend import LocalBackend, pack_name
from cloneaware.repo.repository import Repository
from cloneaware.testing import write_random

pytestmark = pytest.mark.root

KiB, MiB = 1 << 10, 1 << 20


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _pack_holding(repo, data: bytes) -> tuple[str, dict[bytes, tuple[int, int]], int]:
    """The pack holding the blob of ``data`` (one blob: under 1 MiB), every
    blob it holds (id -> offset, length), and where that one lies."""
    r = Repository.open(LocalBackend(str(repo)))
    try:
        r.load_index()
        e = r.index.get(r.crypto.blob_id(data))
        held = {b: (x.offset, x.stored_length) for b, x in r.index.items() if x.pack == e.pack}
        return e.pack.hex(), held, e.offset
    finally:
        r.close()


@pytest.mark.parametrize("how", ["flipped", "truncated", "deleted"])
def test_repair_packs_salvages_and_a_new_backup_heals(btrfs_dir, tmp_path, how):
    src = btrfs_dir / "src"
    src.mkdir()
    for i in range(12):  # one blob each, several to a pack
        write_random(src / f"f{i:02}", 300 * KiB, 100 + i)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    first = cli_json("backup", "--json", "-r", repo, src)["snapshot"]
    victim, held, at = _pack_holding(repo, (src / "f05").read_bytes())
    path = repo / pack_name(victim)
    raw = path.read_bytes()
    # which files the damage takes: the blobs it reaches, as the test cut them
    contents = {f"f{i:02}": (src / f"f{i:02}").read_bytes() for i in range(12)}
    r0 = Repository.open(LocalBackend(str(repo)))
    ids = {n: r0.crypto.blob_id(d) for n, d in contents.items()}
    r0.close()
    in_pack = {n for n, b in ids.items() if b in held}
    assert len(in_pack) == len(held) >= 2, held  # file blobs only: the manifest is elsewhere
    if how == "flipped":
        bad = bytearray(raw)
        bad[at + 1000] ^= 0xFF
        path.write_bytes(bytes(bad))
        hit = {"f05"}
    elif how == "truncated":
        path.write_bytes(raw[:at + 1000])
        hit = {n for n in in_pack if held[ids[n]][0] + held[ids[n]][1] > at + 1000}
    else:
        path.unlink()
        hit = in_pack
    assert "f05" in hit and hit <= in_pack

    r = cli("check", "--read-data", "--json", "-r", repo)
    assert r.returncode == 3, str(r)
    assert {d["path"] for d in json.loads(r.out)["damaged"]} == {f"src/{n}" for n in hit}
    if how != "deleted":  # check names the repair to run
        assert any(f"cloneaware repair packs {victim[:16]}" in w
                   for w in json.loads(r.out)["warnings"]), r.out

    aside = tmp_path / "aside"
    out = cli_json("repair", "packs", "--json", "-r", repo, "--aside", aside)
    assert out["damaged"] == [victim] and out["salvaged"] == len(in_pack - hit), out
    assert sorted(out["lost"]) == sorted(ids[n].hex() for n in hit), out
    if how == "deleted":
        assert out["aside"] == []
    else:
        assert (aside / victim).read_bytes() == path.read_bytes() if path.exists() else True
        assert out["aside"] == [str(aside / victim)]
    assert not path.exists()

    # the old snapshot: every file the damage did not touch, exactly; the others named
    dest = tmp_path / "dest"
    r = cli("restore", "-r", repo, first[:8], dest)
    assert r.returncode == 3, str(r)
    for n in contents:
        if n not in hit:
            assert _sha(dest / "src" / n) == _sha(src / n), n
        else:
            assert f"src/{n}" in r.err, r.err
    # a new backup of the same source stores what was lost: all whole again
    cli("backup", "-r", repo, src, check_rc=0)
    cli("check", "--read-data", "-r", repo, check_rc=0)
    dest2 = tmp_path / "dest2"
    cli("restore", "-r", repo, first[:8], dest2, check_rc=0)
    for n in contents:
        assert _sha(dest2 / "src" / n) == _sha(src / n), n


def test_repair_packs_leaves_a_sound_repository_alone(btrfs_dir, tmp_path):
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a", 2 * MiB, 1)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    before = sorted(os.listdir(repo / "data"))
    out = cli_json("repair", "packs", "--json", "-r", repo, "--aside", tmp_path / "aside")
    assert out["damaged"] == [] and out["read"] >= 1 and out["index"] is None, out
    assert sorted(os.listdir(repo / "data")) == before
    assert not (tmp_path / "aside").exists()
    r = cli("repair", "packs", "-r", repo, "ffffffffff")
    assert r.returncode == 2 and "no pack" in r.err, str(r)


def test_repair_snapshots_when_the_source_is_gone(btrfs_dir, tmp_path):
    """No backup can heal (the source is gone): repair snapshots writes the
    snapshot again without the lost blob, the file that lost bytes marked
    (an xattr) and its lost range zeros, every other file exact; a damaged
    snapshot object is named, and --forget removes it with the old
    snapshot; then check --read-data passes."""
    src = btrfs_dir / "src"
    src.mkdir()
    for i in range(8):
        write_random(src / f"f{i}", 300 * KiB, 200 + i)
    write_random(src / "big", 3 * MiB, 9)  # three blobs: one of them lost
    repo = tmp_path / "repo"
    cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    first = cli_json("backup", "--json", "-r", repo, "--tag", "weekly", src)["snapshot"]
    data = (src / "big").read_bytes()
    victim, held, _ = _pack_holding(repo, data[MiB:2 * MiB])
    (repo / pack_name(victim)).unlink()
    junk = repo / "snapshots" / ("ab" * 32)
    junk.write_bytes(b"not a snapshot at all")
    lost_files = {n for n in [f"f{i}" for i in range(8)] + ["big"]
                  if any(_blob(repo, c) in held for c in _pieces((src / n).read_bytes()))}
    assert "big" in lost_files
    cli("repair", "packs", "-r", repo, "--aside", tmp_path / "aside", check_rc=0)

    dry = cli_json("repair", "snapshots", "--json", "--dry-run", "-r", repo)
    assert list(dry["rewritten"]) == [first] and dry["bad_objects"] == ["ab" * 32], dry
    out = cli_json("repair", "snapshots", "--json", "--forget", "-r", repo)
    assert {d["path"] for d in out["damaged_files"]} == {f"src/{n}" for n in lost_files}
    new = out["rewritten"][first]
    assert sorted(out["forgotten"]) == sorted([first, "ab" * 32]), out
    snaps = json.loads(cli("snapshots", "--json", "-r", repo, check_rc=0).out)
    assert [s["id"] for s in snaps] == [new] and snaps[0]["tags"] == ["repaired", "weekly"]
    cli("check", "--read-data", "-r", repo, check_rc=0)

    shutil_rm(src)  # the source is gone: what is left is the repaired snapshot
    dest = tmp_path / "dest"
    cli("restore", "-r", repo, "latest", dest, check_rc=0)
    got = (dest / "src" / "big").read_bytes()
    assert got[:MiB] == data[:MiB] and got[2 * MiB:] == data[2 * MiB:]
    assert got[MiB:2 * MiB] == bytes(MiB)
    note = os.getxattr(dest / "src" / "big", "user.cloneaware.damaged").decode()
    assert note.startswith(f"{MiB} bytes lost") and first in note, note
    for i in range(8):
        n = f"f{i}"
        if n not in lost_files:
            assert "user.cloneaware.damaged" not in os.listxattr(dest / "src" / n)


def _pieces(data: bytes) -> list[bytes]:
    return [data[i:i + MiB] for i in range(0, len(data), MiB)]


def _blob(repo, piece: bytes) -> bytes:
    r = Repository.open(LocalBackend(str(repo)))
    try:
        return r.crypto.blob_id(piece)
    finally:
        r.close()


def shutil_rm(path) -> None:
    import shutil
    shutil.rmtree(path)


def test_repair_packs_on_s3(ceph, btrfs_dir, tmp_path):
    """The same on the suite's Ceph gateway: a byte flipped in a pack (put
    with boto3), found by check, salvaged around by repair packs, healed by
    a backup."""
    import secrets

    env = {**os.environ, **ceph.env}
    bucket = f"t-{secrets.token_hex(6)}"
    url = f"s3://{bucket}/repo"
    src = btrfs_dir / "src"
    src.mkdir()
    for i in range(6):
        write_random(src / f"f{i}", 300 * KiB, 300 + i)
    cli("init", "-r", url, "--pack-size", "1", env=env, check_rc=0)
    first = json.loads(cli("backup", "--json", "-r", url, src, env=env, check_rc=0).out)[
        "snapshot"]
    s3 = ceph.s3()
    needle = (src / "f3").read_bytes()[:4096]
    for o in s3.list_objects_v2(Bucket=bucket, Prefix="repo/data/")["Contents"]:
        body = bytearray(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
        at = body.find(needle)
        if at >= 0:
            body[at + 10] ^= 0xFF
            s3.put_object(Bucket=bucket, Key=o["Key"], Body=bytes(body))
            victim = o["Key"].rsplit("/", 1)[1]
            break
    else:
        raise AssertionError("f3's bytes are in no pack")
    r = cli("check", "--read-data", "--json", "-r", url, env=env)
    assert r.returncode == 3, str(r)
    assert [d["path"] for d in json.loads(r.out)["damaged"]] == ["src/f3"]
    out = json.loads(cli("repair", "packs", "--json", "-r", url, "--aside", tmp_path / "aside",
                         env=env, check_rc=0).out)
    assert out["damaged"] == [victim] and len(out["lost"]) == 1, out
    assert (tmp_path / "aside" / victim).exists()
    r = cli("restore", "-r", url, first[:8], tmp_path / "dest", env=env)
    assert r.returncode == 3 and "src/f3" in r.err, str(r)
    cli("backup", "-r", url, src, env=env, check_rc=0)
    cli("check", "--read-data", "-r", url, env=env, check_rc=0)
    cli("restore", "-r", url, first[:8], tmp_path / "dest2", env=env, check_rc=0)
    for i in range(6):
        assert _sha(tmp_path / "dest2" / "src" / f"f{i}") == _sha(src / f"f{i}")
