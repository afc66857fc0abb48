"""Snapshots as the commands see them: one object of ``snapshots/``
(docs/REPOSITORY.md, "Snapshots") with its id, and the choice of one by
what a user types (an id, a unique prefix of one, or ``latest``, for a host
or any).  Choosing is a function over a list, so that it is tested without
a repository, and so that a command choosing several snapshots lists them
once."""
from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass

from cloneaware.errors import UsageError


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
        """The manifest's blob ids when the snapshot names them itself
        (else empty: Repository.manifest_ids reads them from its list)."""
        return [bytes.fromhex(m) for m in self.data["manifest"]]

    @property
    def manifest_list(self) -> list[bytes]:
        """The blobs of the manifest's blob list, if it has one."""
        return [bytes.fromhex(m) for m in self.data.get("manifest_list") or []]

    @property
    def content_key(self) -> str:
        """What the snapshot holds, apart from its tags: its manifest (named
        by blob ids, which name content), time, host and PATHs.  ``tag``
        gives a snapshot a new id and keeps this: a host that wrote it
        knows it again by it (repo/parent.py)."""
        d = self.data
        key = [d["manifest"], d.get("manifest_list") or [], d["manifest_bytes"],
               d["time_ns"], d["hostname"], sorted(d["paths"])]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def to_json(self) -> dict:
        d = {k: self.data[k] for k in ("time", "hostname", "username", "paths", "tags",
                                       "parent", "program", "summary", "manifest_bytes")}
        return {"id": self.id, "short_id": self.short_id, **d}


def of_host(snaps: list[Snapshot], host: str | None) -> list[Snapshot]:
    """The snapshots of ``host`` (all of them for None), in their order."""
    return list(snaps) if host is None else [s for s in snaps if s.hostname == host]


@dataclass(frozen=True)
class Filter:
    """Which snapshots a command chooses among (``--host``, ``--path``,
    ``--tag``, as restic's): of ``host``; whose PATHs include every one of
    ``paths``; holding every tag of at least one of ``tags`` (each a set:
    ``--tag a,b`` asks for both, ``--tag a --tag b`` for either)."""

    host: str | None = None
    paths: tuple[str, ...] = ()
    tags: tuple[frozenset[str], ...] = ()

    @classmethod
    def of(cls, host: str | None = None, paths: list[str] | None = None,
           tags: list[str] | None = None) -> Filter:
        """From the command line: ``paths`` as given (a trailing / dropped),
        ``tags`` each a comma-separated list."""
        return cls(host, tuple(p.rstrip("/") or "/" for p in paths or ()),
                   tuple(frozenset(t for t in spec.split(",") if t) for spec in tags or ()))

    def __bool__(self) -> bool:
        return self.host is not None or bool(self.paths) or bool(self.tags)

    def match(self, s: Snapshot) -> bool:
        if self.host is not None and s.hostname != self.host:
            return False
        if self.paths and not set(self.paths) <= {p.rstrip("/") or "/" for p in s.paths}:
            return False
        return not self.tags or any(t <= set(s.tags) for t in self.tags)

    def apply(self, snaps: list[Snapshot]) -> list[Snapshot]:
        return [s for s in snaps if self.match(s)]

    def __str__(self) -> str:
        out = [f"host {self.host}"] if self.host is not None else []
        out += [f"path {p}" for p in self.paths]
        out += ["tag " + ",".join(sorted(t)) for t in self.tags]
        return ", ".join(out)


def find(snaps: list[Snapshot], spec: str, host: str | None = None,
         where: str = "the repository", filt: Filter | None = None) -> Snapshot:
    """The snapshot ``spec`` names among ``snaps`` (oldest first) that
    ``filt`` (and ``host``) leave: 'latest' (the last one), a whole id, or a
    prefix of exactly one id.  ``where`` names the repository in the
    errors."""
    filt = filt or Filter()
    if host is not None:
        filt = Filter(host, filt.paths, filt.tags)
    snaps = filt.apply(snaps)
    among = f" ({filt})" if filt else ""
    if spec == "latest":
        if not snaps:
            raise UsageError(f"{where}: no snapshot yet{among}" if filt else
                             f"{where}: no snapshot yet")
        return snaps[-1]
    if not spec or any(c not in "0123456789abcdef" for c in spec):
        raise UsageError(f"{spec!r} is not a snapshot id (hex digits, or 'latest')")
    found = [s for s in snaps if s.id.startswith(spec)]
    if not found:
        raise UsageError(f"{where}: no snapshot {spec}{among}")
    if len(found) > 1:
        raise UsageError(f"{where}: {spec} names {len(found)} snapshots; give more digits")
    return found[0]


def chosen(s: Snapshot) -> str:
    """What a command says of the snapshot 'latest' chose."""
    return (f"latest is {s.short_id} ({s.data['time'][:19]}, host {s.hostname}, "
            f"{', '.join(s.paths)}" + (f", tags {','.join(s.tags)}" if s.tags else "") + ")")
