"""The nightly job: ``run`` (the jobs of a configuration file) and
``config`` (check it, or show the jobs as they take effect)."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from cloneaware.cli.common import Command, app, err, handled, say
from cloneaware.cli.options import DryRunOpt, JsonOpt
from cloneaware.errors import EXIT_USAGE, UsageError

ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", metavar="FILE", help="The configuration file (default: "
    "$CLONEAWARE_CONFIG, else /etc/cloneaware/cloneaware.toml).")]
JobsArg = Annotated[list[str] | None, typer.Argument(
    metavar="[JOB...]", help="The jobs to run (default: every job, in the file's order).")]


def _load(path: str | None, jobs: list[str] | None):
    """The configuration and the chosen jobs, checked against this machine;
    every problem on a line of its own, exit 2."""
    from cloneaware.config import ConfigError, load, preflight

    try:
        cfg = load(path)
        chosen = cfg.chosen(jobs)
        preflight(cfg, chosen)
    except ConfigError as e:
        for p in e.problems:
            err(p)
        raise typer.Exit(EXIT_USAGE) from None
    return cfg, chosen


@app.command(cls=Command)
def run(
    jobs: JobsArg = None,
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also print what each step's command printed.")] = False,
    metrics: Annotated[str | None, typer.Option(
        "--metrics", metavar="FILE", help="Write the jobs' metrics to FILE, in the node "
        "exporter's textfile format (replaced atomically).")] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Run the jobs of the configuration file: for each, its before command, a
    backup, forget by its keep-* policy, prune and check when they are due, its
    after command; its on-failure command if a step failed.  One line a step on
    standard output; the exit code is the first failure's, else 1 if a step
    warned, else 0."""
    from cloneaware.nightly import Runner, write_metrics

    with handled():
        cfg, chosen = _load(config, jobs)
        runner = Runner(cfg, say, verbose=verbose, dry_run=dry_run)
        code = runner.run(chosen)
        if metrics and not dry_run:
            try:
                write_metrics(metrics, cfg, chosen)
            except OSError as e:
                raise UsageError(f"{metrics}: cannot write the metrics: {e.strerror}") from None
    raise typer.Exit(code)


@app.command(cls=Command)
def config(
    what: Annotated[str, typer.Argument(
        metavar="check|show", help="check: refuse what is wrong, naming file, line and key; "
        "show: the jobs as they take effect (defaults filled in).")],
    config: ConfigOpt = None,
    jobs: JobsArg = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the configuration file of run, or show its jobs."""
    with handled(as_json):
        if what not in ("check", "show"):
            raise UsageError(f"config {what!r}: give check or show")
        cfg, chosen = _load(config, jobs)
        if what == "check":
            if as_json:
                typer.echo(json.dumps({"config": cfg.path, "jobs": [j.name for j in chosen],
                                       "ok": True}, indent=2))
            else:
                say(f"{cfg.path}: {len(chosen)} jobs ({', '.join(j.name for j in chosen)}), "
                    "no problems found")
            return
        if as_json:
            typer.echo(json.dumps({j.name: j.to_dict() for j in chosen}, indent=2))
            return
        for i, j in enumerate(chosen):
            if i:
                say("")
            say(f"[jobs.{j.name}]")
            for k, v in j.to_dict().items():
                if v is None or v == []:  # TOML has no null
                    continue
                say(f"{k} = {json.dumps(v)}")
