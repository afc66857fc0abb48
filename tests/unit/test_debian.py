"""debian/: the package's version is cloneaware's, and every runtime dependency
in pyproject.toml has its Debian package in debian/control.  (The package
itself is built and tested installed by `make deb-test`.)"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from cloneaware import __version__

TOP = Path(__file__).resolve().parents[2]


def _control() -> dict[str, str]:
    """The binary package's stanza, continuation lines joined."""
    stanzas = (TOP / "debian" / "control").read_text().split("\n\n")
    fields: dict[str, str] = {}
    key = ""
    for line in stanzas[1].splitlines():
        if line[:1].isspace():
            fields[key] += " " + line.strip()
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def test_changelog_version_is_the_package_version():
    first = (TOP / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"cloneaware \(([^)]+)\) ", first)
    assert m, first
    upstream = m.group(1).rsplit("-", 1)[0].split(":")[-1]
    assert upstream == __version__


def test_every_python_dependency_is_a_debian_dependency():
    project = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]
    depends = {d.strip().split()[0] for d in _control()["Depends"].split(",") if d.strip()}
    for req in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("_", "-")
        assert f"python3-{name}" in depends, f"{req}: add python3-{name} to debian/control"


def test_architecture_any_and_recommends():
    fields = _control()
    assert fields["Architecture"] == "any"     # the cffi extension is compiled
    assert {"btrfs-progs", "xfsprogs"} <= {r.strip() for r in fields["Recommends"].split(",")}
