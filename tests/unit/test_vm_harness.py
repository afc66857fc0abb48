"""make vm-test must fail loudly, never pass silently, when the VM cannot
boot.  (Booting needs qemu and minutes: `make vm-test` itself is not in the
suite; these are the checks that run before any boot.)"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="vm/run.sh runs as root")


def run(**env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TOP / "vm" / "run.sh")], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60, cwd="/")


def test_missing_kernel_fails_before_booting(tmp_path):
    r = run(KERNEL=str(tmp_path / "no-such-vmlinuz"))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"vm-test: FAILED: cannot boot the VM: kernel image "
                                f"'{tmp_path / 'no-such-vmlinuz'}' does not exist or is unreadable")
