"""The configuration file of the nightly job (``cloneaware run``): one or
more jobs, each a backup into a repository with its retention, how often to
prune and check, and commands to run around it.  TOML, read with the
standard library's ``tomllib``; the keys are documented in
docs/CONFIG.md, which is normative for them.

Everything is refused before anything runs, each problem named by the file,
the line and the key (``FILE:LINE: jobs.home.keep-daily: ...``): an unknown
key, a value of the wrong type, a job without paths or repository.
``preflight`` adds what only the machine can say: a path that does not
exist, a password file that cannot be read, a local repository that is not
there.  tomllib gives no positions, so the line of a key is found in the
text (``_Lines``); a key it cannot place is named by its table's line.
"""
from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from cloneaware.errors import UsageError

DEFAULT_PATH = "/etc/cloneaware/cloneaware.toml"

#: the keep-* options of forget, as config keys
KEEP = ("keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly",
        "keep-yearly", "keep-within", "keep-tag")
#: key -> (kind, default).  Kinds: str, bool, int (>= 0), strs (a list of
#: strings), interval (a duration like 7d or "never"), seconds (a duration),
#: span (a duration, kept as written: it is passed on to a command)
KEYS: dict[str, tuple[str, Any]] = {
    "paths": ("strs", None),
    "repository": ("str", None),
    "password-file": ("str", None),
    "s3-endpoint": ("str", None),
    "rsh": ("str", None),
    "host": ("str", None),
    "tags": ("strs", []),
    "exclude": ("strs", []),
    "exclude-caches": ("bool", False),
    "cross-filesystems": ("bool", False),
    "compress": ("str", None),
    **{k: ("int", 0) for k in KEEP[:-2]},
    "keep-within": ("span", None),
    "keep-tag": ("strs", []),
    "prune-every": ("interval", "1w"),
    "check-every": ("interval", "1d"),
    "check-read-data-every": ("interval", "never"),
    "check-read-data-parts": ("int", 1),
    "retry-lock": ("seconds", "10m"),
    "before": ("str", None),
    "after": ("str", None),
    "on-failure": ("str", None),
}
#: keys only a job may have (not [defaults])
JOB_ONLY = ("paths",)
JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ConfigError(UsageError):
    """Every problem of a configuration, each one line naming file, line and key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def parse_interval(text: str) -> float | None:
    """Seconds of ``7d``, ``12h``, ``1w2d``, ``90m``, ``30s``; None for
    ``never``.  ValueError otherwise."""
    t = text.strip()
    if t == "never":
        return None
    if not re.fullmatch(r"(?:\d+[smhdw])+", t):
        raise ValueError(f"{text!r} is not a duration (like 30s, 90m, 12h, 7d, 2w or never)")
    secs = sum(int(n) * UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", t))
    if secs <= 0:
        raise ValueError(f"{text!r} is not a duration longer than 0")
    return float(secs)


@dataclass
class Job:
    name: str
    paths: list[str]
    repository: str
    password_file: str | None = None
    s3_endpoint: str | None = None
    rsh: str | None = None
    host: str | None = None
    tags: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    exclude_caches: bool = False
    cross_filesystems: bool = False
    compress: str | None = None
    #: forget's keep-* options as given (keep-within a duration string)
    keep: dict[str, Any] = field(default_factory=dict)
    prune_every: float | None = 7 * 86400.0
    check_every: float | None = 86400.0
    check_read_data_every: float | None = None
    #: each check --read-data reads the next part of this many (1: all)
    check_read_data_parts: int = 1
    retry_lock: float = 600.0
    before: str | None = None
    after: str | None = None
    on_failure: str | None = None
    #: where each key was set: key -> "FILE:LINE"
    where: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """The effective job as config keys (``config show``)."""
        out: dict[str, Any] = {}
        for key, (kind, _) in KEYS.items():
            if key in KEEP:
                v: Any = self.keep.get(key, KEYS[key][1])
            else:
                v = getattr(self, key.replace("-", "_"))
            if kind in ("interval", "seconds"):
                v = "never" if v is None else _show_seconds(v)
            out[key] = v
        return out


def _show_seconds(s: float) -> str:
    s = int(s)
    for u in ("w", "d", "h", "m"):
        if s and s % UNITS[u] == 0:
            return f"{s // UNITS[u]}{u}"
    return f"{s}s"


@dataclass
class Config:
    path: str
    jobs: dict[str, Job]

    def chosen(self, names: list[str] | None) -> list[Job]:
        if not names:
            return list(self.jobs.values())
        unknown = [n for n in names if n not in self.jobs]
        if unknown:
            raise UsageError(f"{self.path}: no job {', '.join(unknown)} (jobs: "
                             f"{', '.join(self.jobs) or 'none'})")
        return [self.jobs[n] for n in names]


class _Lines:
    """The line of each table header and key in a TOML text, by its table."""

    HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
    KEY = re.compile(r"""\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")

    def __init__(self, text: str):
        self.tables: dict[tuple, int] = {}
        self.keys: dict[tuple, int] = {}
        table: tuple = ()
        for n, line in enumerate(text.splitlines(), 1):
            m = self.HEADER.match(line)
            if m:
                table = tuple(p.strip().strip("\"'") for p in m.group(1).split("."))
                self.tables.setdefault(table, n)
                continue
            m = self.KEY.match(line)
            if m:
                self.keys.setdefault((*table, m.group(1) or m.group(2) or m.group(3)), n)

    def line(self, *key: str) -> int | None:
        k = tuple(key)
        while k:
            if k in self.keys:
                return self.keys[k]
            if k in self.tables:
                return self.tables[k]
            k = k[:-1]
        return None


def load(path: str | None = None) -> Config:
    """The configuration at ``path`` (default: $CLONEAWARE_CONFIG, else
    /etc/cloneaware/cloneaware.toml), every job checked; ConfigError names
    every problem."""
    path = path or os.environ.get("CLONEAWARE_CONFIG") or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no configuration file (an example: "
                         "/usr/share/doc/cloneaware/examples/cloneaware.toml.example)") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it: {e.strerror}") from None
    try:
        text = raw.decode()
        doc = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        msg = re.sub(r"\s*\(at (?:line \d+, column \d+|end of document)\)", "", str(e))
        line = m.group(1) if m else str(max(1, len(text.splitlines())))  # at the end
        raise ConfigError([f"{path}:{line}: not TOML: {msg}"]) from None
    return parse(doc, text, path)


def parse(doc: dict, text: str, path: str) -> Config:
    lines = _Lines(text)
    problems: list[str] = []

    def at(*key: str) -> str:
        n = lines.line(*key)
        return f"{path}:{n}" if n else path

    def bad(msg: str, *key: str) -> None:
        problems.append(f"{at(*key)}: {'.'.join(key)}: {msg}")

    for k in doc:
        if k not in ("defaults", "jobs"):
            bad("unknown key (a configuration has [defaults] and [jobs.NAME] tables)", k)
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        bad("must be a table", "defaults")
        defaults = {}
    jobs_doc = doc.get("jobs", {})
    if not isinstance(jobs_doc, dict):
        bad("must be a table of jobs ([jobs.NAME])", "jobs")
        jobs_doc = {}
    base = _values(defaults, ("defaults",), bad, at, job=False)
    jobs: dict[str, Job] = {}
    for name, body in jobs_doc.items():
        if not isinstance(body, dict):
            bad("must be a table", "jobs", name)
            continue
        if not JOB_NAME.fullmatch(name):
            bad("a job's name is letters, digits, '_', '.' and '-' (it names a systemd "
                "instance and a metrics label)", "jobs", name)
            continue
        own = _values(body, ("jobs", name), bad, at, job=True)
        merged = {**base, **own}
        job = _job(name, merged, bad)
        if job is not None:
            jobs[name] = job
    if not jobs_doc and not problems:
        problems.append(f"{path}: no job ([jobs.NAME] with paths and repository)")
    if problems:
        raise ConfigError(problems)
    return Config(path, jobs)


def _values(table: dict, where: tuple, bad, at, job: bool) -> dict[str, tuple[Any, str]]:
    """The keys of one table, checked: key -> (value, "FILE:LINE")."""
    out: dict[str, tuple[Any, str]] = {}
    for key, v in table.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key.replace("_", "-"), KEYS, n=1, cutoff=0.75)
            bad("unknown key" + (f" (did you mean {close[0]}?)" if close else ""), *where, key)
            continue
        if key in JOB_ONLY and not job:
            bad("belongs to a job, not to [defaults]", *where, key)
            continue
        kind = KEYS[key][0]
        try:
            out[key] = (_value(kind, v), at(*where, key))
        except ValueError as e:
            bad(str(e), *where, key)
    return out


def _value(kind: str, v: Any) -> Any:
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"must be true or false, not {_show(v)}")
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"must be a whole number, 0 or more, not {_show(v)}")
        return v
    if kind == "str":
        if not isinstance(v, str) or not v:
            raise ValueError(f"must be a non-empty string, not {_show(v)}")
        return v
    if kind == "strs":
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f"must be a list of non-empty strings, not {_show(v)}")
        return v
    if kind in ("interval", "seconds", "span"):
        if not isinstance(v, str):
            raise ValueError(f"must be a duration string like \"7d\", not {_show(v)}")
        secs = parse_interval(v)
        if secs is None and kind in ("seconds", "span"):
            raise ValueError("must be a duration, not never")
        return v if kind == "span" else secs
    raise AssertionError(kind)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "a list" if v else "an empty list"
    return repr(v) if isinstance(v, str) else f"{type(v).__name__} {v}"


def _job(name: str, merged: dict[str, tuple[Any, str]], bad) -> Job | None:
    missing = [k for k in ("paths", "repository") if k not in merged]
    for k in missing:
        bad(f"no {k} (in the job or in [defaults])", "jobs", name)
    if missing:
        return None
    if not merged["paths"][0]:
        bad("an empty list: a job backs up at least one path", "jobs", name, "paths")
        return None
    kw: dict[str, Any] = {}
    keep: dict[str, Any] = {}
    for key, (kind, default) in KEYS.items():
        v: Any = merged[key][0] if key in merged else (
            parse_interval(default) if kind in ("interval", "seconds") else default)
        if key in KEEP:
            if v:
                keep[key] = v
        else:
            kw[key.replace("-", "_")] = v if not isinstance(v, list) else list(v)
    return Job(name=name, keep=keep, where={k: w for k, (_, w) in merged.items()}, **kw)


def is_local(repository: str) -> bool:
    return "://" not in repository


def preflight(cfg: Config, jobs: list[Job]) -> None:
    """What only this machine can say, before anything runs: each path
    exists, each password file can be read, each local repository is
    there.  ConfigError names every problem by file, line and key."""
    problems: list[str] = []
    for job in jobs:
        def bad(key: str, msg: str, job: Job = job) -> None:
            problems.append(f"{job.where.get(key, cfg.path)}: jobs.{job.name}.{key}: {msg}")

        for p in job.paths:
            if not os.path.isabs(p):
                bad("paths", f"{p!r} is not an absolute path")
            elif not os.path.lexists(p):
                bad("paths", f"{p}: no such file or directory")
        if job.password_file:
            try:
                with open(job.password_file, "rb") as f:
                    f.read(1)
            except OSError as e:
                bad("password-file", f"{job.password_file}: cannot read it: {e.strerror}")
        if is_local(job.repository):
            if not os.path.isfile(os.path.join(job.repository, "config")):
                bad("repository", f"{job.repository}: no repository there (make one with "
                    "cloneaware init)")
    if problems:
        raise ConfigError(problems)
