"""onnxruntime latency of the two MoE lowerings, `portable` and `fused`, by expert count.

    python scripts/bench_moe_lowering.py [--experts 4,16,64] [--threads 1] [--runs 10] [--out FILE]

For each expert count: a random transformers `MixtralForCausalLM` (hidden 512, intermediate 1024,
4 layers, top-2, vocab 8000) is exported with the KV-cache graph through the `export-onnx` pass
(parity-checked) once per lowering, and onnxruntime is timed on a 128-token prefill and a 1-token
decode after it (median, CPU time of this process), with PyTorch eager in the same run as the
baseline. The figures are the evidence for what `--strategy auto` should pick on CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(experts: int, threads: int, runs: int, work: Path) -> dict:
    import torch
    import transformers
    from moeconv import Context, Pipeline, load
    from moeconv.onnx import runtime
    from moeconv.onnx.signature import build_signature
    from passes.export_onnx import ExportOnnx
    cfg = transformers.MixtralConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                     num_key_value_heads=8, num_local_experts=experts, num_experts_per_tok=2,
                                     vocab_size=8000, max_position_embeddings=512)
    torch.manual_seed(0)
    state = load(transformers.MixtralForCausalLM(cfg).eval())
    sig = build_signature(state.module, with_past=True)
    ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    mask, one, mask2 = torch.ones_like(ids), torch.tensor([[42]]), torch.ones(1, 129, dtype=torch.long)

    def timed(call, first_past):
        prefill = runtime.median_ms(lambda: call(ids, mask, None), runs=runs, clock="cpu")
        past = first_past()
        decode = runtime.median_ms(lambda: call(one, mask2, past), warmup=3, runs=runs * 3, clock="cpu")
        return {"prefill_ms": round(prefill, 2), "decode_ms": round(decode, 2)}

    out = {"experts": experts}
    for strategy in ("portable", "fused"):
        d = work / f"{experts}-{strategy}"
        Pipeline([ExportOnnx(strategy=strategy, with_past=True, latency_runs=0, workdir=d)]).run(state, Context(seed=0))
        sess = runtime.session(d / "model.onnx", threads, spinning=True)
        out[strategy] = timed(lambda i, m, p: runtime.run(sess, sig, i, m, p), lambda: runtime.run(sess, sig, ids, mask)[1:])
    out["eager"] = timed(lambda i, m, p: runtime.run_torch(sig, i, m, p), lambda: runtime.run_torch(sig, ids, mask)[1:])
    for phase in ("prefill_ms", "decode_ms"):
        out[f"fused_vs_portable_{phase[:-3]}"] = round(out["fused"][phase] / out["portable"][phase], 3)
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="4,16,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default="bench_moe_lowering.json")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for e in (int(x) for x in args.experts.split(",")):
            r = measure(e, args.threads, args.runs, Path(tmp))
            rows.append(r)
            print(f"{e:3d} experts  prefill portable {r['portable']['prefill_ms']:7.2f} fused {r['fused']['prefill_ms']:7.2f} "
                  f"eager {r['eager']['prefill_ms']:7.2f} ms   decode portable {r['portable']['decode_ms']:6.2f} "
                  f"fused {r['fused']['decode_ms']:6.2f} eager {r['eager']['decode_ms']:6.2f} ms", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
