"""S3 Object Lock on the suite's Ceph gateway (issue 33): ``init
--object-lock DAYS`` makes a bucket with Object Lock; every object but
locks is put with that retention (seen with boto3 directly, not through
cloneaware); the same credentials cannot delete or overwrite a retained
version; forget and prune keep what is still retained and say so, and
leave no snapshot naming a deleted object; prune extends the retention
when half of it is left."""
from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime, timedelta

import botocore
import pytest
from helpers.cli import assert_one_line_error, cli, cli_json

from cloneaware.testing import write_random

pytestmark = pytest.mark.root

MiB = 1 << 20


def _env(ceph) -> dict:
    return {**os.environ, **ceph.env}


def test_object_lock_retains_every_object_and_prune_extends_it(ceph, btrfs_dir, tmp_path,
                                                              monkeypatch):
    bucket = f"t-{secrets.token_hex(6)}"
    url, env = f"s3://{bucket}/repo", _env(ceph)
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a", 3 * MiB, 1)
    (src / "b").write_bytes(b"b\n")
    r = cli("init", "-r", url, "--object-lock", "4", env=env, check_rc=0)
    assert "retained 4 days (compliance)" in r.out, r.out
    first = cli_json("backup", "--json", "-r", url, src, env=env)["snapshot"]
    (src / "b").write_bytes(b"b again\n")
    second = cli_json("backup", "--json", "-r", url, src, env=env)["snapshot"]

    s3 = ceph.s3()
    assert s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"][
        "ObjectLockEnabled"] == "Enabled"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="repo/")["Contents"]]
    kinds = {k.split("/")[1] for k in keys}
    assert {"config", "data", "index", "snapshots"} <= kinds and "locks" not in kinds, keys
    soon, late = (datetime.now(UTC) + timedelta(days=d) for d in (3.9, 4.1))
    for k in keys:
        h = s3.head_object(Bucket=bucket, Key=k)
        assert h["ObjectLockMode"] == "COMPLIANCE" and \
            soon < h["ObjectLockRetainUntilDate"] < late, (k, h)
    # no lock left behind, not even as an old version
    versions = s3.list_object_versions(Bucket=bucket, Prefix="repo/locks/")
    assert not versions.get("Versions") and not versions.get("DeleteMarkers"), versions

    # forget keeps what is retained, and says until when; nothing is lost
    out = cli_json("forget", "--json", "-r", url, "--keep-last", "1", "--prune", env=env)
    kept = {s["id"]: s["reasons"] for s in out["kept"]}
    assert out["removed"] == [] and kept[first][0].startswith("retained by Object Lock until")
    assert out["prune"]["object_lock"]["extended"] == 0, out["prune"]  # all fresh
    due = datetime.fromisoformat(out["prune"]["object_lock"]["next_due"])
    assert timedelta(days=1.9) < due - datetime.now(UTC) < timedelta(days=2.1), due
    snaps = {s["id"] for s in json.loads(cli("snapshots", "--json", "-r", url, env=env).out)}
    assert snaps == {first, second}
    cli("check", "--read-data", "-r", url, env=env, check_rc=0)
    dest = tmp_path / "dest"
    cli("restore", "-r", url, first[:8], dest, env=env, check_rc=0)
    assert (dest / "src" / "a").read_bytes() == (src / "a").read_bytes()
    assert (dest / "src" / "b").read_bytes() == b"b\n"  # the first night's

    # three days on, half the retention is gone: prune extends every object's
    from cloneaware.repo import objectlock
    from cloneaware.repo.connect import opened

    later = datetime.now(UTC) + timedelta(days=3)
    for k, v in ceph.env.items():
        monkeypatch.setenv(k, v)
    with opened(url, lock="exclusive", operation="test") as repo:
        ext = objectlock.extend(repo, now=later)
    assert ext is not None and ext.extended == ext.checked >= len(keys), ext
    h = s3.head_object(Bucket=bucket, Key=keys[0])
    assert h["ObjectLockRetainUntilDate"] > later + timedelta(days=3.9), h

    # the same credentials, with boto3 itself: a retained version cannot be
    # deleted; an overwrite or a plain delete leaves it readable
    key = next(k for k in keys if "/data/" in k)
    vid = s3.head_object(Bucket=bucket, Key=key)["VersionId"]
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.delete_object(Bucket=bucket, Key=key, VersionId=vid)
    assert e.value.response["Error"]["Code"] == "AccessDenied"
    s3.put_object(Bucket=bucket, Key=key, Body=b"ransom note")
    s3.delete_object(Bucket=bucket, Key=key)
    assert s3.get_object(Bucket=bucket, Key=key, VersionId=vid)["Body"].read() == body


def test_object_lock_refuses_what_cannot_hold_it(ceph, tmp_path):
    env = _env(ceph)
    line = assert_one_line_error(cli("init", "-r", tmp_path / "local", "--object-lock", "7"), 2)
    assert "Object Lock is for s3://" in line
    url = f"s3://t-{secrets.token_hex(6)}/repo"
    assert "--object-lock 1" in assert_one_line_error(
        cli("init", "-r", url, "--object-lock", "1", env=env), 2)
    assert "--lock-mode" in assert_one_line_error(
        cli("init", "-r", url, "--object-lock", "7", "--lock-mode", "strict", env=env), 2)
    # a bucket made without Object Lock cannot be given it
    bucket = f"t-{secrets.token_hex(6)}"
    ceph.s3().create_bucket(Bucket=bucket)
    line = assert_one_line_error(cli("init", "-r", f"s3://{bucket}/r", "--object-lock", "7",
                                     env=env), 2)
    assert "without Object Lock" in line
