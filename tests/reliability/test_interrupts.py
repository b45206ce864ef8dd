"""Interrupted conversions never leave an output directory that looks complete."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import tiny_hf


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "llama"
    # big enough that the conversion runs for a moment after start-up
    tiny_hf("llama", path, hidden_size=256, intermediate_size=768, num_hidden_layers=4)
    return path


def _start(src, out):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "moeconv.cli", "upcycle", str(src), str(out), "-e", "8", "-k", "2",
                             "--shard-size", "1MB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sigkill_at_random_points_never_leaves_out(src, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "out"
    for delay in [rng.uniform(0.5, 5.0) for _ in range(4)]:
        proc = _start(src, out)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if out.exists():  # the run finished before the kill: it must be complete then
            assert (out / "report.json").is_file() and (out / "config.json").is_file()
            import shutil
            shutil.rmtree(out)
    # a later run cleans up the temp siblings of killed runs and succeeds
    proc = _start(src, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert (out / "report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".moeconv-tmp-" in p.name]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_prints_one_line_and_cleans_up(src, tmp_path, sig):
    """Ctrl-C, and the SIGTERM a supervisor (systemd, docker stop, a job queue) sends, are one line."""
    out = tmp_path / "out"
    proc = _start(src, out)
    # wait until the run has started writing (its temp directory exists), then interrupt
    deadline = time.time() + 120
    while time.time() < deadline and not [p for p in tmp_path.iterdir() if ".moeconv-tmp-" in p.name]:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted"), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".moeconv-tmp-" in p.name]
