"""A repository (docs/REPOSITORY.md): its config and the key that opened
it, objects, blobs, the blob index, snapshots, and the locks taken on it.
Everything above it (the backup sink, restore, forget, prune, check) goes
through this class; it goes through a backend (repo/backend.py) and never
touches storage itself.  The parts with a life of their own are modules
beside it: the index in memory (blobindex.py), locks (lock.py), packs being
written (packer.py), choosing snapshots (snapshots.py), passwords and keys
(keys.py).
"""
from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Protocol

import zstandard

from cloneaware.errors import LockLost, RepositoryError, UsageError, WrongPassword
from cloneaware.repo import crypto
from cloneaware.repo import format as rf
from cloneaware.repo import snapshots as sn
from cloneaware.repo.backend import Backend, pack_name
from cloneaware.repo.blobindex import BlobIndex
from cloneaware.repo.lock import Lock, Timings
from cloneaware.repo.snapshots import Snapshot, now_rfc3339


class PasswordSource(Protocol):
    """Where the password comes from (keys.Password): ``given`` says one was
    set at all (so that an unencrypted repository refuses it)."""

    given: bool

    def __call__(self, prompt: str) -> bytes: ...


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
        self._locks: list[Lock] = []

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
    def open(cls, backend: Backend, password: PasswordSource | None = None) -> Repository:
        """The repository in ``backend``; ``password`` (keys.Password) opens
        it if it is encrypted: None is no password."""
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
            raise UsageError(f"{backend.where}: the repository is encrypted: give its password")
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

        self.check_lock()
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
        """A snapshot by id, unique id prefix, or 'latest' (snapshots.find)."""
        return sn.find(self.snapshots() if snaps is None else snaps, spec, host, self.where)

    def save_snapshot(self, data: dict) -> Snapshot:
        rf.check_snapshot(data, "new snapshot")
        self.check_lock()
        sid = self.save_object(rf.K_SNAPSHOT, rf.encode_json(data), "snapshots")
        self.backend.sync()
        return Snapshot(sid, data)

    def delete_snapshot(self, snap: Snapshot) -> None:
        self.backend.delete(f"snapshots/{snap.id}")

    def find_all(self, specs: list[str], snaps: list[Snapshot] | None = None) -> list[Snapshot]:
        """The snapshots ``specs`` name, each chosen as ``find`` chooses it
        and listed once, in the order first named (``restore -r``)."""
        snaps = self.snapshots() if snaps is None else snaps
        chosen: list[Snapshot] = []
        for spec in specs:
            s = self.find(spec, snaps)
            if s not in chosen:
                chosen.append(s)
        return chosen

    def manifest(self, snap: Snapshot) -> bytes:
        """The snapshot's manifest (an archive of docs/FORMAT.md version 3)."""
        parts = [self.read_blob(b) for b in snap.manifest]
        data = b"".join(parts)
        if len(data) != snap.data["manifest_bytes"]:
            raise RepositoryError(f"{self.where}: snapshot {snap.short_id}: its manifest has "
                                  f"{len(data)} bytes, not {snap.data['manifest_bytes']}")
        return data

    # -- locks -----------------------------------------------------------------------------

    def lock(self, exclusive: bool, operation: str,
             on_lost: Callable[[LockLost], None] | None = None,
             warn: Callable[[str], None] | None = None,
             timings: Timings | None = None) -> Lock:
        """A lock to hold while ``operation`` runs (lock.py); ``check_lock``
        then raises once it is lost."""
        lk = Lock(self, exclusive, operation, on_lost, warn, timings)
        self._locks.append(lk)
        return lk

    def check_lock(self) -> None:
        """Raise LockLost if a lock taken here was lost: before a pack, an
        index or a snapshot is written, or anything deleted."""
        for lk in self._locks:
            lk.check()

    def close(self) -> None:
        self.backend.close()
