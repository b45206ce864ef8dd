"""A checkpoint bigger than this machine's memory through `moeconv run` (issue #16).

    python scripts/bench_bigger_than_ram.py [--size-gb 26] [--hidden 1024 --intermediate 2816 --experts 8]
        [--keep-experts 6] [--max-rss-gb 4] [--out-dir DIR] [--keep] [--json FILE]

Writes a random bf16 Mixtral-shaped checkpoint of at least --size-gb on disk shard by shard
(`scripts/synthetic_checkpoint.py`; the depth is chosen from the layer shape), then runs the recipe
prune-experts (keep 6 of 8) → 2:4 Wanda → int8 on it with `moeconv run … --calib IDS`, measured by a
stdlib-only runner (`bench_streaming.measure`: peak RSS of the command alone, wall time). The run
must stream (one decoder layer in memory at a time), finish, and pass its streamed verification;
the script prints the checkpoint size against the machine's RAM, the peak RSS against --max-rss-gb,
the wall time, and the verification figures from the run's report.json, and exits 1 when a target
is missed. The work directory needs room for the checkpoint and the output (~1.4× --size-gb).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_streaming as bench  # noqa: E402  (stdlib-only at import time)

RECIPE = bench.RECIPE


def layers_for(size_gb: float, hidden: int, inter: int, experts: int, heads: int, kv_heads: int, vocab: int) -> int:
    """The fewest decoder layers that make a bf16 checkpoint of at least `size_gb` (10^9 bytes)."""
    kv = hidden * kv_heads // heads
    per_layer = 2 * (experts * 3 * hidden * inter + 2 * hidden * hidden + 2 * hidden * kv + experts * hidden + 2 * hidden)
    outer = 2 * (2 * vocab * hidden + hidden)
    return max(1, -(-int(size_gb * 1e9 - outer) // per_layer))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=26.0)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--keep-experts", type=int, default=6)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seq-len", type=int, default=64)
    ap.add_argument("--max-rss-gb", type=float, default=4.0, help="target: peak RSS of the run (GiB)")
    ap.add_argument("--timeout", type=float, default=6 * 3600.0)
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args(argv)


def run(a: argparse.Namespace, log=print) -> dict:
    work = a.out_dir or Path(tempfile.mkdtemp(prefix="moeconv-big-"))
    work.mkdir(parents=True, exist_ok=True)
    layers = layers_for(a.size_gb, a.hidden, a.intermediate, a.experts, a.heads, a.kv_heads, a.vocab)
    shape = {"layers": layers, "hidden": a.hidden, "intermediate": a.intermediate, "experts": a.experts, "top_k": 2,
             "heads": a.heads, "kv_heads": a.kv_heads, "vocab": a.vocab}
    machine = bench.machine_info()
    log(f"machine: {json.dumps(machine)}")
    ckpt = work / f"mixtral-L{layers}"
    log(f"writing a {layers}-layer checkpoint (≥ {a.size_gb} GB) …")
    info, m_write = bench.make_checkpoint(ckpt, shape, "2GB", a.timeout)
    if info is None:
        raise SystemExit(f"writing the checkpoint failed: {m_write.error}")
    disk = bench.dir_bytes(ckpt)
    calib_text = work / "calib.txt"
    bench.write_calib_text(calib_text)
    ids = work / "calib_ids.safetensors"
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(keep=a.keep_experts))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    ids_job = bench.measure([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import bench_streaming as b; "
                             "b.write_calib_ids(*sys.argv[2:5], int(sys.argv[5]), int(sys.argv[6]))",
                             str(bench.SCRIPTS), str(calib_text), str(ckpt), str(ids), str(a.calib_samples),
                             str(a.calib_seq_len)], timeout=600)
    if not ids_job.ok:
        raise SystemExit(f"tokenizing the calibration text failed: {ids_job.error}")
    argv = [sys.executable, "-m", "moeconv.cli", "run", str(recipe), "--model", str(ckpt), "--out", str(out),
            "--calib", str(ids)]
    log(f"running: {' '.join(argv[2:])}")
    m = bench.measure(argv, timeout=a.timeout, log_dir=work / "run-logs")
    return _result(a, machine, shape, disk, m, out, work)


def _result(a, machine: dict, shape: dict, disk: int, m, out: Path, work: Path) -> dict:
    report = json.loads((out / "report.json").read_text()) if m.ok else {}
    v = report.get("verification", {})
    ram = (machine.get("ram_total_mib") or 0) * 2**20
    rss = m.max_rss_kib * 1024
    result = {"shape": shape, "checkpoint_bytes": disk, "machine_ram_bytes": ram, "bigger_than_ram": disk > ram,
              "rc": m.rc, "error": m.error, "wall_s": m.wall_s, "peak_rss_bytes": rss,
              "anon_peak_bytes": (m.anon_peak_kib or 0) * 1024, "route": report.get("route"),
              "output_bytes": report.get("written", {}).get("bytes"), "verification": v,
              "rss_target_bytes": int(a.max_rss_gb * 2**30)}
    result["met"] = bool(m.ok and disk > ram and rss <= result["rss_target_bytes"]
                         and (report.get("route") or {}).get("route") == "streaming" and "rel_max_diff" in v)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None) -> int:
    a = parse_args(argv)
    r = run(a)
    gib = 2**30
    print(f"checkpoint {r['checkpoint_bytes'] / 1e9:.1f} GB on disk vs {r['machine_ram_bytes'] / gib:.1f} GiB of RAM "
          f"({'bigger' if r['bigger_than_ram'] else 'NOT bigger'} than memory), {r['shape']['layers']} layers")
    if r["rc"] != 0:
        print(f"moeconv run failed: {r['error']}")
    else:
        v = r["verification"]
        print(f"moeconv run (prune-experts → 2:4 wanda → int8): wall {r['wall_s']:.0f} s, peak RSS "
              f"{r['peak_rss_bytes'] / gib:.2f} GiB (target ≤ {r['rss_target_bytes'] / gib:.1f}), route "
              f"{(r['route'] or {}).get('route')}; streamed verification: relative max |Δlogits| "
              f"{v.get('rel_max_diff', float('nan')):.3g}, KL {v.get('kl', float('nan')):.3g}, top-1 "
              f"{v.get('top1_agreement', float('nan')):.1%}")
    print("targets " + ("met" if r["met"] else "NOT MET"))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2, default=str) + "\n")
    return 0 if r["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
