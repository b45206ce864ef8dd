"""The Mixture-of-Experts block every moeconv pass works on.

Semantics are explicit because export targets differ (FIELD.md, "Routing math"):
router logits `x·W_rᵀ (+ b)` computed in fp32 → softmax over all experts → top-k → optionally
renormalise the k weights to sum to 1 (Mixtral; Qwen with `norm_topk_prob`) → `Σ w_i·E_i(x)`,
plus an optional always-on shared expert scaled by `sigmoid(x·w_s)` (Qwen2-MoE).

Promises:
- With identical experts and `renormalize=True` the block equals one expert, to fp32 rounding,
  whatever the router weights are.
- Dispatch is sparse: each expert runs only on the tokens routed to it, so compute follows
  `top_k`, not the number of experts.
- The router stays fp32 through `.to(dtype)`, `.half()`, … (routing must not degrade with casts).
- The block traces with `torch.fx.symbolic_trace` and exports with `torch.export` (no
  data-dependent Python control flow in `forward`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RoutingConfig:
    """How tokens are assigned to experts."""

    top_k: int = 2
    renormalize: bool = True

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


class Route(NamedTuple):
    logits: torch.Tensor   # (tokens, E) fp32
    weights: torch.Tensor  # (tokens, k) fp32
    indices: torch.Tensor  # (tokens, k) int64


class MoEBlock(nn.Module):
    """Sparse MoE layer: `router` (fp32 `nn.Linear(H, E)`), `experts` (`ModuleList`), top-k."""

    def __init__(
        self,
        experts: list[nn.Module] | nn.ModuleList,
        hidden_size: int,
        routing: RoutingConfig = RoutingConfig(),
        *,
        router_bias: bool = False,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: bool = False,
    ):
        super().__init__()
        self.experts = experts if isinstance(experts, nn.ModuleList) else nn.ModuleList(experts)
        if routing.top_k > len(self.experts):
            raise ValueError(f"top_k={routing.top_k} exceeds the number of experts ({len(self.experts)})")
        self.hidden_size = hidden_size
        self.top_k = routing.top_k
        self.renormalize = routing.renormalize
        self.router = nn.Linear(hidden_size, len(self.experts), bias=router_bias, dtype=torch.float32)
        nn.init.zeros_(self.router.weight)
        if router_bias:
            nn.init.zeros_(self.router.bias)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32) if shared_expert_gate else None
        )
        if self.shared_expert_gate is not None:
            nn.init.zeros_(self.shared_expert_gate.weight)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig(self.top_k, self.renormalize)

    def _apply(self, fn, recurse=True):
        # Routers stay fp32 whatever the model is cast to; only devices may change. The values are
        # saved first: casting to bf16 and back would silently round them (and fp16 overflows).
        saved = {}
        for m in (self.router, self.shared_expert_gate):
            if m is not None:
                saved[id(m)] = {k: p.detach() for k, p in m._parameters.items() if p is not None}
        super()._apply(fn, recurse)
        for m in (self.router, self.shared_expert_gate):
            if m is None:
                continue
            for k, old in saved[id(m)].items():
                new = m._parameters[k]
                if not new.is_floating_point() or new.dtype == torch.float32:
                    continue
                if old.is_meta or new.is_meta or old.dtype != torch.float32:
                    new.data = new.data.float()
                else:
                    new.data = old.to(device=new.device, dtype=torch.float32)
        return self

    def route(self, hidden: torch.Tensor) -> Route:
        """Routing decision for `hidden` of shape (tokens, H)."""
        logits = self.router(hidden.float())
        probs = F.softmax(logits, dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Route(logits, weights, indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        hidden = x.reshape(-1, shape[-1])
        _, weights, indices = self.route(hidden)
        out = torch.zeros_like(hidden)
        # Weights in the activation dtype before the multiply: no fp32 copy of every expert output.
        weights = weights.to(hidden.dtype)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(indices == e)
            y = expert(hidden.index_select(0, token_idx))
            out.index_add_(0, token_idx, y * weights[token_idx, slot].unsqueeze(-1))
        out = add_shared_expert(out, hidden, self.shared_expert, self.shared_expert_gate)
        return out.reshape(shape[:-1] + (out.shape[-1],))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"


def add_shared_expert(out: torch.Tensor, hidden: torch.Tensor, shared_expert: nn.Module | None,
                      gate: nn.Module | None) -> torch.Tensor:
    """`out` plus the shared expert's output on `hidden` (sigmoid-gated when there is a gate);
    `out` itself without a shared expert. One definition for the block and its ONNX stand-in."""
    if shared_expert is None:
        return out
    shared = shared_expert(hidden)
    if gate is not None:
        shared = torch.sigmoid(gate(hidden.float())).to(shared.dtype) * shared
    return out + shared
