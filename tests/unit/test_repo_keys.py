"""Passwords and keys (repo/keys.py), on repositories in a temporary
directory: where a password comes from (a file, the environment, nowhere),
a repository made with one (connect.create, ``cloneaware init``), and key
add, list, remove and passwd as ``cloneaware key`` runs them."""
from __future__ import annotations

import pytest

from cloneaware.errors import UsageError, WrongPassword
from cloneaware.repo import keys
from cloneaware.repo.backend import LocalBackend
from cloneaware.repo.connect import create
from cloneaware.repo.keys import Password
from cloneaware.repo.repository import Repository

N = 1 << 14  # the cheapest scrypt a key may have


@pytest.fixture(autouse=True)
def no_password_in_the_environment(monkeypatch):
    monkeypatch.delenv("CLONEAWARE_PASSWORD", raising=False)
    monkeypatch.delenv("CLONEAWARE_PASSWORD_FILE", raising=False)


class NotATerminal:
    def isatty(self) -> bool:
        return False


# --- where a password comes from ---------------------------------------------------------

def test_a_password_file_gives_its_first_line(tmp_path, monkeypatch):
    f = tmp_path / "pw"
    f.write_bytes(b"s3cret\nignored\n")
    monkeypatch.setenv("CLONEAWARE_PASSWORD", "from the environment")
    p = Password(str(f))
    assert p.given and p("prompt: ") == b"s3cret"  # the file wins over the environment
    monkeypatch.setenv("CLONEAWARE_PASSWORD_FILE", str(f))
    assert Password()("") == b"s3cret"


def test_the_environment_gives_a_password(monkeypatch):
    monkeypatch.setenv("CLONEAWARE_PASSWORD", "pässword")
    p = Password()
    assert p.given and p("") == "pässword".encode()


def test_no_password_anywhere_and_no_terminal_is_a_usage_error(monkeypatch):
    monkeypatch.setattr("sys.stdin", NotATerminal())
    p = Password()
    assert not p.given
    with pytest.raises(UsageError, match="give its password with --password-file"):
        p("")


def test_a_missing_or_empty_password_file_is_refused(tmp_path):
    with pytest.raises(UsageError, match="password file .*nothing: No such file"):
        Password(str(tmp_path / "nothing"))("")
    (tmp_path / "empty").write_bytes(b"\nsecond line\n")
    with pytest.raises(UsageError, match="empty password"):
        Password(str(tmp_path / "empty"))("")


def test_an_unencrypted_repository_has_no_keys_to_manage(tmp_path):
    r = Repository.init(LocalBackend(str(tmp_path / "repo")))
    for call in (lambda: keys.key_list(r), lambda: keys.add(r, b"x", kdf_n=N),
                 lambda: keys.remove(r, "ab"), lambda: keys.passwd(r, b"x", kdf_n=N)):
        with pytest.raises(UsageError, match=r"repo: not encrypted: it has no keys\Z"):
            call()
    assert list(r.backend.listing("keys")) == []
    r.close()


def test_open_refuses_a_password_for_an_unencrypted_repository(tmp_path, monkeypatch):
    Repository.init(LocalBackend(str(tmp_path / "repo"))).close()
    monkeypatch.setenv("CLONEAWARE_PASSWORD", "x")
    with pytest.raises(UsageError, match="not encrypted, but a password was given"):
        Repository.open(LocalBackend(str(tmp_path / "repo")), Password())
    Repository.open(LocalBackend(str(tmp_path / "repo")), None).close()


def test_create_makes_a_repository_that_opens_with_its_password(tmp_path, monkeypatch):
    p = str(tmp_path / "repo")
    config = create(p, b"one", kdf_n=N, grid=64 << 10)
    assert config.encryption == "aes-256-gcm" and config.grid == 64 << 10
    monkeypatch.setenv("CLONEAWARE_PASSWORD", "one")
    r = Repository.open(LocalBackend(p), Password())
    assert r.config.id == config.id
    r.close()
    with pytest.raises(UsageError, match="not empty"):
        create(p)


# --- cloneaware key -------------------------------------------------------------------------

@pytest.fixture
def path(tmp_path) -> str:
    p = str(tmp_path / "repo")
    Repository.init(LocalBackend(p), b"one", kdf_n=N).close()
    return p


def opened(path: str, password: str, monkeypatch) -> Repository:
    monkeypatch.setenv("CLONEAWARE_PASSWORD", password)
    return Repository.open(LocalBackend(path), Password())


def test_an_encrypted_repository_needs_its_password(path, monkeypatch):
    with pytest.raises(UsageError, match="encrypted: give its password"):
        Repository.open(LocalBackend(path), None)
    with pytest.raises(WrongPassword):
        opened(path, "two", monkeypatch)


def test_add_then_list_then_open_with_either(path, monkeypatch):
    r = opened(path, "one", monkeypatch)
    (first,) = keys.key_list(r)
    assert first.current and first.n == N and first.name == r.key_name
    assert first.short_id == r.key_name[5:13] and first.created[:2] == "20"
    name = keys.add(r, b"two", kdf_n=N)
    listed = keys.key_list(r)
    assert [k.name for k in listed] == [first.name, name]  # oldest first
    assert [k.current for k in listed] == [True, False]
    r.close()
    r2 = opened(path, "two", monkeypatch)
    assert r2.key_name == name and r2.crypto.blob_id(b"x") == r.crypto.blob_id(b"x")
    assert [k.current for k in keys.key_list(r2)] == [False, True]
    r2.close()


def test_remove_never_the_key_in_use_nor_the_last(path, monkeypatch):
    r = opened(path, "one", monkeypatch)
    with pytest.raises(UsageError, match="that is the key this password opened"):
        keys.remove(r, r.key_name[5:])
    other = keys.add(r, b"two", kdf_n=N)
    with pytest.raises(UsageError, match="'' names 0 keys"):
        keys.remove(r, "")
    assert keys.remove(r, other[5:12]) == other
    assert [k.name for k in keys.key_list(r)] == [r.key_name]
    with pytest.raises(WrongPassword):
        opened(path, "two", monkeypatch)
    # the last key: the one in use is refused first; a stranger's repository has it alone
    r.key_name = None
    with pytest.raises(UsageError, match="the last key cannot be removed"):
        keys.remove(r, keys.key_list(r)[0].name[5:])
    r.close()


def test_passwd_replaces_the_key_in_use(path, monkeypatch):
    r = opened(path, "one", monkeypatch)
    old = r.key_name
    new = keys.passwd(r, b"two", kdf_n=N)
    assert [k.name for k in keys.key_list(r)] == [new] != [old]
    r.close()
    with pytest.raises(WrongPassword):
        opened(path, "one", monkeypatch)
    opened(path, "two", monkeypatch).close()
