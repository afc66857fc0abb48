"""Two network namespaces joined by a veth pair, with a real OpenSSH sshd in
one of them: the network path the ssh:// tests run over.

``ssh_network()`` builds it and tears it down (sshd and every process left in
the namespaces killed, namespaces deleted) even when a test fails; the
``sshnet_session`` fixture (tests/conftest.py) keeps one per pytest-xdist
worker (the names hold the worker's pid) and ``sshnet`` hands it to one test
and puts the link back as it found it (up, no rate limit) afterwards.

Links, addresses and qdiscs are set with pyroute2; processes are put in a
namespace with ``nsenter --net`` only, so they all share the test's mount
namespace and see its loopback filesystems.  The addresses are private and
the namespaces ours: no traffic leaves the machine."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cloneaware.testing import timeout as scaled
from helpers.cli import Result, cli, cli_argv, cli_command

SSHD = "/usr/sbin/sshd"
SERVER_IP, CLIENT_IP, PREFIX = "10.201.0.1", "10.201.0.2", 30


def missing_capability() -> str | None:
    """Why the ssh network cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "pyroute2 is not installed"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} missing (apt-get install openssh-server)"
    for tool in ("ssh", "ssh-keygen", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


class SshNet:
    """The network and its sshd.  ``client(...)`` runs a command in the client
    namespace; ``new_key(...)`` adds an authorized key; ``link_up``,
    ``limit`` change the link."""

    def __init__(self, tmp: Path):
        pid = os.getpid()
        self.tmp = tmp
        self.server_ns, self.client_ns = f"ca-srv-{pid}", f"ca-cli-{pid}"
        self.server_if, self.client_if = f"cas{pid}", f"cac{pid}"
        self.server_ip, self.client_ip = SERVER_IP, CLIENT_IP
        self.sshd: subprocess.Popen | None = None
        self.sshd_log = tmp / "sshd.log"
        self.authorized = tmp / "authorized_keys"
        self.authorized.write_text("")
        self.nkeys = 0
        self.key: Path | None = None

    # -- building and tearing down -------------------------------------------------

    def setup(self) -> None:
        from pyroute2 import IPRoute, netns

        for ns in (self.server_ns, self.client_ns):
            if ns in netns.listnetns():  # left by a crashed run with a recycled pid
                self._kill_ns_pids(ns)
                netns.remove(ns)
            netns.create(ns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.client_if, kind="veth",
                     peer={"ifname": self.server_if, "net_ns_fd": self.server_ns})
            idx = ipr.link_lookup(ifname=self.client_if)[0]
            ipr.link("set", index=idx, net_ns_fd=self.client_ns)
        for ns, ifname, addr in ((self.server_ns, self.server_if, self.server_ip),
                                 (self.client_ns, self.client_if, self.client_ip)):
            with IPRoute(netns=ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=idx, address=addr, prefixlen=PREFIX)
                ipr.link("set", index=idx, state="up")
        self._start_sshd()
        self.key = self.new_key()
        self.wait_ready()

    def _start_sshd(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        hostkey = self.tmp / "ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)],
                       check=True, capture_output=True)
        cfg = self.tmp / "sshd_config"
        cfg.write_text(
            f"Port 22\n"
            f"ListenAddress {self.server_ip}\n"
            f"HostKey {hostkey}\n"
            f"PidFile {self.tmp / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.authorized}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "MaxStartups 64\n"
            "ClientAliveInterval 1\n"
            "ClientAliveCountMax 3\n"
            "LogLevel VERBOSE\n")
        with open(self.sshd_log, "wb") as log:
            self.sshd = subprocess.Popen(
                self.in_ns(self.server_ns, [SSHD, "-D", "-e", "-f", str(cfg)]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def wait_ready(self, timeout: float = scaled(15)) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.client(["ssh", *self.ssh_options(), f"root@{self.server_ip}", "true"],
                            timeout=timeout)
            if r.returncode == 0:
                return
            if self.sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd in {self.server_ns} did not come up: "
                                   f"{r.stderr.decode(errors='replace')}\n{self.log()}")
            time.sleep(0.1)

    @staticmethod
    def _kill_ns_pids(ns: str) -> None:
        """End every process left in one of our namespaces (sshd sessions,
        cloneaware serve, ssh clients), by pid."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            pids = [int(p) for p in r.stdout.split()]
            if not pids:
                return
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
                if not r.stdout.split():
                    return
                time.sleep(0.05)

    def close(self) -> None:
        from pyroute2 import netns

        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.terminate()
            try:
                self.sshd.wait(5)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()
        names = netns.listnetns()
        for ns in (self.client_ns, self.server_ns):
            if ns in names:
                self._kill_ns_pids(ns)
                netns.remove(ns)  # the veth pair goes with its namespaces

    # -- running things ------------------------------------------------------------

    @staticmethod
    def in_ns(ns: str, argv: list) -> list:
        return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]

    def ssh_options(self, key: Path | None = None) -> list[str]:
        return ["-F", "/dev/null", "-i", str(key or self.key), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={int(scaled(5))}",
                "-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3"]

    def rsh(self, key: Path | None = None) -> str:
        """A --rsh value that logs in with KEY (default: the unrestricted one)."""
        return shlex.join(["ssh", *self.ssh_options(key)])

    def url(self, path, user: str = "root") -> str:
        return f"ssh://{user}@{self.server_ip}{path}"

    def new_key(self, options: str = "") -> Path:
        """A fresh client key, authorized with the given authorized_keys
        options (e.g. ``command="...",restrict``); sshd reads the file at
        each login."""
        self.nkeys += 1
        key = self.tmp / f"client{self.nkeys}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                        f"cloneaware-test-{self.nkeys}", "-f", str(key)],
                       check=True, capture_output=True)
        pub = (self.tmp / f"client{self.nkeys}.pub").read_text().strip()
        with open(self.authorized, "a") as f:
            f.write((options + " " if options else "") + pub + "\n")
        return key

    def client_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # what ssh runs on the server: the cloneaware under test (helpers/cli.py)
        env["CLONEAWARE_REMOTE_COMMAND"] = shlex.join(cli_command())
        env.pop("CLONEAWARE_RSH", None)
        return env

    def client(self, argv: list[str], timeout: float = scaled(120), env: dict | None = None,
               **kw) -> subprocess.CompletedProcess:
        """Run ARGV in the client namespace (bytes output)."""
        return subprocess.run(self.in_ns(self.client_ns, argv), capture_output=True,
                              timeout=timeout, env=env or self.client_env(), **kw)

    def client_popen(self, argv: list, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.in_ns(self.client_ns, argv), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env or self.client_env())

    def cloneaware_argv(self, *args, key: Path | None = None) -> list[bytes]:
        """``cloneaware ARGS --rsh ...`` as run on the client."""
        return cli_argv(*args, "--rsh", self.rsh(key))

    def cloneaware(self, *args, key: Path | None = None, timeout: float = scaled(300),
                   check_rc: int | None = None, env: dict | None = None) -> Result:
        """``cloneaware ARGS`` in the client namespace, logging in with KEY;
        ENV is added to the client's environment.  Never a traceback."""
        return cli(*args, "--rsh", self.rsh(key), prefix=self.in_ns(self.client_ns, []),
                   env=dict(self.client_env(), **(env or {})), timeout=timeout,
                   check_rc=check_rc, explain=self.log)

    def connect_seconds(self, tries: int = 3) -> float:
        """The best time of ``ssh host true``: connection and login."""
        best = float("inf")
        for _ in range(tries):
            t0 = time.monotonic()
            r = self.client(["ssh", *self.ssh_options(), f"root@{self.server_ip}", "true"])
            assert r.returncode == 0, r.stderr
            best = min(best, time.monotonic() - t0)
        return best

    def server_processes(self) -> list[str]:
        """Command lines of the processes in the server namespace other than
        the sshd listener (sessions, ``cloneaware serve``)."""
        r = subprocess.run(["ip", "netns", "pids", self.server_ns], capture_output=True,
                           text=True)
        out = []
        for p in r.stdout.split():
            if int(p) == self.sshd.pid:
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
            except OSError:
                pass
        return out

    def log(self, lines: int = 30) -> str:
        try:
            text = self.sshd_log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "sshd log (last lines):\n" + "\n".join(text[-lines:])

    # -- the link ------------------------------------------------------------------

    def _ipr(self, side: str):
        from pyroute2 import IPRoute

        ns = self.client_ns if side == "client" else self.server_ns
        ifname = self.client_if if side == "client" else self.server_if
        ipr = IPRoute(netns=ns)
        return ipr, ipr.link_lookup(ifname=ifname)[0]

    def link_up(self, up: bool) -> None:
        """Set the client's end of the veth up or down (down cuts the link)."""
        ipr, idx = self._ipr("client")
        with ipr:
            ipr.link("set", index=idx, state="up" if up else "down")

    def limit(self, rate: str = "200mbit", side: str = "client") -> None:
        """A tbf qdisc on the egress of one end: the rate of that direction."""
        ipr, idx = self._ipr(side)
        with ipr:
            # burst: at least one GSO super-packet (64 KiB) at a time
            ipr.tc("add", "tbf", idx, rate=rate, burst=256 << 10, latency="50ms")

    def unlimit(self, side: str = "client") -> None:
        ipr, idx = self._ipr(side)
        with ipr:
            kinds = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=idx)
                     if q["parent"] == 0xFFFFFFFF]
            if "tbf" in kinds:
                ipr.tc("del", index=idx, handle=0, parent=0xFFFFFFFF)

    def reset(self) -> None:
        self.link_up(True)
        for side in ("client", "server"):
            self.unlimit(side)


@contextmanager
def ssh_network(tmp: Path) -> Iterator[SshNet]:
    why = missing_capability()
    if why:
        pytest.skip(why)
    net = SshNet(tmp)
    try:
        try:
            net.setup()
        except OSError as e:  # no CAP_NET_ADMIN / CAP_SYS_ADMIN in a container
            pytest.skip(f"cannot build network namespaces here: {e}")
        yield net
    finally:
        net.close()
