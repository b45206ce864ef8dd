"""The pruning math of `sparsify`: input statistics, magnitude / Wanda masks, SparseGPT.

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

import torch

from moeconv.sparsity import SparsityPattern, keep_top


class InputStats:
    """Σ x xᵀ and token counts of the inputs each named module receives.

    Modules fed the *same* tensor in a row (gate_proj and up_proj; q, k and v) reuse one product:
    the previous input is held (so its memory cannot be reused by another tensor) and compared by
    address, shape, stride and dtype (calibration runs in inference mode, where tensors carry no
    version counter; nothing writes into a layer's input between two projections reading it).
    """

    def __init__(self):
        self.hessian: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._last_key = None
        self._last_x = None
        self._last_xtx = None

    def add(self, name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
        if key == self._last_key:
            xtx = self._last_xtx
        else:
            xf = x.float()
            xtx = xf.t() @ xf
            self._last_key, self._last_x, self._last_xtx = key, x, xtx
        if name in self.hessian:
            self.hessian[name].add_(xtx)
            self.tokens[name] += int(x.shape[0])
        else:
            self.hessian[name] = xtx.clone()
            self.tokens[name] = int(x.shape[0])

    def drop(self, names) -> None:
        for n in names:
            self.hessian.pop(n, None)
            self.tokens.pop(n, None)

    def release(self) -> None:
        self._last_key = self._last_x = self._last_xtx = None


def magnitude(w: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    keep = keep_top(w.abs(), pattern)
    return w.masked_fill(~keep, 0.0)


def wanda(w: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """`hessian` (in, in) or its diagonal: ‖X_j‖² per input column."""
    sq = hessian.diagonal() if hessian.dim() == 2 else hessian
    keep = keep_top(w.abs() * sq.clamp_min(0).sqrt().unsqueeze(0), pattern)
    return w.masked_fill(~keep, 0.0)


def _upper_inverse_cholesky(h: torch.Tensor, dampening: float, tries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ per batch element, λ = dampening·mean(diag H), raised
    ×10 where H + λI is not positive definite (tokens fewer than inputs, duplicated inputs).
    Returns (factor, λ used / mean diag)."""
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0  # inputs never active: unit curvature, the weight is judged by magnitude
    mean = diag.mean(-1)
    rel = torch.full_like(mean, dampening)
    base = h.clone()
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    for _ in range(tries):
        h = base + torch.diag_embed((rel * mean).unsqueeze(-1).expand_as(diag))
        # Upper Cholesky factor of H⁻¹ without forming H⁻¹: with P the reversal permutation and
        # P·H·P = L·Lᵀ, U = P·L⁻¹·P is upper triangular and UᵀU = H⁻¹ (one factorisation and one
        # triangular inverse instead of factor, invert, factor again).
        chol, info = torch.linalg.cholesky_ex(h.flip(-2, -1))
        bad = info != 0
        if not bad.any():
            upper = torch.linalg.solve_triangular(chol, eye, upper=False).flip(-2, -1)
            if torch.isfinite(upper).all():
                return upper, rel
            bad = ~torch.isfinite(upper).flatten(1).all(-1)
        rel = torch.where(bad, rel * 10, rel)
    raise FloatingPointError("Hessian not positive definite even with dampening ×1e5")


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, *, block_size: int = 128,
              dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched SparseGPT: `w` (B, out, in), `hessian` (B, in, in) → (pruned w, dampening used per B).

    The reference sweep updates every later column of the block after each column; here the
    update is lazy at two levels (within a group of M columns, then the rest of the block, then
    the rest of the matrix), which is the same arithmetic reordered: Python-level work per column
    is O(out·M) instead of O(out·block), and the rest are matrix products.
    """
    w = w.clone()
    batch, rows, cols = w.shape
    hinv, damp = _upper_inverse_cholesky(hessian, dampening)
    step = pattern.m if pattern.is_nm else 8
    threads = torch.get_num_threads()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        # The column sweep is thousands of small ops: with several OpenMP threads each one pays a
        # fork/join (5-9x slower measured on a busy 2-core machine), so it runs on one thread; the
        # block-level products below use them all.
        torch.set_num_threads(1)
        try:
            w1, err1, prune1 = _sweep_block(w, hinv, pattern, i1, i2, step)
        finally:
            torch.set_num_threads(threads)
        w[:, :, i1:i2] = w1.masked_fill(prune1, 0.0)
        if i2 < cols:
            w[:, :, i2:].sub_(torch.bmm(err1, hinv[:, i1:i2, i2:]))
    return w, damp


def _sweep_block(w, hinv, pattern: SparsityPattern, i1: int, i2: int, step: int):
    """Columns i1..i2 of one block, in order: choose masks, prune, spread each column's error
    over the later columns of the block. Returns (block weights, errors, prune mask)."""
    count = i2 - i1
    w1 = w[:, :, i1:i2].clone()
    err1 = torch.zeros_like(w1)
    hinv1 = hinv[:, i1:i2, i1:i2]
    d1 = hinv1.diagonal(dim1=-2, dim2=-1)  # (B, count)
    prune1 = torch.zeros_like(w1, dtype=torch.bool)
    # Unstructured: the mask of the block is chosen at its start, with per-block counts that
    # add up to the per-row total the check demands.
    drop = int(i2 * pattern.ratio) - int(i1 * pattern.ratio)
    if not pattern.is_nm and drop:
        score = w1 ** 2 / d1.unsqueeze(1) ** 2
        prune1.scatter_(-1, torch.topk(score, drop, dim=-1, largest=False).indices, True)
    for g1 in range(0, count, step):
        g2 = min(g1 + step, count)
        if pattern.is_nm:  # N:M: each group's mask is chosen when the sweep reaches it
            score = w1[:, :, g1:g2] ** 2 / d1[:, None, g1:g2] ** 2
            prune1[:, :, g1:g2] = ~keep_top(score, pattern)
        for i in range(g1, g2):
            col = w1[:, :, i]
            q = col.masked_fill(prune1[:, :, i], 0.0)
            err = (col - q) / d1[:, i].unsqueeze(1)
            w1[:, :, i] = q
            if i + 1 < g2:
                w1[:, :, i + 1:g2].sub_(err.unsqueeze(2) * hinv1[:, i:i + 1, i + 1:g2])
            err1[:, :, i] = err
        if g2 < count:
            w1[:, :, g2:].sub_(torch.bmm(err1[:, :, g1:g2], hinv1[:, g1:g2, g2:]))
    return w1, err1, prune1


def reconstruction_error(w: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> list[float | None]:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) per batch element of (B, out, in) weights and (B, in, in)
    Hessians; None where the matrix saw no signal."""
    delta = w - new
    num = (torch.bmm(delta, hessian) * delta).sum((-2, -1))
    den = (torch.bmm(w, hessian) * w).sum((-2, -1))
    return [max(0.0, a) / b if b > 0 else None for a, b in zip(num.tolist(), den.tolist())]
