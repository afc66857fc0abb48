"""Keys and sealing of a repository (docs/REPOSITORY.md, "Keys and
encryption").  ``Plain`` for an unencrypted repository; ``Sealed`` for
AES-256-GCM with a key derived by HKDF for every object and blob from a
random salt, blob ids keyed with HMAC-SHA256, and the master key wrapped by
passwords with scrypt.

The primitives are python3-cryptography's (AESGCM, HKDF, Scrypt: Debian
packages it; OpenSSL underneath, and it releases the GIL on large
buffers); hashlib/hmac for SHA-256 and HMAC.  cryptography is imported only
when a repository is encrypted: unencrypted use does not pay for it.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from typing import Protocol

from cloneaware.errors import RepositoryError, UsageError
from cloneaware.repo.format import decode_json, encode_json

SALT, NONCE, TAG = 16, 12, 16
OVERHEAD = SALT + NONCE + TAG
MASTER = 64
SEAL_INFO = b"cloneaware seal 1"
KEY_AAD = b"cloneaware key 1"
KDF_N, KDF_R, KDF_P = 1 << 17, 8, 1
#: scrypt parameters a key file may ask for (bounded: a hostile key file
#: must not make us allocate gigabytes)
KDF_N_MAX, KDF_R_MAX, KDF_P_MAX = 1 << 22, 32, 16
#: the memory scrypt may be asked for by a key object (128 * N * r bytes): a
#: key a store planted cannot make unlocking take 16 GiB
KDF_MEMORY_MAX = 1 << 30
#: a key object is a small JSON object
KEY_OBJECT_MAX = 64 << 10


class Crypto(Protocol):
    encrypted: bool

    def blob_id(self, data) -> bytes: ...
    def seal(self, plaintext, aad: bytes) -> bytes: ...
    def open(self, sealed, aad: bytes, what: str) -> bytes: ...


class Plain:
    """No encryption: blob ids are SHA-256; sealing is the identity."""

    encrypted = False
    overhead = 0

    def blob_id(self, data) -> bytes:
        return hashlib.sha256(data).digest()

    def seal(self, plaintext, aad: bytes) -> bytes:
        return bytes(plaintext)

    def open(self, sealed, aad: bytes, what: str) -> bytes:
        return bytes(sealed)


class Sealed:
    """AES-256-GCM with a key per object (HKDF from a random salt)."""

    encrypted = True
    overhead = OVERHEAD

    def __init__(self, master: bytes):
        # Imported here: only encrypted repositories need cryptography.
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        self._AESGCM, self._HKDF, self._sha256 = AESGCM, HKDF, hashes.SHA256
        self.enc_key, self.id_key = master[:32], master[32:]

    def _key(self, salt: bytes) -> bytes:
        return self._HKDF(algorithm=self._sha256(), length=32, salt=salt,
                          info=SEAL_INFO).derive(self.enc_key)

    def blob_id(self, data) -> bytes:
        return hmac.new(self.id_key, data, hashlib.sha256).digest()

    def seal(self, plaintext, aad: bytes, salt: bytes | None = None,
             nonce: bytes | None = None) -> bytes:
        salt = salt if salt is not None else secrets.token_bytes(SALT)
        nonce = nonce if nonce is not None else secrets.token_bytes(NONCE)
        return salt + nonce + self._AESGCM(self._key(salt)).encrypt(nonce, bytes(plaintext),
                                                                    aad)

    def open(self, sealed, aad: bytes, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(sealed) < OVERHEAD:
            raise RepositoryError(f"{what}: too short to be sealed")
        sealed = bytes(sealed)
        salt, nonce = sealed[:SALT], sealed[SALT:SALT + NONCE]
        try:
            return self._AESGCM(self._key(salt)).decrypt(nonce, sealed[SALT + NONCE:], aad)
        except InvalidTag:
            raise RepositoryError(f"{what}: authentication failed: the data was damaged or "
                                  "tampered with") from None


# --- key objects ------------------------------------------------------------------

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, TypeError):
        raise RepositoryError(f"{what}: bad base64") from None


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)


def new_master() -> bytes:
    return secrets.token_bytes(MASTER)


def make_key(master: bytes, repo_id: str, password: bytes, n: int = KDF_N, r: int = KDF_R,
             p: int = KDF_P) -> bytes:
    """A key object: the master key wrapped by ``password``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if n & (n - 1) or not 1 << 14 <= n <= KDF_N_MAX or 128 * n * r > KDF_MEMORY_MAX:
        raise UsageError(f"scrypt N={n} must be a power of two from 16384 to "
                         f"{KDF_MEMORY_MAX // (128 * r)}")
    salt, nonce = secrets.token_bytes(32), secrets.token_bytes(NONCE)
    wrap = _scrypt(password, salt, n, r, p)
    data = AESGCM(wrap).encrypt(nonce, master + bytes.fromhex(repo_id), KEY_AAD)
    return encode_json({"kdf": "scrypt", "n": n, "r": r, "p": p, "salt": _b64(salt),
                        "nonce": _b64(nonce), "data": _b64(data),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def unwrap_key(obj: bytes, password: bytes, repo_id: str, what: str) -> bytes | None:
    """The master key, if ``password`` opens this key object; None if not."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    d = decode_json(obj, what)
    try:
        n, r, p = int(d["n"]), int(d["r"]), int(d["p"])
        if d.get("kdf") != "scrypt":
            raise RepositoryError(f"{what}: unknown key derivation {d.get('kdf')!r}")
        salt, nonce, data = (_unb64(d[k], what) for k in ("salt", "nonce", "data"))
    except (KeyError, TypeError, ValueError):
        raise RepositoryError(f"{what}: not a key object") from None
    if n & (n - 1) or not 2 <= n <= KDF_N_MAX or not 0 < r <= KDF_R_MAX \
            or not 0 < p <= KDF_P_MAX or len(nonce) != NONCE \
            or 128 * n * r > KDF_MEMORY_MAX:
        raise RepositoryError(f"{what}: key parameters out of bounds (scrypt N={n}, r={r}, "
                              f"p={p}: at most {KDF_MEMORY_MAX >> 20} MiB)")
    wrap = _scrypt(password, salt, n, r, p)
    try:
        plain = AESGCM(wrap).decrypt(nonce, data, KEY_AAD)
    except InvalidTag:
        return None
    if len(plain) != MASTER + 32:
        raise RepositoryError(f"{what}: key of the wrong length")
    if plain[MASTER:] != bytes.fromhex(repo_id):
        raise RepositoryError(f"{what}: this key belongs to another repository")
    return plain[:MASTER]


def _username() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return str(os.geteuid())


username = _username


def unlock(backend, repo_id: str, pw: bytes) -> tuple[bytes, str]:
    """(the master key, the name of the key object) that ``pw`` opens among
    the repository's key objects, oldest first.  A key object that is not
    one (damaged, or planted by a store) stops no other from being tried."""
    from cloneaware.errors import WrongPassword

    keys = backend.listing("keys")
    if not keys:
        raise RepositoryError(f"{backend.where}: encrypted, but it holds no key")
    bad: list[str] = []
    for k in sorted(keys, key=lambda k: k.mtime):
        what = f"{backend.where}: {k.name}"
        try:
            master = unwrap_key(backend.read(k.name, limit=KEY_OBJECT_MAX), pw, repo_id, what)
        except RepositoryError as e:
            bad.append(str(e))
            continue
        if master is not None:
            return master, k.name
    if len(bad) == len(keys):
        raise RepositoryError(f"no key object of the repository can be read: {bad[0]}"
                              + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    raise WrongPassword(f"{backend.where}: wrong password (no key opens with it)"
                        + (f"; {len(bad)} key objects could not be read ({bad[0]})"
                           if bad else ""))
