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

from cloneaware.errors import LockLost, RepositoryError, UsageError
from cloneaware.repo import crypto
from cloneaware.repo import format as rf
from cloneaware.repo import snapshots as sn
from cloneaware.repo.backend import Backend, pack_name
from cloneaware.repo.blobindex import BlobIndex, load_into, write
from cloneaware.repo.blobread import read_blobs
from cloneaware.repo.lock import Lock, Timings
from cloneaware.repo.snapshots import Snapshot, now_rfc3339
from cloneaware.repo.state import ClientState


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
        self.location: str = getattr(backend, "location", backend.where)
        self.config = config
        self.crypto = keys
        self.key_name = key_name
        self.index = BlobIndex()
        self._index_loaded = False
        self._locks: list[Lock] = []
        #: the snapshot objects the last snapshots() passed over: id -> why
        self.damaged: dict[str, str] = {}
        #: what this host remembers of the repository (set by open)
        self.state: ClientState | None = None
        #: says what was passed over: an object that does not decode (named),
        #: index records for packs that are gone; the command goes on with
        #: what is sound (the CLI sets it to print a line each)
        self.warn: Callable[[str], None] = lambda msg: None

    # -- opening -------------------------------------------------------------------

    @classmethod
    def init(cls, backend: Backend, password: bytes | None = None,
             grid: int = rf.GRID_DEFAULT, pack_size: int = rf.PACK_SIZE_DEFAULT,
             kdf_n: int = crypto.KDF_N, lock: tuple[int, str] | None = None) -> Repository:
        """``lock``: S3 Object Lock (days, mode) on every object but locks."""
        if lock is not None and not hasattr(backend, "set_object_lock"):
            raise UsageError(f"{backend.where}: Object Lock is for s3:// repositories (a "
                             "local or ssh:// store cannot keep its owner from deleting)")
        if not backend.is_empty():
            raise UsageError(f"{backend.where}: not empty; a repository is made in an empty "
                             "directory (or bucket prefix)")
        cfg = rf.Config(id=secrets.token_hex(32), created=now_rfc3339(), grid=grid,
                        pack_size=pack_size,
                        encryption="aes-256-gcm" if password is not None else "none",
                        lock_days=lock[0] if lock else 0, lock_mode=lock[1] if lock else "")
        rf.Config.decode(cfg.encode(), backend.where)  # its own checks on grid and sizes
        if lock is not None:
            backend.set_object_lock(*lock)  # type: ignore[attr-defined]
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
        state = ClientState(cfg.id)
        state.note_encryption(password is not None)
        state.save()
        return cls(backend, cfg, keys, key_name)

    @classmethod
    def open(cls, backend: Backend, password: PasswordSource | None = None,
             warn: Callable[[str], None] | None = None) -> Repository:
        """The repository in ``backend``; ``password`` (keys.Password) opens
        it if it is encrypted: None is no password.  A repository this host
        has used encrypted is refused if its config now says it is not (the
        config cannot be sealed: it says whether anything is; repo/state.py
        remembers instead)."""
        try:
            raw = backend.read("config", limit=rf.CONFIG_MAX)
        except RepositoryError as e:
            if "more than any such object" in str(e):
                raise
            # the wrong -r (an empty directory, another tool's): a usage matter
            raise UsageError(f"{backend.where}: not a cloneaware repository (no config; "
                             "make one with cloneaware init)") from None
        cfg = rf.Config.decode(raw, backend.where)
        if cfg.lock_days:
            if hasattr(backend, "set_object_lock"):
                backend.set_object_lock(cfg.lock_days, cfg.lock_mode)
            elif warn is not None:  # a copy of its bucket, read for a restore, say
                warn(f"{backend.where}: a repository made with S3 Object Lock, here where "
                     "nothing keeps what is written from being deleted")
        state = ClientState(cfg.id, warn, location=getattr(backend, "location", None))
        if state.encrypted and cfg.encryption == "none":
            raise RepositoryError(
                f"{backend.where}: this host has used this repository encrypted, and its "
                "config now says it is not: refused, so that nothing is read or written in "
                "the clear (a store can rewrite the config; if you made a new repository "
                f"with the same id on purpose, remove {state.path})")
        if state.encrypted is None:
            state.note_encryption(cfg.encryption != "none")
            state.save()
        repo = cls._open(backend, cfg, password)
        repo.state = state
        return repo

    @classmethod
    def _open(cls, backend: Backend, cfg: rf.Config, password: PasswordSource | None
              ) -> Repository:
        if cfg.encryption == "none":
            if password is not None and password.given:  # a usage matter, not damage
                raise UsageError(f"{backend.where}: this repository is not encrypted, but a "
                                 "password was given; refusing to use it (if you made it "
                                 "unencrypted, give no password)")
            return cls(backend, cfg, crypto.Plain())
        if password is None:
            raise UsageError(f"{backend.where}: the repository is encrypted: give its password")
        master, name = crypto.unlock(backend, cfg.id,
                                     password(f"password for {backend.where}: "))
        return cls(backend, cfg, crypto.Sealed(master), name)

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
        data = self.backend.read(name, limit=rf.OBJECT_MAX + 1024)
        what = f"{self.where}: {name}"
        oid = name.rpartition("/")[2]
        if kind != rf.K_LOCK and rf.object_id(data) != oid:
            raise RepositoryError(f"{what}: its contents do not match its name (damaged)")
        return self.decode_object(data, kind, what)

    # -- the index -----------------------------------------------------------------------

    def load_index(self, check_packs: bool = False) -> BlobIndex:
        """Load the index objects not loaded yet (blobindex.load_into)."""
        load_into(self, check_packs)
        self._index_loaded = True
        return self.index

    def write_index(self, packs: list[rf.IndexPack]) -> list[str]:
        """Index objects for ``packs`` (already durable): blobindex.write."""
        self.check_lock()
        return write(self, packs)

    # -- blobs ---------------------------------------------------------------------------

    def encode_blob(self, btype: int, bid: bytes, data, zstd: zstandard.ZstdCompressor | None,
                    compressed: bytes | None = None) -> bytes:
        """The stored form of a blob: codec | payload, sealed (on a worker).
        ``compressed``: the zstd frame of ``data``, made already."""
        payload = None
        if len(data) > 64:
            z = compressed if compressed is not None or zstd is None else zstd.compress(data)
            if z is not None and len(z) < len(data):
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

    def read_blob(self, bid: bytes, skip: rf.IndexEntry | None = None) -> bytes:
        """A blob's bytes from the first of its locations that decodes to
        them (``skip``: one already found wanting)."""
        if not self._index_loaded:
            self.load_index()
        locs = [e for e in self.index.locations(bid) if e != skip]
        if not locs:
            if skip is not None:
                raise RepositoryError(f"{self.where}: blob {bid.hex()[:16]} in pack "
                                      f"{skip.pack.hex()[:16]} does not decode, and no index "
                                      "lists another copy (run cloneaware check)")
            raise RepositoryError(f"{self.where}: blob {bid.hex()} is in no index "
                                  "(the repository is damaged; run cloneaware check)")
        first: RepositoryError | None = None
        for entry in locs:  # the first that decodes; the first error if none does
            pid = entry.pack.hex()
            what = f"{self.where}: blob {bid.hex()[:16]} in pack {pid[:16]}"
            try:
                stored = self.backend.read(pack_name(pid), entry.offset, entry.stored_length)
                return self.decode_blob(bid, entry, stored, what)
            except RepositoryError as e:
                first = first or e
                if len(locs) > 1:
                    self.warn(f"{e}; trying another copy")
        assert first is not None
        raise first

    # -- snapshots -------------------------------------------------------------------------

    def snapshots(self, problems: list[str] | None = None) -> list[Snapshot]:
        """Every snapshot that decodes, oldest first.  One that does not (a
        damaged object, or junk a store or an append-only client put there)
        is passed over, never stopping the command: said through ``warn``,
        or added to ``problems``."""
        out = []
        self.damaged = {}
        for obj in self.backend.listing("snapshots"):
            what = f"{self.where}: {obj.name}"
            try:
                d = rf.check_snapshot(rf.decode_json(self.load_object(obj.name, rf.K_SNAPSHOT),
                                                     what), what)
            except RepositoryError as e:
                self.damaged[obj.name.rpartition("/")[2]] = str(e)
                if problems is not None:
                    problems.append(str(e))
                else:
                    self.warn(f"{e}; that snapshot object is passed over")
                continue
            out.append(Snapshot(obj.name.rpartition("/")[2], d))
        out.sort(key=lambda s: (s.time_ns, s.id))
        if self.state is not None:
            self.state.went_back(out, self.where, self.warn)
        return out

    def find(self, spec: str, snaps: list[Snapshot] | None = None,
             host: str | None = None, filt: sn.Filter | None = None) -> Snapshot:
        """A snapshot by id, unique id prefix, or 'latest', among those
        ``filt`` leaves (snapshots.find).  Where none is found and a snapshot
        object that does not decode could have been it, that is the error
        (the repository is damaged)."""
        try:
            return sn.find(self.snapshots() if snaps is None else snaps, spec, host,
                           self.where, filt)
        except UsageError:
            near = [sid for sid in self.damaged if spec == "latest" or sid.startswith(spec)]
            if near:
                raise RepositoryError(f"{self.damaged[near[0]]} (no snapshot that decodes "
                                      f"answers {spec!r})") from None
            raise

    def save_snapshot(self, data: dict) -> Snapshot:
        rf.check_snapshot(data, "new snapshot")
        self.check_lock()
        sid = self.save_object(rf.K_SNAPSHOT, rf.encode_json(data), "snapshots")
        self.backend.sync()
        return Snapshot(sid, data)

    def delete_snapshot(self, snap: Snapshot) -> None:
        self.backend.delete(f"snapshots/{snap.id}")

    def find_all(self, specs: list[str], snaps: list[Snapshot] | None = None,
                 filt: sn.Filter | None = None) -> list[Snapshot]:
        """The snapshots ``specs`` name, each chosen as ``find`` chooses it
        and listed once, in the order first named (``restore -r``)."""
        snaps = self.snapshots() if snaps is None else snaps
        chosen: list[Snapshot] = []
        for spec in specs:
            s = self.find(spec, snaps, filt=filt)
            if s not in chosen:
                chosen.append(s)
        return chosen

    def read_blobs(self, ids: list[bytes]) -> list[bytes]:
        """The bytes of each blob of ``ids``, in order, the blobs near each
        other in a pack read in one ranged read (repo/blobread.py)."""
        if not self._index_loaded:
            self.load_index()
        return read_blobs(self, ids)

    def manifest_ids(self, snap: Snapshot) -> list[bytes]:
        """The ids of the snapshot's manifest blobs, from its blob list if it
        has one (docs/REPOSITORY.md, "Manifest blobs")."""
        if not snap.manifest_list:
            return snap.manifest
        raw = b"".join(self.read_blobs(snap.manifest_list))
        n, rest = divmod(len(raw), 32)
        if rest or n * rf.BLOB_MAX < snap.data["manifest_bytes"] or \
                n > snap.data["manifest_bytes"] + 1:
            raise RepositoryError(f"{self.where}: snapshot {snap.short_id}: its manifest's "
                                  "blob list does not fit its manifest")
        return [raw[i:i + 32] for i in range(0, len(raw), 32)]

    def manifest(self, snap: Snapshot) -> bytes:
        """The snapshot's manifest (an archive of docs/FORMAT.md version 3)."""
        data = b"".join(self.read_blobs(self.manifest_ids(snap)))
        if len(data) != snap.data["manifest_bytes"]:
            raise RepositoryError(f"{self.where}: snapshot {snap.short_id}: its manifest has "
                                  f"{len(data)} bytes, not {snap.data['manifest_bytes']}")
        return data

    # -- locks -----------------------------------------------------------------------------

    def lock(self, exclusive: bool, operation: str,
             on_lost: Callable[[LockLost], None] | None = None,
             warn: Callable[[str], None] | None = None,
             timings: Timings | None = None, retry: float = 0.0) -> Lock:
        """A lock to hold while ``operation`` runs (lock.py), waited for up to
        ``retry`` seconds; ``check_lock`` then raises once it is lost."""
        lk = Lock(self, exclusive, operation, on_lost, warn, timings, retry)
        self._locks.append(lk)
        return lk

    def check_lock(self) -> None:
        """Raise LockLost if a lock taken here was lost: before a pack, an
        index or a snapshot is written, or anything deleted."""
        for lk in self._locks:
            lk.check()

    def close(self) -> None:
        self.backend.close()
