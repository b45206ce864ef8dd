"""The pruning math of `sparsify`: magnitude / Wanda masks, SparseGPT (the input statistics and
the inverse-Hessian factor it sweeps with are in `moeconv.hessian`, shared with GPTQ).

All functions take weights as (…, out, in) float32 and return new tensors; pruned entries are
exact +0.0. Batched where it pays: SparseGPT runs every expert of a layer (and gate+up, which
share their input) as one batched solve, so the Python loop over columns runs once per layer
shape instead of once per matrix.

- magnitude: score |W|.
- Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂ over the calibration inputs the matrix saw.
- SparseGPT (Frantar & Alistarh 2023): OBS-style column-by-column pruning with the inverse
  Hessian H = Σ x xᵀ of those inputs; the remaining weights are updated to compensate. For N:M
  the mask of each group of M columns is chosen when the sweep reaches it (as in the reference
  implementation); for unstructured, each row keeps the same fraction in each block of columns.

Reconstruction error of a matrix: ‖(W − W')X‖²_F / ‖W X‖²_F = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), the
quantity SparseGPT minimises, measured on the same inputs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from moeconv.hessian import upper_inverse_cholesky
from moeconv.sparsity import SparsityPattern, keep_top


def magnitude(w: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    keep = keep_top(w.abs(), pattern)
    return w.masked_fill(~keep, 0.0)


def wanda(w: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """`hessian` (in, in) or its diagonal: ‖X_j‖² per input column."""
    sq = hessian.diagonal() if hessian.dim() == 2 else hessian
    keep = keep_top(w.abs() * sq.clamp_min(0).sqrt().unsqueeze(0), pattern)
    return w.masked_fill(~keep, 0.0)


class SparseGPTResult(NamedTuple):
    weight: torch.Tensor  # (B, out, in), pruned and updated
    dampening: torch.Tensor  # (B,) λ used / mean diag H
    row_error: torch.Tensor  # (B, out): ‖(W − W')_r X‖², each row's share of tr(ΔW H ΔWᵀ)


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, *, block_size: int = 128,
              dampening: float = 0.01) -> SparseGPTResult:
    """Batched SparseGPT: `w` (B, out, in), `hessian` (B, in, in) → pruned weights, the dampening
    used per matrix and each row's output error on the calibration inputs.

    The output error comes free from the sweep: with UᵀU = H̃⁻¹ (H̃ the dampened Hessian) the
    sweep's total update is ΔW = E·U for its scaled errors E, so tr(ΔW H̃ ΔWᵀ) = ‖E‖²; the
    dampening (and unit curvature given to dead inputs) is subtracted to report it against H.

    The reference sweep updates every later column of the block after each column; here the
    update is lazy at four levels (within a group of M columns, then the rest of a sub-block of
    `_SUB` columns, then the rest of the block, then the rest of the matrix), which is the same
    arithmetic reordered: Python-level work per column is O(out·M) instead of O(out·block), and
    the rest are matrix products.
    """
    batch, rows, cols = w.shape
    hinv, damp = upper_inverse_cholesky(hessian, dampening)
    err_sq = w.new_zeros(batch, rows)
    # Columns-major working copy: a column of every row is one contiguous run, which is what the
    # per-column steps touch.
    wt = w.transpose(1, 2).contiguous()
    step = pattern.m if pattern.is_nm else 8
    threads = torch.get_num_threads()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        # The column sweep is thousands of small ops: with several OpenMP threads each one pays a
        # fork/join (5-9x slower measured on a busy 2-core machine), so it runs on one thread; the
        # block-level products below use them all.
        torch.set_num_threads(1)
        try:
            err1 = _sweep_block(wt, hinv, pattern, i1, i2, step)
        finally:
            torch.set_num_threads(threads)
        err_sq += err1.square().sum(1)
        if i2 < cols:
            wt[:, i2:].sub_(torch.bmm(hinv[:, i1:i2, i2:].transpose(1, 2), err1))
    new = wt.transpose(1, 2).contiguous()
    # Back from H̃ = H + λ·mean·I + (1 on dead inputs' diagonal) to H.
    diag = hessian.diagonal(dim1=-2, dim2=-1)
    extra = (damp * diag.masked_fill(diag == 0, 1.0).mean(-1)).unsqueeze(-1) + (diag == 0).to(w.dtype)  # (B, in)
    delta_sq = (w - new).square()
    row_error = (err_sq - torch.bmm(delta_sq, extra.unsqueeze(-1)).squeeze(-1)).clamp_min(0.0)
    return SparseGPTResult(new, damp, row_error)


_SUB = 32  # columns per sub-block of the sweep: bounds the memory each group's update rewrites


def _group_prune_mask(score: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """(B, M, out) scores of one group of M columns → float mask, 1.0 where pruned: the M − N
    lowest of each row. Ranks by pairwise comparison (ties: the earlier column ranks higher) for
    small M, where it is ~20× faster than topk on a trailing dimension of 4."""
    m = score.shape[1]
    if m > 8:
        keep = keep_top(score.transpose(1, 2), SparsityPattern.parse(f"{pattern.n}:{m}")).transpose(1, 2)
        return (~keep).float()
    first, second, incidence, base = _pairs(m, score.device)
    wins = (score[:, first] >= score[:, second]).float()  # (B, pairs, out): the earlier column wins ties
    rank = torch.matmul(incidence, wins).add_(base)  # (B, M, out): how many of the group outrank each
    return (rank >= pattern.n).float()


_PAIRS: dict = {}


def _pairs(m: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the M(M−1)/2 pairs i < j of a group: indices i and j, and the (M, pairs) incidence and
    (M, 1) base with rank = base + incidence · [s_i >= s_j]: i is outranked by j when it loses
    (1 − win), j is outranked by i when i wins."""
    key = (m, str(device))
    if key not in _PAIRS:
        pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
        inc = torch.zeros(m, len(pairs))
        base = torch.zeros(m, 1)
        for p, (i, j) in enumerate(pairs):
            inc[i, p] -= 1.0
            base[i] += 1.0
            inc[j, p] += 1.0
        _PAIRS[key] = (torch.tensor([i for i, _ in pairs], device=device), torch.tensor([j for _, j in pairs], device=device),
                       inc.to(device), base.to(device))
    return _PAIRS[key]


def _sweep_block(wt, hinv, pattern: SparsityPattern, i1: int, i2: int, step: int) -> torch.Tensor:
    """Columns i1..i2 of `wt` (B, in, out), in order, in place: choose masks, prune, spread each
    column's error over the later columns of the block. Returns the errors (B, count, out)."""
    count = i2 - i1
    w1 = wt[:, i1:i2]
    err1 = torch.zeros_like(w1)
    hinv1 = hinv[:, i1:i2, i1:i2]
    hinv1t = hinv1.transpose(1, 2).contiguous()
    rd = hinv1.diagonal(dim1=-2, dim2=-1).reciprocal().unsqueeze(-1)  # (B, count, 1)
    prune1 = torch.zeros_like(w1)  # 1.0 where pruned: float masks multiply faster than bool ones select
    # Unstructured: the mask of the block is chosen at its start, with per-block counts that
    # add up to the per-row total the check demands.
    drop = int(i2 * pattern.ratio) - int(i1 * pattern.ratio)
    if not pattern.is_nm and drop:
        score = (w1 * rd).square().transpose(1, 2)  # (B, out, count)
        idx = torch.topk(score, drop, dim=-1, largest=False).indices
        prune1.copy_(torch.zeros_like(score).scatter_(-1, idx, 1.0).transpose(1, 2))
    for s1 in range(0, count, _SUB):
        s2 = min(s1 + _SUB, count)
        for g1 in range(s1, s2, step):
            g2 = min(g1 + step, s2)
            if pattern.is_nm:  # N:M: each group's mask is chosen when the sweep reaches it
                prune1[:, g1:g2] = _group_prune_mask((w1[:, g1:g2] * rd[:, g1:g2]).square(), pattern)
            gain = prune1[:, g1:g2] * rd[:, g1:g2]
            keep = 1.0 - prune1[:, g1:g2]
            for i in range(g1, g2):
                col = w1[:, i]
                err = torch.mul(col, gain[:, i - g1], out=err1[:, i])
                col.mul_(keep[:, i - g1])
                if i + 1 < g2:
                    w1[:, i + 1:g2].sub_(err.unsqueeze(1) * hinv1[:, i, i + 1:g2].unsqueeze(-1))
            if g2 < s2:
                w1[:, g2:s2].sub_(torch.bmm(hinv1t[:, g2:s2, g1:g2], err1[:, g1:g2]))
        if s2 < count:
            w1[:, s2:].sub_(torch.bmm(hinv1t[:, s2:, s1:s2], err1[:, s1:s2]))
    # x·0 is −0.0 for negative x; pruned entries must be exact +0.0, and −0.0 + 0.0 = +0.0 while
    # every other value is unchanged by adding zero (one pass, no boolean mask).
    w1.add_(0.0)
    return err1


def output_energy(w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(W H Wᵀ) = ‖W X‖²_F per batch element of (B, out, in) weights and (B, in, in) Hessians."""
    return (torch.bmm(w, hessian) * w).sum((-2, -1))


def reconstruction_error(w: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor, *,
                         numerator: torch.Tensor | None = None, denominator: torch.Tensor | None = None) -> list[float | None]:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) per batch element of (B, out, in) weights and (B, in, in)
    Hessians; None where the matrix saw no signal. Either term (B,) may be given when already
    known (SparseGPT's sweep, the observed outputs); the other is computed from H."""
    num = numerator if numerator is not None else output_energy(w - new, hessian)
    den = denominator if denominator is not None else output_energy(w, hessian)
    return [max(0.0, a) / b if b > 0 else None for a, b in zip(num.tolist(), den.tolist())]
