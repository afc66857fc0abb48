"""``cloneaware run``: the jobs of a configuration (config.py), each a
backup, then forget by its policy, then prune and check when they are due,
with its hooks around them.

Each step is the cloneaware command a person would type, run as a child
process with ``--json`` (its exit code and summary are exactly the
command's; a crash in one step is that step's failure, and a lock is held
only while its command runs).  A step that fails (an exit code other than 0
and 1) ends its job: the rest is skipped, the job's ``on-failure`` command
runs with what failed in its environment, and the next job goes on.  The
exit code of ``run`` is the worst of all steps: the first failure's code,
else 1 if any step warned, else 0.

When prune and check last ran, and what each job last did, is kept in
``jobs.json`` in the state directory (repo/state.py: $CLONEAWARE_STATE_DIR,
else ~/.local/state/cloneaware), per job and repository, under a lock so
that two timers can run at once.  Losing it only makes prune and check due
again.  ``--metrics FILE`` writes the node exporter's textfile format from
it, atomically (docs/CONFIG.md, "Metrics").
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cloneaware.config import Config, Job
from cloneaware.display import human
from cloneaware.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_WARNINGS
from cloneaware.repo.state import state_dir

STATE_FILE = "jobs.json"


@dataclass
class Step:
    job: str
    step: str
    code: int
    seconds: float
    line: str  # the one-line summary
    message: str = ""  # the failure's own error line
    out: dict = field(default_factory=dict)  # the command's --json
    stderr: str = ""
    #: False for a step only said (not due, or a dry run's): no time is recorded
    ran: bool = True


def ok(code: int) -> bool:
    return code in (EXIT_OK, EXIT_WARNINGS)


def worst(codes: list[int]) -> int:
    """The first failure, else 1 if anything warned, else 0."""
    for c in codes:
        if not ok(c):
            return c
    return EXIT_WARNINGS if EXIT_WARNINGS in codes else EXIT_OK


@contextlib.contextmanager
def job_state(directory: str | None = None) -> Iterator[dict]:
    """jobs.json, read and written back under an exclusive lock."""
    d = directory or state_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, STATE_FILE)
    with open(path + ".lock", "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                state = json.load(f)
            if not isinstance(state, dict):
                state = {}
        except (OSError, ValueError):
            state = {}
        yield state
        write_atomically(path, json.dumps(state, indent=1, sort_keys=True) + "\n")


def write_atomically(path: str, text: str, mode: int = 0o600) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def state_key(job: Job) -> str:
    return f"{job.name} {job.repository}"


class Runner:
    """Runs jobs; ``say`` gets each summary line, ``verbose`` the steps' own
    output too."""

    def __init__(self, cfg: Config, say: Callable[[str], None], verbose: bool = False,
                 dry_run: bool = False, state_directory: str | None = None):
        self.cfg = cfg
        self.say = say
        self.verbose = verbose
        self.dry_run = dry_run
        self.state_directory = state_directory
        self.steps: list[Step] = []
        self.interrupted = False

    # -- one job -------------------------------------------------------

    def run(self, jobs: list[Job]) -> int:
        for job in jobs:
            self.run_job(job)
            if self.interrupted:
                break
        return worst([s.code for s in self.steps])

    def run_job(self, job: Job) -> None:
        t0 = time.time()
        with job_state(self.state_directory) as st:
            mine = dict(st.get(state_key(job), {}))
        steps: list[Step] = []
        failed: Step | None = None
        got: dict[str, Any] = {}
        for name in ("before", "backup", "forget", "prune", "check", "after"):
            s = self._step(job, name, mine, t0)
            if s is None:
                continue
            steps.append(s)
            self.steps.append(s)
            self._report(s)
            if s.step == "backup" and ok(s.code):
                got["bytes_read"] = s.out.get("bytes_read", 0)
                got["added_bytes"] = s.out.get("added_bytes", 0)
            if s.step == "forget" and ok(s.code):
                got["snapshots"] = len(s.out.get("kept", []))
            if ok(s.code) and s.ran and s.step in ("prune", "check", "check-read-data"):
                mine[f"last_{s.step.replace('-', '_')}"] = time.time()
                if s.step == "check-read-data":  # it checks all that check does
                    mine["last_check"] = time.time()
                    mine["next_part"] = mine.get("next_part", 1) % job.check_read_data_parts + 1
            if s.code == EXIT_INTERRUPTED:
                self.interrupted = True
            if not ok(s.code):
                failed = s
                break
        if failed is not None and job.on_failure and not self.interrupted:
            h = self._hook(job, "on-failure", job.on_failure, failed)
            self.steps.append(h)
            self._report(h)
        code = worst([s.code for s in steps])
        now = time.time()
        mine.update({"last_run": now, "last_exit": code, "duration": now - t0})
        if ok(code) and not self.dry_run:
            mine["last_success"] = now
            mine.update(got)
        if not self.dry_run:
            with job_state(self.state_directory) as st:
                st[state_key(job)] = mine

    def _step(self, job: Job, name: str, mine: dict, t0: float) -> Step | None:
        if name in ("before", "after"):
            cmd = job.before if name == "before" else job.after
            return None if not cmd else self._hook(job, name, cmd)
        if name == "backup":
            return self._backup(job)
        if name == "forget":
            if not job.keep:
                return None
            return self._forget(job)
        if name == "prune":
            due = _due(mine.get("last_prune"), job.prune_every, t0)
            if due is not True:
                return Step(job.name, name, EXIT_OK, 0.0, f"{job.name}: prune: {due}", ran=False)
            return self._prune(job)
        if name == "check":
            read = _due(mine.get("last_check_read_data"), job.check_read_data_every, t0)
            if read is True:
                return self._check(job, read_data=True, part=mine.get("next_part", 1))
            due = _due(mine.get("last_check"), job.check_every, t0)
            if due is not True:
                return Step(job.name, name, EXIT_OK, 0.0, f"{job.name}: check: {due}", ran=False)
            return self._check(job, read_data=False)
        raise AssertionError(name)

    # -- the steps -----------------------------------------------------

    def _repo_args(self, job: Job) -> list[str]:
        a = ["-r", job.repository]
        if job.password_file:
            a += ["--password-file", job.password_file]
        if job.s3_endpoint:
            a += ["--s3-endpoint", job.s3_endpoint]
        if job.rsh:
            a += ["--rsh", job.rsh]
        return a + ["--retry-lock", f"{int(job.retry_lock)}s"]

    def _filters(self, job: Job) -> list[str]:
        """The job's snapshots: its host, its PATHs (forget's --path: a
        snapshot whose PATHs include every one) and its tags (all of them)."""
        a = ["--host", job.host or socket.gethostname()]
        for p in job.paths:
            a += ["--path", os.path.abspath(p)]
        if job.tags:
            a += ["--tag", ",".join(job.tags)]
        return a

    def _backup(self, job: Job) -> Step:
        a = ["backup", *self._repo_args(job)]
        if job.host:
            a += ["--host", job.host]
        for t in job.tags:
            a += ["--tag", t]
        for x in job.exclude:
            a += ["--exclude", x]
        if job.exclude_caches:
            a.append("--exclude-caches")
        if job.cross_filesystems:
            a.append("--cross-filesystems")
        if job.compress:
            a += ["--compress", job.compress]
        if self.dry_run:
            a.append("--dry-run")
        s = self._command(job, "backup", a + ["--", *job.paths])
        if ok(s.code):
            o = s.out
            snap = (o.get("snapshot") or "")[:8] or "none (dry run)"
            extra = ""
            if s.code == EXIT_WARNINGS:
                extra = f", with warnings ({_warnings(s.stderr)})"
            s.line = (f"{job.name}: backup: snapshot {snap}, {o.get('files', 0)} files, read "
                      f"{human(o.get('bytes_read', 0))}, added {human(o.get('added_bytes', 0))}"
                      f"{extra}, {s.seconds:.1f} s")
        return s

    def _forget(self, job: Job) -> Step:
        a = ["forget", *self._repo_args(job), *self._filters(job)]
        for k, v in job.keep.items():
            for one in v if isinstance(v, list) else [v]:  # keep-tag: each tag
                a += [f"--{k}", str(one)]
        if self.dry_run:
            a.append("--dry-run")
        s = self._command(job, "forget", a)
        if ok(s.code):
            verb = "would remove" if self.dry_run else "removed"
            s.line = (f"{job.name}: forget: {verb} {len(s.out.get('removed', []))} snapshots, "
                      f"kept {len(s.out.get('kept', []))}, {s.seconds:.1f} s")
        return s

    def _prune(self, job: Job) -> Step:
        a = ["prune", *self._repo_args(job)] + (["--dry-run"] if self.dry_run else [])
        s = self._command(job, "prune", a)
        if ok(s.code):
            o = s.out
            s.line = (f"{job.name}: prune: deleted "
                      f"{o.get('packs_deleted', 0) + o.get('orphans_deleted', 0)} packs, "
                      f"repacked {o.get('packs_repacked', 0)}; "
                      f"{human(o.get('bytes_before', 0))} -> {human(o.get('bytes_after', 0))}, "
                      f"{s.seconds:.1f} s")
        return s

    def _check(self, job: Job, read_data: bool, part: int = 1) -> Step:
        name = "check-read-data" if read_data else "check"
        a = ["check", *self._repo_args(job)]
        parts = job.check_read_data_parts
        part = part if isinstance(part, int) and 1 <= part <= parts else 1
        if read_data:
            a += ["--read-data-subset", f"{part}/{parts}"] if parts > 1 else ["--read-data"]
        if self.dry_run:
            return Step(job.name, name, EXIT_OK, 0.0, f"{job.name}: {name}: due (dry run)",
                        ran=False)
        s = self._command(job, name, a)
        o = s.out
        if ok(s.code):
            s.line = (f"{job.name}: {name}: no problems, {o.get('snapshots', 0)} snapshots, "
                      f"{o.get('packs', 0)} packs"
                      + (f", read {human(o.get('read_bytes', 0))}" if read_data else "")
                      + (f" (part {part} of {parts}: {o.get('read_packs', 0)} packs)"
                         if read_data and parts > 1 else "")
                      + f", {s.seconds:.1f} s")
        elif o.get("errors"):
            s.message = f"{len(o['errors'])} problems, the first: {o['errors'][0]}"
            s.line = f"{job.name}: {name}: FAILED (exit {s.code}): {s.message}"
        return s

    def _command(self, job: Job, step: str, args: list[str]) -> Step:
        argv = [sys.executable, "-P", "-m", "cloneaware", *args[:1], "--json", "-q",
                *args[1:]]
        t = time.monotonic()
        code, out, err = self._child(argv, _same_cloneaware(), subprocess.PIPE)
        secs = time.monotonic() - t
        try:
            doc = json.loads(out) if out.strip() else {}
        except ValueError:
            doc = {}
        if not isinstance(doc, dict):
            doc = {}
        text = err.decode(errors="replace")
        s = Step(job.name, step, code, secs, "", out=doc, stderr=text)
        if not ok(code):
            s.message = doc.get("error") or _last_error(text) or f"exit {code}"
            s.line = f"{job.name}: {step}: FAILED (exit {code}): {s.message}"
        return s

    def _hook(self, job: Job, name: str, cmd: str, failed: Step | None = None) -> Step:
        env = dict(os.environ, CLONEAWARE_JOB=job.name, CLONEAWARE_REPOSITORY=job.repository,
                   CLONEAWARE_CONFIG=self.cfg.path, CLONEAWARE_HOOK=name)
        if failed is not None:
            env.update(CLONEAWARE_STEP=failed.step, CLONEAWARE_EXIT_CODE=str(failed.code),
                       CLONEAWARE_MESSAGE=failed.message)
        if self.dry_run:
            return Step(job.name, name, EXIT_OK, 0.0, f"{job.name}: {name}: would run {cmd!r}",
                        ran=False)
        t = time.monotonic()
        try:
            code, raw, _ = self._child(["/bin/sh", "-c", cmd], env, subprocess.STDOUT)
            out = raw.decode(errors="replace")
        except OSError as e:
            code, out = 2, f"cannot run /bin/sh: {e.strerror}"
        secs = time.monotonic() - t
        s = Step(job.name, name, EXIT_OK, secs, f"{job.name}: {name}: ok, {secs:.1f} s",
                 stderr=out)
        if code:
            # a hook that fails is the job's failure, with exit 2 unless interrupted
            s.code = EXIT_INTERRUPTED if code == EXIT_INTERRUPTED else 2
            tail = _last_line(out)
            s.message = f"{name} command exited {code}" + (f": {tail}" if tail else "")
            s.line = f"{job.name}: {name}: FAILED (exit {s.code}): {s.message}"
        return s

    def _child(self, argv: list[str], env: dict | None, stderr: int
               ) -> tuple[int, bytes, bytes]:
        """Run a step's process and wait for it.  It has a process group of
        its own, so a terminal's Ctrl-C reaches only ``run``, which passes
        SIGINT or SIGTERM on to its group once and lets it clean up (the unit's
        KillMode=mixed does the same for systemd's stop); ``run`` then goes
        no further."""
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=stderr, process_group=0)
        got: list[int] = []

        def forward(signum, frame):
            if not got:
                got.append(signum)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signum)  # a hook's children too

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            out, err = p.communicate()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if got:
            self.interrupted = True
        code = p.returncode
        if code < 0:  # killed by a signal it did not handle
            code = EXIT_INTERRUPTED if got else 128 - code
        return code, out, err or b""

    def _report(self, s: Step) -> None:
        self.say(s.line)
        if self.verbose and s.stderr.strip():
            for ln in s.stderr.rstrip("\n").splitlines():
                self.say(f"  {ln}")


def _same_cloneaware() -> dict:
    """The environment of a step: the cloneaware running this one first on
    the path, whatever the working directory or PYTHONPATH would find."""
    import cloneaware

    top = os.path.dirname(os.path.dirname(os.path.abspath(cloneaware.__file__)))
    pp = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=top + (os.pathsep + pp if pp else ""))


def _due(last: float | None, every: float | None, now: float) -> bool | str:
    """True if due; else why not, as the summary says it."""
    if every is None:
        return "never (not configured)"
    if last is None or now - last >= every - 60:  # a timer's minute of jitter
        return True
    nxt = time.strftime("%Y-%m-%d %H:%M", time.localtime(last + every))
    return f"not due (next after {nxt})"


def _last_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("cloneaware:")]
    pick = errs[-1] if errs else (lines[-1] if lines else "")
    return pick.removeprefix("cloneaware:").strip()


def _warnings(text: str) -> str:
    """How many warnings a step printed, and the first (-v shows them all)."""
    w = [ln.removeprefix("cloneaware:").strip() for ln in text.splitlines()
         if ln.startswith("cloneaware:")]
    if not w:
        return "none printed"
    return w[0][:200] + (f"; {len(w) - 1} more" if len(w) > 1 else "")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


# -- metrics ---------------------------------------------------------------

METRICS = (
    ("last_success_timestamp_seconds", "last_success",
     "When the job last finished without a failure (Unix time)."),
    ("last_run_timestamp_seconds", "last_run", "When the job last ran (Unix time)."),
    ("exit_code", "last_exit", "The exit code of the job's last run (0 ok, 1 warnings)."),
    ("duration_seconds", "duration", "How long the job's last run took."),
    ("bytes_read", "bytes_read", "Bytes the last successful backup read."),
    ("bytes_added", "added_bytes", "Bytes the last successful backup added to the repository."),
    ("snapshots", "snapshots", "Snapshots of the job after its last forget."),
)


def metrics_text(cfg: Config, jobs: list[Job], state_directory: str | None = None) -> str:
    """The node exporter's textfile format for ``jobs``, from jobs.json."""
    with job_state(state_directory) as st:
        have = {j.name: st.get(state_key(j), {}) for j in jobs}
    out = []
    for metric, key, text in METRICS:
        rows = [(n, d[key]) for n, d in have.items() if isinstance(d.get(key), (int, float))]
        if not rows:
            continue
        out.append(f"# HELP cloneaware_{metric} {text}")
        out.append(f"# TYPE cloneaware_{metric} gauge")
        for n, v in rows:
            out.append(f'cloneaware_{metric}{{job="{n}"}} {_num(v)}')
    return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3f}"


def write_metrics(path: str, cfg: Config, jobs: list[Job],
                  state_directory: str | None = None) -> None:
    write_atomically(path, metrics_text(cfg, jobs, state_directory), mode=0o644)
