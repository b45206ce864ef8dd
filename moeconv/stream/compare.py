"""A model's outputs computed one decoder layer at a time from its checkpoint, and two such
models compared side by side: no step holds more than one layer of each.

`streamed_logits(skeleton, batches)`: the embeddings and head are read once; the first layer's
inputs are captured with the usual forward (it stops at the first decoder layer, which is never
run on `meta`); then each layer is materialised, run on every batch, and released; the final
hidden states go through the model's own tail (final norm, head) by replaying them in place of
the layer stack. The result equals `model_outputs` of the loaded model up to summation order.

Each skeleton runs on its own device (`Skeleton.device`: the CPU, or one GPU holding one layer at a
time): the token ids go there, the logits come back to the CPU, so `compare_logits` and the
perplexities are computed the same way whichever device ran the layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeconv.calibrate import capture_first_layer_inputs
from moeconv.errors import VerificationError
from moeconv.state import call_model, output_tensor
from moeconv.stream.allocator import release_freed
from moeconv.stream.skeleton import Skeleton


class _Replay(nn.Module):
    """Stands in for the first decoder layer: returns the stored final hidden state of the batch."""

    def __init__(self, outputs: list, kind: type):
        super().__init__()
        self.outputs, self.kind, self.batch = outputs, kind, 0

    def forward(self, hidden_states, *args, **kwargs):
        h = self.outputs[self.batch]
        self.batch += 1
        return (h,) if self.kind is tuple else h


class _Through(nn.Module):
    """Stands in for every other decoder layer: passes the hidden state on unchanged."""

    def __init__(self, kind: type):
        super().__init__()
        self.kind = kind

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.kind is tuple else hidden_states


class LayerByLayer:
    """One model run on fixed batches one decoder layer at a time, driven from outside: `begin()`
    while the parts outside the decoder layers are materialised, `step(path)` with each layer
    materialised in order, `logits()` at the end (the outer parts still materialised). Whoever
    drives it loads and drops the parts: `streamed_logits` does so for the check alone, and the
    streamed quantize runs the source's layers while its write sweep holds them anyway (one read
    of the source instead of two). `observe(path, layer)` is called with each layer before it runs."""

    def __init__(self, skel: Skeleton, batches: list[torch.Tensor], observe=None):
        self.skel, self.observe = skel, observe
        self.batches = [b.to(skel.device) for b in batches]
        self.hidden: list[torch.Tensor] = []
        self.kind: type = torch.Tensor
        self.done = 0  # layers run so far

    @torch.inference_mode()
    def begin(self) -> None:
        self.inputs = capture_first_layer_inputs(self.skel.module, self.batches)
        self.hidden = [a[0] for a in self.inputs.args]

    @torch.inference_mode()
    def step(self, path: str) -> None:
        if path != self.skel.layer_paths()[self.done]:
            raise RuntimeError(f"internal: layer {path} run out of order (expected layer {self.done})")
        layer = self.skel.module.get_submodule(path)
        if self.observe is not None:
            self.observe(path, layer)
        outs = [layer(h, *a[1:], **kw) for h, a, kw in zip(self.hidden, self.inputs.args, self.inputs.kwargs)]
        self.kind = tuple if isinstance(outs[0], (tuple, list)) else torch.Tensor
        self.hidden = [o[0] if isinstance(o, (tuple, list)) else o for o in outs]
        self.done += 1

    @torch.inference_mode()
    def logits(self) -> list[torch.Tensor]:
        if self.done != self.skel.num_layers:
            raise RuntimeError(f"internal: {self.done} of {self.skel.num_layers} layers run")
        return [out.cpu() for out in _tail(self.skel, self.batches, self.hidden, self.kind)]


@torch.inference_mode()
def streamed_logits(skel: Skeleton, batches: list[torch.Tensor], progress=None, observe=None) -> list[torch.Tensor]:
    """The model's outputs (logits, on the CPU) on each batch, one decoder layer in memory at a
    time, computed on `skel.device`. `observe(path, layer)` is called with each layer once its
    weights are read, before it runs (`moeconv.summary.LayerFacts`: the report's expert load and
    sparsity without another sweep)."""
    run = LayerByLayer(skel, batches, observe)
    skel.load_part(None)
    try:
        run.begin()
        for i, path in enumerate(skel.layer_paths()):
            if progress:
                progress("compare layers", i, skel.num_layers)
            skel.load_part(path)
            run.step(path)
            skel.drop_part(path)
            release_freed()
        return run.logits()
    finally:
        skel.drop_part(None)


def _tail(skel: Skeleton, batches: list[torch.Tensor], hidden: list[torch.Tensor], kind: type) -> list[torch.Tensor]:
    """Final norm and head on `hidden`: the model's own forward, the layer stack replayed."""
    owner, _, leaf = skel.prefix.rpartition(".")
    parent = skel.module.get_submodule(owner) if owner else skel.module
    stack = getattr(parent, leaf)
    replay = nn.ModuleList([_Replay(hidden, kind)] + [_Through(kind) for _ in range(skel.num_layers - 1)])
    setattr(parent, leaf, replay)
    try:
        return [output_tensor(call_model(skel.module, b)) for b in batches]
    finally:
        setattr(parent, leaf, stack)


def check_batches(source: Skeleton, evaluation: torch.Tensor | None, seed: int) -> list[torch.Tensor]:
    """The held-out tokens the comparison runs on, in batches of 2 rows: up to 8 rows of the
    evaluation text when given, else random ids from `seed`."""
    from moeconv.verify import check_inputs
    vocab = getattr(source.config, "vocab_size", None) or source.module.get_input_embeddings().num_embeddings
    inputs = evaluation[:8] if evaluation is not None else check_inputs(vocab, seed + 1)
    return list(inputs.split(2))


def compare_models(source: Skeleton, output: Skeleton, *, evaluation: torch.Tensor | None, seed: int,
                   what: str, progress=None, observe: tuple | None = None,
                   reference: list[torch.Tensor] | None = None) -> dict:
    """Source and output side by side, one decoder layer of each at a time, on held-out tokens
    (`check_batches`): the measured change (`compare_logits`), with both perplexities on the
    evaluation text. `observe`: one `streamed_logits` observer for the source and one for the
    output. `reference`: the source's logits on those batches, computed already (a `LayerByLayer`
    run during a sweep); the source is then not read again."""
    batches = check_batches(source, evaluation, seed)
    observe_src, observe_out = observe or (None, None)
    ref = reference if reference is not None else streamed_logits(source, batches, progress, observe_src)
    got = streamed_logits(output, batches, progress, observe_out)
    result = compare_logits(ref, got, tolerance=None, what=what)
    result["inputs"] = "eval text" if evaluation is not None else "random tokens"
    result["consumer_class"] = type(output.module).__name__
    if evaluation is not None:
        result["ppl_before"], result["ppl_after"] = _perplexity(ref, batches), _perplexity(got, batches)
    return result


def _perplexity(logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over every position of every row."""
    total, count = 0.0, 0
    for out, ids in zip(logits, batches):
        out = out.float()
        total += F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor], *, tolerance: float | None, what: str) -> dict:
    """max |Δ| (and relative to max(1, |ref|)), mean KL(ref ‖ got), top-1 agreement; raises
    `VerificationError` when the relative difference exceeds `tolerance` or is not a number."""
    r, g = torch.cat([t.float().flatten(0, -2) for t in ref]), torch.cat([t.float().flatten(0, -2) for t in got])
    diff = (g - r).abs().max().item()
    rel = diff / max(1.0, r.abs().max().item())
    kl = F.kl_div(F.log_softmax(g, -1), F.log_softmax(r, -1), log_target=True, reduction="none").sum(-1).mean().item()
    result = {"against": what, "max_abs_diff": diff, "rel_max_diff": rel, "kl": kl, "ref_max_abs": r.abs().max().item(),
              "top1_agreement": (g.argmax(-1) == r.argmax(-1)).float().mean().item(), "tolerance": tolerance,
              "mode": "streamed (one layer of each model at a time)"}
    if not math.isfinite(diff):
        raise VerificationError(f"output differs from the {what} by a non-finite amount ({diff})")
    if tolerance is not None and not rel <= tolerance:
        raise VerificationError(f"output differs from the {what}: relative max |Δ| {rel:.3g} > {tolerance:.3g}")
    return result
