"""Distillation losses and MoE regularisers, each a plain function of tensors.

Every function returns an fp32 scalar (inputs are cast) and is *unweighted*: the weights live in
`LossWeights` and are applied by the objective. Token axes are flattened, so `(batch, seq, C)`
and `(tokens, C)` inputs are equivalent; every "mean" below is over tokens.

- `kl_loss`: T² · mean_t KL(softmax(teacher/T) ‖ softmax(student/T)) on next-token logits
  (Hinton et al.: the T² keeps gradient magnitudes comparable across temperatures).
- `ce_loss`: next-token cross-entropy on the data (position t predicts token t+1).
- `hidden_mse`: mean over mapped (student layer, teacher layer) pairs of the element-wise MSE
  between `proj(h_student)` and `h_teacher`; `proj` is a learned `nn.Linear` only where the two
  hidden sizes differ (`HiddenProjections`).
- `router_kl`: mean_t KL(p_teacher ‖ p_student) between routing distributions (softmax of router
  logits) of one MoE layer pair; the teacher's distribution is first summed into the student's
  experts with `expert_map` when the expert counts differ.
- `router_topk_ce`: cross-entropy of the student's routing distribution against the teacher's top-k
  choice: target `q = (1/k)·Σ_j onehot(map(topk_j))`, loss `-mean_t Σ_i q_i·log p_student,i`.
- `load_balance_loss`: the Switch Transformer loss `E · Σ_i f_i · P_i` (multiply by α ≈ 0.01 in
  `LossWeights.balance`): `f_i` = fraction of the token→expert assignments (all top-k slots) that
  go to expert i, `P_i` = mean router probability of expert i. Σ f_i = 1, so a perfectly balanced
  router scores exactly 1 for every k (top-1: identical to Switch; HF Mixtral counts k-hot
  assignments and scores k instead). `f` is not differentiable; the gradient flows through `P`.
- `z_loss`: router z-loss `mean_t logsumexp(logits_t)²` (ST-MoE; weight ≈ 0.001).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over tokens of KL(softmax(teacher/T) ‖ softmax(student/T))."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}")
    t = float(temperature)
    log_q = F.log_softmax(_flat(student_logits) / t, dim=-1)
    log_p = F.log_softmax(_flat(teacher_logits) / t, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return kl.mean() * (t * t)


def ce_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: `logits[:, t]` predicts `input_ids[:, t + 1]`."""
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (batch, seq, vocab) and ids (batch, seq); got {tuple(logits.shape)}, "
                         f"{tuple(input_ids.shape)}")
    return F.cross_entropy(_flat(logits[:, :-1]), input_ids[:, 1:].reshape(-1))


class HiddenProjections(nn.Module):
    """One learned `Linear(d_student → d_teacher, bias=False)` per mapped pair whose sizes differ.

    Pairs with equal sizes compare directly (no parameters). Initialised from `seed` (identically on
    every rank; DDP broadcasts rank 0's copy anyway). Trained with the student, never saved in it.
    """

    def __init__(self, pairs: list[tuple[int, int]], student_dims: dict[int, int], teacher_dims: dict[int, int],
                 seed: int = 0):
        super().__init__()
        self.pairs = list(pairs)
        self.maps = nn.ModuleDict()
        g = torch.Generator().manual_seed(seed)
        for s, t in self.pairs:
            ds, dt = student_dims[s], teacher_dims[t]
            if ds != dt:
                lin = nn.Linear(ds, dt, bias=False, dtype=torch.float32)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(dt, ds, generator=g) / ds ** 0.5)
                self.maps[self.key(s, t)] = lin

    @staticmethod
    def key(s: int, t: int) -> str:
        return f"s{s}_t{t}"

    def project(self, s: int, t: int, h: torch.Tensor) -> torch.Tensor:
        lin = self.maps[self.key(s, t)] if self.key(s, t) in self.maps else None
        h = h.float()
        return lin(h) if lin is not None else h


def hidden_mse(student_hidden: dict[int, torch.Tensor], teacher_hidden: dict[int, torch.Tensor],
               projections: HiddenProjections) -> torch.Tensor:
    """Mean over `projections.pairs` of mean((proj(h_s) - h_t)²)."""
    if not projections.pairs:
        raise ValueError("hidden_mse needs at least one (student layer, teacher layer) pair")
    terms = [F.mse_loss(projections.project(s, t, student_hidden[s]), teacher_hidden[t].float())
             for s, t in projections.pairs]
    return torch.stack(terms).mean()


def expert_map_matrix(expert_map: list[int] | None, teacher_experts: int, student_experts: int,
                      device=None) -> torch.Tensor | None:
    """(E_teacher, E_student) 0/1 matrix summing teacher experts into student experts; None = identity."""
    if expert_map is None:
        if teacher_experts != student_experts:
            raise ValueError(f"teacher has {teacher_experts} experts, student {student_experts}: give an expert_map")
        return None
    if len(expert_map) != teacher_experts or not all(0 <= j < student_experts for j in expert_map):
        raise ValueError(f"expert_map must list, for each of the {teacher_experts} teacher experts, a student "
                         f"expert in 0..{student_experts - 1}")
    m = torch.zeros(teacher_experts, student_experts, device=device)
    m[torch.arange(teacher_experts), torch.tensor(expert_map)] = 1.0
    return m


def router_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              expert_map: list[int] | None = None) -> torch.Tensor:
    """mean_t KL(p_teacher ‖ p_student) of routing distributions (teacher summed through `expert_map`)."""
    s, t = _flat(student_logits), _flat(teacher_logits)
    m = expert_map_matrix(expert_map, t.shape[-1], s.shape[-1], t.device)
    log_q = F.log_softmax(s, dim=-1)
    if m is None:
        log_p = F.log_softmax(t, dim=-1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
    p = F.softmax(t, dim=-1) @ m
    return F.kl_div(log_q, p, reduction="none").sum(-1).mean()  # 0·log 0 terms are 0 in kl_div


def router_topk_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, top_k: int,
                   expert_map: list[int] | None = None) -> torch.Tensor:
    """-mean_t Σ_i q_i log p_student,i with q the teacher's top-k choice spread evenly (1/k each)."""
    s, t = _flat(student_logits), _flat(teacher_logits)
    idx = torch.topk(t, top_k, dim=-1).indices
    if expert_map is not None:
        expert_map_matrix(expert_map, t.shape[-1], s.shape[-1])  # validates
        idx = torch.tensor(expert_map, device=idx.device)[idx]
    elif t.shape[-1] != s.shape[-1]:
        raise ValueError(f"teacher has {t.shape[-1]} experts, student {s.shape[-1]}: give an expert_map")
    q = torch.zeros_like(s).scatter_add_(-1, idx, torch.full(idx.shape, 1.0 / top_k, device=s.device))
    return -(q * F.log_softmax(s, dim=-1)).sum(-1).mean()


def load_balance_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch load balance `E · Σ_i f_i · P_i` (unweighted; see the module docstring for f and P)."""
    logits = _flat(router_logits)
    tokens, experts = logits.shape
    probs = F.softmax(logits, dim=-1)
    idx = torch.topk(probs, top_k, dim=-1).indices
    counts = torch.zeros(experts, device=logits.device).scatter_add_(
        0, idx.reshape(-1), torch.ones(idx.numel(), device=logits.device))
    f = counts / (tokens * top_k)
    p_mean = probs.mean(0)
    return experts * (f * p_mean).sum()


def z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)²."""
    return torch.logsumexp(_flat(router_logits), dim=-1).pow(2).mean()
