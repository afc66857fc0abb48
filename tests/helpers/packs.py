"""Which pack of a local repository holds what: the oracle tests damage
packs by (they know what they wrote; the index says where it went)."""
from __future__ import annotations

from cloneaware.repo import format as rf
from cloneaware.repo.backend import LocalBackend
from cloneaware.repo.repository import Repository

MiB = 1 << 20


def pack_of_only(repo, data: bytes) -> tuple[str, set[bytes]]:
    """A pack that holds only blobs of ``data`` (1 MiB pieces), and those blobs."""
    att = Repository.open(LocalBackend(str(repo)))
    try:
        att.load_index()
        ids = {att.crypto.blob_id(data[i:i + MiB]) for i in range(0, len(data), MiB)}
        for bid in sorted(ids):
            pid = att.index.get(bid).pack
            held = {b for b, e in att.index.items() if e.pack == pid}
            if held <= ids and all(att.index.get(b).type == rf.T_DATA for b in held):
                return pid.hex(), held
    finally:
        att.close()
    raise AssertionError("no pack holds only the file's blobs")
