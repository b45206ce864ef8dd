"""Run `moeconv` as a user does: a separate process, with its own stdin, environment, and a measured
peak memory and wall time (from `os.wait4`, for that child alone). What in-process `CliRunner`
tests cannot see — a prompt on stdin, a payload that runs, memory grown before a refusal,
hash-seed-dependent output — these tests can."""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A refusal must come before the work: a process that imports torch and transformers and exits
# peaks at ~0.3 GB here; building any model worth refusing takes far more.
REFUSAL_MAX_RSS = 1200 * 2**20
REFUSAL_MAX_SECONDS = 90


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    max_rss: int  # bytes, this child alone
    seconds: float


def run_cli(args, *, stdin: str | bytes | None = "", env: dict | None = None, timeout: float = 300,
            cwd: Path | None = None, memory_limit: int | None = None) -> CliResult:
    """`python -m moeconv.cli ARGS` in a fresh process. `memory_limit` (bytes) caps its address
    space, so a run that allocates before refusing dies instead of passing slowly."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    full_env.pop("PYTEST_CURRENT_TEST", None)

    def limit():  # in the child, before exec
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    data = stdin.encode() if isinstance(stdin, str) else stdin
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "moeconv.cli", *[os.fsencode(a) if isinstance(a, Path) else a
                                                                      for a in args]],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=full_env, cwd=cwd or ROOT, preexec_fn=limit)
    try:
        out, err = _communicate_and_reap(proc, data, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"moeconv {' '.join(map(str, args))} ran past {timeout} s") from None
    rc, max_rss = proc._moeconv_status
    return CliResult(rc, out.decode(errors="replace"), err.decode(errors="replace"), max_rss,
                     time.perf_counter() - t0)


def _communicate_and_reap(proc: subprocess.Popen, data: bytes | None, timeout: float):
    """`communicate`, then `wait4` for this child's own rusage (Popen.wait would discard it)."""
    import threading
    chunks = {"out": b"", "err": b""}

    def drain(stream, key):
        chunks[key] = stream.read()
    readers = [threading.Thread(target=drain, args=(proc.stdout, "out")),
               threading.Thread(target=drain, args=(proc.stderr, "err"))]
    for r in readers:
        r.start()
    try:
        if data:
            proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.05)
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc._moeconv_status = (proc.returncode, usage.ru_maxrss * 1024)
    return chunks["out"], chunks["err"]


PROGRESS_LINE = re.compile(r"^\[(\d+h)?(\d+m)?\d+s\] ")  # a log's time-stamped progress line


def assert_refused(result: CliResult, out: Path | None = None, *, names: str | tuple = (),
                   max_rss: int = REFUSAL_MAX_RSS, max_seconds: float = REFUSAL_MAX_SECONDS,
                   after_work: bool = False) -> str:
    """Exit 2, exactly one line on stderr (`error: …`, no traceback, no warning lines), nothing left
    beside OUT, and the refusal came before the work (bounded memory and time). Returns the line.
    `after_work`: the failure comes once the work ran (a full disk met while writing), so the
    progress lines a log shows of a run past its quiet seconds (a slow or busy machine) may come
    before the error line, which must still be the one other line."""
    err = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    if after_work:
        err = "\n".join(line for line in err.splitlines() if not PROGRESS_LINE.match(line))
    assert err.startswith("error:") and "\n" not in err, err[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    for name in (names,) if isinstance(names, str) else names:
        assert name in err, (name, err)
    if out is not None:
        assert not os.path.lexists(out), f"{out} was left behind"
        assert sorted(p.name for p in Path(out).parent.iterdir()) == [], "temporary files left beside OUT"
    assert result.max_rss <= max_rss, f"peak RSS {result.max_rss / 2**20:.0f} MiB before refusing: {err}"
    assert result.seconds <= max_seconds, f"{result.seconds:.1f} s before refusing: {err}"
    return err
