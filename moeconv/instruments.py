"""Instruments run around every pass (TVM-style): timing and the numeric promise check.

They keep passes pure: a pass transforms, the instruments measure and enforce.
"""
from __future__ import annotations

import math
import time

import torch

from moeconv.context import Context
from moeconv.errors import VerificationError
from moeconv.pass_base import EXACT_RTOL, Pass, PassResult
from moeconv.state import ModelState, model_outputs, vocab_size


class Instrument:
    def before(self, p: Pass, state: ModelState, ctx: Context) -> None: ...
    def after(self, p: Pass, result: PassResult, ctx: Context) -> None: ...


class Timing(Instrument):
    def before(self, p, state, ctx):
        self._t0 = time.perf_counter()

    def after(self, p, result, ctx):
        result.report.seconds = round(time.perf_counter() - self._t0, 4)


class NumericCheck(Instrument):
    """Compares outputs on example inputs before/after each pass against its `output_tolerance`.

    The measured error is always written to the report (`max_abs_diff`, `rel_max_diff`); an
    exact or bounded pass that exceeds its promise raises `VerificationError`.
    """

    def before(self, p, state, ctx):
        self._ref = None
        self._inputs = None
        vocab = vocab_size(state.module, state.config)
        if vocab is None:
            return
        self._inputs = ctx.examples_for(vocab)
        self._ref = model_outputs(state.module, self._inputs).float()
        self._vocab = vocab

    def after(self, p, result, ctx):
        if self._ref is None or not result.modified:
            return
        out = model_outputs(result.state.module, self._inputs).float()
        diff = (out - self._ref).abs().max().item()
        scale = max(1.0, self._ref.abs().max().item())
        rel = diff / scale
        result.report.metrics["max_abs_diff"] = diff
        result.report.metrics["rel_max_diff"] = rel
        if out.shape[-1] == self._vocab and math.isfinite(diff):
            # next-token logits: what a user feels of the change (a pass that measured these on its
            # own, better, inputs keeps its numbers)
            for k, v in _distribution_change(self._ref, out).items():
                result.report.metrics.setdefault(k, v)
        if not math.isfinite(diff) and math.isfinite(self._ref.abs().max().item()):
            # A measured error that is not a number is a failure whatever the promise: the pass
            # produced NaN/Inf from finite inputs (e.g. noise of absurd scale).
            raise VerificationError(f"{p.name} produced non-finite outputs (max |Δoutput| {diff}) from a finite "
                                    "model; nothing was written")
        tol = p.contract().output_tolerance
        if tol is None:
            return
        bound = (EXACT_RTOL if tol == 0 else tol) * _dtype_factor(result.state)
        if not rel <= bound:  # also catches NaN
            raise VerificationError(
                f"{p.name} broke its promise: relative max |Δoutput| {rel:.3g} > {bound:.3g}")


class ModelBytes(Instrument):
    """Records the model's bytes after each pass (`model_bytes`: parameters and buffers as stored,
    int8 weights at one byte), so every step of a report shows what it did to the size."""

    def after(self, p, result, ctx):
        from moeconv.summary import bytes_per_group
        result.report.metrics.setdefault("model_bytes", sum(bytes_per_group(result.state.module).values()))


def _distribution_change(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """Mean KL(ref ‖ out) of the next-token distributions and top-1 agreement."""
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return {"kl": max(kl.sum(-1).mean().item(), 0.0),
            "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def _dtype_factor(state: ModelState) -> float:
    p = next(state.module.parameters(), None)
    if p is None or not p.is_floating_point():
        return 1.0
    return torch.finfo(p.dtype).eps / torch.finfo(torch.float32).eps
