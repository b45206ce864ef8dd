"""Reload what was written with the consumer users have and compare outputs."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from moeconv.errors import VerificationError
from moeconv.pass_base import EXACT_RTOL
from moeconv.state import model_outputs


def check_inputs(vocab: int, seed: int = 1, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def load_consumer(out_dir: Path, consumer: str, expected_class: str | None = None) -> torch.nn.Module:
    """`consumer`: "transformers" (AutoModelForCausalLM, fp32) or "moeconv" (`moeconv.load`)."""
    if consumer == "transformers":
        from moeconv.io.transformers_io import load_causal_lm
        try:
            model = load_causal_lm(out_dir, dtype=torch.float32)
        except Exception as exc:
            raise VerificationError(f"written checkpoint does not load in transformers: "
                                    f"{' '.join(str(exc).split())[:200]}") from None
        if expected_class and type(model).__name__ != expected_class:
            raise VerificationError(f"transformers loaded {type(model).__name__}, expected {expected_class}")
        return model.eval()
    from moeconv.io.load import load
    return load(out_dir).module.eval()


def compare_outputs(reference: torch.nn.Module | torch.Tensor, candidate: torch.nn.Module, inputs: torch.Tensor, *,
                    tolerance: float | None, what: str) -> dict:
    """Max |Δ| of the two models' outputs (fp32), relative to max(1, |ref|); raise if over `tolerance`.
    `reference` may be the reference model's outputs on `inputs`, computed earlier, so the model
    need not be in memory beside the reloaded one."""
    ref = (reference if isinstance(reference, torch.Tensor) else model_outputs(reference, inputs)).float()
    got = model_outputs(candidate, inputs).float()
    diff = (got - ref).abs().max().item()
    rel = diff / max(1.0, ref.abs().max().item())
    result = {"against": what, "consumer_class": type(candidate).__name__, "max_abs_diff": diff,
              "rel_max_diff": rel, "tolerance": tolerance}
    if not math.isfinite(diff):  # a lossy writer reports its error; an error that is not a number fails
        raise VerificationError(f"reloaded output differs from the {what} by a non-finite amount ({diff})")
    if tolerance is not None and not rel <= tolerance:
        raise VerificationError(f"reloaded output differs from the {what}: relative max |Δ| {rel:.3g} > {tolerance:.3g}")
    return result


EXACT = EXACT_RTOL
