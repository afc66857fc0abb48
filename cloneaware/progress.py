"""A progress bar on stderr when it is a terminal (rich), silence otherwise.
rich is imported only when a bar is shown: it costs 40 ms of start-up.

Sizes and speeds are both in binary units (MiB and MiB/s, as every other
number cloneaware prints), and the total is given whenever it is known
(issue 21, defect 18)."""
from __future__ import annotations

from typing import Any


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    def __init__(self, enabled: bool, total: int | None, label: str):
        self.enabled = enabled
        self.total = total
        self.label = label
        self._p: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress
            from rich.text import Text

            class Bytes(ProgressColumn):
                def render(self, task) -> Text:
                    done = _human(task.completed)
                    return Text(f"{done} of {_human(task.total)}" if task.total else done)

            class Speed(ProgressColumn):
                def render(self, task) -> Text:
                    s = task.finished_speed or task.speed
                    return Text(f"{_human(s)}/s" if s else "")

            self._p = RichProgress(
                TextColumn("{task.description}"), BarColumn(), Bytes(), Speed(),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True,
            )
            self._p.start()
            self._task = self._p.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._p is not None:
            self._p.update(self._task, total=total)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()
