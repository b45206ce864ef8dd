"""Hugging Face sparse-MoE blocks (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5.x) → `MoEBlock`.

transformers 5 keeps experts as fused 3-D parameters (`experts.gate_up_proj` [E, 2I, H] with gate
rows first, `experts.down_proj` [E, H, I]) that quantizers, pruners and exporters cannot see as
linear layers (FIELD.md: bitsandbytes leaves them in float). Every moeconv pass works on
`MoEBlock`s with one ordinary `nn.Linear` per projection, so native blocks are *linearised* on
load and written back in the family's own layout on save.

Promise: the converted block computes the same function (softmax → top-k → renormalise when the
family does → weighted sum, plus the sigmoid-gated shared expert of Qwen2-MoE); in fp32 the
outputs agree to rounding. The router runs in fp32 (HF runs it in the model dtype), which is
only more precise.
"""
from __future__ import annotations

import torch
from torch import nn

from moeconv.nn.moe import MoEBlock, RoutingConfig


class GatedExpert(nn.Module):
    """`down_proj(act_fn(gate_proj(x)) * up_proj(x))`: one expert of a native HF MoE block."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module, dtype=None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
        self.act_fn = act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def is_hf_sparse_moe(m: nn.Module) -> bool:
    gate, experts = getattr(m, "gate", None), getattr(m, "experts", None)
    return (gate is not None and isinstance(getattr(gate, "weight", None), torch.Tensor) and gate.weight.dim() == 2
            and experts is not None and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
            and experts.gate_up_proj.dim() == 3 and isinstance(getattr(experts, "down_proj", None), torch.Tensor))


def moeblock_from_hf(m: nn.Module) -> MoEBlock:
    gate, experts = m.gate, m.experts
    n, two_i, h = experts.gate_up_proj.shape
    inter = two_i // 2
    top_k = int(getattr(gate, "top_k", None) or getattr(m, "top_k"))
    renorm = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral's router always renormalises
    dtype = experts.gate_up_proj.dtype
    # built where the fused parameters are: a skeleton's are on `meta`, so its experts are never
    # allocated (why that matters for a streamed run: `moeconv.stream.allocator.untouched_allocations_mapped`)
    device = experts.gate_up_proj.device
    built = []
    for e in range(n):
        ex = GatedExpert(h, inter, experts.act_fn, dtype=dtype, device=device)
        with torch.no_grad():
            ex.gate_proj.weight.copy_(experts.gate_up_proj[e, :inter])
            ex.up_proj.weight.copy_(experts.gate_up_proj[e, inter:])
            ex.down_proj.weight.copy_(experts.down_proj[e])
        built.append(ex)
    shared = getattr(m, "shared_expert", None)
    shared_gate = getattr(m, "shared_expert_gate", None)
    block = MoEBlock(built, h, RoutingConfig(top_k, renorm), shared_expert=shared,
                     shared_expert_gate=shared_gate is not None)
    with torch.no_grad():
        block.router.weight.copy_(gate.weight.float())
        if shared_gate is not None:
            block.shared_expert_gate.weight.copy_(shared_gate.weight.float())
    block.native_class = type(m).__name__
    return block


def linearise_native_moe(model: nn.Module) -> list[str]:
    """Replace every native HF sparse-MoE block of `model` in place; returns their paths."""
    paths = [name for name, m in model.named_modules() if is_hf_sparse_moe(m)]
    for path in paths:
        model.set_submodule(path, moeblock_from_hf(model.get_submodule(path)))
    return paths
