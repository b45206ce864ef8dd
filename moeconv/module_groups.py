"""Which part of a model each module belongs to, and how many bytes each part takes.

Groups: `attention`, `experts` (routed experts of MoE layers), `shared_expert`, `router` (MoE
routers and shared-expert gates), `mlp` (dense FFNs, found by graph structure), `embeddings`,
`lm_head`, `other` (norms, …). The group names are selectors too (`moeconv.selectors`: quantize
and sparsify pick linear layers by group; there `experts` covers the shared expert as well); the
quantize report's bytes table and `moeconv inspect` count bytes per group. Bytes are what a
checkpoint stores: float tensors at their dtype, quantized layers at their serialized size; a
tensor shared by two modules (tied embeddings) counts once.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from moeconv.state import ModelState

GROUPS = ("attention", "experts", "shared_expert", "router", "mlp", "embeddings", "lm_head", "other")
_ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)", re.I)


def module_groups(state: ModelState) -> dict[str, str]:
    """Module path → group, for every module that holds tensors of its own."""
    model = state.module
    moe = [p for p, _ in state.moe_blocks()]
    ffn_prefixes, ffn_paths = [], set()
    for site in state.ffn_sites():
        ffn_prefixes.append(site.path)
        # The projections' full paths (a split site's down projection lies outside `site.path`).
        ffn_paths.update(p for p in (site.up, site.gate, site.down) if p)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    groups = {}
    for path, m in model.named_modules():
        if not _holds_tensors(m):
            continue
        groups[path] = _group(path, m, moe, ffn_prefixes, ffn_paths, out_emb)
    return groups


def _group(path, m, moe, ffn_prefixes, ffn_paths, out_emb) -> str:
    for b in moe:
        if b == "" or path.startswith(b + "."):
            rel = path[len(b) + 1:] if b else path
            head = rel.split(".", 1)[0]
            if head in ("router", "gate", "shared_expert_gate"):
                return "router"
            if head == "experts":
                return "experts"
            if head == "shared_expert":
                return "shared_expert"
            return "other"
    if isinstance(m, nn.Embedding):
        return "embeddings"
    if out_emb is not None and m is out_emb:
        return "lm_head"
    if path in ffn_paths or any(path == p or path.startswith(p + ".") for p in ffn_prefixes):
        return "mlp"
    if "norm" in type(m).__name__.lower():  # `post_attention_layernorm` is a norm, not attention
        return "other"
    if _ATTENTION.search(path):
        return "attention"
    return "other"


def _holds_tensors(m: nn.Module) -> bool:
    return any(p is not None for p in m._parameters.values()) or any(b is not None for b in m._buffers.values())


def module_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    """What `m` itself (not its children) contributes to a checkpoint. Quantized layers give
    their captured serialized tensors, never a fresh `state_dict()` (see `moeconv.nn.quantized`)."""
    from moeconv.nn.quantized import is_quantized_layer, serialized
    if is_quantized_layer(m):
        return serialized(m)
    out = {k: p.detach() for k, p in m._parameters.items() if p is not None}
    out.update({k: b for k, b in m._buffers.items() if b is not None and k not in m._non_persistent_buffers_set})
    return out


def logical_params(m: nn.Module) -> int:
    """Parameters `m` represents (a quantized layer counts its float shape, not its bytes)."""
    from moeconv.nn.quantized import is_quantized_layer
    if is_quantized_layer(m):
        return m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
    return sum(p.numel() for p in m._parameters.values() if p is not None)


def group_bytes(model: nn.Module, groups: dict[str, str]) -> dict[str, dict]:
    """group → {"params": logical parameters, "bytes": stored bytes, "storage": {dtype or
    method: parameters}}; shared tensors count once."""
    from moeconv.nn.quantized import method_of
    seen: set[tuple] = set()
    out: dict[str, dict] = {}
    for path, m in model.named_modules():
        if path not in groups:
            continue
        row = out.setdefault(groups[path], {"params": 0, "bytes": 0, "storage": {}})
        fresh = 0
        for t in module_tensors(m).values():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if t.numel() and key in seen:
                continue
            seen.add(key)
            row["bytes"] += t.numel() * t.element_size()
            fresh += 1
        if fresh:
            n = logical_params(m)
            row["params"] += n
            method = method_of(m)
            kinds = {method: n} if method else _dtypes(m)
            for k, v in kinds.items():
                row["storage"][k] = row["storage"].get(k, 0) + v
    return {g: out[g] for g in GROUPS if g in out}


def _dtypes(m: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in m._parameters.values():
        if p is not None:
            k = str(p.dtype).replace("torch.", "")
            out[k] = out.get(k, 0) + p.numel()
    return out
