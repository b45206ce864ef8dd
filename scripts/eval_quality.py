"""Perplexity on held-out `pydoc_data.topics` text for one or more checkpoints, and their bytes.

    python scripts/eval_quality.py NAME=PATH [NAME=PATH ...] [--tokenizer DIR|GGUF] [--seq-len 256]
        [--batches 16] [--out eval_quality.json]

Each PATH is anything `moeconv.load` reads (HF dir, GGUF, moeconv format, quantized moeconv
format, a compressed-tensors W4A16 / W8A16 / FP8 directory from `moeconv quantize --method
w4a16 [--algorithm gptq]`, which transformers decompresses on load). The tokenizer comes from the first PATH that has one unless --tokenizer is given. The
evaluation half of the text is disjoint from the calibration half (`moeconv.evaluate`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tokenizer(path: str):
    from moeconv.io.transformers_io import read_tokenizer
    return read_tokenizer(path)


def _bytes(path: str) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=PATH")
    ap.add_argument("--tokenizer")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--out", default="eval_quality.json")
    args = ap.parse_args(argv)
    import torch
    from moeconv import load
    from moeconv.evaluate import perplexity, pydoc_text, token_batches
    pairs = [m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.models]
    tok = None
    for cand in ([args.tokenizer] if args.tokenizer else [p for _, p in pairs]):
        try:
            tok = _tokenizer(cand)
            break
        except Exception:
            continue
    if tok is None:
        raise SystemExit("no tokenizer found; pass --tokenizer")
    batches = token_batches(tok, pydoc_text("eval"), seq_len=args.seq_len, max_batches=args.batches)
    results = {}
    for name, path in pairs:
        state = load(path, dtype=None)
        model = state.module.eval()
        ppl = perplexity(model, batches)
        results[name] = {"path": path, "perplexity": round(ppl, 4), "bytes": _bytes(path)}
        print(f"{name:24s} ppl {ppl:10.4f}   {results[name]['bytes'] / 2**20:9.1f} MiB", flush=True)
        del model, state
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out = {"tokens_per_batch": args.seq_len, "batches": int(batches.shape[0]), "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
