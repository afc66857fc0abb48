"""A repository (docs/REPOSITORY.md): config and keys, objects, the blob
index, packs being written, snapshots, locks.  Everything above it (the
backup sink, restore, forget, prune, check) goes through this class; it
goes through a backend (repo/backend.py) and never touches storage itself.
"""
from __future__ import annotations

import datetime
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from cloneaware.errors import RepositoryError, RepositoryLocked, UsageError, WrongPassword
from cloneaware.repo import crypto
from cloneaware.repo import format as rf
from cloneaware.repo.backend import Backend, pack_name
from cloneaware.safeio import pid_alive

STALE_AFTER = 30 * 60  # seconds: a lock of another host older than this is stale
REFRESH_EVERY = 5 * 60
INDEX_EVERY = 8  # packs per index object while a backup runs


def now_rfc3339(ns: int | None = None) -> str:
    ns = time.time_ns() if ns is None else ns
    dt = datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


@dataclass
class Snapshot:
    id: str
    data: dict

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def time_ns(self) -> int:
        return int(self.data["time_ns"])

    @property
    def hostname(self) -> str:
        return self.data["hostname"]

    @property
    def paths(self) -> list[str]:
        return self.data["paths"]

    @property
    def tags(self) -> list[str]:
        return self.data["tags"]

    @property
    def manifest(self) -> list[bytes]:
        return [bytes.fromhex(m) for m in self.data["manifest"]]

    def to_json(self) -> dict:
        d = {k: self.data[k] for k in ("time", "hostname", "username", "paths", "tags",
                                       "parent", "program", "summary")}
        return {"id": self.id, "short_id": self.short_id, **d}


class BlobIndex:
    """blob id -> where a copy of it is (the first one listed wins)."""

    def __init__(self) -> None:
        self.blobs: dict[bytes, rf.IndexEntry] = {}
        self.packs: set[bytes] = set()
        self.loaded: set[str] = set()  # index object names
        self.duplicates = 0

    def add(self, pack: rf.IndexPack) -> None:
        self.packs.add(pack.id)
        for bid, t, off, stored, raw in pack.blobs:
            if bid in self.blobs:
                self.duplicates += 1
                continue
            self.blobs[bid] = rf.IndexEntry(pack.id, t, off, stored, raw)

    def get(self, bid: bytes) -> rf.IndexEntry | None:
        return self.blobs.get(bid)

    def __contains__(self, bid: bytes) -> bool:
        return bid in self.blobs


class Password:
    """Where a password comes from: ``--password-file FILE``, else
    CLONEAWARE_PASSWORD_FILE, else CLONEAWARE_PASSWORD, else a prompt when
    standard input is a terminal; never the command line.  ``given``: one of
    the first three was set (so an unencrypted repository is refused)."""

    def __init__(self, file: str | None = None, confirm: bool = False):
        self.file = file or os.environ.get("CLONEAWARE_PASSWORD_FILE")
        self.env = os.environ.get("CLONEAWARE_PASSWORD")
        self.given = bool(self.file) or self.env is not None
        self.confirm = confirm

    def __call__(self, prompt: str) -> bytes:
        if self.file:
            try:
                with open(self.file, "rb") as f:
                    pw = f.read(1 << 16).split(b"\n", 1)[0]
            except OSError as e:
                raise UsageError(f"password file {self.file}: {e.strerror}") from None
        elif self.env is not None:
            pw = os.fsencode(self.env)
        elif sys.stdin.isatty():
            import getpass  # only when a person is there to type

            pw = getpass.getpass(prompt).encode()
            if self.confirm and getpass.getpass("again: ").encode() != pw:
                raise UsageError("the passwords differ")
        else:
            raise UsageError("the repository is encrypted: give its password with "
                             "--password-file FILE, CLONEAWARE_PASSWORD_FILE or "
                             "CLONEAWARE_PASSWORD")
        if not pw:
            raise UsageError("empty password")
        return pw


class Repository:
    def __init__(self, backend: Backend, config: rf.Config, keys: crypto.Crypto,
                 key_name: str | None = None):
        self.backend = backend
        self.where = backend.where
        self.config = config
        self.crypto = keys
        self.key_name = key_name
        self.index = BlobIndex()
        self._index_loaded = False

    # -- opening -------------------------------------------------------------------

    @classmethod
    def init(cls, backend: Backend, password: bytes | None = None,
             grid: int = rf.GRID_DEFAULT, pack_size: int = rf.PACK_SIZE_DEFAULT,
             kdf_n: int = crypto.KDF_N) -> Repository:
        if not backend.is_empty():
            raise UsageError(f"{backend.where}: not empty; a repository is made in an empty "
                             "directory (or bucket prefix)")
        cfg = rf.Config(id=secrets.token_hex(32), created=now_rfc3339(), grid=grid,
                        pack_size=pack_size,
                        encryption="aes-256-gcm" if password is not None else "none")
        rf.Config.decode(cfg.encode(), backend.where)  # its own checks on grid and sizes
        backend.create()
        keys: crypto.Crypto = crypto.Plain()
        key_name = None
        if password is not None:
            master = crypto.new_master()
            key_name = f"keys/{secrets.token_hex(32)}"
            backend.write(key_name, crypto.make_key(master, cfg.id, password, n=kdf_n),
                          create_only=True)
            keys = crypto.Sealed(master)
        try:
            backend.write("config", cfg.encode(), create_only=True)
        except FileExistsError:
            raise UsageError(f"{backend.where}: a repository exists here already") from None
        backend.sync()
        return cls(backend, cfg, keys, key_name)

    @classmethod
    def open(cls, backend: Backend, password: Password | None = None) -> Repository:
        try:
            raw = backend.read("config")
        except RepositoryError:
            raise RepositoryError(f"{backend.where}: not a cloneaware repository (no config; "
                                  "make one with cloneaware init)") from None
        cfg = rf.Config.decode(raw, backend.where)
        if cfg.encryption == "none":
            if password is not None and password.given:
                raise RepositoryError(f"{backend.where}: this repository is not encrypted, but "
                                      "a password was given; refusing to use it (if you made it "
                                      "unencrypted, give no password)")
            return cls(backend, cfg, crypto.Plain())
        if password is None:
            password = Password()
        master, name = cls._unlock(backend, cfg, password(f"password for {backend.where}: "))
        return cls(backend, cfg, crypto.Sealed(master), name)

    @staticmethod
    def _unlock(backend: Backend, cfg: rf.Config, pw: bytes) -> tuple[bytes, str]:
        keys = backend.listing("keys")
        if not keys:
            raise RepositoryError(f"{backend.where}: encrypted, but it holds no key")
        for k in sorted(keys, key=lambda k: k.mtime):
            master = crypto.unwrap_key(backend.read(k.name), pw, cfg.id,
                                       f"{backend.where}: {k.name}")
            if master is not None:
                return master, k.name
        raise WrongPassword(f"{backend.where}: wrong password (no key opens with it)")

    # -- objects -----------------------------------------------------------------------

    def encode_object(self, kind: int, payload: bytes) -> bytes:
        head = rf.envelope_header(kind)
        return head + self.crypto.seal(rf.encode_body(payload), head)

    def decode_object(self, data: bytes, kind: int, what: str) -> bytes:
        head = rf.check_envelope(data, kind, what)
        body = self.crypto.open(memoryview(data)[rf.ENVELOPE_SIZE:], head, what)
        return rf.decode_body(body, what)

    def save_object(self, kind: int, payload: bytes, directory: str) -> str:
        data = self.encode_object(kind, payload)
        oid = rf.object_id(data)
        self.backend.write(f"{directory}/{oid}", data)
        return oid

    def load_object(self, name: str, kind: int) -> bytes:
        data = self.backend.read(name)
        what = f"{self.where}: {name}"
        if len(data) > rf.OBJECT_MAX + 1024:
            raise RepositoryError(f"{what}: larger than any object can be")
        oid = name.rpartition("/")[2]
        if kind != rf.K_LOCK and rf.object_id(data) != oid:
            raise RepositoryError(f"{what}: its contents do not match its name (damaged)")
        return self.decode_object(data, kind, what)

    # -- the index -----------------------------------------------------------------------

    def load_index(self) -> BlobIndex:
        """Load the index objects not loaded yet (all of them the first time)."""
        for obj in sorted(self.backend.listing("index"), key=lambda o: o.name):
            if obj.name in self.index.loaded:
                continue
            payload = self.load_object(obj.name, rf.K_INDEX)
            for pack in rf.decode_index_payload(payload, f"{self.where}: {obj.name}"):
                self.index.add(pack)
            self.index.loaded.add(obj.name)
        self._index_loaded = True
        return self.index

    def write_index(self, packs: list[rf.IndexPack]) -> list[str]:
        """Index objects for ``packs`` (already durable), split so that each
        stays well under the object limit.  Returns their names."""
        names = []
        per = (rf.OBJECT_MAX // 2) // 48
        batch: list[rf.IndexPack] = []
        count = 0

        def emit() -> None:
            nonlocal batch, count
            if batch:
                oid = self.save_object(rf.K_INDEX, rf.encode_index_payload(batch), "index")
                names.append(f"index/{oid}")
                self.index.loaded.add(f"index/{oid}")
            batch, count = [], 0

        for p in packs:
            if count + len(p.blobs) > per:
                emit()
            batch.append(p)
            count += len(p.blobs)
        emit()
        self.backend.sync()
        return names

    # -- blobs ---------------------------------------------------------------------------

    def encode_blob(self, btype: int, bid: bytes, data, zstd: zstandard.ZstdCompressor | None
                    ) -> bytes:
        """The stored form of a blob: codec | payload, sealed (on a worker)."""
        payload = None
        if zstd is not None and len(data) > 64:
            z = zstd.compress(data)
            if len(z) < len(data):
                payload = bytes((rf.CODEC_ZSTD,)) + z
        if payload is None:
            payload = bytes((rf.CODEC_NONE,)) + bytes(data)
        return self.crypto.seal(payload, bytes((btype,)) + bid)

    def decode_blob(self, bid: bytes, entry: rf.IndexEntry, stored, what: str) -> bytes:
        """A blob's bytes from its stored form, checked against its id."""
        plain = self.crypto.open(stored, bytes((entry.type,)) + bid, what)
        if not plain:
            raise RepositoryError(f"{what}: empty blob")
        data = rf.decode(plain[0], memoryview(plain)[1:], entry.raw_length, what)
        if self.crypto.blob_id(data) != bid:
            raise RepositoryError(f"{what}: its bytes do not match its id (damaged)")
        return data

    def read_blob(self, bid: bytes) -> bytes:
        if not self._index_loaded:
            self.load_index()
        entry = self.index.get(bid)
        if entry is None:
            raise RepositoryError(f"{self.where}: blob {bid.hex()} is in no index "
                                  "(the repository is damaged; run cloneaware check)")
        pid = entry.pack.hex()
        stored = self.backend.read(pack_name(pid), entry.offset, entry.stored_length)
        return self.decode_blob(bid, entry, stored,
                                f"{self.where}: blob {bid.hex()[:16]} in pack {pid[:16]}")

    # -- snapshots -------------------------------------------------------------------------

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest first."""
        out = []
        for obj in self.backend.listing("snapshots"):
            what = f"{self.where}: {obj.name}"
            d = rf.check_snapshot(rf.decode_json(self.load_object(obj.name, rf.K_SNAPSHOT),
                                                 what), what)
            out.append(Snapshot(obj.name.rpartition("/")[2], d))
        out.sort(key=lambda s: (s.time_ns, s.id))
        return out

    def find(self, spec: str, snaps: list[Snapshot] | None = None,
             host: str | None = None) -> Snapshot:
        """A snapshot by id, unique id prefix, or 'latest'."""
        snaps = self.snapshots() if snaps is None else snaps
        if host is not None:
            snaps = [s for s in snaps if s.hostname == host]
        if spec == "latest":
            if not snaps:
                raise UsageError(f"{self.where}: no snapshot yet"
                                 + (f" of host {host}" if host else ""))
            return snaps[-1]
        if not spec or any(c not in "0123456789abcdef" for c in spec):
            raise UsageError(f"{spec!r} is not a snapshot id (hex digits, or 'latest')")
        found = [s for s in snaps if s.id.startswith(spec)]
        if not found:
            raise UsageError(f"{self.where}: no snapshot {spec}")
        if len(found) > 1:
            raise UsageError(f"{self.where}: {spec} names {len(found)} snapshots; give more "
                             "digits")
        return found[0]

    def save_snapshot(self, data: dict) -> Snapshot:
        rf.check_snapshot(data, "new snapshot")
        sid = self.save_object(rf.K_SNAPSHOT, rf.encode_json(data), "snapshots")
        self.backend.sync()
        return Snapshot(sid, data)

    def delete_snapshot(self, snap: Snapshot) -> None:
        self.backend.delete(f"snapshots/{snap.id}")

    def manifest(self, snap: Snapshot) -> bytes:
        """The snapshot's manifest (an archive of docs/FORMAT.md version 3)."""
        parts = [self.read_blob(b) for b in snap.manifest]
        data = b"".join(parts)
        if len(data) != snap.data["manifest_bytes"]:
            raise RepositoryError(f"{self.where}: snapshot {snap.short_id}: its manifest has "
                                  f"{len(data)} bytes, not {snap.data['manifest_bytes']}")
        return data

    # -- locks -----------------------------------------------------------------------------

    def lock(self, exclusive: bool, operation: str) -> Lock:
        return Lock(self, exclusive, operation)

    def close(self) -> None:
        self.backend.close()


class Lock:
    """A lock object, held while a command runs (a context manager)."""

    def __init__(self, repo: Repository, exclusive: bool, operation: str):
        self.repo = repo
        self.exclusive = exclusive
        self.operation = operation
        self.name: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _payload(self) -> bytes:
        ns = time.time_ns()
        return rf.encode_json({"time": now_rfc3339(ns), "time_ns": ns,
                               "hostname": socket.gethostname(), "username": crypto.username(),
                               "pid": os.getpid(), "exclusive": self.exclusive,
                               "operation": self.operation})

    def _write(self) -> str:
        name = f"locks/{secrets.token_hex(32)}"
        self.repo.backend.write(name, self.repo.encode_object(rf.K_LOCK, self._payload()),
                                create_only=True)
        return name

    def __enter__(self) -> Lock:
        self.name = self._write()
        try:
            for other in read_locks(self.repo):
                if other.name == self.name or other.stale:
                    continue
                if self.exclusive or other.exclusive:
                    raise RepositoryLocked(
                        f"{self.repo.where}: locked by {other.describe()}; wait for it, or, if "
                        "that process is gone, run cloneaware unlock")
        except BaseException:
            self.repo.backend.delete(self.name)
            self.name = None
            raise
        self._thread = threading.Thread(target=self._refresh, daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                with self._mutex:
                    if self.name is None:
                        return
                    new = self._write()
                    old, self.name = self.name, new
                self.repo.backend.delete(old)
            except Exception:  # noqa: BLE001 - a failed refresh is retried next time
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self._mutex:
            name, self.name = self.name, None
        if name is not None:
            try:
                self.repo.backend.delete(name)
            except Exception:  # noqa: BLE001 - a lock left behind goes stale
                pass


@dataclass
class LockInfo:
    name: str
    data: dict
    stale: bool

    @property
    def exclusive(self) -> bool:
        return bool(self.data.get("exclusive"))

    def describe(self) -> str:
        age = max(0, (time.time_ns() - int(self.data.get("time_ns", 0))) // 1_000_000_000)
        kind = "an exclusive" if self.exclusive else "a"
        return (f"{kind} lock of {self.data.get('operation')} by {self.data.get('username')}@"
                f"{self.data.get('hostname')} pid {self.data.get('pid')}, {age} s old")


def read_locks(repo: Repository) -> list[LockInfo]:
    """Every lock, each marked stale or live (docs/REPOSITORY.md, "Locks")."""
    out = []
    host = socket.gethostname()
    now = time.time_ns()
    for obj in repo.backend.listing("locks"):
        what = f"{repo.where}: {obj.name}"
        try:
            d = rf.check_lock(rf.decode_json(repo.load_object(obj.name, rf.K_LOCK), what), what)
        except RepositoryError:
            if repo.backend.exists(obj.name):
                raise
            continue  # removed while we listed
        if d["hostname"] == host:
            stale = not pid_alive(d["pid"])
        else:
            stale = now - d["time_ns"] > STALE_AFTER * 1_000_000_000
        out.append(LockInfo(obj.name, d, stale))
    return out


# --- packs --------------------------------------------------------------------------------

class Packer:
    """Gathers stored blobs into packs of about ``pack_size`` bytes, written
    by ``connections`` uploader threads (at most that many packs, plus the
    one being filled, in memory).  Blobs are in the index once ``flush``
    returns (or every INDEX_EVERY packs)."""

    def __init__(self, repo: Repository, connections: int = 2):
        self.repo = repo
        self.pool = ThreadPoolExecutor(max_workers=max(1, connections))
        self.slots = threading.BoundedSemaphore(max(1, connections))
        self.cur: list[bytes] = []
        self.entries: list[rf.PackEntry] = []
        self.size = 0
        self.pending: dict[bytes, int] = {}  # blob id -> type, not yet in the index
        self.inflight: list[Future] = []
        self.done: list[rf.IndexPack] = []  # written, not yet in an index object
        self.packs_written = 0
        self.bytes_written = 0
        self.lock = threading.Lock()

    def known(self, bid: bytes) -> bool:
        return bid in self.repo.index or bid in self.pending

    def add(self, bid: bytes, btype: int, raw_length: int, stored: bytes) -> bool:
        """Add a blob; False if the repository (or this packer) has it."""
        if self.known(bid):
            return False
        self.pending[bid] = btype
        self.cur.append(stored)
        self.entries.append(rf.PackEntry(bid, btype, raw_length, len(stored)))
        self.size += len(stored)
        if self.size >= self.repo.config.pack_size or len(self.entries) >= 100_000:
            self._close_pack()
        return True

    def _close_pack(self) -> None:
        if not self.entries:
            return
        entries, blobs = self.entries, self.cur
        self.cur, self.entries, self.size = [], [], 0
        trailer = self.repo.encode_object(rf.K_TRAILER, rf.encode_trailer_payload(entries))
        parts = [*blobs, trailer, rf.pack_tail(trailer)]
        self._reap()
        self.slots.acquire()
        try:
            self.inflight.append(self.pool.submit(self._upload, entries, parts))
        except BaseException:
            self.slots.release()
            raise

    def _upload(self, entries: list[rf.PackEntry], parts: list[bytes]) -> None:
        try:
            data = b"".join(parts)
            pid = rf.object_id(data)
            self.repo.backend.write(pack_name(pid), data)
            pack = rf.IndexPack(bytes.fromhex(pid))
            off = 0
            for e in entries:
                pack.blobs.append((e.id, e.type, off, e.stored_length, e.raw_length))
                off += e.stored_length
            with self.lock:
                self.done.append(pack)
                self.packs_written += 1
                self.bytes_written += len(data)
        finally:
            self.slots.release()

    def _reap(self) -> None:
        """Raise the first upload error; write an index every INDEX_EVERY packs."""
        still = []
        for f in self.inflight:
            if f.done():
                f.result()
            else:
                still.append(f)
        self.inflight = still
        if len(self.done) >= INDEX_EVERY:
            self._write_index()

    def _write_index(self) -> None:
        with self.lock:
            packs, self.done = self.done, []
        if not packs:
            return
        self.repo.backend.sync()  # the packs' names are durable before an index names them
        self.repo.write_index(packs)
        for p in packs:
            self.repo.index.add(p)
            for b in p.blobs:
                self.pending.pop(b[0], None)

    def flush(self) -> None:
        """Write the last pack, wait for every upload, and index them all."""
        self._close_pack()
        for f in self.inflight:
            f.result()
        self.inflight = []
        self._write_index()

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)


def iter_packs(repo: Repository) -> Iterable[str]:
    return (o.name for o in repo.backend.listing("data"))
