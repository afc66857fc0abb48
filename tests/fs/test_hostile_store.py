"""Issue 35: trust no one who holds the storage.  Each test plays an attacker
who holds append-only credentials (``cloneaware serve --allow repo-append``,
run here as the forced command of an ssh login would run it) and uses them
against the owner's repository; afterwards the owner's commands must give
back every byte and delete nothing real.

The attacker speaks the real protocol through the client's own backend
(repo/sshbackend.py) with an --rsh that starts ``serve`` on this host, so
every request meets the same server checks a remote attacker meets."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import struct
import time
from pathlib import Path

import pytest
from helpers.archivecraft import records, reframe, temp_files
from helpers.cli import cli, cli_command, cli_json
from helpers.treeutil import MiB, Snapshot, assert_same_tree

from cloneaware.archive import format as fmt
from cloneaware.archive.events import BlobEvent, EndEvent, EntryEvent, StatEvent
from cloneaware.archive.reader import Stream
from cloneaware.archive.writer import Writer
from cloneaware.errors import UsageError
from cloneaware.repo import format as rf
from cloneaware.repo.backend import LocalBackend, pack_name
from cloneaware.repo.packer import Packer
from cloneaware.repo.repository import Repository
from cloneaware.repo.sink import ManifestOut
from cloneaware.repo.sshbackend import SshBackend
from cloneaware.testing import write_random

pytestmark = pytest.mark.root


def append_rsh(root: Path) -> str:
    """An --rsh that runs ``cloneaware serve --allow repo-append`` for ROOT
    here, whatever host and command the client names."""
    serve = [*cli_command(), "serve", "--allow", "repo-append", "--restrict-to-path",
             str(root)]
    return f"sh -c {shlex.quote('exec ' + shlex.join(serve))} x"


class World:
    """The owner's repository (a path: full rights), a client that reaches it
    append-only over the channel, and the attacker's own connection."""

    def __init__(self, tmp: Path, src: Path):
        self.root = tmp / "srv"
        self.root.mkdir()
        self.repo = self.root / "repo"
        self.src = src
        cli("init", "-r", self.repo, check_rc=0)
        self.rsh = append_rsh(self.root)
        self.url = f"ssh://localhost{self.repo}"

    def client(self, *args, rc=0):
        """The backed-up host, through the append-only channel."""
        return cli(*args[:1], "-r", self.url, "--rsh", self.rsh, *args[1:], check_rc=rc)

    def backup(self, rc=0) -> dict:
        return self.client("backup", "--json", self.src, rc=rc).json()

    def attacker(self) -> Repository:
        return Repository.open(SshBackend(self.url, self.rsh))


def _tree(top: Path) -> Path:
    top.mkdir()
    write_random(top / "a.bin", 3 * MiB, 1)
    write_random(top / "b.bin", 3 * MiB, 2)
    (top / "small.txt").write_bytes(b"hello\n")
    return top


@pytest.fixture
def world(btrfs_dir, tmp_path) -> World:
    return World(tmp_path, _tree(btrfs_dir / "src"))


def _sorting_first(make) -> tuple[str, bytes]:
    """An object whose name (its SHA-256) sorts before the others': ``make(n)``
    gives its bytes for nonce n (an attacker grinds as long as it likes)."""
    n = 0
    while True:
        data = make(n)
        oid = rf.object_id(data)
        if oid.startswith("00"):
            return oid, data
        n += 1


def test_junk_under_names_the_server_cannot_check_is_refused(world):
    """The server takes a pack, index or snapshot only under the SHA-256 of
    its bytes, and keys or config not at all from an append-only client."""
    world.backup()
    att = world.attacker()
    b = att.backend
    for name in ("data/00/" + "0" * 64, "index/" + "1" * 64, "snapshots/" + "2" * 64,
                 "keys/" + "3" * 64, "config"):
        with pytest.raises(UsageError):
            b.write(name, b"junk", create_only=True)
    assert not (world.repo / "data" / "00" / ("0" * 64)).exists()
    b.close()


def test_forged_index_and_junk_pack_make_prune_delete_nothing_real(world, btrfs_dir):
    """A junk pack under its own hash, with a trailer and an index that say
    it holds every blob the real packs hold (the index sorting first, so that
    a prune taking the first record would take it): prune keeps the real
    packs, and every byte restores.  check names the forged records; with
    --read-data, the junk pack."""
    s1 = world.backup()
    write_random(world.src / "b.bin", 3 * MiB, 3)
    world.backup()
    want = Snapshot(world.src, atime=False)
    real_packs = {p.name for p in (world.repo / "data").rglob("*") if p.is_file()}
    att = world.attacker()
    idx = att.load_index()
    blobs = sorted(idx.items())
    entries = [rf.PackEntry(bid, e.type, e.raw_length, e.stored_length) for bid, e in blobs]
    trailer = att.encode_object(rf.K_TRAILER, rf.encode_trailer_payload(entries))
    junk = b"".join(os.urandom(e.stored_length) for e in entries)
    pack = junk + trailer + rf.pack_tail(trailer)
    pid = rf.object_id(pack)
    att.backend.write(pack_name(pid), pack)
    ip = rf.IndexPack(bytes.fromhex(pid))
    off = 0
    for bid, e in blobs:
        ip.blobs.append((bid, e.type, off, e.stored_length, e.raw_length))
        off += e.stored_length
    # and one that lies even about the junk pack's own trailer
    lie = rf.IndexPack(bytes.fromhex(pid), [(bid, e.type, 7, e.stored_length, e.raw_length)
                                            for bid, e in blobs])

    def index_object(n: int) -> bytes:
        nonce = rf.IndexPack(hashlib.sha256(b"%d" % n).digest())  # a pack of no blobs
        return att.encode_object(rf.K_INDEX, rf.encode_index_payload([ip, lie, nonce]))

    oid, data = _sorting_first(index_object)
    att.backend.write(f"index/{oid}", data)
    att.close()
    r = cli("check", "-r", world.repo, check_rc=3)
    assert "index records name blobs its trailer does not hold" in r.err, r.err
    # prune ends with warnings (exit 1): it names the records it did not use
    r = cli("prune", "--json", "-r", world.repo, check_rc=1)
    assert "not used" in r.err, r.err
    pr = r.json()
    left = {p.name for p in (world.repo / "data").rglob("*") if p.is_file()}
    assert real_packs <= left, f"a real pack was deleted: {pr}"
    assert pr["packs_deleted"] <= 1, pr  # the junk pack: its copies did not read back
    dest = btrfs_dir / "dest"
    cli("restore", "-r", world.repo, "latest", dest, check_rc=0)
    assert_same_tree(want, Snapshot(dest / "src"))
    cli("check", "--read-data", "-r", world.repo, check_rc=0)  # the junk is gone
    cli("restore", "-r", world.repo, s1["snapshot"][:8], btrfs_dir / "old", check_rc=0)


def test_a_junk_snapshot_object_stops_no_command(world, btrfs_dir):
    """Junk under a valid hash name in snapshots/ is named and passed over:
    snapshots, backup, prune and restore of what is sound all go on."""
    world.backup()
    att = world.attacker()
    junk = b"CAWO\x01\x02\x00\x00" + os.urandom(200)
    oid = rf.object_id(junk)
    att.backend.write(f"snapshots/{oid}", junk)
    att.close()
    # each goes on, names the object, and ends with warnings (exit 1)
    r = cli("snapshots", "--json", "-r", world.repo, check_rc=1)
    assert len(json.loads(r.stdout)) == 1 and oid[:16] in r.err, str(r)
    world.src.joinpath("new.txt").write_bytes(b"x")
    r = world.client("backup", "--json", world.src, rc=1)
    assert r.json()["snapshot"], str(r)
    cli("forget", "-r", world.repo, "--keep-last", "1", "--prune", check_rc=1)
    dest = btrfs_dir / "dest"
    cli("restore", "-r", world.repo, "latest", dest, check_rc=1)
    assert_same_tree(Snapshot(world.src, atime=False), Snapshot(dest / "src"))


def test_an_append_only_client_deletes_only_its_own_locks(world):
    """The owner's lock (an exclusive one, as prune takes) cannot be deleted
    by the append-only client; the client's own locks still go at the end of
    each of its commands."""
    world.backup()
    owner = Repository.open(LocalBackend(str(world.repo)))
    with owner.lock(True, "prune"):
        (name,) = [f"locks/{p.name}" for p in (world.repo / "locks").iterdir()]
        att = world.attacker()
        with pytest.raises(UsageError, match="another command wrote"):
            att.backend.delete(name)
        att.close()
        assert (world.repo / name).exists()
    owner.close()
    assert list((world.repo / "locks").iterdir()) == []


def _forged_snapshot(att: Repository, like: dict, **changes) -> str:
    d = dict(like, **changes)
    return att.save_snapshot(d).id


def test_future_dated_snapshots_push_no_real_one_out(world):
    """Snapshots of the same host and PATHs dated in the future would be the
    'last' ones of a --keep-last policy; they are kept and counted for
    nothing, and the real ones stay."""
    real = [world.backup()["snapshot"] for _ in range(3)]
    att = world.attacker()
    like = next(s for s in att.snapshots() if s.id == real[-1]).data
    future = time.time_ns() + 10 * 24 * 3600 * 10**9
    forged = [_forged_snapshot(att, like, time_ns=future + i, time=like["time"],
                               tags=[f"f{i}"]) for i in range(3)]
    att.close()
    # --keep-within counts from the newest snapshot whose time is believed: a
    # forged one ten days ahead does not push the real ones out of the hour
    out = cli_json("forget", "--json", "--dry-run", "-r", world.repo, "--keep-within", "1h")
    assert out["removed"] == [], out
    out = cli_json("forget", "--json", "-r", world.repo, "--keep-last", "2")
    removed = {s["id"] for s in out["removed"]}
    assert removed == {real[0]}, (removed, real, forged)
    kept = {s["id"] for s in out["kept"]}
    assert set(real[1:]) | set(forged) <= kept


def test_a_forged_parent_is_not_trusted(world, btrfs_dir):
    """A newer snapshot of the same host and PATHs, whose manifest says
    c.txt is as it was (same inode, size, mtime, ctime) but gives it d.txt's
    blob ranges: the next backup does not take it as its parent (the host
    remembers the snapshot it wrote), so c.txt is read, not taken over by
    the metadata rule (which applies to files not cloned: small ones, and
    all of them with --no-point-in-time)."""
    (world.src / "c.txt").write_bytes(b"c" * 20000)
    (world.src / "d.txt").write_bytes(b"d" * 20000)
    world.backup()
    att = world.attacker()
    att.load_index()
    snap = att.snapshots()[-1]
    manifest = att.manifest(snap)
    _save_newer(att, snap, _swap_blobs(manifest, b"src/c.txt", b"src/d.txt"))
    att.close()
    r = world.client("backup", "--json", world.src, rc=None)
    assert r.returncode in (0, 1), str(r)
    assert "not taken as the parent" in r.err, r.err
    dest = btrfs_dir / "dest"
    cli("restore", "-r", world.repo, r.json()["snapshot"], dest, check_rc=0)
    assert (dest / "src" / "c.txt").read_bytes() == b"c" * 20000
    assert (dest / "src" / "d.txt").read_bytes() == b"d" * 20000


def test_a_manifest_whose_index_lies_is_refused_in_one_line(world, btrfs_dir):
    """A newer snapshot whose manifest's FOOTER counts a byte more than its
    INDEX holds (framed and checksummed as written): restore -r reads only
    the index's top-level names before it writes, and the full read refuses
    the manifest at its INDEX, as an archive's is (docs/DESIGN.md): one line,
    exit 3, nothing of it left under a name the restore did not finish; the
    sound snapshot still restores."""
    (world.src / "c.txt").write_bytes(b"c" * 20000)
    world.backup()
    att = world.attacker()
    att.load_index()
    snap = att.snapshots()[-1]
    manifest = att.manifest(snap)
    foot = records(manifest)[-1]
    fields = list(struct.unpack_from("<7Q", manifest, foot.payload_offset))
    fields[3] += 1  # stored_bytes
    forged_id = _save_newer(att, snap, reframe(manifest, foot, struct.pack("<7Q", *fields)))
    att.close()
    dest = btrfs_dir / "forged"
    r = cli("restore", "-r", world.repo, forged_id[:12], dest)
    assert r.returncode == 3 and r.err.count("\n") == 1 and "Traceback" not in r.err, str(r)
    assert "byte counts are not those of the index" in r.err, r.err
    assert not temp_files(dest)
    good = btrfs_dir / "good"
    cli("restore", "-r", world.repo, snap.id[:12], good, check_rc=0)
    assert (good / "src" / "c.txt").read_bytes() == b"c" * 20000


def _save_newer(att: Repository, snap, manifest: bytes) -> str:
    """``manifest`` stored by the attacker as a snapshot like ``snap``, a
    second newer; its id."""
    packer = Packer(att, 1)
    mout = ManifestOut(att, packer)
    mout.write(manifest)
    mout.finish()
    packer.flush()
    packer.close()
    d = dict(snap.data, manifest=[b.hex() for b in mout.ids], manifest_bytes=mout.total,
             time_ns=snap.time_ns + 10**9, parent=None)
    return att.save_snapshot(d).id


def _swap_blobs(manifest: bytes, victim: bytes, donor: bytes) -> bytes:
    """The manifest again, ``victim``'s BLOB records replaced by ``donor``'s."""
    events = list(Stream(io.BytesIO(manifest)).events())
    ranges: dict[bytes, list] = {}
    cur = None
    for ev in events:
        if isinstance(ev, EntryEvent):
            cur = ev.entry.path
        elif isinstance(ev, BlobEvent):
            ranges.setdefault(cur, []).append(ev)
    out = io.BytesIO()
    w = Writer(out, None, "forged")
    for ev in events:
        if isinstance(ev, EntryEvent):
            cur = ev.entry.path
            w.entry(ev.entry)
        elif isinstance(ev, StatEvent):
            w.stat(ev.ino, ev.ctime_ns)
        elif isinstance(ev, BlobEvent):
            src = ranges[donor] if cur == victim else None
            if src is None:
                w.blob(ev.offset, ev.length, ev.blob_offset, ev.blob_id)
        elif isinstance(ev, EndEvent):
            if cur == victim:
                for b in ranges[donor]:
                    w.blob(b.offset, b.length, b.blob_offset, b.blob_id)
            w.end()
    w.finish()
    assert fmt.MAGIC in out.getvalue()[:16]
    return out.getvalue()


def test_a_downgraded_config_is_refused(btrfs_dir, tmp_path):
    """A store that serves a config saying "none" for a repository this host
    has used encrypted would get its next backup in the clear (no password
    asked for); the host remembers, and refuses."""
    repo = tmp_path / "repo"
    pw = tmp_path / "pw"
    pw.write_bytes(b"correct horse\n")
    cli("init", "--encrypt", "--password-file", pw, "-r", repo, check_rc=0)
    src = _tree(btrfs_dir / "src")
    cli("backup", "--password-file", pw, "-r", repo, src, check_rc=0)
    cfg = json.loads((repo / "config").read_bytes())
    cfg["encryption"] = "none"
    (repo / "config").write_bytes(json.dumps(cfg).encode())
    before = {p.name for p in repo.rglob("*") if p.is_file()}
    r = cli("backup", "-r", repo, src, check_rc=3)
    assert "encrypted" in r.err and "refused" in r.err, r.err
    assert {p.name for p in repo.rglob("*") if p.is_file()} == before


def test_a_rolled_back_store_is_noticed_and_costs_no_data(btrfs_dir, tmp_path):
    """The store serves an older state: the newest snapshot gone, and the
    index from before a prune (naming a pack the prune deleted).  The host
    says the repository went back; its next backup stores again what the
    replayed index claims is in the gone pack, so its snapshot restores."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "old.bin", 2 * MiB, 11)
    write_random(src / "keep.bin", 2 * MiB, 12)
    cli("backup", "-r", repo, src, check_rc=0)
    old = (src / "old.bin").read_bytes()
    (src / "old.bin").unlink()
    s2 = cli_json("backup", "--json", "-r", repo, src)["snapshot"]
    replay = {p.name: p.read_bytes() for p in (repo / "index").iterdir()}
    cli("forget", "-r", repo, "--keep-last", "1", "--prune", check_rc=0)
    for name, data in replay.items():  # the index of before the prune, served again
        (repo / "index" / name).write_bytes(data)
    (repo / "snapshots" / s2).unlink()  # and the newest snapshot gone
    r = cli("snapshots", "-r", repo)
    assert "rolled back" in r.err, str(r)
    (src / "old.bin").write_bytes(old)  # the file comes back
    r = cli("backup", "--json", "-r", repo, src)
    assert r.returncode in (0, 1) and "not in the store" in r.err, str(r)
    dest = btrfs_dir / "dest"
    r = cli("restore", "-r", repo, r.json()["snapshot"], dest, check_rc=1)
    assert r.err.count("not in the store") == 1, r.err  # said once, and still restored
    assert (dest / "src" / "old.bin").read_bytes() == old


# --- a hostile store against the client: every input bounded, no traceback ----------------

AS_LIMIT = ["prlimit", "--as=4294967296", "--"]  # a client that allocated on a store's word dies


def _plain_repo(tmp_path, btrfs_dir) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = _tree(btrfs_dir / "src")
    cli("backup", "-r", repo, src, check_rc=0)
    return repo, src


@pytest.mark.parametrize("value", ["Infinity", "NaN", "-Infinity"])
def test_a_config_with_infinity_is_refused_in_one_line(tmp_path, btrfs_dir, value):
    repo, _src = _plain_repo(tmp_path, btrfs_dir)
    import re

    cfg = (repo / "config").read_bytes().decode()
    bad = re.sub(r'"grid":\s*\d+', f'"grid": {value}', cfg)
    assert bad != cfg
    (repo / "config").write_bytes(bad.encode())
    r = cli("snapshots", "-r", repo, check_rc=3)
    assert r.err.count("\n") == 1 and "JSON" in r.err, r.err


def _plant_snapshot(repo: Path, payload: bytes) -> str:
    """An unencrypted snapshot object holding ``payload``, under its hash."""
    att = Repository.open(LocalBackend(str(repo)))
    data = att.encode_object(rf.K_SNAPSHOT, payload)
    oid = rf.object_id(data)
    (repo / "snapshots" / oid).write_bytes(data)
    att.close()
    return oid


@pytest.mark.parametrize("how", ["deep", "time", "terabyte", "huge"])
def test_hostile_snapshot_objects_are_passed_over(tmp_path, btrfs_dir, how):
    """Deeply nested JSON, a time past 2262, a manifest said to be a TiB, an
    object of 80 MiB: each named and passed over, under a 4 GiB address
    space, and the sound snapshot still restores."""
    repo, src = _plain_repo(tmp_path, btrfs_dir)
    good = json.loads(Repository.open(LocalBackend(str(repo))).load_object(
        f"snapshots/{next((repo / 'snapshots').iterdir()).name}", rf.K_SNAPSHOT))
    if how == "deep":
        payload = b"[" * 100000 + b"]" * 100000
        oid = _plant_snapshot(repo, payload)
    elif how == "time":
        oid = _plant_snapshot(repo, json.dumps(dict(good, time_ns=10**30)).encode())
    elif how == "terabyte":
        oid = _plant_snapshot(repo, json.dumps(dict(good, manifest_bytes=1 << 40,
                                                    manifest=good["manifest"] * 262144))
                              .encode())
    else:
        junk = os.urandom(80 << 20)
        oid = hashlib.sha256(junk).hexdigest()
        (repo / "snapshots" / oid).write_bytes(junk)
    r = cli("snapshots", "--json", "-r", repo, prefix=AS_LIMIT)
    assert r.returncode in (0, 1) and len(json.loads(r.stdout)) == 1, str(r)
    assert oid[:16] in r.err, r.err
    dest = btrfs_dir / "dest"
    r = cli("restore", "-r", repo, "latest", dest, prefix=AS_LIMIT)
    assert r.returncode in (0, 1), str(r)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))


def test_key_objects_a_store_planted_stop_no_unlocking(tmp_path, btrfs_dir):
    """A key object asking scrypt for 16 GiB, one that is not JSON, one with
    Infinity: each is passed over (not allocated for) and the password
    still opens the repository with its real key."""
    repo = tmp_path / "repo"
    pw = tmp_path / "pw"
    pw.write_bytes(b"pass phrase\n")
    cli("init", "--encrypt", "--password-file", pw, "-r", repo, check_rc=0)
    real = json.loads(next((repo / "keys").iterdir()).read_bytes())
    planted = [json.dumps(dict(real, n=1 << 22, r=32)).encode(), b"\x00not json",
               json.dumps(real).replace('"n": 131072', '"n": Infinity').encode()]
    for i, data in enumerate(planted):
        p = repo / "keys" / hashlib.sha256(data).hexdigest()
        p.write_bytes(data)
        t = time.time() - 3600 * (i + 1)  # older: tried first
        os.utime(p, (t, t))
    src = _tree(btrfs_dir / "src")
    t0 = time.monotonic()
    r = cli("backup", "--password-file", pw, "-r", repo, src, prefix=AS_LIMIT)
    assert r.returncode == 0, str(r)
    assert time.monotonic() - t0 < 60
    (pw).write_bytes(b"wrong\n")
    r = cli("snapshots", "--password-file", pw, "-r", repo, prefix=AS_LIMIT, check_rc=7)
    assert "could not be read" in r.err, r.err


def test_a_server_announcing_a_huge_answer_is_refused(tmp_path):
    """The ssh channel's answer says how many bytes follow; a length beyond
    what was asked for (or negative) is refused before anything is read."""
    fake = tmp_path / "fake-serve"
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import sys, json\n"
        "sys.stdin.readline()\n"
        "print(json.dumps({'ok': True}), flush=True)\n"
        "for line in sys.stdin:\n"
        "    print(json.dumps({'ok': True, 'length': 1 << 40}), flush=True)\n")
    fake.chmod(0o755)
    rsh = f"sh -c {shlex.quote('exec ' + str(fake))} x"
    r = cli("snapshots", "-r", "ssh://localhost/x", "--rsh", rsh, prefix=AS_LIMIT)
    assert r.returncode in (3, 4) and "announced" in r.err, str(r)


def test_the_password_is_not_given_to_ssh_or_rsh(tmp_path, btrfs_dir):
    """CLONEAWARE_PASSWORD (and the password file's name) stay with the
    client: the ssh or --rsh command it starts does not inherit them."""
    root = tmp_path / "srv"
    root.mkdir()
    repo = root / "repo"
    pw = tmp_path / "pw"
    pw.write_bytes(b"secret words\n")
    cli("init", "--encrypt", "--password-file", pw, "-r", repo, check_rc=0)
    seen = tmp_path / "env"
    serve = [*cli_command(), "serve", "--allow", "repo", "--restrict-to-path", str(root)]
    script = f"env > {shlex.quote(str(seen))}; exec {shlex.join(serve)}"
    rsh = f"sh -c {shlex.quote(script)} x"
    env = dict(os.environ, CLONEAWARE_PASSWORD="secret words",
               CLONEAWARE_PASSWORD_FILE=str(pw))
    cli("snapshots", "-r", f"ssh://localhost{repo}", "--rsh", rsh, env=env, check_rc=0)
    got = seen.read_text()
    assert "CLONEAWARE_PASSWORD" not in got and "secret words" not in got, got


def test_archives_and_outputs_are_the_owners_alone(btrfs_dir, tmp_path):
    """An archive holds every file's bytes whatever their modes: backup -o,
    export -o, the sparse form and its manifest, and serve's put are 0600
    whatever the umask."""
    src = _tree(btrfs_dir / "src")
    out = btrfs_dir / "a.caw"
    cli("backup", "-o", out, src, check_rc=0)
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    cli("backup", "-r", repo, src, check_rc=0)
    exp = btrfs_dir / "e.caw"
    cli("export", "-r", repo, "latest", "-o", exp, check_rc=0)
    clone = btrfs_dir / "clone.img"
    clone.write_bytes((src / "a.bin").read_bytes())
    thin = btrfs_dir / "clone.thin"
    cli("backup", "--base", src / "a.bin", "--sparse", "-o", thin, clone, check_rc=0)
    for p in (out, exp, thin):
        assert oct(p.stat().st_mode & 0o777) == oct(0o600), p


# --- anchors under a directory users can write --------------------------------------------

def _anchored(tmp_path, btrfs_dir) -> tuple[Path, Path, Path]:
    """A repository, a tree backed up into it once, and the anchor
    directory at the top of the tree's mount."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = _tree(btrfs_dir / "src")
    s = cli_json("backup", "--json", "-r", repo, src)
    anchors = btrfs_dir.parent / ".cloneaware-anchors"
    assert (anchors / "CLONEAWARE-ANCHORS").is_file() and s["bytes_read"] > 0
    return repo, src, anchors


def _touch(src: Path) -> None:
    """4 KiB of each big file rewritten in place: the rest is proved unchanged
    only by a trusted anchor (a file whose stat did not change is taken from
    the files cache, anchors or not)."""
    for name in ("a.bin", "b.bin"):
        with open(src / name, "r+b") as f:
            f.write(os.urandom(4096))


def test_a_symlinked_marker_disables_the_anchors(tmp_path, btrfs_dir):
    """The marker replaced by a symlink (someone's bait): the directory is
    not taken as ours; the next backup says so once and reads every file."""
    repo, src, anchors = _anchored(tmp_path, btrfs_dir)
    marker = anchors / "CLONEAWARE-ANCHORS"
    text = marker.read_bytes()
    marker.unlink()
    marker.symlink_to("/etc/hostname")
    _touch(src)
    try:
        r = cli("backup", "--json", "-r", repo, src)
        assert r.returncode in (0, 1), str(r)
        assert r.json()["bytes_read"] >= 6 * MiB and "marker" in r.err, str(r)
        assert r.err.count("marker") == 1, r.err
    finally:  # the mount's anchor directory serves the tests after this one
        marker.unlink()
        marker.write_bytes(text)
        marker.chmod(0o600)


def test_a_fifo_for_an_anchor_does_not_hang_the_backup(tmp_path, btrfs_dir):
    """An anchor replaced by a FIFO: opened without blocking, refused as not
    a regular file, its file read again."""
    repo, src, anchors = _anchored(tmp_path, btrfs_dir)
    found = sorted(p for p in anchors.rglob("*") if p.name.isdigit())
    assert found, sorted(anchors.rglob("*"))
    anchor = found[0]
    anchor.unlink()
    os.mkfifo(anchor, 0o400)
    _touch(src)
    r = cli("backup", "--json", "-r", repo, src, timeout=60)
    assert r.returncode in (0, 1), str(r)
    assert r.json()["bytes_read"] >= 3 * MiB, str(r)


def test_anchors_another_user_could_write_are_not_used(tmp_path, btrfs_dir):
    """The anchor directory owned by someone else (a per-user mount, say):
    whatever its ANCHORS record says, nothing of it is trusted, and the
    next backup reads every file (and says why)."""
    repo, src, anchors = _anchored(tmp_path, btrfs_dir)
    (rec,) = anchors.glob("*/*/*/ANCHORS")
    os.chown(anchors, 65534, 65534)
    _touch(src)
    try:
        r = cli("backup", "--json", "-r", repo, src)
        assert r.returncode in (0, 1), str(r)
        assert r.json()["bytes_read"] >= 6 * MiB and "this user's" in r.err, str(r)
    finally:
        os.chown(anchors, 0, 0)
    os.chmod(rec.parent, 0o777)  # a set directory anyone may write into: the same
    _touch(src)
    r = cli("backup", "--json", "-r", repo, src)
    assert r.json()["bytes_read"] >= 6 * MiB, str(r)


def test_a_nested_anchor_directory_is_backed_up(tmp_path, btrfs_dir):
    """A directory named .cloneaware-anchors with a marker, below the top of
    the mount (a user's, say), is a user's data: backed up, not skipped."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = _tree(btrfs_dir / "src")
    hide = src / "home" / ".cloneaware-anchors"
    hide.mkdir(parents=True)
    (hide / "CLONEAWARE-ANCHORS").write_bytes(b"x")
    (hide / "secret.txt").write_bytes(b"not hidden from backups\n")
    cli("backup", "-r", repo, src, check_rc=0)
    names = [e["path"] for e in cli_json("ls", "--json", "-r", repo, "latest")["entries"]]
    assert "src/home/.cloneaware-anchors/secret.txt" in names, names


def test_a_lost_state_costs_a_full_read_and_the_owner_can_name_the_parent(
        tmp_path, btrfs_dir, monkeypatch):
    """Without its memory of the repository (a new state directory), a host
    trusts no snapshot as its parent: the next backup reads every file and
    says why; with backup --parent the owner names it, and the files that
    did not change are not read."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = _tree(btrfs_dir / "src")
    cli("backup", "-r", repo, src, check_rc=0)
    monkeypatch.setenv("CLONEAWARE_STATE_DIR", str(tmp_path / "fresh"))
    r = cli("backup", "--json", "-r", repo, src)
    assert r.returncode in (0, 1) and r.json()["bytes_read"] >= 6 * MiB, str(r)
    assert "no record of writing" in r.err, r.err
    s2 = r.json()["snapshot"]  # its anchors are the set's now
    monkeypatch.setenv("CLONEAWARE_STATE_DIR", str(tmp_path / "fresher"))
    r = cli("backup", "--json", "-r", repo, "--parent", s2[:8], src)
    assert r.returncode == 0 and r.json()["bytes_read"] == 0, str(r)


@pytest.mark.parametrize("how", ["not_ids", "missing", "short", "beside_manifest"])
def test_a_hostile_manifest_list_is_refused_in_one_line(tmp_path, btrfs_dir, how):
    """A snapshot whose manifest's blob list (docs/REPOSITORY.md, "Manifest
    blobs") names a blob that is not a list of ids, a blob the repository
    lacks, too few pieces for its manifest, or comes beside a manifest of
    its own: restoring it fails with one line, check says so, and the sound
    snapshot still restores."""
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    src = btrfs_dir / "src"
    src.mkdir()
    for i in range(1500):  # a manifest of several pieces, so named by a list
        (src / f"f{i:04d}").write_bytes(b"%d\n" % i)
    cli("backup", "-r", repo, src, check_rc=0)
    att = Repository.open(LocalBackend(str(repo)))
    name = next((repo / "snapshots").iterdir()).name
    good = json.loads(att.load_object(f"snapshots/{name}", rf.K_SNAPSHOT))
    assert good["manifest"] == [] and good["manifest_list"], good
    pieces = att.manifest_ids(att.find(name[:8]))
    assert len(pieces) > 1
    att.close()
    if how == "not_ids":  # a manifest piece, whose length is no multiple of 32
        bad = dict(good, manifest_list=[pieces[0].hex()])
    elif how == "missing":
        bad = dict(good, manifest_list=["ab" * 32])
    elif how == "short":  # the list of a far smaller manifest
        bad = dict(good, manifest_bytes=good["manifest_bytes"] * 1000)
    else:
        bad = dict(good, manifest=[pieces[0].hex()])
    oid = _plant_snapshot(repo, json.dumps(bad).encode())
    r = cli("restore", "-r", repo, oid[:12], btrfs_dir / "bad")
    # one line (a snapshot object refused whole is also said as passed over)
    assert r.returncode != 0 and r.err.count("\n") == (2 if how == "beside_manifest" else 1) \
        and all(ln.startswith("cloneaware: ") for ln in r.err.splitlines()), str(r)
    assert not (btrfs_dir / "bad" / "src").exists()
    r = cli("check", "-r", repo)
    assert r.returncode != 0 and oid[:8] in r.out + r.err and "Traceback" not in r.err, str(r)
    r = cli("restore", "-r", repo, name[:12], btrfs_dir / "dest")
    assert r.returncode in (0, 1), str(r)  # 1: a snapshot object was passed over
    assert_same_tree(Snapshot(src, atime=False), Snapshot(btrfs_dir / "dest" / "src"))
