"""Progress in a log file (moeconv.progress.LogProgress): plain lines stamped with the run's elapsed
time; a step is said when it starts, a layer-sized task once per item, a tensor-sized one every so
often; quick tasks print nothing; a last line when a task that printed finishes."""
import io

from rich.console import Console

from moeconv.progress import LogProgress, Progress, progress_line


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _log(**kw):
    out, clock = io.StringIO(), _Clock()
    return LogProgress(Console(file=out, width=200), clock=clock, **{"quiet": 2, **kw}), out, clock


def test_a_layer_task_prints_one_line_per_layer_after_a_quiet_start_and_a_quick_task_nothing():
    log, out, clock = _log(after=2, every=10, per_item=200)
    for done in range(5):  # a quick task: done within a second
        log("quick", done, 4)
    for done in range(0, 11):
        clock.t = done * 1.0  # one layer per second
        log("layers", done, 10)
    lines = out.getvalue().splitlines()
    assert not any("quick" in ln for ln in lines)
    assert lines[0] == "[2s] layers: 2/10 (20.0%), 2s elapsed, about 8s left"
    assert lines[1] == "[3s] layers: 3/10 (30.0%), 3s elapsed, about 7s left"
    assert lines[-1] == "[10s] layers: 10/10 (100.0%), 10s elapsed"
    assert len(lines) == 9  # layers 2..10, one line each


def test_a_tensor_task_prints_every_so_often_and_a_step_marker_once():
    log, out, clock = _log(after=2, every=10, per_item=200)
    clock.t = 5.0
    log("step 1/2: quantize", 0, None)
    log("step 1/2: quantize", 0, None)  # said once
    for done in range(0, 1001):
        clock.t = 5.0 + done * 0.05  # 1,000 tensors in 50 s
        log("tensors", done, 1000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[5s] step 1/2: quantize …"
    tensor_lines = lines[1:]
    assert tensor_lines[0].startswith("[7s] tensors: 40/1000 (4.0%), 2s elapsed")
    assert tensor_lines[-1] == "[55s] tensors: 1000/1000 (100.0%), 50s elapsed"
    assert 5 <= len(tensor_lines) <= 7  # at 2 s, then every 10 s, and the last


def test_the_cli_progress_writes_lines_only_where_bars_cannot_be_drawn():
    out = io.StringIO()
    with Progress(Console(file=out), enabled=True) as progress:
        assert progress._log is not None and not progress.enabled  # a file is no terminal
    with Progress(Console(file=io.StringIO()), enabled=False) as progress:
        assert progress._log is None  # --verbose: no progress at all
    assert progress_line("t", 3, None, 65) == "t: 3 done, 1m05s elapsed"
    assert progress_line("t", 1, 4, 3 * 3600) == "t: 1/4 (25.0%), 3h00m elapsed, about 9h00m left"


def test_bars_in_a_terminal_keep_only_the_current_step_marker():
    console = Console(file=io.StringIO(), force_terminal=True)
    with Progress(console, enabled=True) as progress:
        progress("step 1/2: upcycle", 0, None)
        progress("layers", 3, 10)
        progress("step 2/2: quantize", 0, None)
        visible = [t.description for t in progress._p.tasks if t.visible]
    assert visible == ["layers", "step 2/2: quantize"]


def test_a_one_item_step_is_said_when_it_starts_and_when_a_long_one_ends():
    log, out, clock = _log(after=2, every=10, per_item=200)
    clock.t = 3.0
    log("parity", 0, 1)
    clock.t = 4.0
    log("parity", 1, 1)  # quick: only its start was said
    log("export", 0, 1)
    clock.t = 49.0
    log("export", 1, 1)
    assert out.getvalue().splitlines() == ["[3s] parity …", "[4s] export …", "[49s] export: 1/1 (100.0%), 45s elapsed"]


def test_nothing_in_a_quiet_start_and_the_step_running_then_is_said_after():
    log, out, clock = _log(after=2, every=10, per_item=200)
    log("loading", 0, None)
    clock.t = 1.0
    log("checking", 0, None)  # a run refused here has printed nothing
    assert out.getvalue() == ""
    clock.t = 30.0
    log("writing", 0, None)
    assert out.getvalue().splitlines() == ["[1s] checking …", "[30s] writing …"]


def test_a_detail_rides_on_the_counted_line():
    """A streamed sweep's pass at work and bytes written (`detail`) follow the counts."""
    assert progress_line("layers", 3, 10, 30.0, "sparsify · 1.2 GB written") == (
        "layers: 3/10 (30.0%), 30s elapsed, about 1m10s left · sparsify · 1.2 GB written")
    log, out, clock = _log(after=0, per_item=200)
    clock.t = 3.0
    log("layers", 1, 4, "prune-experts · 10 MB written")
    assert out.getvalue().splitlines() == ["[3s] layers: 1/4 (25.0%), 0s elapsed, about 0s left · prune-experts · 10 MB written"]
