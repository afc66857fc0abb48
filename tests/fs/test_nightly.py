"""The nightly job (issue 34): ``cloneaware run`` with a configuration of
jobs on loopback Btrfs and XFS, its state (what is due), its refusals
before anything runs (file, line and key), its failure hook and metrics,
SIGTERM in the middle, and the systemd units.

Oracles of our own making are avoided: snapshots are counted with
``snapshots --json``, the restored tree is hashed against the source, the
hook's environment is what the hook itself wrote down, the metrics are
parsed as the node exporter's text format."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import tomllib

import pytest
from helpers.cli import cli, cli_json, cli_popen, finished
from helpers.treeutil import Snapshot, assert_same_tree

from cloneaware.testing import write_random

pytestmark = pytest.mark.root

MiB = 1 << 20
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def env(tmp_path):
    """A state directory of this test's own (xdist-safe)."""
    return dict(os.environ, CLONEAWARE_STATE_DIR=str(tmp_path / "state"))


def _write(path, text: str):
    path.write_text(text)
    return path


def _snapshots(repo, *filt) -> list[dict]:
    return cli_json("snapshots", "--json", "-r", repo, *filt)


def _two_jobs(btrfs_dir, xfs_dir, tmp_path):
    home, vms = btrfs_dir / "home", xfs_dir / "vms"
    home.mkdir()
    vms.mkdir()
    for i in range(30):
        (home / f"note{i:02d}.txt").write_bytes(b"note %d\n" % i * 40)
    (home / ".cache").mkdir()
    (home / ".cache" / "junk").write_bytes(b"x" * 5000)
    write_random(vms / "golden.img", 4 * MiB, 1)
    subprocess.run(["cp", "--reflink=always", vms / "golden.img", vms / "guest.img"], check=True)
    repo_a, repo_b = tmp_path / "repo-a", tmp_path / "repo-b"
    cli("init", "-r", repo_a, check_rc=0)
    cli("init", "-r", repo_b, check_rc=0)
    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = _write(tmp_path / "c.toml", f"""\
# two jobs, two filesystems, two repositories
[defaults]
keep-last = 2
prune-every = "1w"
check-every = "1d"
after = "echo $CLONEAWARE_JOB >> {marks}/after"

[jobs.home]
paths = ["{home}"]
repository = "{repo_a}"
exclude = [".cache"]
tags = ["nightly"]
keep-tag = ["gold", "silver"]

[jobs.vms]
paths = ["{vms}"]
repository = "{repo_b}"
keep-last = 3
keep-within = "1s"
check-read-data-every = "30d"
check-read-data-parts = 2
""")
    return cfg, home, vms, repo_a, repo_b, marks


def _lines(r) -> dict[str, str]:
    """'JOB: STEP' -> the rest of its line."""
    out = {}
    for ln in r.out.splitlines():
        m = re.match(r"(\S+): (\S+): (.*)", ln)
        assert m, f"not a step line: {ln!r}\n{r}"
        out[f"{m.group(1)}: {m.group(2)}"] = m.group(3)
    return out


def test_two_jobs_end_to_end_then_only_what_is_due(btrfs_dir, xfs_dir, tmp_path, env):
    cfg, home, vms, repo_a, repo_b, marks = _two_jobs(btrfs_dir, xfs_dir, tmp_path)
    r = cli("config", "check", "-c", cfg, env=env, check_rc=0)
    assert "2 jobs (home, vms), no problems found" in r.out, str(r)
    shown = cli_json("config", "show", "--json", "-c", cfg, env=env)
    assert shown["home"]["keep-last"] == 2 and shown["vms"]["keep-last"] == 3, shown
    assert shown["home"]["prune-every"] == "1w" and shown["home"]["repository"] == str(repo_a)
    assert shown["home"]["after"].startswith("echo ") and shown["vms"]["keep-within"] == "1s"
    text = cli("config", "show", "-c", cfg, env=env, check_rc=0).out  # TOML again
    again = tomllib.loads(text)["jobs"]
    assert again == {j: {k: v for k, v in d.items() if v is not None and v != []}
                     for j, d in shown.items()}, (again, shown)

    r = cli("run", "-c", cfg, env=env, check_rc=0)
    got = _lines(r)
    assert list(got) == ["home: backup", "home: forget", "home: prune", "home: check",
                         "home: after", "vms: backup", "vms: forget", "vms: prune",
                         "vms: check-read-data", "vms: after"], r.out
    assert r.err == "", str(r)  # journald gets the summary lines and nothing else
    assert "read 4.0 MiB" in got["vms: backup"], got  # the clone's extents read once
    assert "no problems" in got["vms: check-read-data"] and "(part 1 of 2: " in got[
        "vms: check-read-data"], got
    assert (marks / "after").read_text() == "home\nvms\n"
    snaps = _snapshots(repo_a)
    assert len(snaps) == 1 and snaps[0]["tags"] == ["nightly"], snaps
    dest = tmp_path / "restored"
    cli("restore", "-r", repo_a, "latest", dest, check_rc=0)
    (home / ".cache" / "junk").unlink()
    (home / ".cache").rmdir()  # excluded: the rest must be exact
    assert_same_tree(Snapshot(home, atime=False), Snapshot(dest / "home", atime=False))

    # the same night again, three times: backups and forgets, nothing else due
    for night in range(3):
        (home / "note00.txt").write_bytes(b"changed %d\n" % night)
        r = cli("run", "-c", cfg, env=env, check_rc=0)
        got = _lines(r)
        for job in ("home", "vms"):
            assert got[f"{job}: prune"].startswith("not due (next after "), got
            assert got[f"{job}: check"].startswith("not due (next after "), got
    assert len(_snapshots(repo_a)) == 2 and len(_snapshots(repo_b)) == 3
    assert "removed 1 snapshots, kept 2" in got["home: forget"], got

    # a week later (the state says so): prune is due, and only that job's
    state = tmp_path / "state" / "jobs.json"
    doc = json.loads(state.read_text())
    key = f"home {repo_a}"
    doc[key]["last_prune"] -= 8 * 86400
    state.write_text(json.dumps(doc))
    got = _lines(cli("run", "-c", cfg, "home", env=env, check_rc=0))
    assert got["home: prune"].startswith("deleted "), got
    assert "vms: backup" not in got
    doc = json.loads(state.read_text())
    assert doc[key]["last_prune"] > time.time() - 600, doc

    # a month later for vms: the read-data check is due, and reads the next part
    for part in (2, 1):
        doc = json.loads(state.read_text())
        doc[f"vms {repo_b}"]["last_check_read_data"] -= 31 * 86400
        state.write_text(json.dumps(doc))
        got = _lines(cli("run", "-c", cfg, "vms", env=env, check_rc=0))
        assert f"(part {part} of 2: " in got["vms: check-read-data"], got


def _bad(tmp_path, body: str):
    return _write(tmp_path / "bad.toml", body)


CASES = {
    # name: (config text, the line, the key, what the message says)
    "unknown_key": ('[jobs.a]\npaths = ["{src}"]\nrepository = "{repo}"\nkeep-daly = 7\n',
                    4, "jobs.a.keep-daly", "unknown key (did you mean keep-daily?)"),
    "wrong_type": ('[defaults]\nrepository = "{repo}"\n\n[jobs.a]\npaths = ["{src}"]\n'
                   'keep-daily = "seven"\n', 6, "jobs.a.keep-daily", "must be a whole number"),
    "bad_duration": ('[jobs.a]\npaths = ["{src}"]\nrepository = "{repo}"\n'
                     'prune-every = "weekly"\n', 4, "jobs.a.prune-every", "is not a duration"),
    "bad_keep_within": ('[jobs.a]\npaths = ["{src}"]\nrepository = "{repo}"\n'
                        'keep-within = "never"\n', 4, "jobs.a.keep-within",
                        "must be a duration, not never"),
    "no_repository_key": ('[jobs.a]\npaths = ["{src}"]\n', 1, "jobs.a",
                          "no repository (in the job or in [defaults])"),
    "no_repository_there": ('[jobs.a]\npaths = ["{src}"]\nrepository = "{src}"\n', 3,
                            "jobs.a.repository", "no repository there"),
    "password_unreadable": ('[defaults]\npassword-file = "{src}/no-such-file"\n[jobs.a]\n'
                            'paths = ["{src}"]\nrepository = "{repo}"\n', 2,
                            "jobs.a.password-file", "cannot read it: No such file"),
    "path_missing": ('[jobs.a]\nrepository = "{repo}"\npaths = ["{src}", "{src}/gone"]\n', 3,
                     "jobs.a.paths", "/gone: no such file or directory"),
    "not_toml": ('[jobs.a]\npaths = ["{src}"\n', 2, None, "not TOML"),
    "paths_in_defaults": ('[defaults]\npaths = ["{src}"]\n[jobs.a]\npaths = ["{src}"]\n'
                          'repository = "{repo}"\n', 2, "defaults.paths", "belongs to a job"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_configuration_refused_before_anything_runs(btrfs_dir, tmp_path, env, case):
    text, line, key, says = CASES[case]
    src, repo = btrfs_dir / "src", tmp_path / "repo"
    src.mkdir()
    (src / "f").write_bytes(b"f\n")
    cli("init", "-r", repo, check_rc=0)
    marker = tmp_path / "ran"
    text = text.format(src=src, repo=repo)
    if case != "not_toml":  # [jobs.a] is the last table: its hook, were anything to run
        text += f'before = "touch {marker}"\n'
    cfg = _bad(tmp_path, text)
    for cmd in (("run",), ("config", "check")):
        r = cli(*cmd, "-c", cfg, env=env)
        assert r.returncode == 2, str(r)
        first = r.err.splitlines()[0]
        want = f"cloneaware: {cfg}:{line}: " + (f"{key}: " if key else "")
        assert first.startswith(want) and says in first, f"{want!r} ... {says!r}\n{r}"
        assert r.out == "" and "Traceback" not in r.err, str(r)
    assert not marker.exists(), "a hook ran"
    assert _snapshots(repo) == []


def _metrics(path) -> dict[tuple[str, str], float]:
    """The node exporter's text format, parsed: (metric, job) -> value; every
    sample has its HELP and TYPE."""
    out, typed = {}, set()
    for ln in path.read_text().splitlines():
        if ln.startswith("# TYPE "):
            name, kind = ln.split()[2:4]
            assert kind == "gauge", ln
            typed.add(name)
            continue
        if ln.startswith("#"):
            continue
        m = re.fullmatch(r'([a-z_]+)\{job="([^"]+)"\} (-?[0-9.e+]+)', ln)
        assert m and m.group(1) in typed, ln
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def test_a_failing_job_runs_its_hook_and_the_metrics_say_so(btrfs_dir, tmp_path, env):
    src = btrfs_dir / "src"
    src.mkdir()
    write_random(src / "a", 2 * MiB, 3)
    good, bad = tmp_path / "good", tmp_path / "bad"
    cli("init", "-r", good, check_rc=0)
    cli("init", "-r", bad, "--pack-size", "1", check_rc=0)
    hook_env = tmp_path / "hook.env"
    cfg = _write(tmp_path / "c.toml", f"""\
[jobs.bad]
paths = ["{src}"]
repository = "{bad}"
check-every = "1s"
on-failure = "env | grep ^CLONEAWARE_ | sort > {hook_env}"
[jobs.good]
paths = ["{src}"]
repository = "{good}"
""")
    metrics = tmp_path / "m" / "cloneaware.prom"
    metrics.parent.mkdir()
    r = cli("run", "-c", cfg, "--metrics", metrics, env=env, check_rc=0)
    m1 = _metrics(metrics)
    assert m1[("cloneaware_exit_code", "bad")] == 0 and m1[("cloneaware_exit_code", "good")] == 0
    assert m1[("cloneaware_bytes_read", "bad")] == 2 * MiB
    assert stat.S_IMODE(os.stat(metrics).st_mode) == 0o644
    # a pack of the bad job's repository damaged in its trailer: its next check fails
    packs = [p for p in (bad / "data").rglob("*") if p.is_file()]
    victim = max(packs, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[-40] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = cli("run", "-c", cfg, "--metrics", metrics, env=env)
    assert r.returncode == 3, str(r)  # the first failure's code: the check's
    got = _lines(r)
    assert got["bad: check"].startswith("FAILED (exit 3): "), got
    assert got["bad: on-failure"].startswith("ok"), got
    assert got["good: backup"].startswith("snapshot "), got  # the next job went on
    seen = dict(ln.split("=", 1) for ln in hook_env.read_text().splitlines())
    assert seen["CLONEAWARE_JOB"] == "bad" and seen["CLONEAWARE_STEP"] == "check", seen
    assert seen["CLONEAWARE_EXIT_CODE"] == "3" and seen["CLONEAWARE_REPOSITORY"] == str(bad)
    assert seen["CLONEAWARE_CONFIG"] == str(cfg) and seen["CLONEAWARE_HOOK"] == "on-failure"
    assert "problems, the first: " in seen["CLONEAWARE_MESSAGE"], seen
    m2 = _metrics(metrics)
    assert m2[("cloneaware_exit_code", "bad")] == 3 and m2[("cloneaware_exit_code", "good")] == 0
    assert m2[("cloneaware_last_success_timestamp_seconds", "bad")] == \
        m1[("cloneaware_last_success_timestamp_seconds", "bad")]  # not moved by a failure
    assert m2[("cloneaware_last_success_timestamp_seconds", "good")] > \
        m1[("cloneaware_last_success_timestamp_seconds", "good")]
    assert m2[("cloneaware_last_run_timestamp_seconds", "bad")] > \
        m1[("cloneaware_last_run_timestamp_seconds", "bad")]
    assert os.listdir(metrics.parent) == ["cloneaware.prom"]  # no temporary left


def test_sigterm_stops_the_step_and_the_run(btrfs_dir, tmp_path, env):
    src = btrfs_dir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f\n")
    repo = tmp_path / "repo"
    cli("init", "-r", repo, check_rc=0)
    started, after = tmp_path / "started", tmp_path / "after"
    cfg = _write(tmp_path / "c.toml", f"""\
[jobs.a]
paths = ["{src}"]
repository = "{repo}"
before = "touch {started}; sleep 60"
on-failure = "touch {after}"
[jobs.b]
paths = ["{src}"]
repository = "{repo}"
before = "touch {after}"
""")
    args = ["run", "-c", cfg]
    p = cli_popen(*args, env=env)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and p.poll() is None, "the hook never started"
        time.sleep(0.05)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    r = finished(p, args, timeout=30)
    assert time.monotonic() - t0 < 20, "the hook was not stopped"
    assert r.returncode == 130, str(r)
    assert "a: before: FAILED (exit 130)" in r.out, str(r)
    assert not after.exists(), "the run went on after SIGTERM"
    assert _snapshots(repo) == []


def test_systemd_units_verify(tmp_path):
    """systemd-analyze verify, on the units as shipped (ExecStart pointed at
    the cloneaware under test: verify checks that it is executable); a
    warning fails too (verify exits 0 on an unknown key)."""
    sa = shutil.which("systemd-analyze")
    exe = shutil.which("cloneaware")
    if sa is None or exe is None:
        pytest.skip("no systemd-analyze or no cloneaware on PATH")
    d = tmp_path / "units"
    d.mkdir()
    for name in ("cloneaware@.service", "cloneaware@.timer"):
        text = (os.path.join(TOP, "systemd", name))
        body = open(text).read()
        if name.endswith(".service"):
            assert "ExecStart=/usr/bin/cloneaware run " in body
            body = body.replace("/usr/bin/cloneaware", exe)
        (d / name).write_text(body)
        (d / name.replace("@.", "@home.")).symlink_to(name)
    r = subprocess.run([sa, "verify", "--man=no", "./cloneaware@home.service",
                        "./cloneaware@home.timer"], cwd=d, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r
