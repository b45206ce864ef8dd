"""How much faster is `--device cuda` than `--device cpu` on the streamed routes?

    python scripts/bench_device.py [--layers 4 --hidden 512 --intermediate 1792 --experts 8 --vocab 8192]
        [--commands quantize-int8,sparsify-wanda] [--calib-samples 8 --calib-seq-len 64]
        [--timeout 3600] [--out-dir DIR --keep] [--json FILE]

A random bf16 Mixtral is written once (`scripts/synthetic_checkpoint.py`, ~100 MB at the default
shape), then each selected command (`scripts/bench_streaming.py`'s COMMANDS: quantize-int8,
sparsify-wanda, …) runs on it as its own child process, `--device cpu` then `--device cuda`,
in the same run on the same machine. For each device it reports the child's wall time (start-up,
reading, writing and the check included) and the passes' own time from report.json (the per-layer
work: quantizing, calibrating, pruning), and the cpu/cuda ratio of both.

Without a CUDA GPU (`torch.cuda.is_available()` is False) it exits 2 with one line, before
writing anything.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import bench_streaming as bench  # noqa: E402  (child-process measurement, checkpoint writer, commands)

DEVICES = ("cpu", "cuda")


def gpu_name() -> str | None:
    """The current CUDA GPU's name, None without one."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Wall time of moeconv's streamed commands with --device cpu and "
                                             "--device cuda, in one run.")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1792)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--shard-size", default="256MB")
    ap.add_argument("--commands", default="quantize-int8,sparsify-wanda",
                    help=f"comma-separated subset of: {', '.join(bench.COMMANDS)}")
    ap.add_argument("--keep-experts", type=int, default=None, help="prune-experts' --keep (default: 3/4 of them)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per child process")
    ap.add_argument("--out-dir", type=Path, default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and logs")
    ap.add_argument("--json", type=Path, default=None, help="write every measurement here")
    a = ap.parse_args(argv)
    a.command_list = [c.strip() for c in a.commands.split(",") if c.strip()]
    unknown = [c for c in a.command_list if c not in bench.COMMANDS]
    if unknown:
        ap.error(f"--commands: unknown {', '.join(unknown)}; choose from {', '.join(bench.COMMANDS)}")
    if a.keep_experts is None:
        a.keep_experts = max(a.top_k, a.experts * 3 // 4)
    return a


def run_once(name: str, device: str, values: dict, work: Path, timeout: float) -> dict:
    """`name` with `--device device` in a child process: wall time, the passes' own seconds and the
    measured change (report.json); the output is removed."""
    out = work / "outputs" / f"{name}-{device}"
    bench._remove_output(out)
    argv = bench.command_argv(name, dict(values, out=str(out))) + ["--device", device]
    m = bench.measure(argv, timeout=timeout, log_dir=work / "logs" / f"{name}-{device}")
    row = {"command": name, "device": device, "wall_s": m.wall_s, "ok": m.ok, "error": m.error}
    if m.ok:
        report = json.loads((out / "report.json").read_text())
        row["passes_s"] = sum(p.get("seconds") or 0.0 for p in report["passes"])
        row["rel_max_diff"] = report.get("verification", {}).get("rel_max_diff")
    bench._remove_output(out)
    return row


def format_table(rows: list[dict]) -> str:
    """One line per command: wall and passes' time on each device, and cpu/cuda of both."""
    by = {(r["command"], r["device"]): r for r in rows}
    lines = [f"{'command':<20}{'cpu wall':>10}{'cuda wall':>11}{'cpu/cuda':>10}"
             f"{'cpu passes':>12}{'cuda passes':>13}{'cpu/cuda':>10}"]
    for name in dict.fromkeys(r["command"] for r in rows):
        cpu, gpu = by[(name, "cpu")], by[(name, "cuda")]
        if not (cpu["ok"] and gpu["ok"]):
            lines.append(f"{name:<20}FAILED: {cpu['error'] or gpu['error']}")
            continue
        wall = bench.ratio(cpu["wall_s"], gpu["wall_s"])
        work = bench.ratio(cpu["passes_s"], gpu["passes_s"])
        lines.append(f"{name:<20}{cpu['wall_s']:>9.1f}s{gpu['wall_s']:>10.1f}s{bench._num(wall, '.2f'):>9}×"
                     f"{cpu['passes_s']:>11.1f}s{gpu['passes_s']:>12.1f}s{bench._num(work, '.2f'):>9}×")
    return "\n".join(lines)


def run_benchmark(a: argparse.Namespace, gpu: str, log=print) -> dict:
    """Write the checkpoint, run every command on each device, return the JSON-ready result."""
    work = a.out_dir if a.out_dir is not None else Path(tempfile.mkdtemp(prefix="bench_device_"))
    created = a.out_dir is None or not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        shape = dict(layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, experts=a.experts,
                     top_k=a.top_k, heads=a.heads, kv_heads=a.kv_heads, vocab=a.vocab)
        ckpt = work / f"mixtral-L{a.layers}"
        log(f"writing the checkpoint {ckpt} …")
        info, m = bench.make_checkpoint(ckpt, shape, a.shard_size, a.timeout)
        if info is None:
            raise RuntimeError(f"writing the checkpoint failed: {m.error}")
        calib = work / "calib.txt"
        bench.write_calib_text(calib)
        values = {"src": str(ckpt), "calib": str(calib), "samples": a.calib_samples, "seq_len": a.calib_seq_len,
                  "keep": a.keep_experts, "shard": a.shard_size}
        if "run-recipe" in a.command_list:
            values.update(recipe=str(work / "recipe.yaml"), calib_ids=str(work / "calib_ids.safetensors"))
            Path(values["recipe"]).write_text(bench.RECIPE.format(keep=a.keep_experts))
            bench.run_child_helper("tokenize", [str(calib), str(ckpt), values["calib_ids"], str(a.calib_samples),
                                                str(a.calib_seq_len)], a.timeout, work / "logs" / "tokenize")
        (work / "outputs").mkdir(exist_ok=True)
        rows = []
        for name in a.command_list:
            for device in DEVICES:
                rows.append(run_once(name, device, values, work, a.timeout))
                r = rows[-1]
                log(f"  {name:<19} --device {device:<5} wall {r['wall_s']:7.1f} s"
                    + (f"  passes {r['passes_s']:7.1f} s" if r["ok"] else f"  FAILED ({r['error']})"))
        return {"machine": dict(bench.machine_info(), gpu=gpu), "shape": shape, "rows": rows,
                "table": format_table(rows)}
    finally:
        if not a.keep:
            bench.cleanup(work, created)  # all of a temp dir; only its own entries of a given --out-dir


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    gpu = gpu_name()
    if gpu is None:
        print("bench_device: torch sees no CUDA GPU here (torch.cuda.is_available() is False); run it on a "
              "machine with a GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    result = run_benchmark(a, gpu)
    print(f"\n{gpu}; {a.layers} layers, hidden {a.hidden}, {a.experts} experts of {a.intermediate}\n")
    print(result["table"])
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
