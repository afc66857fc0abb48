"""A real single-node Ceph cluster with a RADOS Gateway, for the s3:// tests.

One monitor, one OSD on ``memstore`` (data in the OSD's memory), one
radosgw bound to 127.0.0.1: all state in one temporary directory, each
daemon in the foreground with its own ``-c`` config, stopped by its pid;
``/etc/ceph`` and ``/var/lib/ceph`` are never touched.  No cephx (every
messenger mode pinned to crc, else radosgw cannot authenticate), pool size
1, ``paxos propose interval`` 0.1 (start-up in about 3 s instead of 13),
lifecycle threads off (they held radosgw's shutdown for seconds).  Debian
packages: ceph-mon, ceph-osd, radosgw, ceph-common."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "ceph", "monmaptool", "radosgw-admin",
            "ceph-authtool")
ACCESS, SECRET = "CLONEAWARETEST", "cloneaware-test-secret-key"


def missing() -> str | None:
    if os.geteuid() != 0:
        return "the Ceph test cluster runs as root"
    gone = [b for b in BINARIES if shutil.which(b) is None]
    if gone:
        return f"Ceph is not installed ({', '.join(gone)} missing: apt install ceph-mon " \
               "ceph-osd radosgw ceph-common)"
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "boto3 is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ok, seconds: float, proc: subprocess.Popen | None = None,
          log: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ok():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"Ceph test cluster: {what} did not come up\n{tail}")


class Ceph:
    """The cluster; ``endpoint`` is radosgw's URL, ``env`` the client's."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "ceph.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.mon_port = _free_port()
        self.rgw_port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": "us-east-1", "CLONEAWARE_S3_ENDPOINT": self.endpoint}

    def _run(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run([args[0], "-c", str(self.conf), *args[1:]], capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()[-500:]}")
        return r.stdout

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.root / "log" / f"{name}.out"
        p = subprocess.Popen([args[0], "-c", str(self.conf), *args[1:], "-f"],
                             stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def start(self) -> Ceph:
        r = self.root
        for d in ("run", "log", "mon", "osd/ceph-0", "rgw"):
            (r / d).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{self.mon_port}]
auth cluster required = none
auth service required = none
auth client required = none
ms cluster mode = crc
ms service mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms mon client mode = crc
osd objectstore = memstore
memstore device bytes = {3 << 30}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
paxos propose interval = 0.1
paxos min wait = 0.01
run dir = {r}/run
admin socket = {r}/run/$name.asok
pid file = {r}/run/$name.pid
log file = {r}/log/$name.log
mon cluster log file = {r}/log/cluster.log
mon data = {r}/mon/$cluster-$id
osd data = {r}/osd/$cluster-$id
rgw enable lc threads = false
[client.rgw.test]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw data = {r}/rgw
""")
        subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                        f"[v2:127.0.0.1:{self.mon_port}]", str(r / "monmap")],
                       check=True, capture_output=True)
        subprocess.run(["ceph-authtool", "--create-keyring", str(r / "mon.keyring"),
                        "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
                       check=True, capture_output=True)
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(r / "monmap"),
                  "--keyring", str(r / "mon.keyring"))
        mon = self._start("mon", "ceph-mon", "-i", "a")
        _wait("the monitor", lambda: self._ok("ceph", "health"), 60, mon,
              r / "log" / "mon.out")
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run("ceph", "osd", "new", osd_uuid).strip()
        self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        osd = self._start("osd", "ceph-osd", "-i", osd_id)
        _wait("the OSD", lambda: "1 up" in self._out("ceph", "osd", "stat"), 60, osd,
              r / "log" / "osd.out")
        self.start_rgw()
        self._run("radosgw-admin", "user", "create", "--uid=test", "--display-name=test",
                  f"--access-key={ACCESS}", f"--secret-key={SECRET}")
        return self

    def _ok(self, *args: str) -> bool:
        try:
            self._run(*args, timeout=5)
            return True
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def _out(self, *args: str) -> str:
        try:
            return self._run(*args, timeout=5)
        except (RuntimeError, subprocess.TimeoutExpired):
            return ""

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.rgw_port), timeout=0.5):
                return True
        except OSError:
            return False

    def start_rgw(self) -> None:
        p = self._start("rgw", "radosgw", "-n", "client.rgw.test")
        _wait("radosgw", self._port_open, 120, p, self.root / "log" / "rgw.out")

    def stop_rgw(self, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop("rgw", None)
        if p is not None:
            p.send_signal(sig)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def s3(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS,
                            aws_secret_access_key=SECRET, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def bucket_bytes(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Bytes per top directory of the objects under prefix (as S3 lists them)."""
        out: dict[str, int] = {}
        for page in self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                         Prefix=prefix):
            for o in page.get("Contents", []):
                top = o["Key"][len(prefix):].lstrip("/").split("/", 1)[0]
                out[top] = out.get(top, 0) + o["Size"]
        return out

    def close(self) -> None:
        for name in ("rgw", "osd", "mon"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
