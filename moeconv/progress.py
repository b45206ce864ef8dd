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
        self._markers: list[str] = []

    def __enter__(self):
        if self.enabled:
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._p.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int | None, detail: str | None = None) -> None:
        if self._log is not None:
            self._log(task, done, total, detail)
        if not self.enabled:
            return
        if total is None:  # a new step marker replaces the last one (a spinner that never ends)
            for marker in self._markers:
                self._p.update(self._tasks[marker], visible=False)
            self._markers = [task]
        if task not in self._tasks:
            self._tasks[task] = self._p.add_task(task, total=total)
        description = f"{task} · {detail}" if detail else task
        self._p.update(self._tasks[task], completed=done, total=total, description=description)


class LogProgress:
    """Progress for a log file, where bars cannot be drawn: plain lines, each stamped with the time
    since the run started.

    - Steps are not said in the run's first `quiet` seconds (a run refused while it loads prints
      its error line alone); the step running then is said at the first call after.
    - A step (`total is None`, e.g. "generate (dense)", or a one-item task) prints one line when it
      starts; a one-item step that took `after` seconds prints another when it ends.
    - A counted task with at most `per_item` items (layers, passes, training steps) prints one
      line per item once it has run `after` seconds, so a quick task prints nothing.
    - A task with more items (tensors) prints a line at most every `every` seconds.
    - A task that printed anything, or ran `after` seconds, prints a last line when it finishes.
    Counted lines carry done/total, the task's elapsed time, the time left at the rate so far, and
    the caller's detail (a streamed sweep's current pass and bytes written) when given."""

    def __init__(self, console: Console, *, after: float = 2.0, every: float = 10.0, per_item: int = 200,
                 quiet: float = 10.0, clock=time.monotonic):
        self.console, self.after, self.every, self.per_item, self.clock = console, after, every, per_item, clock
        self.quiet = quiet
        self._t0 = clock()
        self._start: dict[str, float] = {}
        self._last: dict[str, tuple[float, int]] = {}
        self._pending: tuple[float, str] | None = None

    def __call__(self, task: str, done: int, total: int | None, detail: str | None = None) -> None:
        now = self.clock()
        if self._pending is not None and now - self._t0 >= self.quiet:
            self._print(*self._pending)  # the step that was running when the quiet start ended
            self._pending = None
        if total is None or (total == 1 and done == 0):  # a step: said once, when it starts
            if task not in self._start:
                self._start[task] = now
                if now - self._t0 < self.quiet:
                    # a quiet start: a run refused within `quiet` seconds prints its one error line only
                    self._pending = (now, f"{task} …")
                else:
                    self._print(now, f"{task} …")
                if total == 1:
                    self._last[task] = (now, 0)
            return
        start = self._start.setdefault(task, now)
        finished = done >= total
        printed = self._last.get(task)
        if total == 1:
            due = finished and now - start >= self.after
        elif printed is not None:
            due = finished or (done > printed[1] and (total <= self.per_item or now - printed[0] >= self.every))
        else:  # a task that took `after` seconds says so when it ends, even if it never got to a line
            due = now - start >= self.after
        if due and now - self._t0 >= self.quiet:
            self._last[task] = (now, done)
            self._print(now, progress_line(task, done, total, now - start, detail))
        if finished:
            self._start.pop(task, None)
            self._last.pop(task, None)

    def _print(self, now: float, line: str) -> None:
        self.console.print(f"[{_duration(now - self._t0)}] {line}", markup=False, highlight=False)


def progress_line(task: str, done: int, total: int | None, elapsed: float, detail: str | None = None) -> str:
    """'TASK: 12/178 (6.7%), 3m10s elapsed, about 44m left · DETAIL'."""
    if not total:
        line = f"{task}: {done} done, {_duration(elapsed)} elapsed"
    else:
        line = f"{task}: {done}/{total} ({done / total:.1%}), {_duration(elapsed)} elapsed"
        if 0 < done < total:
            line += f", about {_duration(elapsed / done * (total - done))} left"
    return f"{line} · {detail}" if detail else line


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
