"""s3:// repositories (issue 17) against a real Ceph RADOS Gateway that the
tests start (tests/helpers/ceph.py): the whole repository cycle, the
gateway gone for seconds or for good mid-backup, bad credentials, a
missing bucket, a bucket that is not a repository, a server that ignores
create-only PUTs, two hosts at once, an encrypted repository."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from helpers.cli import cli, cli_popen, finished
from helpers.space import Usage
from helpers.treeutil import MiB, Snapshot, assert_close, assert_same_tree, physical_bytes

from cloneaware.testing import make_family, reflink_copy, rewrite_blocks, timeout, write_random

pytestmark = pytest.mark.root


def _url(prefix: str = "repo") -> str:
    return f"s3://t-{secrets.token_hex(6)}/{prefix}"


def s3cli(ceph, *args, check_rc=None, env=None, **kw):
    return cli(*args, env={**os.environ, **ceph.env, **(env or {})}, check_rc=check_rc,
               timeout=timeout(300), **kw)


def s3json(ceph, *args, check_rc=0, env=None):
    return json.loads(s3cli(ceph, *args, check_rc=check_rc, env=env).stdout)


def test_the_repository_cycle(ceph, reflink_dir, tmp_path):
    url = _url()
    src = reflink_dir / "src"
    make_family(src, base_size=16 * MiB, clones=3, small_files=10, sparse=True)
    s3cli(ceph, "init", "-r", url, check_rc=0)  # makes the bucket
    s1 = s3json(ceph, "backup", "--json", "-r", url, src)
    want1 = Snapshot(src, atime=False)
    rewrite_blocks(src / "images" / "base.img", 0.02, 5)
    reflink_copy(src / "images" / "base.img", src / "images" / "new.img")
    s2 = s3json(ceph, "backup", "--json", "-r", url, "--s3-connections", "8", src)
    assert s2["bytes_read"] <= 1 * MiB and s2["unchanged_bytes"] >= 16 * MiB, s2
    snaps = s3json(ceph, "snapshots", "--json", "-r", url)
    assert [s["id"] for s in snaps] == [s1["snapshot"], s2["snapshot"]]
    ls = s3json(ceph, "ls", "--json", "-r", url, "latest")
    assert any(e["path"] == "src/images/new.img" for e in ls["entries"])
    dest = reflink_dir / "dest"
    s3cli(ceph, "restore", "-r", url, s1["snapshot"], dest, check_rc=0)
    assert_same_tree(want1, Snapshot(dest / "src"))
    dest2 = reflink_dir / "dest2"
    with Usage(reflink_dir) as u:
        s3cli(ceph, "restore", "-r", url, "latest", dest2, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest2 / "src"))
    assert u.delta <= 1.02 * physical_bytes(src) + 256 * 1024, u.delta  # by df
    assert_close(physical_bytes(dest2), physical_bytes(src), 0.02, "restored from s3://")
    s3cli(ceph, "forget", "-r", url, "--keep-last", "1", "--prune", check_rc=0)
    assert len(s3json(ceph, "snapshots", "--json", "-r", url)) == 1
    s3cli(ceph, "check", "--read-data", "-r", url, check_rc=0)
    bucket, prefix = url[5:].split("/", 1)
    objs = ceph.bucket_bytes(bucket, prefix)
    assert set(objs) <= {"config", "data", "index", "snapshots"}, objs


def _long_backup_tree(root: Path) -> Path:
    src = root / "big"
    src.mkdir()
    for i in range(12):
        write_random(src / f"f{i}.bin", 24 * MiB, 50 + i)
    os.sync()
    return src


def test_gateway_gone_for_seconds_mid_backup(ceph, btrfs_dir):
    url = _url()
    s3cli(ceph, "init", "-r", url, "--pack-size", "4", check_rc=0)
    src = _long_backup_tree(btrfs_dir)
    p = cli_popen("backup", "--json", "-r", url, "--compress", "zstd:9", src,
                  env=dict(os.environ, **ceph.env))
    bucket = url[5:].split("/", 1)[0]
    deadline = time.monotonic() + timeout(60)
    while ceph.bucket_bytes(bucket).get("repo", 0) < 20 * MiB and time.monotonic() < deadline:
        time.sleep(0.1)
    ceph.stop_rgw()
    time.sleep(5)
    ceph.start_rgw()
    r = finished(p, ["backup"], timeout=timeout(300))
    assert r.returncode == 0, r  # retried through the outage
    s3cli(ceph, "check", "-r", url, check_rc=0)
    dest = btrfs_dir / "dest"
    s3cli(ceph, "restore", "-r", url, "latest", dest, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "big"))


def test_gateway_killed_for_good_fails_in_one_line_and_leaves_it_consistent(ceph, btrfs_dir):
    url = _url()
    s3cli(ceph, "init", "-r", url, "--pack-size", "4", check_rc=0)
    src = _long_backup_tree(btrfs_dir)
    env = dict(os.environ, **ceph.env, CLONEAWARE_S3_RETRY_SECONDS="4")
    p = cli_popen("backup", "-r", url, "--compress", "zstd:9", src, env=env)
    bucket = url[5:].split("/", 1)[0]
    deadline = time.monotonic() + timeout(60)
    while ceph.bucket_bytes(bucket).get("repo", 0) < 20 * MiB and time.monotonic() < deadline:
        time.sleep(0.1)
    ceph.stop_rgw(signal.SIGKILL)  # the network cut: connections die mid-upload
    r = finished(p, ["backup"], timeout=timeout(120))
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.returncode == 4 and len(lines) == 1, r
    assert ceph.endpoint in lines[0] and "gave up" in lines[0], lines
    ceph.start_rgw()
    s3cli(ceph, "check", "-r", url, check_rc=0)
    assert s3json(ceph, "snapshots", "--json", "-r", url) == []
    s3cli(ceph, "unlock", "-r", url, check_rc=0)
    s3cli(ceph, "backup", "-r", url, src, check_rc=0)
    s3cli(ceph, "check", "--read-data", "-r", url, check_rc=0)


def test_bad_credentials_missing_bucket_and_strangers(ceph, btrfs_dir):
    url = _url()
    r = s3cli(ceph, "snapshots", "-r", url, check_rc=2)
    assert "no such bucket" in r.err and r.err.count("\n") == 1
    s3cli(ceph, "init", "-r", url, check_rc=0)
    r = s3cli(ceph, "snapshots", "-r", url, env={"AWS_SECRET_ACCESS_KEY": "wrong"},
              check_rc=4)
    assert "access denied" in r.err and r.err.count("\n") == 1
    bucket = url[5:].split("/", 1)[0]
    ceph.s3().put_object(Bucket=bucket, Key="other/photo.jpg", Body=b"not a repository")
    r = s3cli(ceph, "snapshots", "-r", f"s3://{bucket}/other", check_rc=2)
    assert "not a cloneaware repository" in r.err
    r = s3cli(ceph, "init", "-r", f"s3://{bucket}/other", check_rc=2)
    assert "not empty" in r.err
    r = s3cli(ceph, "snapshots", "-r", "s3://No_Such", check_rc=2)
    assert "bad s3 URL" in r.err


class _HeaderDroppingProxy:
    """A TCP proxy in front of radosgw that drops If-None-Match request
    headers: a server that ignores create-only PUTs, as init must detect."""

    def __init__(self, port: int):
        self.target = port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    @staticmethod
    def _pipe(a, b, requests: bool) -> None:
        try:
            while data := a.recv(1 << 16):
                if requests:  # (a header is never split across reads this small)
                    data = data.replace(b"If-None-Match: *\r\n", b"")
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def test_init_refuses_a_server_that_ignores_create_only_puts(ceph):
    proxy = _HeaderDroppingProxy(ceph.rgw_port)
    try:
        url = _url()
        r = s3cli(ceph, "init", "-r", url, check_rc=2,
                  env={"CLONEAWARE_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}"})
        assert "ignores If-None-Match" in r.err, r.err
        s3cli(ceph, "init", "-r", url, check_rc=0)  # straight to radosgw: honoured
    finally:
        proxy.close()


def test_two_hosts_at_once_store_a_common_image_once(ceph, btrfs_dir, xfs_dir, tmp_path):
    url = _url()
    s3cli(ceph, "init", "-r", url, check_rc=0)
    golden = tmp_path / "golden.img"
    write_random(golden, 32 * MiB, 9)
    a, b = btrfs_dir / "a", xfs_dir / "b"
    for d, seed in ((a, 1), (b, 2)):
        d.mkdir()
        shutil.copyfile(golden, d / "golden.img")
        write_random(d / "own.bin", 4 * MiB, seed)
    os.sync()
    env = dict(os.environ, **ceph.env)
    pa = cli_popen("backup", "-r", url, "--host", "a", a, env=env)
    pb = cli_popen("backup", "-r", url, "--host", "b", b, env=env)
    assert finished(pa, ["a"]).returncode == 0 and finished(pb, ["b"]).returncode == 0
    s3cli(ceph, "prune", "-r", url, check_rc=0)
    bucket, prefix = url[5:].split("/", 1)
    stored = ceph.bucket_bytes(bucket, prefix)["data"]
    assert stored < (32 + 8) * MiB * 1.05, stored  # the golden image once
    for host, d in (("a", a), ("b", b)):
        dest = tmp_path / host
        snaps = s3json(ceph, "snapshots", "--json", "-r", url, "--host", host)
        s3cli(ceph, "restore", "-r", url, snaps[0]["id"], dest, check_rc=0)
        assert_same_tree(Snapshot(d, atime=False), Snapshot(dest / d.name))


def test_encrypted_over_s3(ceph, btrfs_dir, tmp_path):
    url = _url()
    pw = tmp_path / "pw"
    pw.write_text("s3 secret\n")
    s3cli(ceph, "init", "-r", url, "--encrypt", "--password-file", pw, "--kdf-n", "16384",
          check_rc=0)
    src = btrfs_dir / "src"
    src.mkdir()
    (src / "secret-name.txt").write_bytes(b"SECRET-CONTENT-MARKER" * 500)
    write_random(src / "disk.img", 4 * MiB, 1)
    s3cli(ceph, "backup", "-r", url, "--password-file", pw, src, check_rc=0)
    bucket, prefix = url[5:].split("/", 1)
    c = ceph.s3()
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            body = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            assert b"SECRET-CONTENT-MARKER" not in body and b"secret-name" not in body
    s3cli(ceph, "snapshots", "-r", url, check_rc=7, env={"CLONEAWARE_PASSWORD": "nope"})
    dest = btrfs_dir / "dest"
    s3cli(ceph, "restore", "-r", url, "--password-file", pw, "latest", dest, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src"))
    s3cli(ceph, "check", "--read-data", "-r", url, "--password-file", pw, check_rc=0)


def test_copy_off_site_to_s3_and_back(ceph, btrfs_dir, tmp_path):
    """copy (issue 33) from a local repository to s3:// on the gateway, as
    the off-site copy of the 3-2-1 rule, then back into a fresh local one:
    restored exactly, and a second copy sends only the new night."""
    src = btrfs_dir / "src"
    make_family(src, base_size=8 * MiB, clones=2, small_files=10, sparse=True)
    local, back = tmp_path / "local", tmp_path / "back"
    url = _url("offsite")
    s3cli(ceph, "init", "-r", local, check_rc=0)
    s3cli(ceph, "init", "-r", url, check_rc=0)
    s3cli(ceph, "init", "-r", back, check_rc=0)
    s3cli(ceph, "backup", "-r", local, src, check_rc=0)
    want = Snapshot(src, atime=False)
    out = s3json(ceph, "copy", "--json", "-r", local, "--to", url)
    assert len(out["copied"]) == 1, out
    rewrite_blocks(src / "images" / "base.img", 0.02, 7)
    night2 = s3json(ceph, "backup", "--json", "-r", local, src)
    out = s3json(ceph, "copy", "--json", "-r", local, "--to", url)
    assert len(out["copied"]) == 1 and len(out["skipped"]) == 1 and \
        out["how"] == "blob by blob", out
    # what the night added locally travels (same ids, same grid), not the tree
    assert out["added_bytes"] == night2["added_bytes"] < out["logical_bytes"] // 10, \
        (out, night2["added_bytes"])
    s3cli(ceph, "check", "--read-data", "-r", url, check_rc=0)
    s3json(ceph, "copy", "--json", "-r", url, "--to", back)
    dest = btrfs_dir / "dest"
    s3cli(ceph, "restore", "-r", back, "latest", dest, check_rc=0)
    assert_same_tree(Snapshot(src, atime=False), Snapshot(dest / "src", atime=False))
    first = s3json(ceph, "snapshots", "--json", "-r", back)[0]["id"]
    dest1 = btrfs_dir / "dest1"
    s3cli(ceph, "restore", "-r", back, first, dest1, check_rc=0)
    assert_same_tree(want, Snapshot(dest1 / "src", atime=False))


def test_a_lock_is_judged_by_the_gateways_clock_too(ceph, btrfs_dir, tmp_path):
    """Another host's lock whose own time says an hour old, but which the
    gateway stored just now (LastModified): that host's clock is behind, and
    its lock is live (issue 33: stale judged with the repository's clock)."""
    import time as _time

    from cloneaware.repo.backend import LocalBackend
    from cloneaware.repo.repository import Repository

    url = _url()
    bucket, prefix = url[len("s3://"):].split("/", 1)
    src = btrfs_dir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f\n")
    s3cli(ceph, "init", "-r", url, check_rc=0)
    plain = tmp_path / "plain"  # a plain repository's envelope is the same anywhere
    s3cli(ceph, "init", "-r", plain, check_rc=0)
    r = Repository.open(LocalBackend(str(plain)))
    body = r.encode_object(3, json.dumps({
        "time": "x", "time_ns": _time.time_ns() - 3600 * 10**9, "hostname": "elsewhere",
        "username": "root", "pid": 1, "exclusive": True, "operation": "prune"}).encode())
    r.close()
    key = f"{prefix}/locks/{'cd' * 32}"
    ceph.s3().put_object(Bucket=bucket, Key=key, Body=body)
    res = s3cli(ceph, "backup", "-r", url, src, check_rc=6)
    assert "locked by an exclusive lock of prune" in res.err, str(res)
    ceph.s3().delete_object(Bucket=bucket, Key=key)
    s3cli(ceph, "backup", "-r", url, src, check_rc=0)
