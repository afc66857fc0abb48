"""``cloneaware`` (the console script) and ``python -m cloneaware``: the
command line, with signals answered from the first instant.

Importing the command line takes a while (typer alone about 80 ms), and a
SIGINT or SIGTERM in that time would end in a traceback out of an import.
Until ``cli.main()`` takes over, either signal gets the one line and the
exit code 130 that it gets later.  (A signal that arrives while the
interpreter itself is still starting, before any of this runs, is
answered by Python.)
"""
from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # not signal: its enums take ms to build
import os

_NAMES = {_signal.SIGINT: b"SIGINT", _signal.SIGTERM: b"SIGTERM"}


def _while_starting(signum: int, frame: object) -> None:
    try:
        os.write(2, b"cloneaware: interrupted by %s\n" % _NAMES.get(signum, b"a signal"))
    except OSError:
        pass
    os._exit(130)


def main() -> None:
    _signal.signal(_signal.SIGINT, _while_starting)
    _signal.signal(_signal.SIGTERM, _while_starting)
    from cloneaware.cli import main as cli_main  # the slow import, covered by the handler

    cli_main()


if __name__ == "__main__":
    main()
