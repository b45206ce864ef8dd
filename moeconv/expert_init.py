"""How upcycled experts and routers are initialised from a dense FFN: the math alone.

Both the in-memory `upcycle` pass and the streaming checkpoint converter call these functions,
so the two paths write the same numbers for the same seed. Tensors are in the `nn.Linear`
(out, in) convention; roles: `gate`, `up`, `down` (or `gate_up` for a fused projection whose rows
are [gate; up]) and their biases as `ROLE.bias`. The intermediate axis is dim 0 of gate/up and
dim 1 of down.

Methods (Komatsuzaki et al. 2022; Drop-Upcycling; LLaMA-MoE splitting):
- copy:  every expert an exact copy (the MoE equals the dense FFN with renormalised top-k).
- noise: copy + `noise_scale · std(W) · N(0, 1)` on every matrix (biases kept).
- drop:  copy, then a random fraction `drop_ratio` of each expert's intermediate neurons is
         re-initialised from N(mean, std) of the matrix it sits in (Drop-Upcycling).
- split: the intermediate neurons are partitioned into `num_experts` fine-grained experts
         (random or clustered); `down` is scaled by `num_experts` so that uniform routing over
         all experts reproduces the dense FFN exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

InitMethod = Literal["copy", "noise", "drop", "split"]
RouterInit = Literal["zeros", "normal", "hidden"]


@dataclass(frozen=True)
class InitSpec:
    method: InitMethod = "copy"
    noise_scale: float = 0.01
    drop_ratio: float = 0.5
    split_mode: Literal["random", "clustered"] = "random"
    seed: int = 0
    routed_scale: float = 1.0  # multiplies down (weight and bias): 0.5 when a gated shared expert takes half


def _gen(seed: int, site_index: int, expert: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + site_index) * 1009 + expert) * 31 + salt)


def _inter_slices(role: str, intermediate: int):
    """Views of a role's intermediate axis: list of (dim, start) for gate_up's two halves."""
    if role == "gate_up":
        return [(0, 0), (0, intermediate)]
    return [(1 if role == "down" else 0, 0)]


def split_partition(dense: dict[str, torch.Tensor], intermediate: int, n: int, spec: InitSpec,
                    site_index: int) -> list[torch.Tensor]:
    """Neuron indices of each fine-grained expert (equal sizes; `intermediate % n == 0`)."""
    if spec.split_mode == "random":
        order = torch.randperm(intermediate, generator=_gen(spec.seed, site_index, 0, salt=7))
    else:
        # clustered: neurons ordered along the first principal direction of their input weights,
        # so each expert gets neurons that respond to similar inputs.
        w = dense["gate_up"][:intermediate] if "gate_up" in dense else dense.get("gate", dense["up"])
        w = w.float()
        w = w - w.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(w, full_matrices=False)
        order = torch.argsort(w @ v[0], stable=True)
    size = intermediate // n
    return [order[i * size:(i + 1) * size].sort().values for i in range(n)]


def expert_tensors(dense: dict[str, torch.Tensor], expert: int, num_experts: int, intermediate: int,
                   spec: InitSpec, site_index: int, partition: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of expert `expert` (same keys as `dense`, same dtypes)."""
    out: dict[str, torch.Tensor] = {}
    if spec.method == "split":
        assert partition is not None
        idx = partition[expert]
        for key, t in dense.items():
            role = key.split(".")[0]
            if role == "down" and key == "down.bias":
                out[key] = (t.float() * spec.routed_scale).to(t.dtype)
                continue
            if role == "down":
                out[key] = (t.float().index_select(1, idx) * (num_experts * spec.routed_scale)).to(t.dtype)
            elif role == "gate_up":
                full = torch.cat([idx, idx + intermediate])
                out[key] = t.index_select(0, full).clone()
            else:
                out[key] = t.index_select(0, idx).clone()
        return out
    for key, t in dense.items():
        out[key] = t.clone()
    if spec.method == "noise":
        for key, t in out.items():
            if not key.endswith(".bias"):
                g = _gen(spec.seed, site_index, expert, salt=hash_role(key))
                noise = torch.randn(t.shape, generator=g) * (spec.noise_scale * t.float().std())
                out[key] = (t.float() + noise).to(t.dtype)
    elif spec.method == "drop":
        n_drop = int(round(spec.drop_ratio * intermediate))
        g = _gen(spec.seed, site_index, expert, salt=3)
        idx = torch.randperm(intermediate, generator=g)[:n_drop].sort().values
        for key, t in out.items():
            role = key.split(".")[0]
            gk = _gen(spec.seed, site_index, expert, salt=hash_role(key))
            for dim, start in _inter_slices(role, intermediate):
                if key.endswith(".bias") and role == "down":
                    continue  # down's bias lives on the output axis: untouched
                dim = 0 if key.endswith(".bias") else dim
                sel = idx + start
                src = t.float()
                mean, std = src.mean(), src.std() if src.numel() > 1 else torch.tensor(0.0)
                shape = list(t.shape)
                shape[dim] = len(sel)
                fresh = (torch.randn(shape, generator=gk) * std + mean).to(t.dtype)
                out[key] = out[key].index_copy(dim, sel, fresh)
    if spec.routed_scale != 1.0:
        for key in ("down", "down.bias"):
            if key in out:
                out[key] = (out[key].float() * spec.routed_scale).to(out[key].dtype)
    return out


def hash_role(key: str) -> int:
    # Stable across processes (Python's hash() is salted per process).
    return sum((i + 1) * ord(c) for i, c in enumerate(key)) % 10007


def router_weight(num_experts: int, hidden: int, init: RouterInit, std: float, seed: int,
                  site_index: int, centroids: torch.Tensor | None = None) -> torch.Tensor:
    """Router weight (E, H) in fp32."""
    if init == "zeros":
        return torch.zeros(num_experts, hidden)
    if init == "normal":
        return torch.randn(num_experts, hidden, generator=_gen(seed, site_index, 0, salt=11)) * std
    if centroids is None:
        raise ValueError("router_init='hidden' needs centroids from calibration data")
    return centroids.float().clone()


def kmeans_centroids(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> torch.Tensor:
    """k-means on rows of `x` (N, H) → (k, H) unit-norm centroids (cosine k-means: the router
    compares directions; scale is left to training)."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] < k:
        raise ValueError(f"need at least {k} calibration tokens, got {x.shape[0]}")
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (x @ c.T).argmax(-1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
        c = torch.nn.functional.normalize(c, dim=-1)
    return c
