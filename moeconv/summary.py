"""Measured facts about a model for reports: bytes per module group, expert load, sparsity per
expert and per layer. `model_summary` gathers them for an in-memory model; `LayerFacts` gathers the
same facts from a streamed model (`moeconv.stream.compare`), one decoder layer at a time."""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from moeconv.nn.moe import MoEBlock
from moeconv.sparsity import zero_count
from moeconv.state import call_model


def _group(name: str, module_of: dict[str, nn.Module]) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = module_of.get(".".join(parts[:i]))
        if isinstance(owner, MoEBlock):
            rest = parts[i]
            if rest in ("router", "shared_expert_gate"):
                return "router"
            return "experts" if rest == "experts" else "shared expert"
    low = name.lower()
    if "embed" in low or "wte" in low or "wpe" in low or "lm_head" in low:
        return "embeddings"
    if "attn" in low or "attention" in low:
        return "attention"
    if "mlp" in low or "ffn" in low or "feed_forward" in low or "intermediate" in low or ".output.dense" in low:
        return "dense ffn"
    if "norm" in low or low.endswith("ln_f.weight") or ".ln_" in low:
        return "norms"
    return "other"


def bytes_per_group(model: nn.Module) -> dict[str, int]:
    module_of = dict(model.named_modules())
    out: dict[str, int] = defaultdict(int)
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[_group(name, module_of)] += t.numel() * t.element_size()
    return dict(out)


def _zeros(w: torch.Tensor, memo: dict[int, int] | None) -> int:
    """`zero_count(w)`, counted once per tensor when `memo` is given (expert weights are counted
    for both the per-expert and the per-layer sparsity)."""
    if memo is None:
        return zero_count(w)
    if id(w) not in memo:
        memo[id(w)] = zero_count(w)
    return memo[id(w)]


def expert_sparsity(model: nn.Module, memo: dict[int, int] | None = None) -> dict[str, list[float]]:
    """Per MoE layer, the fraction of zero weights in each expert's projections (bitsandbytes int8
    weights included: a zero there is a zero weight; packed 4-bit weights are not counted).
    `memo`: see `_zeros`."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, MoEBlock):
            fr = []
            for e in m.experts:
                ws = [p for n, p in e.named_parameters() if n.endswith("weight") and p.dim() == 2
                      and (p.is_floating_point() or p.dtype == torch.int8)]
                total = sum(w.numel() for w in ws)
                zeros = sum(_zeros(w, memo) for w in ws)
                fr.append(zeros / total if total else 0.0)
            out[path] = fr
    return out


# Weights counted as "the layer's FFN" for per-layer sparsity: what sparsify prunes.
FFN_GROUPS = ("experts", "shared expert", "dense ffn")
_LAYER = re.compile(r"^(.*?\.\d+)\.")


def layer_sparsity(model: nn.Module, prefix: str = "", memo: dict[int, int] | None = None) -> dict[str, float]:
    """Per decoder layer, the fraction of zero weights in its FFN matrices (all experts of an MoE
    layer together; int8 weights counted, packed 4-bit ones not); `prefix`: the path `model` has in
    the whole model (a streamed layer). A 2:4 model reads 0.5 in every pruned layer."""
    module_of = {".".join(x for x in (prefix, n) if x): m for n, m in model.named_modules()}
    zeros: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for rel, w in model.named_parameters():
        name = ".".join(x for x in (prefix, rel) if x)
        if w.dim() != 2 or not (w.is_floating_point() or w.dtype == torch.int8) or w.is_meta:
            continue
        layer = _LAYER.match(name)
        if layer is None or _group(name, module_of) not in FFN_GROUPS:
            continue
        zeros[layer.group(1)] += _zeros(w, memo)
        total[layer.group(1)] += w.numel()
    return {k: round(zeros[k] / total[k], 4) for k in total if total[k]}


def model_summary(state, batches: torch.Tensor | None) -> dict:
    """Everything the report shows about one model (`state`: a `ModelState`), expert load measured
    on `batches` (token ids; None: not measured)."""
    memo: dict[int, int] = {}
    out = {"parameters": state.parameter_count(), "active_parameters": state.active_parameter_count(),
           "bytes_per_group": bytes_per_group(state.module), "layer_sparsity": layer_sparsity(state.module, memo=memo)}
    if any(isinstance(m, MoEBlock) for m in state.module.modules()):
        out["expert_sparsity"] = expert_sparsity(state.module, memo)
        if batches is not None:
            out["expert_load"] = expert_load(state.module, batches)
    return out


def summary_inputs(state, seed: int, calibration: torch.Tensor | None = None) -> torch.Tensor | None:
    """The tokens expert load is measured on, the same before and after a run: up to 16 rows of
    the calibration data when given, else random ids from the run's seed (None: a model without
    a vocabulary)."""
    from moeconv.state import vocab_size
    from moeconv.verify import check_inputs
    if calibration is not None:
        return calibration[:16]
    vocab = vocab_size(state.module, state.config)
    return None if vocab is None else check_inputs(vocab, seed + 2, batch=8, seq=32)


class LayerFacts:
    """The report's facts about a model that runs one decoder layer at a time: call it with each
    layer once its weights are in memory (`moeconv.stream.compare.streamed_logits(observe=…)`); it
    counts the tokens each expert is sent while the layer runs and the layer's zero weights."""

    def __init__(self):
        self.load: dict[str, list[int]] = {}
        self.sparsity: dict[str, float] = {}
        self.expert_sparsity: dict[str, list[float]] = {}
        self._handles: list = []

    def __call__(self, path: str, layer: nn.Module) -> None:
        self._remove_hooks()  # the previous layer has run: its counters are complete
        memo: dict[int, int] = {}  # the layer's weights live until it is dropped: ids stay theirs
        self.sparsity.update(layer_sparsity(layer, prefix=path, memo=memo))
        for rel, m in layer.named_modules():
            if isinstance(m, MoEBlock):
                full = f"{path}.{rel}" if rel else path
                self.expert_sparsity[full] = expert_sparsity(m, memo)[""]
                counts = self.load.setdefault(full, [0] * m.num_experts)
                self._handles.append(m.register_forward_pre_hook(_counter(counts)))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def summary(self) -> dict:
        self._remove_hooks()
        out = {"layer_sparsity": dict(self.sparsity)}
        if self.load:
            out.update(expert_load=dict(self.load), expert_sparsity=dict(self.expert_sparsity))
        return out


def _counter(counts: list[int]):
    """A forward pre-hook adding the tokens an MoE block routes to each expert to `counts`."""
    def hook(mod, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        got = torch.bincount(mod.route(x).indices.reshape(-1), minlength=mod.num_experts)
        for e, c in enumerate(got.tolist()):
            counts[e] += c
    return hook


@torch.inference_mode()
def expert_load(model: nn.Module, batches: torch.Tensor) -> dict[str, list[int]]:
    """Tokens routed to each expert of every MoE layer on `batches` (counts, top-k included)."""
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for path, m in model.named_modules():
        if isinstance(m, MoEBlock):
            counts[path] = torch.zeros(m.num_experts, dtype=torch.long)

            def hook(mod, args, path=path):
                x = args[0].reshape(-1, args[0].shape[-1])
                idx = mod.route(x).indices
                counts[path] += torch.bincount(idx.reshape(-1), minlength=mod.num_experts)
            handles.append(m.register_forward_pre_hook(hook))
    try:
        for chunk in batches.split(4):
            call_model(model, chunk)
    finally:
        for h in handles:
            h.remove()
    return {k: v.tolist() for k, v in counts.items()}
