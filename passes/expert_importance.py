"""Expert importance in one `MoEBlock`, measured on calibration tokens.

`routing_scores(block, x)` measures the routing criteria on every token (each expert runs only on
its routed tokens). `observe_block(block, x)` runs the router and *every* expert on every token
of `x` once and keeps the results, so the reconstruction criterion, each candidate subset, merging
similarity and the router re-calibration are cheap arithmetic on them. Definitions (N tokens,
top-k routing as the block does it: softmax over all E router logits, top-k, renormalised when
the block renormalises):

- `frequency[j]`  share of routed (token, slot) pairs that go to expert j: count_j / (N·k).
  Sums to 1 over the experts.
- `mass[j]`       router probability the expert actually receives: Σ_x p_j(x)·[j ∈ topk(x)] / N,
  with p the softmax over all experts (before renormalisation). An expert the router never
  selects has mass 0, whatever its probabilities elsewhere.
- `reap[j]`       REAP: mean over the tokens routed to j of g_j(x)·‖E_j(x)‖₂, g the gate weight
  the block applies (renormalised when the block renormalises); 0 for an expert with no tokens.
- `reconstruction[j]`  NAEE-style: the relative squared error of the block output when expert j
  alone is removed (its router row dropped, routing redone over the rest):
  ‖F₋ⱼ(x) − F(x)‖² / ‖F(x)‖² summed over tokens, F the full block output (shared expert included).

Higher is more important for every criterion. `best_subset` searches the kept subset that
minimises that reconstruction error: exhaustively when there are few subsets, else by beam
search (backward elimination).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeconv.nn.moe import MoEBlock

CRITERIA = ("frequency", "mass", "reap", "reconstruction")


@dataclass
class BlockObservation:
    """Router logits and every expert's output on the same N tokens (fp32)."""

    x: torch.Tensor              # (N, H) the block inputs
    logits: torch.Tensor         # (N, E) router logits
    outputs: torch.Tensor        # (E, N, H) expert e on every token
    shared: torch.Tensor | None  # (N, H) the (gated) shared-expert term, or None
    top_k: int
    renormalize: bool

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]


def _expert_dtype(module: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else default


@torch.no_grad()
def expert_outputs(experts, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(len(experts), N, H) fp32: each expert module on every row of `x`."""
    out = None
    for e, expert in enumerate(experts):
        dtype = _expert_dtype(expert, x.dtype)
        for s in range(0, x.shape[0], chunk):
            y = expert(x[s:s + chunk].to(dtype)).float()
            if out is None:
                out = torch.empty(len(experts), x.shape[0], y.shape[-1], device=x.device)
            out[e, s:s + chunk] = y
    return out


@torch.no_grad()
def observe_block(block: MoEBlock, x: torch.Tensor) -> BlockObservation:
    x = x.reshape(-1, x.shape[-1])
    logits = block.router(x.float()).float()
    outputs = expert_outputs(block.experts, x)
    shared = None
    if block.shared_expert is not None:
        shared = expert_outputs([block.shared_expert], x)[0]
        if block.shared_expert_gate is not None:
            shared = torch.sigmoid(block.shared_expert_gate(x.float())).float() * shared
    return BlockObservation(x.float(), logits, outputs, shared, block.top_k, block.renormalize)


def route(logits: torch.Tensor, top_k: int, renormalize: bool):
    """(probs over all experts, top-k probs, gate weights applied, top-k indices): the block's math."""
    probs = F.softmax(logits.float(), dim=-1)
    top_p, idx = torch.topk(probs, top_k, dim=-1)
    weights = top_p / top_p.sum(dim=-1, keepdim=True) if renormalize else top_p
    return probs, top_p, weights, idx


def combine(logits: torch.Tensor, outputs: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """Routed output Σ_topk w·E(x) (N, H) from router logits (N, E') and expert outputs (E', N, H).
    Differentiable in `logits` (the router re-calibration trains through it)."""
    _, _, weights, idx = route(logits, top_k, renormalize)
    rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
    picked = outputs[idx, rows]                      # (N, k, H)
    return (picked * weights.unsqueeze(-1)).sum(dim=1)


def reference_output(obs: BlockObservation) -> torch.Tensor:
    """The routed part of the unpruned block's output (N, H)."""
    return combine(obs.logits, obs.outputs, obs.top_k, obs.renormalize)


def _full_norm(obs: BlockObservation, routed: torch.Tensor) -> float:
    full = routed if obs.shared is None else routed + obs.shared
    return max(float(full.pow(2).sum()), 1e-30)


@torch.no_grad()
def subset_error(obs: BlockObservation, subset, reference: torch.Tensor | None = None) -> float:
    """Relative squared error of the block output with only `subset` kept (router rows dropped).
    The shared expert is unchanged, so it cancels in the difference (but counts in the norm)."""
    ref = reference_output(obs) if reference is None else reference
    sub = torch.as_tensor(list(subset), dtype=torch.long, device=obs.logits.device)
    got = combine(obs.logits[:, sub], obs.outputs[sub], obs.top_k, obs.renormalize)
    return float((got - ref).pow(2).sum()) / _full_norm(obs, ref)


@torch.no_grad()
def routing_scores(block: MoEBlock, x: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """frequency, mass, REAP and `tokens` (counts) of every expert (float64, length E) on the rows
    of `x`. Each expert runs only on its routed tokens (nothing is stored per expert)."""
    x = x.reshape(-1, x.shape[-1])
    n, e, k = x.shape[0], block.num_experts, block.top_k
    _, top_p, weights, idx = route(block.router(x.float()), k, block.renormalize)
    flat = idx.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=e).double()
    mass = torch.zeros(e, dtype=torch.float64).index_add_(0, flat, top_p.reshape(-1).double().cpu())
    reap_sum = torch.zeros(e, dtype=torch.float64)
    for j, expert in enumerate(block.experts):
        tok, slot = torch.where(idx == j)
        dtype = _expert_dtype(expert, x.dtype)
        for s in range(0, tok.numel(), chunk):
            t, sl = tok[s:s + chunk], slot[s:s + chunk]
            norms = expert(x.index_select(0, t).to(dtype)).float().norm(dim=-1)
            reap_sum[j] += float((weights[t, sl] * norms).double().sum())
    reap = torch.where(counts > 0, reap_sum / counts.clamp(min=1), torch.zeros_like(reap_sum))
    return {"frequency": counts / max(n * k, 1), "mass": mass / max(n, 1), "reap": reap, "tokens": counts}


@torch.no_grad()
def reconstruction_scores(obs: BlockObservation) -> torch.Tensor:
    """Relative output error when each expert alone is removed (inf where that would leave fewer
    experts than top_k)."""
    e, k = obs.num_experts, obs.top_k
    ref = reference_output(obs)
    recon = torch.full((e,), math.inf, dtype=torch.float64)
    if e - 1 >= k:
        for j in range(e):
            recon[j] = subset_error(obs, [i for i in range(e) if i != j], ref)
    return recon


def expert_scores(block: MoEBlock, x: torch.Tensor, obs: BlockObservation | None = None) -> dict[str, torch.Tensor]:
    """Every criterion for every expert: routing criteria on `x`, reconstruction on `obs` (the
    observation of `x`, or of a subset of it, made with `observe_block`) when given."""
    scores = routing_scores(block, x)
    e = block.num_experts
    scores["reconstruction"] = (reconstruction_scores(obs) if obs is not None
                                else torch.full((e,), math.nan, dtype=torch.float64))
    return scores


def rank_keep(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the `keep` highest scores, in expert order. Ties keep the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:keep])


@torch.no_grad()
def best_subset(obs: BlockObservation, keep: int, *, beam_width: int = 4,
                max_combinations: int = 512) -> tuple[list[int], float, str]:
    """(kept experts, their relative reconstruction error, how it was searched)."""
    e = obs.num_experts
    ref = reference_output(obs)
    if math.comb(e, keep) <= max_combinations:
        best, best_err = None, math.inf
        for cand in itertools.combinations(range(e), keep):
            err = subset_error(obs, cand, ref)
            if err < best_err:
                best, best_err = list(cand), err
        return best, best_err, f"exhaustive over {math.comb(e, keep)} subsets"
    beams = [(subset_error(obs, range(e), ref), tuple(range(e)))]
    for size in range(e - 1, keep - 1, -1):
        seen, cands = set(), []
        for _, s in beams:
            for j in s:
                c = tuple(i for i in s if i != j)
                if c not in seen:
                    seen.add(c)
                    cands.append((subset_error(obs, c, ref), c))
        cands.sort()
        beams = cands[:beam_width]
    err, s = beams[0]
    return list(s), err, f"beam search (width {beam_width})"
