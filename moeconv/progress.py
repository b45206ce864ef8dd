"""Progress for people: rich bars in a terminal, plain timestamped lines in a log file."""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.progress import Progress as RichProgress


class Progress:
    """A `progress(task, done, total)` callable: rich progress bars (one per task, with the time
    left) in a terminal; in a log file, plain lines (`LogProgress`)."""

    def __init__(self, console: Console, enabled: bool = True):
        self.enabled = enabled and console.is_terminal
        self._log = LogProgress(console) if enabled and not console.is_terminal else None
        self._p = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                               MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"),
                               TimeRemainingColumn(), console=console, transient=True)
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int | None) -> None:
        if self._log is not None:
            self._log(task, done, total)
        if not self.enabled:
            return
        if task not in self._tasks:
            self._tasks[task] = self._p.add_task(task, total=total)
        self._p.update(self._tasks[task], completed=done, total=total)


class LogProgress:
    """Progress for a log file: one line per task every `every` seconds once it has run `after`
    seconds (a quick task prints nothing), and a last line when a task that printed finishes.
    Each line: done/total, elapsed, and the time left extrapolated from the rate so far."""

    def __init__(self, console: Console, *, after: float = 10.0, every: float = 30.0, clock=time.monotonic):
        self.console, self.after, self.every, self.clock = console, after, every, clock
        self._start: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def __call__(self, task: str, done: int, total: int | None) -> None:
        now = self.clock()
        start = self._start.setdefault(task, now)
        finished = total is not None and done >= total
        if task in self._last:
            due = finished or now - self._last[task] >= self.every
        else:
            due = not finished and now - start >= self.after
        if due:
            self._last[task] = now
            self.console.print(progress_line(task, done, total, now - start), markup=False, highlight=False)
        if finished:
            self._start.pop(task, None)
            self._last.pop(task, None)


def progress_line(task: str, done: int, total: int | None, elapsed: float) -> str:
    """'TASK: 12/178 (6.7%), 3m10s elapsed, about 44m left'."""
    if not total:
        return f"{task}: {done} done, {_duration(elapsed)} elapsed"
    line = f"{task}: {done}/{total} ({done / total:.1%}), {_duration(elapsed)} elapsed"
    if 0 < done < total:
        line += f", about {_duration(elapsed / done * (total - done))} left"
    return line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
