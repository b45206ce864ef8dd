"""Benchmark `moeconv upcycle` on a ~1 GB dense Llama checkpoint (bf16, several shards).

Reports, in one run: wall time and peak RSS of `moeconv upcycle` (8 experts, streaming route),
and the wall time of copying the same number of output bytes with a plain file copy (the I/O
floor on this machine). Targets: peak RSS < 1.5 GB; wall time <= 2x the copy floor.

    python scripts/bench_upcycle.py [--size-gb 1.0] [--experts 8] [--out bench_upcycle.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(path: Path, size_gb: float) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter)
    fixed = 2 * 2 * vocab * hidden
    layers = max(1, int((size_gb * 1e9 - fixed) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")
    del model
    return {"layers": layers, "hidden": hidden, "intermediate": inter, "vocab": vocab}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def run_upcycle(src: Path, out: Path, experts: int) -> tuple[float, float]:
    """Wall time and peak RSS (sampled every 20 ms with psutil) of the `moeconv upcycle` process."""
    import psutil
    cmd = [sys.executable, "-m", "moeconv.cli", "upcycle", str(src), str(out), "--num-experts", str(experts),
           "--top-k", "2", "--shard-size", "2GB"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"upcycle failed ({proc.returncode}): {stderr[-2000:]}")
    return wall, peak


def copy_floor(src_dir: Path, dst: Path) -> float:
    """Plain copy of the output's bytes (the same files), the I/O floor."""
    dst.mkdir()
    t0 = time.perf_counter()
    for f in sorted(src_dir.iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    os.sync()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out", default="bench_upcycle.json")
    ap.add_argument("--workdir", default=None, help="where to build the checkpoints (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moeconv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out, floor_dst = work / "dense", work / "moe", work / "copy"
    for p in (out, floor_dst):
        shutil.rmtree(p, ignore_errors=True)
    try:
        if not (src / "config.json").exists():
            print(f"building ~{args.size_gb} GB bf16 Llama checkpoint in {src} …", flush=True)
            shape = build_checkpoint(src, args.size_gb)
        else:
            shape = json.loads((src / "config.json").read_text())
        src_bytes = dir_bytes(src)
        os.sync()
        print("running moeconv upcycle …", flush=True)
        wall, peak = run_upcycle(src, out, args.experts)
        out_bytes = dir_bytes(out)
        floor = copy_floor(out, floor_dst)
        report = json.loads((out / "report.json").read_text())
        result = {
            "source_bytes": src_bytes, "output_bytes": out_bytes, "experts": args.experts,
            "upcycle_wall_s": round(wall, 2), "upcycle_peak_rss_bytes": peak,
            "copy_floor_s": round(floor, 2), "ratio_vs_copy_floor": round(wall / floor, 2),
            "targets": {"peak_rss_lt_1_5GB": peak < 1.5e9, "wall_le_2x_floor": wall <= 2 * floor},
            "route": report.get("route"), "verification": report.get("verification", {}).get("mode"),
            "shape": {k: shape.get(k) for k in ("layers", "num_hidden_layers", "hidden", "hidden_size") if k in shape},
        }
        print(json.dumps(result, indent=2))
        print(f"\nupcycle: {wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB; copy floor {floor:.1f} s; "
              f"ratio {wall / floor:.2f}x  (targets: RSS < 1.5 GB → {'PASS' if peak < 1.5e9 else 'FAIL'}, "
              f"<= 2x floor → {'PASS' if wall <= 2 * floor else 'FAIL'})")
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        for p in (out, floor_dst):
            shutil.rmtree(p, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
