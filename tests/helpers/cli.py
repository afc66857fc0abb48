"""The one place that knows how the tests run the cloneaware CLI.

Every test runs ``cloneaware ARGS`` through this module:

- ``cli(*args, ...)``: a fresh process, as a user runs it; returns a
  ``Result``.  By default it fails the test if ``Traceback`` appears on
  stderr, and with ``check_rc`` if the exit code is not the one expected.
- ``cli_json(*args, ...)``: the same, with ``--json`` output parsed.
- ``cli_popen(*args, ...)``: a running process, for pipes and signals;
  ``finished(p, args)`` waits for it and gives its ``Result``.
- ``cli_argv(*args, ...)`` / ``cli_command(...)``: the command line itself,
  for what runs it elsewhere (another network namespace, a forced ssh
  command, ``CLONEAWARE_REMOTE_COMMAND``).
- ``CliServer``: the same command run in a forked child of a process that
  has already imported the CLI, for the hundreds of hostile archives; same
  ``Result``, same checks.

The command is ``[sys.executable, "-P", "-m", "cloneaware", ...]`` (what the
``cloneaware`` console script runs: cloneaware/__main__.py): the
interpreter running the tests, so the cloneaware under test is the one
these tests import (``cloneaware`` on PATH may be another installation), and
``-P`` so that the working directory (the source tree, say) is not put
ahead of it on sys.path.  ``python=`` and ``site=`` run another interpreter
(a read-only copy of this one that another user can reach) with this
installation's site-packages put first.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["CliServer", "Result", "assert_one_line_error", "cli", "cli_argv", "cli_command",
           "cli_json", "cli_popen", "finished"]

#: ``python -P -c LAUNCH SITEDIR ARGS``: SITEDIR's packages (and its .pth
#: files) put first on sys.path, then cloneaware run as ``-m`` runs it.
_LAUNCH_WITH_SITE = (
    "import runpy, site, sys\n"
    "d = sys.argv.pop(1)\n"
    "old = list(sys.path)\n"
    "site.addsitedir(d)\n"
    "sys.path[:] = [p for p in sys.path if p not in old] + old\n"
    "runpy.run_module('cloneaware', run_name='__main__', alter_sys=True)\n")


def cli_command(python: str | None = None, site: str | None = None) -> list[str]:
    """The command that runs the cloneaware under test (its arguments follow)."""
    py = sys.executable if python is None else python
    if site is None:
        return [py, "-P", "-m", "cloneaware"]
    return [py, "-P", "-c", _LAUNCH_WITH_SITE, site]


def _arg(a) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, os.PathLike):
        return os.fsencode(a)
    return os.fsencode(str(a))


def cli_argv(*args, prefix: Sequence = (), python: str | None = None,
             site: str | None = None) -> list[bytes]:
    """``PREFIX... cloneaware ARGS`` as an argv (PREFIX: nsenter, setpriv,
    time, ...)."""
    return [_arg(a) for a in prefix] + [_arg(a) for a in cli_command(python, site)] + \
        [_arg(a) for a in args]


@dataclass
class Result:
    """What a run of the CLI gave (bytes as written)."""
    args: list
    returncode: int
    stdout: bytes
    stderr: bytes
    #: peak resident set size in KiB (CliServer only)
    maxrss_kib: int | None = None

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")

    def json(self):
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (f"cloneaware {' '.join(os.fsdecode(_arg(a)) for a in self.args)}: exit "
                f"{self.returncode}\nstdout: {self.out[-2000:]}\nstderr: {self.err[-4000:]}")


def _check(r: Result, check_rc: int | None, traceback_ok: bool,
           explain: Callable[[], str] | None) -> Result:
    more = ("\n" + explain()) if explain is not None else ""
    if not traceback_ok:
        assert "Traceback" not in r.err, f"a traceback\n{r}{more}"
    if check_rc is not None:
        assert r.returncode == check_rc, f"expected exit {check_rc}\n{r}{more}"
    return r


def cli(*args, check_rc: int | None = None, input: bytes | None = None, stdin=None,
        timeout: float = 300, cwd=None, env: dict | None = None, prefix: Sequence = (),
        python: str | None = None, site: str | None = None, traceback_ok: bool = False,
        explain: Callable[[], str] | None = None) -> Result:
    """Run ``cloneaware ARGS`` to the end (bytes in and out).

    check_rc: the exit code it must have; input: bytes for its stdin (or
    stdin: a file); prefix: a command it runs under; explain: more to show
    when a check fails (a log)."""
    r = subprocess.run(cli_argv(*args, prefix=prefix, python=python, site=site),
                       input=input, stdin=stdin, capture_output=True, timeout=timeout,
                       cwd=cwd, env=env)
    return _check(Result(list(args), r.returncode, r.stdout, r.stderr), check_rc,
                  traceback_ok, explain)


def cli_json(*args, check_rc: int = 0, **kw):
    """``cloneaware ARGS`` (which include --json); its output parsed."""
    return cli(*args, check_rc=check_rc, **kw).json()


def cli_popen(*args, stdin=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              prefix: Sequence = (), env: dict | None = None, cwd=None) -> subprocess.Popen:
    """``cloneaware ARGS`` started, not waited for (pipes, signals); see
    ``finished()`` for its Result."""
    return subprocess.Popen(cli_argv(*args, prefix=prefix), stdin=stdin, stdout=stdout,
                            stderr=stderr, env=env, cwd=cwd)


def finished(p: subprocess.Popen, args, timeout: float = 60, check_rc: int | None = None,
             traceback_ok: bool = False) -> Result:
    """Wait for a ``cli_popen`` process (killed if it outlives TIMEOUT)."""
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return _check(Result(list(args), p.returncode, out or b"", err or b""), check_rc,
                  traceback_ok, None)


def assert_one_line_error(r: Result, rc: int | tuple | None = None) -> str:
    """A failed command: non-zero exit (``rc`` if given), exactly one line on
    stderr, no traceback.  Returns that line."""
    err = r.err
    assert "Traceback" not in err, str(r)
    assert r.returncode != 0, str(r)
    if rc is not None:
        ok = rc if isinstance(rc, tuple) else (rc,)
        assert r.returncode in ok, f"expected exit {rc}\n{r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr\n{r}"
    assert lines[0].startswith("cloneaware: "), str(r)
    return lines[0]


# --- the fast path: a forked child of a process that imported the CLI ---------------

_SERVER = r"""
import base64, json, os, sys, tempfile, time, traceback
import importlib
import cloneaware.cli

# what the commands import lazily, imported once here instead of per child
for _m in ("numpy", "zstandard", "cloneaware.restore", "cloneaware.backup",
           "cloneaware.archive.manifest", "cloneaware.archive.reader", "cloneaware.progress",
           "cloneaware.fsinfo", "cloneaware.scan.report"):
    try:
        importlib.import_module(_m)
    except ImportError:
        pass

proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
proto_out = os.dup(1)
devnull = os.open(os.devnull, os.O_RDONLY)

# warm up (typer builds its command tree and imports more on first use)
_save = os.dup(2), os.dup(1)
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 1)
os.dup2(_null, 2)
for _argv in (["ls", "/nonexistent/archive"], ["verify", "/nonexistent/archive"],
              ["restore", "/nonexistent/archive", "/nonexistent/dest"]):
    sys.argv = ["cloneaware"] + _argv
    try:
        cloneaware.cli.main()
    except BaseException:
        pass
sys.stdout.flush()
sys.stderr.flush()
os.dup2(_save[0], 2)
os.dup2(_save[1], 1)

def readline():
    buf = bytearray()
    while True:
        c = proto_in.read(1)
        if not c:
            return None
        if c == b"\n":
            return bytes(buf)
        buf += c

while True:
    line = readline()
    if line is None:
        break
    req = json.loads(line)
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(devnull, 0)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdin = open(os.devnull)
            os.chdir(req["cwd"])
            sys.argv = ["cloneaware"] + [os.fsdecode(base64.b64decode(a))
                                         for a in req["args"]]
            try:
                cloneaware.cli.main()
                code = 0
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:
                pass
        finally:
            os._exit(code)
    deadline = time.monotonic() + req["timeout"]
    timed_out = False
    maxrss = 0
    while True:
        p, status, ru = os.wait4(pid, os.WNOHANG)
        if p:
            maxrss = ru.ru_maxrss
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status, timed_out = 9, True
            break
        time.sleep(0.002)
    rc = os.waitstatus_to_exitcode(status)
    res = []
    for f in (out, err):
        f.seek(0)
        res.append(base64.b64encode(f.read()).decode())
        f.close()
    os.write(proto_out, json.dumps({"rc": rc, "out": res[0], "err": res[1],
                                    "timed_out": timed_out, "maxrss": maxrss}
                                   ).encode() + b"\n")
"""


class CliServer:
    """``cloneaware ARGS`` in a forked child of a process that imported the
    CLI once (this interpreter, ``-P``), so that hundreds of hostile and
    damaged archives are run as separate processes in seconds instead of
    paying the interpreter's start-up each time.  The child runs
    cloneaware.cli.main() exactly as the ``cloneaware`` console script does;
    an exception escaping it prints a traceback, as the interpreter would.

    Use as a context manager; ``run(*args)`` returns a Result and checks it
    as ``cli()`` does.  The child's stdin is /dev/null."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-P", "-c", _SERVER],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, *args, check_rc: int | None = None, cwd: str | os.PathLike = "/",
            timeout: float = 120, traceback_ok: bool = False) -> Result:
        enc = [base64.b64encode(_arg(a)).decode() for a in args]
        req = {"args": enc, "cwd": os.fspath(cwd), "timeout": timeout}
        self.p.stdin.write(json.dumps(req).encode() + b"\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("the CLI server died")
        res = json.loads(line)
        if res["timed_out"]:
            raise TimeoutError(f"cloneaware {args} ran for more than {timeout} s")
        r = Result(list(args), res["rc"], base64.b64decode(res["out"]),
                   base64.b64decode(res["err"]), res["maxrss"])
        return _check(r, check_rc, traceback_ok, None)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
