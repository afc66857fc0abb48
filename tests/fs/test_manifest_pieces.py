"""``check`` and ``prune`` walk each distinct manifest piece once
(repo/pieces.py, docs/REPOSITORY.md "Manifest blobs"): cloneaware cuts
manifests at record boundaries, so what a piece names is a function of its
bytes, shared by every night that names it.  What must hold whatever cut
the pieces: prune keeps every blob a snapshot names, check finds every
range the index lacks, in every snapshot that names it.  The judges are a
whole decode of each manifest (the reader, not the walk) and a restore
compared by hashing the tree."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import zstandard
from helpers.cli import cli, cli_json
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.archive import format as fmt
from cloneaware.archive.events import BlobEvent
from cloneaware.archive.reader import Stream
from cloneaware.repo import format as rf
from cloneaware.repo.backend import LocalBackend, pack_name
from cloneaware.repo.packer import Packer
from cloneaware.repo.pieces import PieceWalk
from cloneaware.repo.repository import Repository

pytestmark = pytest.mark.root


def _tree(root: Path, files: int = 1500) -> Path:
    src = root / "src"
    for i in range(files):
        d = src / f"d{i % 30:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(b"file %d\n" % i * (1 + i % 7))
    return src


def _ranges_decoded(repo: Repository, snap) -> list:
    """The snapshot's BLOB ranges as the reader decodes its whole manifest."""
    out = []
    for ev in Stream(io.BytesIO(repo.manifest(snap))).events():
        if isinstance(ev, BlobEvent):
            out.append((ev.blob_id, ev.blob_offset, ev.length))
    return out


def _ranges_walked(repo: Repository, snap) -> list:
    """The snapshot's BLOB ranges as a fresh piece walk finds them."""
    got: list = []
    assert PieceWalk(repo).walk(snap, lambda p: got.extend(p.ranges.tuples())) is not None
    return got


def test_every_night_is_walked_piece_by_piece_and_agrees_with_the_reader(btrfs_dir, tmp_path):
    """The writer's pieces end at record boundaries: the walk follows every
    snapshot, finds the ranges a whole decode finds, and a night that
    changed one file walks a few new pieces, not the manifest again."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = _tree(btrfs_dir)
    with open(src / "big", "wb") as f:  # an entry whose ENTRY record is longer than a piece
        f.write(b"x" * 5000)
    os.setxattr(src / "big", "user.a", b"a" * 3000)
    for n in range(3):
        (src / "d00" / "f00000").write_bytes(b"night %d\n" % n)
        cli("backup", "-r", repo, src, check_rc=0)
    first = cli_json("check", "--json", "-r", repo)
    assert first["ok"] and first["snapshots"] == 3, first
    att = Repository.open(LocalBackend(str(repo)))
    att.load_index()
    walk = PieceWalk(att)
    snaps = att.snapshots()
    pieces = len(att.manifest_ids(snaps[0]))
    assert pieces > 10, pieces
    for s in snaps:
        assert walk.walk(s) is not None, s.short_id
        assert _ranges_walked(att, s) == _ranges_decoded(att, s)
    att.close()
    # nights 2 and 3 changed one small file: a few new pieces each
    assert pieces <= walk.walked <= pieces + 2 * 6, (walk.walked, pieces)
    assert first["pieces"] == walk.walked


def _cuts(manifest: bytes, rtype: int, into: int) -> list[int]:
    """Offsets ``into`` bytes inside every fifth record of type ``rtype``,
    found by hopping over the records' frames (docs/FORMAT.md)."""
    out, pos, seen = [], len(fmt.MAGIC), 0
    while pos < len(manifest):
        t, _flags, length = fmt.FRAME.unpack_from(manifest, pos)
        if t == rtype:
            seen += 1
            if seen % 5 == 0:
                out.append(pos + into)
        pos += fmt.FRAME_OVERHEAD + length
    assert pos == len(manifest) and len(out) > 50, (pos, len(out))
    return out


def _recut(repo: Path, rtype: int, into: int) -> str:
    """The last snapshot again, its manifest cut inside records (as another
    writer may cut it: readers only concatenate), under a new snapshot
    object.  Its id."""
    att = Repository.open(LocalBackend(str(repo)))
    att.load_index()
    snap = att.snapshots()[-1]
    manifest = att.manifest(snap)
    packer = Packer(att, 1)
    z = zstandard.ZstdCompressor()
    ids = []
    bounds = [0, *_cuts(manifest, rtype, into), len(manifest)]
    for a, b in zip(bounds, bounds[1:]):
        chunk = manifest[a:b]
        bid = att.crypto.blob_id(chunk)
        ids.append(bid)
        if not packer.known(bid):
            packer.add(bid, rf.T_TREE, len(chunk), att.encode_blob(rf.T_TREE, bid, chunk, z))
    packer.flush()
    packer.close()
    data = dict(snap.data, manifest=[b.hex() for b in ids], time_ns=snap.time_ns + 1)
    data.pop("manifest_list", None)
    new = att.save_snapshot(data)
    # the walk cannot follow it: decoded whole
    assert PieceWalk(att).walk(new) is None
    att.close()
    return new.id


@pytest.mark.parametrize("inside", ["blob", "header"])
def test_prune_keeps_what_a_manifest_cut_inside_records_names(btrfs_dir, tmp_path, inside):
    """A snapshot whose pieces end inside BLOB records, or inside ENTRY
    records' headers, the only one left after its original is forgotten:
    prune keeps every blob it names, and it restores exactly (without the
    walk's refusal of a BLOB record across pieces, prune dropped blobs and
    the restore failed)."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    src = _tree(btrfs_dir)
    cli("backup", "-r", repo, src, check_rc=0)
    orig = next((repo / "snapshots").iterdir())
    recut = _recut(repo, *((fmt.T_BLOB, 20) if inside == "blob" else (fmt.T_ENTRY, 5)))
    orig.unlink()  # the original forgotten: its pieces are no longer needed
    out = cli_json("prune", "--json", "-r", repo)
    assert out["blobs_removed"] > 0, out  # the original's pieces went
    assert cli_json("check", "--json", "-r", repo)["ok"]
    dest = btrfs_dir / "dest"
    cli("restore", "-r", repo, recut[:12], dest, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))


def test_check_names_every_snapshot_a_lost_blob_leaves_short(btrfs_dir, tmp_path):
    """A data blob lost (its pack deleted) that three nights name through
    the same unchanged pieces: check fails and names all three snapshots
    and the file, though it walks the shared pieces once."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, "--pack-size", "1", check_rc=0)
    src = _tree(btrfs_dir, 300)
    with open(src / "a-big", "wb") as f:
        f.write(os.urandom(3 << 20))
    ids = []
    for n in range(3):
        (src / "d29" / "late").write_bytes(b"night %d\n" % n)
        ids.append(cli_json("backup", "--json", "-r", repo, src)["snapshot"])
    att = Repository.open(LocalBackend(str(repo)))
    att.load_index()
    ranges: list = []
    PieceWalk(att).walk(att.snapshots()[0], lambda p: ranges.extend(p.ranges.tuples()))
    bid = next(r[0] for r in ranges if att.index.get(r[0]).raw_length == 1 << 20)
    pack = att.index.get(bid).pack.hex()
    holds = {e.type for b, e in att.index.items() if e.pack.hex() == pack}
    att.close()
    assert holds == {rf.T_DATA}, holds  # the manifests stay readable
    (repo / pack_name(pack)).unlink()
    r = cli("check", "-r", repo)
    assert r.returncode == 3, str(r)
    lines = (r.out + r.err).splitlines()
    for sid in ids:  # each snapshot names the file, once
        named = [ln for ln in lines if ln.startswith(f"cloneaware: snapshot {sid[:8]}: ")]
        assert len(named) == 1 and "a-big: " in named[0] and "(in no index)" in named[0], \
            str(r)
    assert json.loads(cli("check", "--json", "-r", repo).stdout)["ok"] is False
