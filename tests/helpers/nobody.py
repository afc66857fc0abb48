"""Run the CLI as uid/gid 65534 (``nobody``): the fixture and its runner,
shared by the tests of what a user other than root meets."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloneaware.testing import make_loopfs
from helpers.cli import Result, cli

NOBODY = 65534
MiB = 1 << 20


@dataclass
class Nobody:
    root: Path  # a world-traversable directory on its own tmpfs
    python: str
    site: str
    env: dict

    def run(self, *args, timeout: float = 120) -> Result:
        return cli(*args, prefix=["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                  "--clear-groups"],
                   python=self.python, site=self.site, timeout=timeout, cwd="/",
                   env=self.env)


@pytest.fixture
def nobody():
    """Run the CLI as uid/gid 65534.  The interpreter may live under /root
    (mode 0700), so what it needs is bind-mounted read-only where nobody can
    reach it: its installation (sys.base_prefix: the interpreter, the
    standard library, libpython) and, when the tests run in a venv, the venv
    (sys.prefix: the site-packages under test, put first on sys.path).  The
    work happens on a tmpfs nobody can traverse."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux)")
    base = Path(tempfile.mkdtemp(prefix="cloneaware-nobody-", dir="/tmp"))
    os.chmod(base, 0o755)
    roots = {"base": os.path.realpath(sys.base_prefix)}
    if os.path.realpath(sys.prefix) != roots["base"]:
        roots["venv"] = os.path.realpath(sys.prefix)
    mounted: list[Path] = []
    fs = None

    def reachable(path: str, root: str) -> str:
        """PATH (in the installation ROOT) as nobody reaches it."""
        rel = os.path.relpath(os.path.realpath(path), roots[root])
        assert not rel.startswith(".."), (path, roots[root])
        return str(base / "py" / root / rel)

    try:
        for name, src in roots.items():
            (base / "py" / name).mkdir(parents=True)
            subprocess.run(["mount", "--bind", "-o", "ro", src, str(base / "py" / name)],
                           check=True, capture_output=True)
            mounted.append(base / "py" / name)
        fs = make_loopfs(base, "tmpfs", 512 * MiB)
        os.chmod(fs.path, 0o755)
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir and not os.path.relpath(os.path.realpath(libdir),
                                          roots["base"]).startswith(".."):
            # a shared libpython is found through an absolute RUNPATH under /root
            env["LD_LIBRARY_PATH"] = reachable(libdir, "base")
        nb = Nobody(fs.path, reachable(sys.executable, "base"),
                    reachable(sysconfig.get_paths()["purelib"], "venv" if "venv" in roots
                              else "base"), env)
        r = nb.run("--version")
        assert r.returncode == 0, str(r)
        yield nb
    finally:
        if fs is not None:
            fs.unmount()
        for m in reversed(mounted):
            subprocess.run(["umount", str(m)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


