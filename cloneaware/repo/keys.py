"""Passwords of an encrypted repository: where the one that opens it comes
from (``Password``), and ``cloneaware key``: each password is a key object
wrapping the same master key (docs/REPOSITORY.md, "Keys and encryption")."""
from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass

from cloneaware.errors import UsageError
from cloneaware.repo import crypto
from cloneaware.repo.format import decode_json
from cloneaware.repo.repository import Repository


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


def new_password(file: str | None) -> bytes:
    """The new password: from ``file``, else from a prompt (twice)."""
    if file is not None:
        return Password(file)("")
    p = Password(confirm=True)
    p.file, p.env = None, None
    return p("new password: ")


@dataclass
class KeyInfo:
    """A key object as ``key list`` shows it (its informational fields)."""

    name: str  # keys/<id>
    created: str
    username: str
    hostname: str
    n: int | None  # scrypt's N
    current: bool  # the key the password given opened

    @property
    def short_id(self) -> str:
        return self.name[5:13]


def require_encrypted(repo: Repository) -> None:
    """Refuse a repository that is not encrypted: it has no key objects
    (every function below calls this first)."""
    if not repo.crypto.encrypted:
        raise UsageError(f"{repo.where}: not encrypted: it has no keys")


def key_list(repo: Repository) -> list[KeyInfo]:
    """Every key object, oldest first."""
    require_encrypted(repo)
    out = []
    for k in sorted(repo.backend.listing("keys"), key=lambda k: k.mtime):
        d = decode_json(repo.backend.read(k.name), k.name)
        out.append(KeyInfo(k.name, d.get("created", "?"), d.get("username", "?"),
                           d.get("hostname", "?"), d.get("n"), k.name == repo.key_name))
    return out


def add(repo: Repository, password: bytes, kdf_n: int = crypto.KDF_N) -> str:
    require_encrypted(repo)
    assert isinstance(repo.crypto, crypto.Sealed)
    master = repo.crypto.enc_key + repo.crypto.id_key
    name = f"keys/{secrets.token_hex(32)}"
    repo.backend.write(name, crypto.make_key(master, repo.config.id, password, n=kdf_n),
                       create_only=True)
    repo.backend.sync()
    return name


def remove(repo: Repository, prefix: str) -> str:
    require_encrypted(repo)
    keys = [k.name for k in repo.backend.listing("keys")]
    found = [k for k in keys if k[5:].startswith(prefix)] if prefix else []
    if len(found) != 1:
        raise UsageError(f"{prefix!r} names {len(found)} keys; give a unique prefix of a key "
                         "id (cloneaware key list)")
    if found[0] == repo.key_name:
        raise UsageError("that is the key this password opened; remove it with another "
                         "password, or use cloneaware key passwd")
    if len(keys) == 1:
        raise UsageError("the last key cannot be removed")
    repo.backend.delete(found[0])
    repo.backend.sync()
    return found[0]


def passwd(repo: Repository, password: bytes, kdf_n: int = crypto.KDF_N) -> str:
    name = add(repo, password, kdf_n)
    if repo.key_name is not None:
        repo.backend.delete(repo.key_name)
        repo.backend.sync()
    return name
