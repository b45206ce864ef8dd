"""Benchmark `moeconv upcycle` against a plain copy of its output and against mergekit-moe (issue #16).

    python scripts/bench_upcycle.py [--experts 8] [--repeat 3] [--workdir DIR] [--out bench_upcycle.json]
        [--mergekit-venv /work/venvs/mergekit] [--no-mergekit]
    python scripts/bench_upcycle.py --quick     # a tiny Llama, seconds: the benchmark's own smoke test

The source is a random bf16 Llama written shard by shard (default: 12 layers, hidden 2048,
intermediate 5632, vocab 32000, 16 heads: 1.50 GB = 1.39 GiB, with a byte-level tokenizer, which
mergekit-moe insists on); with --workdir it is kept there and reused. Each step is its own child
process measured by `bench_streaming.measure` (wall time; peak RSS from `os.wait4` through a
stdlib-only runner, so this process's torch is not counted):

- **moeconv**: `moeconv upcycle SRC OUT -e 8 -k 2 --router-init normal`, verification included
  (whatever `--verify auto` does at this size, as a user gets it);
- **copy floor**: `shutil.copytree` of moeconv's output directory (the same bytes; I/O only);
- **mergekit**: `mergekit-moe CONFIG OUT` from its own virtual environment (not a moeconv
  dependency), on the same job: base model = the 8 experts = SRC, `gate_mode: random`, bf16,
  `experts_per_token: 2`. Create it with

      python -m venv /work/venvs/mergekit
      /work/venvs/mergekit/bin/pip install /path/to/torch-2.13.0+cpu-*.whl   # or the CPU index
      /work/venvs/mergekit/bin/pip install mergekit==0.1.5

  Without that environment the mergekit part is skipped and the reason printed.

The disk's speed drifts, so `--repeat N` runs N rounds of the three steps, interleaved, and each
step's fastest run counts (every run's time is in the JSON, with the load average before it:
other work on the machine shows there). Before each step the previous outputs are removed, dirty
pages flushed, and the source read through, so every step starts from the same state: nothing
dirty to write back, the source in the page cache.

Printed and written (`--out`, JSON): each step's seconds and peak RSS, `upcycle/copy` and
`upcycle/mergekit` (wall), `upcycle/mergekit` (peak RSS), and the issue's targets: upcycle ≤ 2× the
copy floor, ≤ 0.5× mergekit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
for _p in (str(ROOT), str(SCRIPTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_streaming  # noqa: E402  (the measured-child runner, shared with the streaming benchmark)

DEFAULT_VENV = Path("/work/venvs/mergekit")
COPY_TARGET = 2.0      # upcycle wall ≤ 2 × the copy floor
MERGEKIT_TARGET = 0.5  # upcycle wall ≤ 0.5 × mergekit-moe
SETTLE_S = 2.0


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of the synthetic dense Llama (MHA: kv heads = heads; untied head)."""

    layers: int = 12
    hidden: int = 2048
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = 16


FULL = LlamaShape()
QUICK = LlamaShape(layers=2, hidden=64, intermediate=128, vocab=512, heads=4)


# ----------------------------------------------------------------------------- the source checkpoint


def llama_specs(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, dims) of every tensor of a Llama checkpoint, in file order."""
    h, f = shape.hidden, shape.intermediate
    specs = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        specs += [(f"{p}.self_attn.{n}_proj.weight", (h, h)) for n in ("q", "k", "v", "o")]
        specs += [(f"{p}.mlp.gate_proj.weight", (f, h)), (f"{p}.mlp.up_proj.weight", (f, h)),
                  (f"{p}.mlp.down_proj.weight", (h, f))]
    return specs + [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]


def build_checkpoint(path: Path, shape: LlamaShape, shard_size: str = "500MB", seed: int = 0) -> dict:
    """Write a random bf16 Llama of `shape` to `path` shard by shard (config by transformers itself,
    a tokenizer, an index). Returns {bytes, shards, parameters}."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from synthetic_checkpoint import nbytes, plan_shards, random_tensor, write_tokenizer
    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16").save_pretrained(path)
    shards = plan_shards(llama_specs(shape), bench_streaming.parse_size(shard_size))
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: random_tensor(name, dims, gen) for name, dims in shard}, str(path / fname),
                  metadata={"format": "pt"})
        for name, dims in shard:
            weight_map[name] = fname
            total += nbytes(dims)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    write_tokenizer(path)
    return {"bytes": total, "shards": len(shards), "parameters": total // 2}


# ----------------------------------------------------------------------------- the measured steps


def moeconv_argv(src: Path, out: Path, experts: int) -> list[str]:
    return [sys.executable, "-m", "moeconv.cli", "upcycle", str(src), str(out), "--num-experts", str(experts),
            "--top-k", "2", "--router-init", "normal"]


def copy_argv(src: Path, dst: Path) -> list[str]:
    """A plain copy of a directory's files (sendfile: no reflinks, no Python-level buffering)."""
    return [sys.executable, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])", str(src), str(dst)]


def mergekit_config(src: Path, experts: int) -> str:
    """mergekit-moe's YAML for our job: every expert a copy of `src`'s FFN, random routers, top-2."""
    lines = [f"base_model: {src}", "gate_mode: random", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    lines += [f"  - source_model: {src}" for _ in range(experts)]
    return "\n".join(lines) + "\n"


def mergekit_argv(venv: Path, config: Path, out: Path) -> list[str]:
    # identical experts are refused unless the user says they will train the result
    return [str(venv / "bin" / "mergekit-moe"), str(config), str(out), "--i-understand-this-is-not-useful-without-training"]


def mergekit_missing(venv: Path) -> str | None:
    """Why mergekit-moe cannot run (None when it can)."""
    if not (venv / "bin" / "mergekit-moe").is_file():
        return f"no mergekit-moe in {venv} (create the venv as the module docstring says)"
    return None


def mergekit_version(venv: Path) -> str | None:
    import subprocess
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('mergekit'))"],
                          capture_output=True, text=True)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def dir_bytes(path: Path, suffix: str = "") -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(suffix))


def settle(*outs: Path, pause: float = SETTLE_S, warm: Path | None = None) -> None:
    """Remove `outs` and let the disk settle: flush what is dirty and give the filesystem a moment
    to discard the freed blocks (this disk may be mounted with `discard`), so no step pays for the
    previous one's writes. `warm`: a directory read through first, so every step finds its input
    in the page cache (the copy's input, moeconv's output, is there: it was just written)."""
    for out in outs:
        bench_streaming._remove_output(out)
    os.sync()
    time.sleep(pause)
    if warm is not None:
        for f in sorted(warm.iterdir()):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def measure_step(argv: list[str], out: Path, logs: Path) -> dict:
    """One measured run of `argv` writing `out`: {seconds, peak_rss_bytes, out_bytes, weights_bytes} or {error}."""
    load = round(os.getloadavg()[0], 2)
    m = bench_streaming.measure(argv, log_dir=logs / f"{out.name}-{time.monotonic_ns()}")
    if not m.ok:
        return {"error": m.error, "argv": argv}
    return {"seconds": round(m.wall_s, 2), "cpu_s": round(m.cpu_s, 2), "peak_rss_bytes": m.max_rss_kib * 1024,
            "loadavg_before": load, "out_bytes": dir_bytes(out) if out.is_dir() else None,
            "weights_bytes": dir_bytes(out, ".safetensors") if out.is_dir() else None}


def fastest(runs: list[dict]) -> dict:
    """The fastest of a step's runs (the least disturbed by the machine), with every run's time."""
    if not runs or any("error" in r for r in runs):
        return next((r for r in runs if "error" in r), {"error": "not run"})
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["runs_s"] = [r["seconds"] for r in runs]
    best["runs_loadavg_before"] = [r["loadavg_before"] for r in runs]
    best["median_s"] = sorted(best["runs_s"])[len(runs) // 2]
    return best


# ----------------------------------------------------------------------------- judging and printing


def ratio(a: dict, b: dict, key: str) -> float | None:
    if "error" in a or "error" in b or a.get(key) is None or not b.get(key):
        return None
    return round(a[key] / b[key], 3)


def summarize(upcycle: dict, copy: dict, mergekit: dict) -> dict:
    """The ratios and whether each target is met (None: not measured)."""
    vs_copy, vs_mk = ratio(upcycle, copy, "seconds"), ratio(upcycle, mergekit, "seconds")
    return {"upcycle_over_copy": vs_copy, "upcycle_over_mergekit": vs_mk,
            "rss_upcycle_over_mergekit": ratio(upcycle, mergekit, "peak_rss_bytes"),
            "target_copy_met": None if vs_copy is None else vs_copy <= COPY_TARGET,
            "target_mergekit_met": None if vs_mk is None else vs_mk <= MERGEKIT_TARGET}


def _met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("MET" if flag else "NOT MET")


def _step_line(name: str, step: dict) -> str:
    if "error" in step:
        return f"{name}: FAILED: {step['error']}"
    if "skipped" in step:
        return f"{name}: skipped: {step['skipped']}"
    return (f"{name}: {step['seconds']:.2f} s (cpu {step['cpu_s']:.1f} s), peak RSS "
            f"{step['peak_rss_bytes'] / 2**30:.2f} GiB")


def report_lines(result: dict) -> list[str]:
    s, mk = result["summary"], result["mergekit"]
    lines = [_step_line("copy floor", result["copy"]), _step_line("moeconv upcycle", result["upcycle"]),
             _step_line(f"mergekit-moe {result.get('mergekit_version') or ''}".rstrip(), mk)]
    vc = s["upcycle_over_copy"]
    lines.append(f"ratio upcycle/copy: {'n/a' if vc is None else f'{vc:.2f}x'} "
                 f"(target <= {COPY_TARGET:g}x: {_met(s['target_copy_met'])})")
    vm = s["upcycle_over_mergekit"]
    why = f"mergekit skipped: {mk['skipped']}" if "skipped" in mk else "mergekit failed" if "error" in mk else ""
    lines.append(f"ratio upcycle/mergekit: {f'{vm:.2f}x' if vm is not None else 'n/a (' + why + ')'} "
                 f"(target <= {MERGEKIT_TARGET:g}x: {_met(s['target_mergekit_met'])})")
    rss = s["rss_upcycle_over_mergekit"]
    lines.append(f"ratio peak RSS upcycle/mergekit: {'n/a' if rss is None else f'{rss:.2f}x'}")
    loads = [x for k in ("upcycle", "copy", "mergekit") for x in result[k].get("runs_loadavg_before", [])]
    if loads:  # a shared machine: other work shows here
        lines.append(f"load average (1 min) before the runs: {min(loads):.2f} to {max(loads):.2f} "
                     f"on {result.get('cpu_count')} CPUs")
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny Llama (2 layers, hidden 64): seconds")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="rounds (each step once per round); the fastest counts")
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit-moe even when its venv exists")
    ap.add_argument("--out", type=Path, default=Path("bench_upcycle.json"))
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to build the checkpoints (kept there, and reused when its shape matches)")
    return ap.parse_args(argv)


def source_checkpoint(work: Path, shape: LlamaShape) -> tuple[Path, dict]:
    """The dense source under `work`, built unless one of the same shape is already there."""
    src, stamp = work / f"dense-L{shape.layers}-h{shape.hidden}", work / f"dense-L{shape.layers}-h{shape.hidden}.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("shape") == asdict(shape):
        return src, json.loads(stamp.read_text())
    shutil.rmtree(src, ignore_errors=True)
    print(f"building the bf16 Llama {asdict(shape)} in {src} …", flush=True)
    info = {"shape": asdict(shape), **build_checkpoint(src, shape)}
    stamp.write_text(json.dumps(info))
    return src, info


def one_round(a: argparse.Namespace, src: Path, work: Path, mergekit_cfg: Path | None) -> dict:
    """moeconv upcycle, a copy of its output, mergekit-moe (when `mergekit_cfg`): one run each."""
    logs, moe, copy_out, mk_out = work / "logs", work / "moeconv-out", work / "copy-out", work / "mergekit-out"
    pause = 0.0 if a.quick else SETTLE_S
    settle(moe, copy_out, mk_out, pause=pause, warm=src)
    print("  moeconv upcycle …", flush=True)
    runs = {"upcycle": measure_step(moeconv_argv(src, moe, a.experts), moe, logs)}
    if "error" not in runs["upcycle"]:
        runs["upcycle"]["report"] = _upcycle_report(moe)
        settle(pause=pause)
        print("  copy of its output (the floor) …", flush=True)
        runs["copy"] = measure_step(copy_argv(moe, copy_out), copy_out, logs)
    if mergekit_cfg is not None:
        settle(moe, copy_out, pause=pause, warm=src)
        print("  mergekit-moe …", flush=True)
        runs["mergekit"] = measure_step(mergekit_argv(a.mergekit_venv, mergekit_cfg, mk_out), mk_out, logs)
    settle(moe, copy_out, mk_out, pause=0.0)
    return runs


def run_benchmark(a: argparse.Namespace, work: Path) -> dict:
    """`a.repeat` rounds of the three steps, interleaved (the disk's speed drifts); each step's
    fastest run counts."""
    shape = QUICK if a.quick else FULL
    if a.layers:
        shape = LlamaShape(**{**asdict(shape), "layers": a.layers})
    src, info = source_checkpoint(work, shape)
    why = "--no-mergekit" if a.no_mergekit else mergekit_missing(a.mergekit_venv)
    mergekit_cfg = None if why else work / "mergekit-moe.yml"
    if mergekit_cfg is not None:
        mergekit_cfg.write_text(mergekit_config(src, a.experts))
    rounds = []
    for i in range(a.repeat):
        print(f"round {i + 1}/{a.repeat}", flush=True)
        rounds.append(one_round(a, src, work, mergekit_cfg))
    steps = {k: fastest([r[k] for r in rounds if k in r]) for k in ("upcycle", "copy")}
    steps["mergekit"] = {"skipped": why} if why else fastest([r["mergekit"] for r in rounds])
    result = {"source": info, "experts": a.experts, **steps, "cpu_count": os.cpu_count(),
              "mergekit_version": None if why else mergekit_version(a.mergekit_venv)}
    result["summary"] = summarize(steps["upcycle"], steps["copy"], steps["mergekit"])
    return result


def _upcycle_report(out: Path) -> dict:
    rep = json.loads((out / "report.json").read_text())
    ver = rep.get("verification", {})
    return {"route": rep.get("route"), "verification_mode": ver.get("mode"), "rel_max_diff": ver.get("rel_max_diff"),
            "seconds_in_process": rep.get("seconds")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="moeconv-bench-upcycle-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run_benchmark(a, work)
    finally:
        for name in ("moeconv-out", "copy-out", "mergekit-out", "logs"):
            bench_streaming._remove_output(work / name)
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(["", *report_lines(result)]))
    a.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {a.out}")
    return 0 if "error" not in result["upcycle"] else 1


if __name__ == "__main__":
    sys.exit(main())
