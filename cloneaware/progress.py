"""A progress bar on stderr when it is a terminal (rich), silence otherwise.
rich is imported only when a bar is shown: it costs 40 ms of start-up."""
from __future__ import annotations

from typing import Any


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
                DownloadColumn,
                TextColumn,
                TimeElapsedColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TransferSpeedColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True,
            )
            self._p.start()
            self._task = self._p.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def set_total(self, total: int) -> None:
        if self._p is not None:
            self._p.update(self._task, total=total)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()
