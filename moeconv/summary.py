"""Measured facts about a model for reports: bytes per module group, expert load, expert sparsity."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from moeconv.nn.moe import MoEBlock
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


def expert_sparsity(model: nn.Module) -> dict[str, list[float]]:
    """Per MoE layer, the fraction of zero weights in each expert's projections (bitsandbytes int8
    weights included: a zero there is a zero weight; packed 4-bit weights are not counted)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, MoEBlock):
            fr = []
            for e in m.experts:
                ws = [p for n, p in e.named_parameters() if n.endswith("weight") and p.dim() == 2
                      and (p.is_floating_point() or p.dtype == torch.int8)]
                total = sum(w.numel() for w in ws)
                zeros = sum(int((w == 0).sum()) for w in ws)
                fr.append(zeros / total if total else 0.0)
            out[path] = fr
    return out


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
