"""s3:// repositories: the objects of a repository as objects in an S3
bucket (Ceph's RADOS Gateway, AWS, or any S3-compatible service), one to
one, under a prefix: ``s3://BUCKET/PREFIX``.

- The client is boto3 (Debian's python3-boto3), imported only here, so
  that local repositories do not pay for it.  The endpoint is
  ``--s3-endpoint``, else CLONEAWARE_S3_ENDPOINT, else AWS_ENDPOINT_URL,
  else AWS; credentials and region come from boto3's usual chain.
  Path-style addressing (what Ceph and most on-premises servers need).
- Large objects (packs) go up as multipart uploads of 8 MiB parts;
  several packs go up at once (the packer's threads, ``--s3-connections``).
- Create-only writes (locks, config, keys) are PUTs with
  ``If-None-Match: *``, added in a before-sign hook (boto3 1.26 has no
  parameter for it).  ``init`` checks that the server honours it and
  refuses one that does not: two hosts could otherwise hold one lock.
- Every request is retried on timeouts, refused or reset connections, 5xx
  and throttling, with capped exponential backoff, for up to
  CLONEAWARE_S3_RETRY_SECONDS (default 60) in all; then the job fails with
  one line naming the endpoint.  4xx errors (credentials, a missing bucket,
  access denied) fail at once.
"""
from __future__ import annotations

import errno
import os
import re
import threading
import time
from datetime import UTC, datetime, timedelta

from cloneaware.errors import CloneawareError, RepositoryError, StillRetained, UsageError
from cloneaware.repo.backend import DIRS, WHOLE_MAX, Listed, check_name, too_large

PART = 8 << 20
_URL = re.compile(r"\As3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>.*))?\Z")
#: How long the requests of one operation are retried in all, by default.
RETRY_SECONDS = 60.0


def _import_boto3():
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise UsageError("s3:// repositories need boto3 (Debian: apt install python3-boto3; "
                         "pip: pip install boto3)") from None
    return boto3, botocore


class S3Backend:
    def __init__(self, url: str, endpoint: str | None = None, connections: int = 4):
        m = _URL.match(url)
        if not m:
            raise UsageError(f"bad s3 URL {url!r}; use s3://BUCKET/PREFIX (a bucket name of "
                             "3 to 63 lowercase letters, digits, dots and dashes)")
        self.bucket = m.group("bucket")
        self.prefix = (m.group("prefix") or "").strip("/")
        self.where = url
        boto3, botocore = _import_boto3()
        self.bc = botocore
        self.endpoint = (endpoint or os.environ.get("CLONEAWARE_S3_ENDPOINT")
                         or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.location = f"s3://{self.bucket}/{self.prefix} at {self.endpoint or 'AWS'}"
        self.retry_seconds = float(os.environ.get("CLONEAWARE_S3_RETRY_SECONDS", RETRY_SECONDS))
        cfg = botocore.config.Config(
            s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=5, read_timeout=60, max_pool_connections=max(8, connections + 4))
        session = boto3.session.Session()
        kw = {"endpoint_url": self.endpoint, "config": cfg}
        if session.region_name is None:
            kw["region_name"] = "us-east-1"
        self.s3 = session.client("s3", **kw)
        # a second client whose PUTs are create-only
        self.s3x = session.client("s3", **kw)
        # added after signing, in before-send: a server (or proxy) that drops
        # the header is then caught by init's probe rather than by a signature
        self.s3x.meta.events.register("before-send.s3.PutObject", self._create_only)
        self._lock = threading.Lock()
        #: S3 Object Lock (docs/REPOSITORY.md "Object Lock"): (days, mode), or None
        self.object_lock: tuple[int, str] | None = None
        #: create-only writes look with HEAD first (a gateway that ignores
        #: If-None-Match in a versioned bucket: create() finds out)
        self.head_first = False

    # -- Object Lock ---------------------------------------------------------------------

    def set_object_lock(self, days: int, mode: str) -> None:
        """Put every object but locks with retention of ``days`` in ``mode``
        from now on, and delete every version of what is deleted.  Create-only
        writes then look with HEAD first: the bucket is versioned, where a
        gateway may ignore If-None-Match."""
        self.object_lock = (days, mode)
        self.head_first = True

    def _retain(self, name: str) -> dict:
        """The PUT arguments that give ``name`` its retention (none for locks)."""
        if self.object_lock is None or name.startswith("locks/"):
            return {}
        days, mode = self.object_lock
        until = datetime.now(UTC) + timedelta(days=days)
        return {"ObjectLockMode": mode.upper(), "ObjectLockRetainUntilDate": until}

    def retention(self, name: str) -> datetime | None:
        """When the retention of ``name``'s current version ends (None: none)."""
        check_name(name)
        try:
            h = self._call(self.s3.head_object, Bucket=self.bucket, Key=self._key(name))
        except self.bc.exceptions.ClientError as e:
            raise self._client_error(e, name) from None
        return h.get("ObjectLockRetainUntilDate")

    def extend(self, name: str, until: datetime) -> None:
        """Retain ``name``'s current version until ``until`` (never shorter)."""
        assert self.object_lock is not None
        try:
            self._call(self.s3.put_object_retention, Bucket=self.bucket, Key=self._key(name),
                       Retention={"Mode": self.object_lock[1].upper(),
                                  "RetainUntilDate": until})
        except self.bc.exceptions.ClientError as e:
            raise self._client_error(e, name) from None

    @staticmethod
    def _create_only(request, **_kw) -> None:
        request.headers["If-None-Match"] = "*"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _name(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    # -- errors and retries --------------------------------------------------------------

    def _call(self, fn, *args, **kw):
        """fn(*args, **kw), retried on transient failures (capped backoff)."""
        bc = self.bc
        delay, deadline = 0.2, time.monotonic() + self.retry_seconds
        while True:
            try:
                return fn(*args, **kw)
            except bc.exceptions.ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                code = e.response.get("Error", {}).get("Code", "")
                if not (status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling",
                                                  "ServiceUnavailable")):
                    raise
                last: Exception = e
            except (bc.exceptions.EndpointConnectionError, bc.exceptions.ConnectionClosedError,
                    bc.exceptions.ReadTimeoutError, bc.exceptions.ConnectTimeoutError,
                    bc.exceptions.ConnectionError) as e:
                last = e
            if time.monotonic() + delay > deadline:
                raise CloneawareError(
                    f"{self.endpoint or 'S3'}: not answering ({_short(last)}); gave up after "
                    f"{self.retry_seconds:.0f} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _client_error(self, e, name: str = ""):
        """A 4xx as the error a user can act on."""
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        where = f"{self.where}/{name}" if name else self.where
        if code in ("NoSuchBucket",):
            return UsageError(f"{self.where}: no such bucket (make the repository with "
                              "cloneaware init)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") \
                or status == 403:
            return CloneawareError(f"{self.endpoint or 'S3'}: access denied ({code}): check "
                                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the "
                                   "bucket's policy")
        if code in ("NoSuchKey", "404") or status == 404:
            return RepositoryError(f"{where} is missing")
        return CloneawareError(f"{where}: {code or status}: "
                               f"{e.response.get('Error', {}).get('Message', '')}")

    # -- the backend --------------------------------------------------------------------

    def read(self, name: str, offset: int = 0, length: int | None = None,
             limit: int = WHOLE_MAX) -> bytes:
        check_name(name)
        kw = {"Bucket": self.bucket, "Key": self._key(name)}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kw["Range"] = f"bytes={offset}-{end}"
        if length == 0:
            return b""

        def get() -> bytes:
            resp = self.s3.get_object(**kw)
            n = resp.get("ContentLength")
            want = limit if length is None else length
            if not isinstance(n, int) or n > want:
                resp["Body"].close()
                raise too_large(self.where, name, n if isinstance(n, int) else -1, want)
            return resp["Body"].read(n)

        try:
            data = self._call(get)
        except self.bc.exceptions.ClientError as e:
            raise self._client_error(e, name) from None
        if length is not None and len(data) != length:
            raise RepositoryError(f"{self.where}/{name} is shorter than expected")
        return data

    def write(self, name: str, data, create_only: bool = False) -> None:
        check_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = b"".join(data)
        key = self._key(name)
        try:
            if create_only:
                self._create(key, bytes(data), name)
            elif len(data) > PART:
                self._multipart(key, memoryview(data), name)
            else:
                self._call(self.s3.put_object, Bucket=self.bucket, Key=key, Body=bytes(data),
                           **self._retain(name))
        except self.bc.exceptions.ClientError as e:
            raise self._client_error(e, name) from None

    def _create(self, key: str, data: bytes, name: str) -> None:
        tries = 0
        if self.head_first and self.exists(name):
            raise FileExistsError(errno.EEXIST, "exists", f"{self.where}/{name}")

        def put():
            nonlocal tries
            tries += 1
            return self.s3x.put_object(Bucket=self.bucket, Key=key, Body=data,
                                       **self._retain(name))

        try:
            self._call(put)
        except self.bc.exceptions.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 412:
                raise
            if tries > 1 and self.read(name) == data:
                return  # our own earlier attempt went through: the answer was lost
            raise FileExistsError(errno.EEXIST, "exists", f"{self.where}/{name}") from None

    def _multipart(self, key: str, data: memoryview, name: str) -> None:
        """A multipart upload of 8 MiB parts; aborted (nothing visible) on failure."""
        up = self._call(self.s3.create_multipart_upload, Bucket=self.bucket, Key=key,
                        **self._retain(name))
        uid = up["UploadId"]
        try:
            parts = []
            for i, start in enumerate(range(0, len(data), PART), 1):
                r = self._call(self.s3.upload_part, Bucket=self.bucket, Key=key, UploadId=uid,
                               PartNumber=i, Body=bytes(data[start:start + PART]))
                parts.append({"ETag": r["ETag"], "PartNumber": i})
            self._call(self.s3.complete_multipart_upload, Bucket=self.bucket, Key=key,
                       UploadId=uid, MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=uid)
            except Exception:  # noqa: BLE001 - prune aborts what is left
                pass
            raise

    def delete(self, name: str) -> None:
        """Delete ``name``; under Object Lock every version of it (a plain
        DELETE would only hide it behind a delete marker), or StillRetained
        while its retention lasts."""
        check_name(name)
        key = self._key(name)
        try:
            if self.object_lock is None:
                self._call(self.s3.delete_object, Bucket=self.bucket, Key=key)
                return
            r = self._call(self.s3.list_object_versions, Bucket=self.bucket, Prefix=key)
            versions = [v for v in r.get("Versions", []) + r.get("DeleteMarkers", [])
                        if v["Key"] == key]
            for v in versions:
                try:
                    self._call(self.s3.delete_object, Bucket=self.bucket, Key=key,
                               VersionId=v["VersionId"])
                except self.bc.exceptions.ClientError as e:
                    if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 403:
                        raise
                    until = self.retention(name)
                    raise StillRetained(
                        f"{self.where}/{name}: retained by Object Lock until "
                        f"{until:%Y-%m-%d %H:%M} UTC" if until else
                        f"{self.where}/{name}: retained by Object Lock",
                        until.timestamp() if until else 0.0) from None
        except self.bc.exceptions.ClientError as e:
            raise self._client_error(e, name) from None

    def listing(self, directory: str) -> list[Listed]:
        if directory not in DIRS:
            raise ValueError(directory)
        out = []
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(directory) + "/")
            for page in self._call(lambda: list(pages)):
                for o in page.get("Contents", []):
                    name = self._name(o["Key"])
                    try:
                        check_name(name)
                    except RepositoryError:
                        continue  # not an object of ours
                    mtime = o["LastModified"]
                    out.append(Listed(name, int(o["Size"]), mtime.timestamp()
                                      if isinstance(mtime, datetime) else float(mtime)))
        except self.bc.exceptions.ClientError as e:
            raise self._client_error(e) from None
        return out

    def exists(self, name: str) -> bool:
        check_name(name)
        try:
            self._call(self.s3.head_object, Bucket=self.bucket, Key=self._key(name))
            return True
        except self.bc.exceptions.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise self._client_error(e, name) from None

    def sync(self) -> None:
        """An acknowledged PUT is durable: nothing to do."""

    def is_empty(self) -> bool:
        try:
            r = self._call(self.s3.list_objects_v2, Bucket=self.bucket,
                           Prefix=(self.prefix + "/") if self.prefix else "", MaxKeys=1)
        except self.bc.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return True
            raise self._client_error(e) from None
        return not r.get("Contents")

    def create(self) -> None:
        """The bucket if it does not exist; then check that create-only PUTs
        are refused the second time (else locks cannot be trusted)."""
        try:
            try:
                self._call(self.s3.head_bucket, Bucket=self.bucket)
            except self.bc.exceptions.ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                    raise
                self._call(self.s3.create_bucket, Bucket=self.bucket,
                           **({"ObjectLockEnabledForBucket": True} if self.object_lock
                              else {}))
            if self.object_lock is not None:
                try:
                    lc = self._call(self.s3.get_object_lock_configuration, Bucket=self.bucket)
                    on = lc.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
                except self.bc.exceptions.ClientError:
                    on = None
                if on != "Enabled":
                    raise UsageError(f"{self.where}: the bucket exists without Object Lock, "
                                     "which can only be enabled when a bucket is made: give "
                                     "a new bucket")
            probe = self._key(f"locks/{'0' * 64}")
            self._call(self.s3x.put_object, Bucket=self.bucket, Key=probe, Body=b"probe")
            try:
                self.s3x.put_object(Bucket=self.bucket, Key=probe, Body=b"probe again")
                honoured = False
            except self.bc.exceptions.ClientError as e:
                if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 412:
                    raise
                honoured = True
            self.delete(f"locks/{'0' * 64}")
        except self.bc.exceptions.ClientError as e:
            raise self._client_error(e) from None
        if not honoured and self.object_lock is not None:
            # Ceph 16 ignores If-None-Match in a versioned bucket (and one
            # with Object Lock is versioned): create-only writes look first.
            # Lock names are random, so only two inits racing on one prefix
            # could meet; each version of what they wrote is retained.
            self.head_first = True
        elif not honoured:
            raise UsageError(f"{self.endpoint or 'S3'}: the server ignores If-None-Match on "
                             "PUT, so locks could not be trusted; refusing to make a "
                             "repository there")

    def close(self) -> None:
        pass


def _short(e: Exception) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    return s[:200]
