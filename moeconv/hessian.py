"""Second-order statistics of a linear layer's inputs and the inverse-Hessian factor that
SparseGPT (`passes.sparsify_methods`) and GPTQ (`moeconv.gptq`) both sweep with.

- `InputStats`: Σ x xᵀ (the Hessian H of the layer-wise reconstruction loss) and token counts of
  the inputs each named module receives.
- `upper_inverse_cholesky(H, λ)`: the upper Cholesky factor U of (H + λI)⁻¹, UᵀU = (H + λI)⁻¹,
  computed from one factorisation and one triangular inverse.
"""
from __future__ import annotations

import torch


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
        self.energy: dict[str, torch.Tensor] = {}  # Σ‖W x‖² over the same inputs: tr(W H Wᵀ), read off the outputs
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

    def add_output(self, name: str, y: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """The module's output W x (+ bias) for the inputs `add` saw: accumulates ‖W x‖², the
        denominator of the relative reconstruction error, without a (out, in)·(in, in) product."""
        yf = y.float()
        if bias is not None:
            yf = yf - bias.detach().float()
        e = yf.square().sum()
        self.energy[name] = self.energy[name] + e if name in self.energy else e

    def drop(self, names) -> None:
        for n in names:
            self.hessian.pop(n, None)
            self.tokens.pop(n, None)
            self.energy.pop(n, None)

    def release(self) -> None:
        self._last_key = self._last_x = self._last_xtx = None


def _inverse_lower(lower: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """Inverse of batched lower-triangular matrices by halves: [[A,0],[B,C]]⁻¹ = [[A⁻¹,0],
    [−C⁻¹BA⁻¹, C⁻¹]]. n³/3 flops in matrix products, where a triangular solve against the identity
    does n³ (3× the time for a 1792-input down_proj, measured)."""
    n = lower.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device).expand_as(lower)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    k = n // 2
    a = _inverse_lower(lower[..., :k, :k], leaf)
    c = _inverse_lower(lower[..., k:, k:], leaf)
    out = torch.zeros_like(lower)
    out[..., :k, :k] = a
    out[..., k:, k:] = c
    out[..., k:, :k] = -(c @ (lower[..., k:, :k] @ a))
    return out


def upper_inverse_cholesky(h: torch.Tensor, dampening: float, tries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ per batch element, λ = dampening·mean(diag H), raised
    ×10 where H + λI is not positive definite (tokens fewer than inputs, duplicated inputs).
    Returns (factor, λ used / mean diag)."""
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0  # inputs never active: unit curvature, the weight is judged by magnitude
    mean = diag.mean(-1)
    rel = torch.full_like(mean, dampening)
    base = h
    for _ in range(tries):
        h = base.clone()
        h.diagonal(dim1=-2, dim2=-1).add_((rel * mean).unsqueeze(-1))
        # Upper Cholesky factor of H⁻¹ without forming H⁻¹: with P the reversal permutation and
        # P·H·P = L·Lᵀ, U = P·L⁻¹·P is upper triangular and UᵀU = H⁻¹ (one factorisation and one
        # triangular inverse instead of factor, invert, factor again).
        chol, info = torch.linalg.cholesky_ex(h.flip(-2, -1))
        bad = info != 0
        if not bad.any():
            upper = _inverse_lower(chol).flip(-2, -1)
            # A sum is non-finite iff some entry is (or it overflows, which also calls for more
            # dampening): one reduction instead of a boolean copy of every entry.
            bad = ~torch.isfinite(upper.sum((-2, -1)))
            if not bad.any():
                return upper, rel
        rel = torch.where(bad, rel * 10, rel)
    raise FloatingPointError("Hessian not positive definite even with dampening ×1e5")
