"""Does compression memory stay flat as a model gets deeper? (issue #16: out-of-core compression)

    python scripts/bench_streaming.py [--layers 4,32] [--hidden 1024 --intermediate 2816 --experts 8]
        [--vocab 32000] [--shard-size 256MB] [--commands quantize-int8,sparsify-wanda,…]
        [--calib-samples 8 --calib-seq-len 64] [--timeout 3600] [--repeat N] [--out-dir DIR --keep] [--json FILE]

    # a small shape (46 / 59 MB checkpoints): ~10 minutes on 2 busy cores, mostly start-up costs
    python scripts/bench_streaming.py --layers 2,4 --hidden 256 --intermediate 512

The default shape writes ~0.7 GB (4 layers) and ~4.7 GB (32 layers) of bf16 weights; the work
directory needs room for one checkpoint per depth plus one command's output at a time.

For each depth in --layers, a random bf16 Mixtral checkpoint is written shard by shard
(`scripts/synthetic_checkpoint.py`: Mixtral's tensor names, a byte-level tokenizer), and every
selected command runs on it as its own child process (`python -m moeconv.cli …` from this
checkout) whose wall time and peak RSS (`ru_maxrss` from `os.wait4`) are recorded:

    quantize-int8       quantize SRC OUT --method int8                   (data-free)
    quantize-nf4        quantize SRC OUT --method nf4                    (data-free)
    sparsify-magnitude  sparsify SRC OUT --method magnitude              (data-free)
    sparsify-wanda      sparsify SRC OUT --method wanda --calib TEXT
    sparsify-sparsegpt  sparsify SRC OUT --method sparsegpt --calib TEXT
    prune-experts       prune-experts SRC OUT --keep N --calib TEXT
    run-recipe          run RECIPE --model SRC --out OUT --calib IDS     (prune-experts → 2:4 wanda → int8)

The calibration text is Python's own `pydoc_data.topics`; `run` has no sample-count options, so it
gets the same text already tokenized by the checkpoint's tokenizer, as a (samples, seq_len) token-id
file. The **floor**, measured in the same run on the same source, is a child that imports torch and
transformers, reads every tensor with `safe_open` and writes it back as safetensors shards of the
same size: what any disk → disk command pays at least.

With `quantize-int8` selected, a second floor runs too, **floor-int8**: the same read and write
with bitsandbytes' own int8 quantization (`int8_vectorwise_quant`, what `Int8Params` runs) of every
matrix the command quantizes, and nothing else (no model, no checks): what any bitsandbytes int8
converter pays at least. The table gives quantize-int8's ratio to both.

Targets (issue #16), each marked met / NOT MET in the table and the JSON:

- RSS(deep) / RSS(shallow) ≤ 1.3 for every command: memory independent of depth;
- wall(deep) / wall(shallow) ≤ 1.25 × the depth ratio (10 for --layers 4,32; `--wall-target`);
- wall(deep) / floor(deep) ≤ 3 for the data-free `quantize-int8`.

A command that fails (non-zero exit, killed, timed out) is reported with its one-line error, and
its ratios are "n/a"; the benchmark goes on. Nothing is hard-coded: every figure is measured here.

Before each child the benchmark calls `sync`, so no child's writes wait on the write-back of the
previous child's output (the floor writes a whole checkpoint just before the commands run).

How RSS is measured: `ru_maxrss` of a child counts the address space it inherited when it was
forked (Linux saves the old mm's high-water mark at exec), so a parent that has imported torch
inflates every child's figure. Each command is therefore launched by a fresh, stdlib-only runner
process (this file with `--_runner`), whose high-water mark is ~15 MB; this process itself never
imports torch. RSS includes file-backed pages (memory-mapped safetensors), so the peak anonymous
RSS (`RssAnon`, sampled every 50 ms) is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# This module is imported by the stdlib-only runner: no torch / transformers / moeconv at the top level.
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

RSS_TARGET = 1.3
WALL_TARGET_PER_DEPTH = 1.25  # wall(deep)/wall(shallow) ≤ this × layers(deep)/layers(shallow): 10 for 4 → 32
FLOOR_TARGET = 3.0
FLOOR_COMMAND = "quantize-int8"  # the data-free command compared with the floor

CALIB = ["--calib", "{calib}"]
COMMANDS: dict[str, list[str]] = {
    "quantize-int8": ["quantize", "{src}", "{out}", "--method", "int8", "--shard-size", "{shard}"],
    "quantize-nf4": ["quantize", "{src}", "{out}", "--method", "nf4", "--shard-size", "{shard}"],
    "sparsify-magnitude": ["sparsify", "{src}", "{out}", "--method", "magnitude", "--shard-size", "{shard}"],
    "sparsify-wanda": ["sparsify", "{src}", "{out}", "--method", "wanda", *CALIB, "--num-samples", "{samples}",
                       "--seq-len", "{seq_len}", "--shard-size", "{shard}"],
    "sparsify-sparsegpt": ["sparsify", "{src}", "{out}", "--method", "sparsegpt", *CALIB,
                           "--num-samples", "{samples}", "--seq-len", "{seq_len}", "--shard-size", "{shard}"],
    "prune-experts": ["prune-experts", "{src}", "{out}", "--keep", "{keep}", *CALIB,
                      "--calib-samples", "{samples}", "--calib-seq-len", "{seq_len}"],
    "run-recipe": ["run", "{recipe}", "--model", "{src}", "--out", "{out}", "--calib", "{calib_ids}"],
}
RECIPE = """\
# bench_streaming.py: prune-experts → 2:4 (Wanda) → int8
steps:
  - pass: prune-experts
    keep: {keep}
    criterion: reap
  - pass: sparsify
    pattern: '2:4'
    method: wanda
  - pass: quantize
    method: int8
"""


# ---------------------------------------------------------------------------------------------
# Measuring one child process
# ---------------------------------------------------------------------------------------------

@dataclass
class Measurement:
    """One child process, measured. `rc`: exit status (negative: killed by that signal; None: never
    ran). `max_rss_kib`: its peak RSS (ru_maxrss, KiB; its waited-for descendants included).
    `anon_peak_kib`: the highest RssAnon sampled (None if never sampled). `error`: the one-line
    reason when `rc != 0`."""

    argv: list[str]
    rc: int | None
    wall_s: float
    max_rss_kib: int
    cpu_s: float
    anon_peak_kib: int | None = None
    timed_out: bool = False
    error: str | None = None
    out_bytes: int | None = None
    runs: list[dict] | None = None  # with --repeat: each run's wall, peak RSS and anonymous peak


    @property
    def ok(self) -> bool:
        return self.rc == 0


def child_env() -> dict[str, str]:
    """The environment of every measured child: offline, this checkout first on sys.path, quiet
    libraries, wide error lines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               COLUMNS="400", NO_COLOR="1", PYTHONUNBUFFERED="1")
    return env


def _rss_anon_kib(pid: int) -> int | None:
    """RssAnon of `pid` from /proc (KiB), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def error_line(stderr: str, limit: int = 400) -> str:
    """The one line that says why a command failed: moeconv's `error: …` line (wrapped lines
    rejoined), else the last non-empty line (a Python exception's last line), cut to `limit`."""
    lines = [ln.rstrip() for ln in stderr.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    if starts:
        i = starts[-1]
        text = " ".join(ln.strip() for ln in lines[i:] if ln.strip())
    else:
        nonempty = [ln.strip() for ln in lines if ln.strip()]
        text = nonempty[-1] if nonempty else "(no output on stderr)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def measure_direct(argv: list[str], *, cwd: str | Path = ROOT, env: dict | None = None,
                   timeout: float | None = None, poll_s: float = 0.05, grace_s: float = 10.0,
                   log_dir: str | Path | None = None) -> Measurement:
    """Run `argv` as a child of *this* process and measure it with `os.wait4`. Its ru_maxrss is at
    least this process's own high-water mark (see the module docstring): call it from a small
    process, or use `measure`. Past `timeout` seconds the child's process group gets SIGTERM, then
    SIGKILL after `grace_s`. stdout/stderr go to files in `log_dir` (a temp dir if None)."""
    own_logs = log_dir is None
    logs = Path(tempfile.mkdtemp(prefix="bench_log_")) if own_logs else Path(log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    anon_peak = None
    timed_out = False
    with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(argv, cwd=str(cwd), env=env if env is not None else child_env(),
                                    stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f, start_new_session=True)
        except OSError as exc:
            return Measurement(list(argv), None, 0.0, 0, 0.0, error=f"could not start: {exc}")
        deadline = None if timeout is None else t0 + timeout
        killed_at = None
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            anon = _rss_anon_kib(proc.pid)
            if anon is not None:
                anon_peak = anon if anon_peak is None else max(anon_peak, anon)
            now = time.perf_counter()
            if deadline is not None and now > deadline and killed_at is None:
                timed_out, killed_at = True, now
                _kill_group(proc.pid, signal.SIGTERM)
            elif killed_at is not None and now > killed_at + grace_s:
                _kill_group(proc.pid, signal.SIGKILL)
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped by wait4: tell Popen, so it never waits again
    error = None
    if timed_out:
        error = f"timed out after {timeout:g} s"
    elif rc != 0:
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            error = f"killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
        else:
            error = error_line(err_path.read_text(errors="replace"))
    if own_logs:
        shutil.rmtree(logs, ignore_errors=True)
    return Measurement(list(argv), rc, wall, int(ru.ru_maxrss), ru.ru_utime + ru.ru_stime,
                       anon_peak, timed_out, error)


def measure(argv: list[str], *, cwd: str | Path = ROOT, timeout: float | None = None,
            log_dir: str | Path | None = None) -> Measurement:
    """Measure `argv` through a fresh stdlib-only runner process (`--_runner`), so its peak RSS is
    its own and not inflated by what this process holds. Same result as `measure_direct`."""
    spec = json.dumps({"argv": list(argv), "cwd": str(cwd), "timeout": timeout,
                       "log_dir": None if log_dir is None else str(log_dir)})
    runner = [sys.executable, "-I", str(Path(__file__).resolve()), "--_runner", spec]
    slack = None if timeout is None else timeout + 120
    try:
        done = subprocess.run(runner, capture_output=True, text=True, env=child_env(), timeout=slack)
    except subprocess.TimeoutExpired:
        return Measurement(list(argv), None, float(slack), 0, 0.0, timed_out=True, error="runner timed out")
    if done.returncode != 0:
        return Measurement(list(argv), None, 0.0, 0, 0.0, error=f"runner failed: {error_line(done.stderr)}")
    try:
        return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        return Measurement(list(argv), None, 0.0, 0, 0.0, error=f"runner printed no result: {done.stdout[-200:]!r}")


def _runner_main(spec_json: str) -> None:
    """`--_runner SPEC`: measure one command with `measure_direct`, print the Measurement as JSON."""
    spec = json.loads(spec_json)
    m = measure_direct(spec["argv"], cwd=spec["cwd"], env=dict(os.environ), timeout=spec["timeout"],
                       log_dir=spec["log_dir"])
    print(json.dumps(asdict(m)))


# ---------------------------------------------------------------------------------------------
# The floor: read every tensor, write it back
# ---------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """Bytes of '256MB', '5GB', '2GiB', '1000': the grammar of `moeconv.units.parse_size` (decimal
    K/M/G/T, binary with 'i'), restated here because importing moeconv imports torch."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.I)
    if not m:
        raise ValueError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB")
    unit = m.group(2).upper().rstrip("B")
    power = "_KMGT".index(unit.replace("I", "") or "_")
    size = int(float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power))
    if size <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return size


def floor_copy(src: str | Path, dst: str | Path, shard_size: str, transform=None) -> dict:
    """Import torch and transformers (the real Mixtral modules, as every command does), read every
    tensor of `src` with `safe_open` and write them, in index order, into safetensors shards of at
    most `shard_size` in `dst` (with an index and the non-weight files). Returns {tensors, bytes, shards}.
    Holds at most one output shard in memory. `transform(name, tensor) -> {name: tensor}`: what is
    written for each source tensor (default: the tensor itself)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import MixtralConfig
    from transformers.models.mixtral import modeling_mixtral  # noqa: F401
    src, dst = Path(src), Path(dst)
    MixtralConfig.from_json_file(src / "config.json")  # read as a command reads it (no code is run)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    files: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        files.setdefault(fname, []).append(name)
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
    plan: list[list[tuple[str, str]]] = [[]]  # shards of (source file, tensor name)
    room, limit = 0, parse_size(shard_size)
    for fname, names in files.items():
        with safe_open(str(src / fname), framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                n = sizes[sl.get_dtype()]
                for d in sl.get_shape():
                    n *= d
                if plan[-1] and room + n > limit:
                    plan.append([])
                    room = 0
                plan[-1].append((fname, name))
                room += n
    dst.mkdir(parents=True)
    out_map, total = {}, 0
    for k, shard in enumerate(plan, 1):
        oname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for fname in dict.fromkeys(f for f, _ in shard):
            with safe_open(str(src / fname), framework="pt") as f:
                for sf, name in shard:
                    if sf == fname:
                        t = f.get_tensor(name)
                        tensors.update(transform(name, t) if transform is not None else {name: t})
        save_file(tensors, str(dst / oname), metadata={"format": "pt"})
        for name, t in tensors.items():
            out_map[name] = oname
            total += t.numel() * t.element_size()
        del tensors
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": out_map}, indent=2))
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copy2(p, dst / p.name)
    return {"tensors": len(out_map), "bytes": total, "shards": len(plan)}


def floor_int8(src: str | Path, dst: str | Path, shard_size: str) -> dict:
    """`floor_copy` with every matrix `quantize --method int8` quantizes (the 2-D weights of the
    linear layers: attention and experts; not the embeddings, the head or the routers) run through
    bitsandbytes' `int8_vectorwise_quant` as `Int8Params` runs it (fp16 in; int8 rows and fp32
    scales out, both written). Imported through moeconv's gateway, which keeps bitsandbytes from
    fetching kernels from the Hub."""
    import torch
    from moeconv.nn.quantized import _bnb
    bnb = _bnb()

    def quantized(name: str, t):
        skip = ("embed_tokens", "lm_head", ".gate.weight")
        if t.dim() != 2 or not name.endswith(".weight") or any(k in name for k in skip):
            return {name: t}
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(t.to(torch.float16))
        return {name: rows, name[:-len("weight")] + "SCB": scales}
    return floor_copy(src, dst, shard_size, transform=quantized)


def write_calib_ids(text: str | Path, src: str | Path, out: str | Path, samples: int, seq_len: int) -> list[int]:
    """Tokenize `text` with `src`'s tokenizer exactly as `--calib TEXT --num-samples S --seq-len L`
    does (`moeconv.data.calibration_tokens`) and save the (rows, seq_len) int64 ids to `out`
    (.safetensors, one tensor). Returns the shape."""
    from safetensors.torch import save_file
    from moeconv.data import calibration_tokens
    ids = calibration_tokens(Path(text), str(src), num_samples=samples, seq_len=seq_len)
    save_file({"input_ids": ids.contiguous()}, str(out))
    return list(ids.shape)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def machine_info() -> dict:
    """Cores (all and usable), RAM total/available (MiB), load average, Python and package versions."""
    mem = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    mem[key] = int(value.split()[0]) // 1024
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None
    return {"cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "ram_total_mib": mem.get("MemTotal"), "ram_available_mib": mem.get("MemAvailable"),
            "loadavg": list(os.getloadavg()), "python": sys.version.split()[0],
            "torch": ver("torch"), "transformers": ver("transformers"), "safetensors": ver("safetensors"),
            "bitsandbytes": ver("bitsandbytes")}


def dir_bytes(path: str | Path) -> int:
    """Bytes of the regular files under `path` (0 if absent)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def write_calib_text(path: Path) -> int:
    """Write Python's `pydoc_data.topics` (every topic, sorted by name) to `path`; returns its characters."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    path.write_text(text, encoding="utf-8")
    return len(text)


def command_argv(name: str, values: dict) -> list[str]:
    """`python -m moeconv.cli …` for command `name` with the placeholders of COMMANDS filled in."""
    return [sys.executable, "-m", "moeconv.cli"] + [a.format(**values) for a in COMMANDS[name]]


def make_checkpoint(path: Path, shape: dict, shard_size: str, timeout: float | None) -> tuple[dict | None, Measurement]:
    """Write (or reuse, when `path/bench_shape.json` records the same shape) a synthetic Mixtral at
    `path` in a child process. Returns (the writer's info or None on failure, its measurement)."""
    stamp = path / "bench_shape.json"
    want = dict(shape, shard_size=shard_size)
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        info = {"path": str(path), "reused": True}
        return info, Measurement([], 0, 0.0, 0, 0.0)
    shutil.rmtree(path, ignore_errors=True)
    argv = [sys.executable, str(SCRIPTS / "synthetic_checkpoint.py"), str(path), "--shard-size", shard_size]
    for key in ("layers", "hidden", "intermediate", "experts", "top_k", "heads", "kv_heads", "vocab"):
        argv += [f"--{key.replace('_', '-')}", str(shape[key])]
    logs = path.parent / f"{path.name}.log"
    m = measure(argv, timeout=timeout, log_dir=logs)
    if not m.ok:
        return None, m
    info = json.loads((logs / "stdout.txt").read_text())
    stamp.write_text(json.dumps(want))
    shutil.rmtree(logs, ignore_errors=True)
    return info, m


def _rm(p: Path) -> None:
    """Remove the file, link or directory tree `p` (nothing if absent)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _remove_output(out: Path) -> None:
    """Remove `out` and what a killed moeconv run may leave beside it (`.OUT.moeconv-tmp-PID`, locks)."""
    _rm(out)
    for p in out.parent.glob(f".{out.name}*"):
        _rm(p)


def cleanup(work: Path, created: bool) -> None:
    """Remove what the benchmark wrote: all of `work` if it `created` it, else only its own entries
    (checkpoints, logs, outputs, calibration files, recipe), never anything else in a given --out-dir."""
    if created:
        shutil.rmtree(work, ignore_errors=True)
        return
    ours = [work / n for n in ("outputs", "logs", "calib.txt", "recipe.yaml", "calib_ids.safetensors")]
    ours += list(work.glob("mixtral-L*"))
    for p in ours:
        _rm(p)


def run_child_helper(mode: str, args: list[str], timeout: float | None, log_dir: Path) -> Measurement:
    """Measure this file run with `--_{mode} ARGS…` (the floor copy or the tokenizing helper)."""
    return measure([sys.executable, str(Path(__file__).resolve()), f"--_{mode}", *args],
                   timeout=timeout, log_dir=log_dir)


def bench_depth(layers: int, *, ckpt: Path, work: Path, commands: list[str], values: dict,
                shard_size: str, timeout: float | None, log=print, repeat: int = 1) -> dict[str, Measurement]:
    """The floor, then every command in `commands`, on the checkpoint `ckpt` of depth `layers`,
    the whole round `repeat` times. Each output is measured (bytes on disk) and removed. Returns
    {"floor" | command: Measurement} (`median_run` of the repeats)."""
    runs: dict[str, list[Measurement]] = {}
    todo = ["floor"] + (["floor-int8"] if FLOOR_COMMAND in commands else []) + commands
    outputs = work / "outputs"
    outputs.mkdir(exist_ok=True)
    for _ in range(repeat):
        for name in todo:
            out = outputs / f"{name}-L{layers}"
            _remove_output(out)
            # every child starts with no dirty pages left by the one before: the floor writes the
            # whole checkpoint, and the next command's writes waited on its write-back
            os.sync()
            logs = work / "logs" / f"{name}-L{layers}"
            if name in ("floor", "floor-int8"):
                m = run_child_helper(name.replace("-", "_"), [str(ckpt), str(out), shard_size], timeout, logs)
            else:
                m = measure(command_argv(name, dict(values, src=str(ckpt), out=str(out))), timeout=timeout,
                            log_dir=logs)
            m.out_bytes = dir_bytes(out) if out.exists() else None
            _remove_output(out)
            runs.setdefault(name, []).append(m)
            state = "ok" if m.ok else f"FAILED ({m.error})"
            log(f"  L{layers:<3} {name:<19} wall {m.wall_s:8.1f} s  peak RSS {m.max_rss_kib / 1024:8.0f} MiB  {state}")
    return {name: median_run(ms) for name, ms in runs.items()}


def median_run(ms: list[Measurement]) -> Measurement:
    """One measurement standing for repeated runs of a command: the first failed run if any failed;
    else the first run with the median wall time, peak RSS and anonymous peak of all runs (each its
    own median: one slow run does not pick the RSS), with every run's figures in `runs`. The peak
    RSS of one command varies between runs by more than its growth with depth (a 16-layer
    sparsegpt: 1134 and 1495 MiB), so one run per depth cannot judge a 1.3x ratio."""
    failed = [m for m in ms if not m.ok]
    if failed or len(ms) == 1:
        return failed[0] if failed else ms[0]

    def median(xs):
        xs = sorted(xs)
        mid = len(xs) // 2
        return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
    anon = [m.anon_peak_kib for m in ms if m.anon_peak_kib is not None]
    return Measurement(ms[0].argv, 0, median([m.wall_s for m in ms]), int(median([m.max_rss_kib for m in ms])),
                       median([m.cpu_s for m in ms]), anon_peak_kib=int(median(anon)) if anon else None,
                       out_bytes=ms[0].out_bytes,
                       runs=[{"wall_s": m.wall_s, "max_rss_kib": m.max_rss_kib, "anon_peak_kib": m.anon_peak_kib}
                             for m in ms])


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


def summarize(results: dict[int, dict[str, Measurement]], shallow: int, deep: int, wall_target: float) -> dict:
    """Per command: the ratios deep/shallow (RSS, wall), wall(deep)/floor(deep), and whether each
    target is met (None where a measurement failed or no target applies)."""
    out = {}
    names = list(results[shallow])
    for name in names:
        s, d = results[shallow].get(name), results[deep].get(name)
        both = s is not None and d is not None and s.ok and d.ok
        floor = results[deep].get("floor")
        row = {"rss_ratio": ratio(d.max_rss_kib, s.max_rss_kib) if both else None,
               "wall_ratio": ratio(d.wall_s, s.wall_s) if both else None,
               "anon_ratio": ratio(d.anon_peak_kib, s.anon_peak_kib) if both else None,
               "floor_ratio": ratio(d.wall_s, floor.wall_s) if d is not None and d.ok and floor is not None
               and floor.ok else None}
        row["rss_target"], row["wall_target"] = RSS_TARGET, wall_target
        row["rss_met"] = None if row["rss_ratio"] is None else row["rss_ratio"] <= RSS_TARGET
        row["wall_met"] = None if row["wall_ratio"] is None else row["wall_ratio"] <= wall_target
        if name == FLOOR_COMMAND:
            row["floor_target"] = FLOOR_TARGET
            row["floor_met"] = None if row["floor_ratio"] is None else row["floor_ratio"] <= FLOOR_TARGET
            kernel = results[deep].get("floor-int8")
            row["int8_floor_ratio"] = (ratio(d.wall_s, kernel.wall_s) if d is not None and d.ok and kernel is not None
                                       and kernel.ok else None)
        out[name] = row
    return out


def _mark(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT MET")


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def format_table(results: dict[int, dict[str, Measurement]], summary: dict, shallow: int, deep: int) -> str:
    """The per-command table: RSS and wall at each depth, the ratios and their targets."""
    s, d = f"L{shallow}", f"L{deep}"
    wall_target = next(iter(summary.values()))["wall_target"]
    head = (f"{'command':<19} {'RSS ' + s:>10} {'RSS ' + d:>10} {'ratio':>6} {'≤' + str(RSS_TARGET):<8}"
            f" {'wall ' + s:>9} {'wall ' + d:>9} {'ratio':>6} {'≤' + format(wall_target, 'g'):<8}"
            f" {'/floor':>7} {'≤' + format(FLOOR_TARGET, 'g'):<8} {'anon ' + s:>10} {'anon ' + d:>10}")
    lines = [head, "-" * len(head)]
    for name, row in summary.items():
        a, b = results[shallow].get(name), results[deep].get(name)

        def rss(m):
            return "FAILED" if m is None or not m.ok else f"{m.max_rss_kib / 1024:.0f} MiB"

        def wall(m):
            return "FAILED" if m is None or not m.ok else f"{m.wall_s:.1f} s"

        def anon(m):
            return "—" if m is None or not m.ok or m.anon_peak_kib is None else f"{m.anon_peak_kib / 1024:.0f} MiB"
        floor_mark = _mark(row.get("floor_met")) if "floor_target" in row else ""
        lines.append(f"{name:<19} {rss(a):>10} {rss(b):>10} {_num(row['rss_ratio'], '.2f'):>6} "
                     f"{_mark(row['rss_met']):<8} {wall(a):>9} {wall(b):>9} {_num(row['wall_ratio'], '.2f'):>6} "
                     f"{_mark(row['wall_met']):<8} {_num(row['floor_ratio'], '.2f'):>7} {floor_mark:<8} "
                     f"{anon(a):>10} {anon(b):>10}")
    row = summary.get(FLOOR_COMMAND, {})
    if row.get("int8_floor_ratio") is not None:
        lines.append("")
        lines.append(f"{FLOOR_COMMAND} at {d}: {_num(row['floor_ratio'], '.2f')}x the read+write floor, "
                     f"{_num(row['int8_floor_ratio'], '.2f')}x floor-int8 (read, bitsandbytes int8 of every "
                     "matrix, write; no model, no checks)")
    spread = [(L, n, m.runs) for L, per in results.items() for n, m in per.items() if m.runs]
    if spread:
        lines.append("")
        lines.append("medians of repeated runs; each run's peak RSS (MiB):")
        lines += [f"  L{L:<3} {n:<19} " + ", ".join(f"{r['max_rss_kib'] / 1024:.0f}" for r in runs)
                  for L, n, runs in spread]
    failures = [(L, n, m.error) for L, per in results.items() for n, m in per.items() if not m.ok]
    if failures:
        lines.append("")
        lines += [f"FAILED L{L} {n}: {err}" for L, n, err in failures]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Peak RSS and wall time of moeconv's compression commands at "
                                             "two depths, against a read+write floor (issue #16).")
    ap.add_argument("--layers", default="4,32", help="the two depths, shallow,deep (default 4,32)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="256MB", help="shards of the source, the floor and the outputs")
    ap.add_argument("--commands", default=",".join(COMMANDS),
                    help=f"comma-separated subset of: {', '.join(COMMANDS)} (the floor always runs)")
    ap.add_argument("--keep-experts", type=int, default=None,
                    help="experts kept by prune-experts (default: max(top_k, 3/4 of them))")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of every command (and floor) per depth; the table gives the medians and each "
                         "run's peak RSS (one command's peak varies from run to run)")
    ap.add_argument("--wall-target", type=float, default=None,
                    help=f"wall(deep)/wall(shallow) target (default {WALL_TARGET_PER_DEPTH} × the depth ratio)")
    ap.add_argument("--out-dir", type=Path, default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the checkpoints and logs (a later run with the same --out-dir and shape reuses "
                         "the checkpoints); without it, everything the benchmark wrote is removed")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement and ratio here")
    a = ap.parse_args(argv)
    try:
        a.depths = [int(x) for x in a.layers.split(",")]
    except ValueError:
        ap.error(f"--layers: expected two integers like 4,32, got {a.layers!r}")
    if len(a.depths) != 2 or not 0 < a.depths[0] < a.depths[1]:
        ap.error(f"--layers: expected shallow,deep with 0 < shallow < deep, got {a.layers!r}")
    a.command_list = [c.strip() for c in a.commands.split(",") if c.strip()]
    unknown = [c for c in a.command_list if c not in COMMANDS]
    if unknown:
        ap.error(f"--commands: unknown {', '.join(unknown)}; choose from {', '.join(COMMANDS)}")
    if a.repeat < 1:
        ap.error(f"--repeat: expected at least 1, got {a.repeat}")
    if a.keep_experts is None:
        a.keep_experts = max(a.top_k, a.experts * 3 // 4)
    return a


def run_benchmark(a: argparse.Namespace, log=print) -> dict:
    """Write the checkpoints, measure the floor and every command at both depths, and return the
    JSON-ready result: machine, settings, checkpoints, measurements, summary, table."""
    shallow, deep = a.depths
    wall_target = a.wall_target if a.wall_target is not None else WALL_TARGET_PER_DEPTH * deep / shallow
    work = a.out_dir if a.out_dir is not None else Path(tempfile.mkdtemp(prefix="bench_streaming_"))
    created = a.out_dir is None or not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    log(f"machine: {machine['usable_cores']} usable cores of {machine['cpu_count']}, RAM {machine['ram_total_mib']} MiB "
        f"({machine['ram_available_mib']} MiB available), load {', '.join(f'{x:.1f}' for x in machine['loadavg'])}; "
        f"torch {machine['torch']}, transformers {machine['transformers']}")
    log(f"work dir: {work}")
    calib = work / "calib.txt"
    write_calib_text(calib)
    shape_base = dict(hidden=a.hidden, intermediate=a.intermediate, experts=a.experts, top_k=a.top_k,
                      heads=a.heads, kv_heads=a.kv_heads, vocab=a.vocab)
    result = {"machine": machine, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "targets": {"rss_ratio": RSS_TARGET, "wall_ratio": wall_target, "floor_ratio": FLOOR_TARGET,
                          "floor_command": FLOOR_COMMAND},
              "work_dir": str(work), "checkpoints": {}, "measurements": {}, "summary": None, "table": None}
    values = {"calib": str(calib), "samples": a.calib_samples, "seq_len": a.calib_seq_len, "keep": a.keep_experts,
              "shard": a.shard_size}
    if "run-recipe" in a.command_list:
        recipe = work / "recipe.yaml"
        recipe.write_text(RECIPE.format(keep=a.keep_experts))
        values.update(recipe=str(recipe), calib_ids=str(work / "calib_ids.safetensors"))
    try:
        measurements: dict[int, dict[str, Measurement]] = {}
        for layers in (shallow, deep):
            ckpt = work / f"mixtral-L{layers}"
            log(f"writing checkpoint L{layers} …")
            info, wm = make_checkpoint(ckpt, dict(shape_base, layers=layers), a.shard_size, a.timeout)
            if info is None:
                raise RuntimeError(f"writing the L{layers} checkpoint failed: {wm.error}")
            reused = bool(info.get("reused"))
            info.update(disk_bytes=dir_bytes(ckpt), writer_wall_s=None if reused else wm.wall_s,
                        writer_max_rss_kib=None if reused else wm.max_rss_kib)
            result["checkpoints"][layers] = info
            log(f"  {ckpt}: {info['disk_bytes'] / 1e6:,.1f} MB on disk"
                + (" (reused)" if reused else f" (written in {wm.wall_s:.1f} s, writer peak RSS "
                                                  f"{wm.max_rss_kib / 1024:.0f} MiB)"))
            if "run-recipe" in a.command_list and not Path(values["calib_ids"]).is_file():
                tm = run_child_helper("tokenize", [str(calib), str(ckpt), values["calib_ids"], str(a.calib_samples),
                                                   str(a.calib_seq_len)], a.timeout, work / "logs" / "tokenize")
                if not tm.ok:
                    log(f"  tokenizing the calibration text for run-recipe failed: {tm.error}")
            measurements[layers] = bench_depth(layers, ckpt=ckpt, work=work, commands=a.command_list, values=values,
                                               shard_size=a.shard_size, timeout=a.timeout, log=log,
                                               repeat=a.repeat)
        summary = summarize(measurements, shallow, deep, wall_target)
        result["measurements"] = {L: {n: asdict(m) for n, m in per.items()} for L, per in measurements.items()}
        result["summary"] = summary
        result["table"] = format_table(measurements, summary, shallow, deep)
    finally:
        if not a.keep:
            cleanup(work, created)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_runner"]:
        _runner_main(argv[1])
        return 0
    if argv[:1] == ["--_floor"]:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(floor_copy(*argv[1:4])))
        return 0
    if argv[:1] == ["--_floor_int8"]:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(floor_int8(*argv[1:4])))
        return 0
    if argv[:1] == ["--_tokenize"]:
        sys.path.insert(0, str(ROOT))
        text, src, out, samples, seq_len = argv[1:6]
        print(json.dumps(write_calib_ids(text, src, out, int(samples), int(seq_len))))
        return 0
    a = parse_args(argv)
    result = run_benchmark(a)
    print()
    print("Checkpoints on disk: " + ", ".join(f"L{L}: {c['disk_bytes'] / 1e6:,.1f} MB"
                                                 for L, c in result["checkpoints"].items()))
    print(result["table"])
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
