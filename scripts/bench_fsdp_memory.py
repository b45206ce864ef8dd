"""What each distillation process holds under DDP and under FSDP, on the same model (issue #19).

    python scripts/bench_fsdp_memory.py [--processes 2] [--layers 4 --hidden 512 --intermediate 1024
        --experts 8] [--steps 2] [--work-dir DIR] [--json FILE]

Writes a random Mixtral-shaped checkpoint (bf16, `scripts/synthetic_checkpoint.py`) and token ids,
then runs the same heal distillation (`moeconv distill`, teacher = student's source, kl + ce) under
`torchrun --nproc-per-node N` twice, `--strategy ddp` and `--strategy fsdp`, and reads from each
run's report.json what rank 0 held after its first step (`memory_per_rank.measured`: the bytes of
the parameters of the student and the teacher, of the gradients and of the optimizer state, this
rank's shards under FSDP, counted from the tensors' storage) beside the plan's estimate. Prints
FSDP / DDP for parameters + optimizer state (the target: at most 0.6 with 2 processes), the other
parts, the largest process's peak RSS (which on CPU also counts the whole model each process
loads before sharding it) and the wall time of each run; exits 1 when the target is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
TARGET = 0.6  # FSDP / DDP, parameters + optimizer state per process, with 2 processes


def write_inputs(work: Path, args) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from synthetic_checkpoint import MixtralShape, write_checkpoint
    shape = MixtralShape(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                         experts=args.experts, heads=8, kv_heads=4, vocab=args.vocab, max_positions=512)
    model = work / "mixtral"
    if not (model / "config.json").is_file():
        write_checkpoint(model, shape, shard_size="2GB")
    ids = work / "ids.safetensors"
    save_file({"ids": torch.randint(3, args.vocab, (args.seq_len * 64,), generator=torch.Generator().manual_seed(0))},
              ids)
    return model, ids


def run_distill(model: Path, ids: Path, out: Path, strategy: str, args) -> dict:
    """One torchrun job; returns its report's metrics, wall time and the largest process's peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.processes),
           "-m", "moeconv.cli", "distill", "--teacher", str(model), "--student", str(model), str(out),
           "--data", str(ids), "--mode", "heal", "--loss-weights", "kl=1,ce=0.1", "--steps", str(args.steps),
           "--seq-len", str(args.seq_len), "--batch-size", str(2 * args.processes), "--eval-rows", "0",
           "--strategy", strategy, "--force"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"distill --strategy {strategy} failed:\n{r.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest descendant so far
    metrics = json.loads((out / "report.json").read_text())["passes"][0]["metrics"]
    return {"metrics": metrics, "wall_s": round(wall, 1),
            "peak_rss_bytes": peak * 1024 if peak > before else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from moeconv.io.config_checks import format_bytes
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        model, ids = write_inputs(work, args)
        runs = {s: run_distill(model, ids, work / f"out-{s}", s, args) for s in ("ddp", "fsdp")}
    got = {s: r["metrics"]["memory_per_rank"]["measured"] for s, r in runs.items()}
    est = runs["fsdp"]["metrics"]["memory_per_rank"]["estimate"]
    for s, m in got.items():
        assert m["strategy"] == s and runs[s]["metrics"]["strategy"] == s, (s, m)

    def held(m: dict) -> int:
        return m["parameters"] + m["optimizer_state"]
    ratio = held(got["fsdp"]) / held(got["ddp"])
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.experts} experts of {args.intermediate}; "
          f"{args.processes} processes (gloo, CPU); student and teacher {format_bytes(got['ddp']['parameters'] // 2)} each")
    print(f"{'per process (rank 0)':28} {'ddp':>11} {'fsdp':>11} {'fsdp/ddp':>9}   estimate ddp / fsdp")
    for part in ("parameters", "gradients", "optimizer_state"):
        a, b = got["ddp"][part], got["fsdp"][part]
        print(f"{part.replace('_', ' '):28} {format_bytes(a):>11} {format_bytes(b):>11} {b / a:9.3f}   "
              f"{format_bytes(est['ddp'][part])} / {format_bytes(est['fsdp'][part])}")
    print(f"{'parameters + optimizer state':28} {format_bytes(held(got['ddp'])):>11} {format_bytes(held(got['fsdp'])):>11} "
          f"{ratio:9.3f}   target ≤ {TARGET}")
    rss = {s: r["peak_rss_bytes"] for s, r in runs.items()}
    if all(rss.values()):
        print(f"{'peak RSS, largest process':28} {format_bytes(rss['ddp']):>11} {format_bytes(rss['fsdp']):>11} "
              f"{rss['fsdp'] / rss['ddp']:9.3f}   (CPU: each process loads the whole model before sharding)")
    print(f"{'wall time (s)':28} {runs['ddp']['wall_s']:>11} {runs['fsdp']['wall_s']:>11} "
          f"{runs['fsdp']['wall_s'] / runs['ddp']['wall_s']:9.3f}")
    result = {"processes": args.processes, "measured": got, "estimate": est, "ratio_params_optimizer": ratio,
              "target": TARGET, "peak_rss_bytes": rss, "wall_s": {s: r["wall_s"] for s, r in runs.items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    ok = ratio <= TARGET or args.processes != 2
    print("ok" if ok else f"MISSED: {ratio:.3f} > {TARGET}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
