"""onnxruntime sessions, greedy generation with the KV-cache graph, and latency measurement."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from moeconv.onnx.signature import Signature


def session(path: Path, threads: int | None = None, *, spinning: bool = False, config: dict | None = None):
    """A CPU session. Thread spinning is off by default: parity alternates onnxruntime and PyTorch
    calls, and spinning onnxruntime threads then starve PyTorch's (and vice versa) on few cores.
    `config`: more session config entries (e.g. `moeconv.onnx.int8_weights.FLOAT_ARITHMETIC`)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, str(value))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess, sig: Signature, ids: torch.Tensor, mask: torch.Tensor | None, past=None) -> list[np.ndarray]:
    return sess.run(None, sig.feeds(ids, mask, past))


@torch.inference_mode()
def run_torch(sig: Signature, ids: torch.Tensor, mask: torch.Tensor | None, past=None) -> list[torch.Tensor]:
    out = sig.wrapper(*sig.torch_args(ids, mask, past))
    return list(out) if isinstance(out, (tuple, list)) else [out]


def greedy_ort(sess, sig: Signature, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding of one prompt (1, T) with the KV-cache graph: prefill, then one token a step."""
    ids, mask, past = prompt, torch.ones_like(prompt), None
    tokens = []
    for _ in range(new_tokens):
        outs = run(sess, sig, ids, mask, past)
        nxt = int(outs[0][0, -1].argmax())
        tokens.append(nxt)
        past = outs[1:]
        ids = torch.tensor([[nxt]])
        mask = torch.ones(1, mask.shape[1] + 1, dtype=torch.long)
    return tokens


@torch.inference_mode()
def greedy_torch(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """PyTorch's own greedy generation (`generate`, KV cache on), the reference tokens. No stop
    token: end-of-sequence is an ordinary token here, as in `greedy_ort` (and `min_new_tokens`
    would instead forbid it, changing the argmax)."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def median_ms(fn, *, warmup: int = 2, runs: int = 5, clock: str = "wall") -> float:
    """Median milliseconds of `fn()`. `clock="cpu"` counts this process's CPU time instead of wall
    time: with one thread it is the wall time of an idle machine, and it stays meaningful when other
    work shares the cores (wall time then measures the scheduler)."""
    tick = time.perf_counter if clock == "wall" else time.process_time
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = tick()
        fn()
        times.append((tick() - t0) * 1e3)
    return statistics.median(times)


def latency(sess, sig: Signature, *, seq: int = 32, runs: int = 5) -> dict:
    """Median ms of onnxruntime and PyTorch eager at batch 1: a `seq`-token forward, and (KV-cache
    graph) one decode step after a `seq`-token past."""
    seq = min(seq, sig.max_len - 1)
    ids = torch.randint(0, sig.vocab, (1, seq), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    out = {"tokens": seq,
           "ort_prefill_ms": median_ms(lambda: run(sess, sig, ids, mask), runs=runs),
           "torch_prefill_ms": median_ms(lambda: run_torch(sig, ids, mask), runs=runs)}
    if sig.with_past:
        past_t = run_torch(sig, ids, mask)[1:]
        past_o = run(sess, sig, ids, mask)[1:]
        one = torch.tensor([[1]])
        mask2 = torch.ones(1, seq + 1, dtype=torch.long)
        out["ort_decode_ms"] = median_ms(lambda: run(sess, sig, one, mask2, past_o), runs=runs)
        out["torch_decode_ms"] = median_ms(lambda: run_torch(sig, one, mask2, past_t), runs=runs)
    return out
