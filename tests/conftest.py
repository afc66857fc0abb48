"""Shared configuration of the test suite.

Layout: ``unit/`` needs nothing but the installed package; ``fs/`` makes
loopback filesystems (root, loop devices; fixtures from the
``cloneaware.testing`` plugin, loaded with ``-p`` in pyproject.toml);
``helpers/`` holds the modules the tests share, imported as ``helpers.*``
(``pythonpath = ["tests"]`` in pyproject.toml), among them ``helpers.cli``,
the one place that knows how the CLI is run.

The cloneaware under test is the one installed for the interpreter running
pytest; run ``python -P -m pytest`` so that the current directory (the source
tree, when run from the top) is not put on sys.path ahead of it.
``pytest_configure`` refuses a run where the source tree shadows a regular
installation."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.ceph import Ceph
from helpers.ceph import missing as ceph_missing
from helpers.netns import SshNet, ssh_network
from helpers.nobody import nobody  # noqa: F401 - the fixture, for every test module


def _shadowed_by_source_tree(root: Path) -> str | None:
    """Why the cloneaware imported here is not the installed one, or None."""
    import importlib.metadata

    import cloneaware

    pkg = Path(cloneaware.__file__).resolve().parent
    if pkg != (root / "cloneaware").resolve():
        return None
    try:
        url = importlib.metadata.distribution("cloneaware").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        url = None
    if url and json.loads(url).get("dir_info", {}).get("editable"):
        return None  # an editable install: the source tree is the installation
    return (f"cloneaware is imported from the source tree {pkg}, not from its installation: "
            "run the tests with 'python -P -m pytest' (or install with 'pip install -e .')")


def pytest_configure(config: pytest.Config) -> None:
    why = _shadowed_by_source_tree(config.rootpath)
    if why:
        raise pytest.UsageError(why)


# --- the ssh network (helpers/netns.py) -----------------------------------------------

@pytest.fixture(scope="session")
def sshnet_session(tmp_path_factory) -> Iterator[SshNet]:
    """One ssh network per pytest-xdist worker (the names hold its pid)."""
    with ssh_network(tmp_path_factory.mktemp("sshnet")) as net:
        yield net


@pytest.fixture
def sshnet(sshnet_session) -> Iterator[SshNet]:
    """The worker's ssh network; the link is up and unlimited again after
    the test, whatever it did."""
    sshnet_session.reset()
    yield sshnet_session
    sshnet_session.reset()


@pytest.fixture(autouse=True)
def _client_state(tmp_path_factory, monkeypatch):
    """What a host remembers of repositories (cloneaware/repo/state.py): a
    directory of each test's own, not the user's ~/.local/state."""
    monkeypatch.setenv("CLONEAWARE_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(autouse=True)
def _anchors_left_by_the_test():
    """Backups into repositories keep anchors at the top of the filesystem
    (docs/REPOSITORY.md); on this worker's shared loopback filesystems they
    would pin space for the rest of the session: remove the ones a test made."""
    from cloneaware.testing import _shared

    def sets() -> set[Path]:
        out = set()
        for fs in list(_shared.values()):
            d = fs.path / ".cloneaware-anchors"
            if d.is_dir():
                out |= {p for p in d.iterdir() if p.is_dir()}
        return out

    before = sets()
    yield
    for p in sets() - before:
        shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph_session(tmp_path_factory) -> Iterator[Ceph]:
    """This worker's Ceph cluster (a monitor, an OSD on memstore, radosgw on
    127.0.0.1), started once and stopped at the end, even after failures."""
    why = ceph_missing()
    if why:
        pytest.skip(why)
    c = Ceph(tmp_path_factory.mktemp("ceph"))
    try:
        c.start()
    except BaseException:
        c.close()
        raise
    yield c
    c.close()


@pytest.fixture
def ceph(ceph_session, request) -> Iterator[Ceph]:
    """The cluster, with radosgw running (a test that stops it gets it back)."""
    if "rgw" not in ceph_session.procs:
        ceph_session.start_rgw()
    yield ceph_session
    if "rgw" not in ceph_session.procs:
        ceph_session.start_rgw()
