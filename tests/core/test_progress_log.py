"""Progress in a log file (moeconv.progress.LogProgress): quick tasks print nothing, long ones a line
every so often with the time left, and a last line when they finish."""
import io

from rich.console import Console

from moeconv.progress import LogProgress, Progress, progress_line


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_long_task_prints_lines_with_the_time_left_and_a_quick_one_nothing():
    out = io.StringIO()
    clock = _Clock()
    log = LogProgress(Console(file=out, width=200), after=10, every=30, clock=clock)
    for done in range(5):  # a quick task: done within a second
        log("quick", done, 4)
    for done in range(0, 101):
        clock.t = done * 1.0  # one item per second
        log("layers", done, 100)
    lines = out.getvalue().splitlines()
    assert not any(ln.startswith("quick") for ln in lines)
    assert lines[0] == "layers: 10/100 (10.0%), 10s elapsed, about 1m30s left"
    assert lines[1] == "layers: 40/100 (40.0%), 40s elapsed, about 1m00s left"
    assert lines[-1] == "layers: 100/100 (100.0%), 1m40s elapsed"
    assert len(lines) == 4  # at 10 s, then every 30 s (40, 70), and the last line at 100


def test_the_cli_progress_writes_lines_only_where_bars_cannot_be_drawn():
    out = io.StringIO()
    with Progress(Console(file=out), enabled=True) as progress:
        assert progress._log is not None and not progress.enabled  # a file is no terminal
    with Progress(Console(file=io.StringIO()), enabled=False) as progress:
        assert progress._log is None  # --verbose: no progress at all
    assert progress_line("t", 3, None, 65) == "t: 3 done, 1m05s elapsed"
    assert progress_line("t", 1, 4, 3 * 3600) == "t: 1/4 (25.0%), 3h00m elapsed, about 9h00m left"
