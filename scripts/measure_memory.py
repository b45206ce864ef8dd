"""Measure the peak memory (RSS) of moeconv commands on synthetic checkpoints, next to
`moeconv.memory_plan`'s estimate for the same run: the figures the plan's coefficients are set from.

    python scripts/measure_memory.py --layers 2 4 8 --commands quantize-int8 sparsify-sparsegpt

Each command runs as `python -m moeconv.cli …` in a child process; its peak RSS comes from
`os.wait4` (ru_maxrss). The checkpoints are random bf16 Mixtral / Llama models written with
`save_pretrained` under --work (kept between runs)."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "quantize-int8": ["quantize", "{src}", "{out}", "--method", "int8"],
    "quantize-nf4": ["quantize", "{src}", "{out}", "--method", "nf4"],
    "sparsify-magnitude": ["sparsify", "{src}", "{out}", "--method", "magnitude"],
    "sparsify-sparsegpt": ["sparsify", "{src}", "{out}", "--method", "sparsegpt", "--calib", "{ids}",
                           "--num-samples", "{samples}", "--seq-len", "{seq}"],
    "sparsify-wanda": ["sparsify", "{src}", "{out}", "--method", "wanda", "--calib", "{ids}",
                       "--num-samples", "{samples}", "--seq-len", "{seq}"],
    "prune-experts": ["prune-experts", "{src}", "{out}", "--keep", "6", "--calib", "{ids}",
                      "--calib-samples", "{samples}", "--calib-seq-len", "{seq}"],
    "quantize-int8-dense": ["quantize", "{src}", "{out}", "--method", "int8"],
}


def passes_of(name: str) -> list:
    """The passes a command of COMMANDS runs, configured as it configures them."""
    from passes.prune_experts import PruneExperts
    from passes.quantize import Quantize, QuantizeConfig
    from passes.sparsify import Sparsify
    if name.startswith("quantize"):
        return [Quantize(QuantizeConfig(method=name.split("-")[1]))]
    if name.startswith("sparsify"):
        return [Sparsify(method=name.split("-")[1])]
    return [PruneExperts(keep=6)]


def make_checkpoint(path: Path, kind: str, layers: int, hidden: int, inter: int, vocab: int) -> Path:
    """A random bf16 `kind` (mixtral | llama) checkpoint at `path` (reused when present)."""
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers as tf
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **common))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def make_ids(path: Path, vocab: int, samples: int, seq: int) -> Path:
    import torch
    from safetensors.torch import save_file
    save_file({"ids": torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(1))}, path)
    return path


def measure(argv: list[str]) -> tuple[int, float, int]:
    """(peak RSS in bytes, seconds, exit code) of `python -m moeconv.cli ARGV` in a child process."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "moeconv.cli", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        print(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}", file=sys.stderr)
    return usage.ru_maxrss * 1024, time.monotonic() - start, proc.returncode


def estimate(name: str, src: Path, samples: int, seq: int) -> int:
    """`moeconv.memory_plan`'s estimate for the command `name` of COMMANDS on `src`."""
    sys.path.insert(0, str(ROOT))
    from moeconv.memory_plan import plan_memory
    calib = samples * seq if "--calib" in COMMANDS[name] else None
    return plan_memory(src, passes_of(name), calib_tokens=calib, calib_seq_len=seq).total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--commands", nargs="+", default=list(COMMANDS))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1792)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeconv-memory"))
    ap.add_argument("--source", type=Path, help="measure on this model (e.g. a .gguf) instead of a synthetic one")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ids = make_ids(a.work / "ids.safetensors", a.vocab, a.samples, a.seq)
    print(f"{'command':20} {'layers':>6} {'on disk':>9} {'peak RSS':>9} {'estimate':>9} {'est/RSS':>7} {'s':>5}")
    for layers in a.layers:
        for name in a.commands:
            kind = "llama" if "dense" in name else "mixtral"
            src = a.source or make_checkpoint(a.work / f"{kind}-{layers}-{a.hidden}", kind, layers, a.hidden,
                                              a.inter, a.vocab)
            out = a.work / "out"
            shutil.rmtree(out, ignore_errors=True)
            argv = [s.format(src=src, out=out, ids=ids, samples=a.samples, seq=a.seq) for s in COMMANDS[name]]
            peak, secs, rc = measure(argv)
            disk = src.stat().st_size if src.is_file() else sum(f.stat().st_size for f in src.glob("*.safetensors"))
            est = estimate(name, src, a.samples, a.seq)
            print(f"{name:20} {layers:6} {disk / 2**20:8.0f}M {peak / 2**20:8.0f}M {est / 2**20:8.0f}M "
                  f"{est / peak:7.2f} {secs:5.0f}{'' if rc == 0 else f'  exit {rc}'}", flush=True)


if __name__ == "__main__":
    main()
