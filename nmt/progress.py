"""Progress and log output on stderr: a rich console, and a live bar only when stderr is a terminal
(and the one console for tables that are data, on stdout).

Library modules report progress through `Progress`-like objects made here, so training and
caching show a bar with loss, tokens/s and ETA on a terminal and plain lines in a log file.
"""

from __future__ import annotations

import functools
import logging
import time

from rich.console import Console

log = logging.getLogger(__name__)


@functools.cache
def stderr_console() -> Console:
    return Console(stderr=True)


def stdout_console() -> Console:
    """For tables that are data (`nmt evaluate`, `nmt info`): on stdout, without highlighting, and
    not squeezed into 80 columns when stdout is a file or a pipe."""
    import sys

    console = Console(file=sys.stdout, highlight=False)
    if not console.is_terminal:
        console = Console(file=sys.stdout, highlight=False, width=200)
    return console


class StepProgress:
    """A bar for a job of `total` units (steps or seconds) with free-form fields (loss, tok/s…).

    On a terminal it is a rich live bar; otherwise `update` logs a plain line every
    `log_every` seconds, so logs redirected to a file stay readable.
    """

    def __init__(self, description: str, total: float | None, log_every: float = 30.0):
        self.description = description
        self.total = total
        self.log_every = log_every
        self._last_log = 0.0
        self._bar = None
        console = stderr_console()
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total, info="")

    def __enter__(self) -> "StepProgress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, completed: float, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=info)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every:
            self._last_log = now
            share = f" {100 * completed / self.total:.0f}%" if self.total else ""
            log.info("%s%s %s", self.description, share, info)
