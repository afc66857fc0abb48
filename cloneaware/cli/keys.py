"""``cloneaware key``: the passwords of an encrypted repository (list, add,
remove, passwd), a group of its own under the app."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, handled
from cloneaware.cli.options import PasswordOpt, RepoOpt, RshOpt, S3EndpointOpt, env_repo, opened

key_app = typer.Typer(help="Manage the passwords of an encrypted repository.",
                      rich_markup_mode=None,
                      no_args_is_help=True)
app.add_typer(key_app, name="key")


@contextmanager
def _key_repo(repo, password_file, rsh, s3_endpoint):
    """The repository, refused before any new password is asked for if it
    has no keys."""
    from cloneaware.repo.keys import require_encrypted

    with opened(env_repo(repo), password_file, rsh, s3_endpoint) as r:
        require_encrypted(r)
        yield r


@key_app.command("list", cls=Command)
def key_list(repo: RepoOpt = None, password_file: PasswordOpt = None, rsh: RshOpt = None,
             s3_endpoint: S3EndpointOpt = None) -> None:
    """List the key objects (one per password)."""
    from cloneaware.repo.keys import key_list as list_keys

    with handled():
        with _key_repo(repo, password_file, rsh, s3_endpoint) as r:
            found = list_keys(r)
        for k in found:
            typer.echo(f"{'*' if k.current else ' '} {k.short_id}  {k.created}  "
                       f"{k.username}@{k.hostname}  scrypt N={k.n}")


@key_app.command("add", cls=Command)
def key_add(repo: RepoOpt = None, password_file: PasswordOpt = None, rsh: RshOpt = None,
            s3_endpoint: S3EndpointOpt = None,
            new_password_file: Annotated[str | None, typer.Option(
                "--new-password-file", metavar="FILE",
                help="The new password (else a prompt).")] = None,
            kdf_n: Annotated[int, typer.Option("--kdf-n", metavar="N",
                                               help="scrypt's N for the new key.")]
            = 1 << 17) -> None:
    """Add a password: a new key object for the same master key."""
    from cloneaware.repo import keys

    with handled():
        with _key_repo(repo, password_file, rsh, s3_endpoint) as r:
            name = keys.add(r, keys.new_password(new_password_file), kdf_n)
        typer.echo(f"added key {name[5:13]}")


@key_app.command("remove", cls=Command)
def key_remove(key_id: Annotated[str, typer.Argument(metavar="KEY_ID",
                                                     help="The key's id (or a prefix).")],
               repo: RepoOpt = None, password_file: PasswordOpt = None, rsh: RshOpt = None,
               s3_endpoint: S3EndpointOpt = None) -> None:
    """Remove a password's key object (never the one used, nor the last)."""
    from cloneaware.repo import keys

    with handled():
        with _key_repo(repo, password_file, rsh, s3_endpoint) as r:
            name = keys.remove(r, key_id)
        typer.echo(f"removed key {name[5:13]}")


@key_app.command("passwd", cls=Command)
def key_passwd(repo: RepoOpt = None, password_file: PasswordOpt = None, rsh: RshOpt = None,
               s3_endpoint: S3EndpointOpt = None,
               new_password_file: Annotated[str | None, typer.Option(
                   "--new-password-file", metavar="FILE",
                   help="The new password (else a prompt).")] = None,
               kdf_n: Annotated[int, typer.Option("--kdf-n", metavar="N",
                                                              help="scrypt's N.")] = 1 << 17
               ) -> None:
    """Change the password used: add a key for the new one, remove the old one."""
    from cloneaware.repo import keys

    with handled():
        with _key_repo(repo, password_file, rsh, s3_endpoint) as r:
            name = keys.passwd(r, keys.new_password(new_password_file), kdf_n)
        typer.echo(f"changed the password: key {name[5:13]} replaces the old one")
