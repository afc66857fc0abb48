"""Open the backend for a repository URL: a directory, ssh://... (through
``cloneaware serve``) or s3://... (boto3).  Apart from repo/backend.py so
that the local backend, which the ssh and S3 backends build on, does not
import them back."""
from __future__ import annotations

import os
import stat

from cloneaware.errors import UsageError
from cloneaware.repo.backend import Backend, LocalBackend


def open_backend(url: str, rsh: str | None = None, s3: dict | None = None,
                 create: bool = False) -> Backend:
    """The backend for a repository URL: a path, ssh://..., or s3://..."""
    if not url:
        raise UsageError("no repository given: use -r REPO or set CLONEAWARE_REPOSITORY")
    if url.startswith("ssh://"):
        from cloneaware.repo.sshbackend import SshBackend  # only for ssh:// repositories

        return SshBackend(url, rsh, create=create)
    if url.startswith("s3://"):
        from cloneaware.repo.s3backend import S3Backend  # only for s3://: boto3 is optional

        return S3Backend(url, **(s3 or {}))
    if not create:
        try:
            st = os.stat(url)
        except FileNotFoundError:
            raise UsageError(f"{url}: no such repository (make one with cloneaware init)") \
                from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{url} is not a repository directory")
    return LocalBackend(url)

