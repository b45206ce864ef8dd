"""Measured quality: perplexity on held-out text, and output error between two models.

Real text without a hub: Python's own `pydoc_data.topics` (~460k characters of English prose and
code). `pydoc_text("calib")` and `pydoc_text("eval")` are disjoint halves, so calibration never
sees the evaluation text.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeconv.state import model_outputs


def pydoc_text(split: str = "eval") -> str:
    from pydoc_data.topics import topics
    keys = sorted(topics)
    half = len(keys) // 2
    chosen = keys[:half] if split == "calib" else keys[half:]
    return "\n\n".join(topics[k] for k in chosen)


def token_batches(tokenizer, text: str, *, seq_len: int = 256, max_batches: int = 16) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(max_batches, len(ids) // seq_len)
    if n == 0:
        raise ValueError("text too short for one sequence")
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, batches: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over every position of every row."""
    total, count = 0.0, 0
    for chunk in batches.split(batch_size):
        logits = model_outputs(model, chunk).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


@torch.inference_mode()
def output_error(reference: torch.nn.Module, candidate: torch.nn.Module, inputs: torch.Tensor) -> dict:
    """max |Δlogits|, mean KL(ref ‖ cand) of next-token distributions, top-1 agreement."""
    ref = model_outputs(reference, inputs).float()
    got = model_outputs(candidate, inputs).float()
    kl = F.kl_div(F.log_softmax(got, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1).mean()
    return {"max_abs_diff": (got - ref).abs().max().item(), "kl": kl.item(),
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}
