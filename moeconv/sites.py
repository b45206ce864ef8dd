"""Reading an FFN site's weights, building modules in its place, and choosing sites by selector.

Keys of the tensor dicts follow `moeconv.expert_init`: `gate`, `up`, `down`, `gate_up` and
`ROLE.bias`, weights in (out, in) order whatever the module stores (GPT-2's Conv1D is (in, out)).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from moeconv.errors import ConfigError
from moeconv.nn.experts import FunctionalAct, SplitFfn
from moeconv.nn.linear_like import is_conv1d, weight_out_in
from moeconv.patterns import FfnSite
from moeconv.selectors import FFN_SITE_GROUP, Selection, absent_note


def role_paths(site: FfnSite) -> dict[str, str]:
    """Role → full module path of the projection."""
    roles = {"down": site.down}
    if site.kind == "fused_gated":
        roles["gate_up"] = site.up
    else:
        roles["up"] = site.up
        if site.gate:
            roles["gate"] = site.gate
    return roles


def dense_tensors(model: nn.Module, site: FfnSite) -> dict[str, torch.Tensor]:
    out = {}
    for role, path in role_paths(site).items():
        m = model.get_submodule(path)
        out[role] = weight_out_in(m).detach()
        if getattr(m, "bias", None) is not None:
            out[f"{role}.bias"] = m.bias.detach()
    return out


def _projection_like(src: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module of `src`'s kind (Linear or Conv1D) holding `weight` (out, in) and `bias`."""
    new = copy.copy(src)  # same class and attributes; parameters replaced below
    # A shallow copy would share src's hook and buffer registries: a hook registered on one expert's
    # projection would then fire for every copy (and the dense source). Give the copy its own.
    for key, val in src.__dict__.items():
        if isinstance(val, (dict, set, list)):
            new.__dict__[key] = copy.copy(val)
    new._parameters = dict(src._parameters)
    w = weight.t().contiguous() if is_conv1d(src) else weight.contiguous()
    new.weight = nn.Parameter(w, requires_grad=src.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=src.bias.requires_grad)
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = weight.shape
    if is_conv1d(new):
        new.nf = weight.shape[0]
        if hasattr(new, "nx"):
            new.nx = weight.shape[1]
    return new


def build_expert(model: nn.Module, site: FfnSite, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """An expert module holding `tensors`: a copy of the source FFN class (or `SplitFfn`)."""
    paths = role_paths(site)
    if site.kind == "split":
        act = copy.deepcopy(model.get_submodule(site.act_path)) if site.act_path else FunctionalAct(site.activation)
        up = _projection_like(model.get_submodule(paths["up"]), tensors["up"], tensors.get("up.bias"))
        down = _projection_like(model.get_submodule(paths["down"]), tensors["down"], tensors.get("down.bias"))
        return SplitFfn(up, act, down)
    src = model.get_submodule(site.path)
    # Deep-copy the FFN without its projections (they are rebuilt from `tensors`).
    memo = {id(model.get_submodule(p)): None for p in paths.values()}
    expert = copy.deepcopy(src, memo)
    for role, path in paths.items():
        rel = path[len(site.path) + 1:]
        proj = _projection_like(model.get_submodule(path), tensors[role], tensors.get(f"{role}.bias"))
        parent_path, _, leaf = rel.rpartition(".")
        (expert.get_submodule(parent_path) if parent_path else expert)._modules[leaf] = proj
    return expert


def replace_site(model: nn.Module, site: FfnSite, block: nn.Module) -> None:
    model.set_submodule(site.path, block)
    if site.kind == "split":
        model.set_submodule(site.down, nn.Identity())


# ----------------------------------------------------------------------------- selection


def select_sites(sites: list[FfnSite], targets: list[str] | None, ignore: list[str]) -> list[tuple[int, FfnSite]]:
    """(site index, site) of the sites `targets` minus `ignore` select (`moeconv.selectors`: a
    site is a candidate at its path, in its path's layer, in group `mlp`). The index is the site's
    position among *all* sites (the layer number in decoder stacks), and seeds per-site randomness."""
    selection = Selection.of(targets, ignore)
    chosen = [(i, s) for i, s in enumerate(sites) if selection.selects(s.path, FFN_SITE_GROUP)]
    if not chosen and not sites:  # e.g. a second upcycle: the first left no dense FFN
        raise ConfigError("no FFN site selected: the model has no dense FFN left (already MoE?)")
    if not chosen:
        raise ConfigError(f"no FFN site selected (found {len(sites)}: {', '.join(s.path for s in sites[:3])}"
                          f"{', …' if len(sites) > 3 else ''}); check targets/ignore"
                          + absent_note(selection, [FFN_SITE_GROUP], "FFN site"))
    return chosen


def expert_rel_names(site: FfnSite) -> dict[str, str]:
    """Role → path of the projection inside one expert module."""
    if site.kind == "split":
        return {"up": "up", "down": "down"}
    rel = site.members()
    if site.kind == "fused_gated":
        return {"gate_up": rel["up"], "down": rel["down"]}
    return rel
