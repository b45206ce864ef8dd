"""The streaming route of `moeconv upcycle`: every output tensor planned from the source's
safetensors headers, then produced one at a time (a `LocatedSource` for the sharded writer).

Peak memory is about one FFN of the source plus one output tensor, whatever the model or shard
size: source tensors are read lazily (`SourceCheckpoint.mapped`: each mapped from its shard, not
copied), one FFN site's dense weights are cached while its experts are produced, and each
expert's tensors are made together (the same numbers the in-memory route makes, from
`moeconv.expert_init`, for the same seed). An exact expert copy is the dense weight itself, not a
clone, and its bytes are where the source has them (`locate`): the writer copies them file to
file (`moeconv.formats.stream_writer`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from moeconv.errors import InputError, VerificationError
from moeconv.expert_init import expert_tensors, router_weight, split_partition
from moeconv.formats.hf_moe import MoeFormat, rename
from moeconv.formats.stream_writer import LocatedSource
from moeconv.io.load import all_finite, refuse_nonfinite
from moeconv.io.safetensors_io import SourceCheckpoint, TensorSpec
from moeconv.sites import expert_rel_names, role_paths
from moeconv.stream.skeleton import tied_parameter_names


@dataclass
class Accounting:
    """Every source tensor is copied, transformed into experts, or dropped with a reason."""

    copied: int = 0
    transformed: int = 0
    dropped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"copied": self.copied, "transformed": self.transformed, "dropped": list(self.dropped)}


def streaming_source(ckpt: SourceCheckpoint, meta_model, chosen, cfg, family: MoeFormat, dtype):
    """(LocatedSource, accounting dict): every output tensor planned from the checkpoint headers,
    each produced on demand. `cfg` is the `UpcycleConfig`; `chosen` the (index, site) to convert."""
    check_against_skeleton(ckpt, meta_model)
    plan = _Plan(ckpt, meta_model, chosen, cfg, family, dtype)
    plan.build()
    producer = _Producer(ckpt, cfg, plan.plan)
    notes = [f"dropped {d}" for d in plan.accounting.dropped]
    return LocatedSource(plan.specs, producer.produce, notes, producer.locate), plan.accounting.to_dict()


def check_against_skeleton(ckpt: SourceCheckpoint, meta_model) -> None:
    """Before any byte is written: shapes and dtypes against the architecture, nothing missing."""
    meta_sd = meta_model.state_dict()
    for name, spec in ckpt.specs.items():
        if name in meta_sd and tuple(meta_sd[name].shape) != spec.shape:
            raise InputError(f"{ckpt.path}: tensor {name} has shape {list(spec.shape)}, the config implies "
                             f"{list(meta_sd[name].shape)}")
        if name in meta_sd and meta_sd[name].is_floating_point() and not spec.dtype.is_floating_point:
            raise InputError(f"{ckpt.path}: tensor {name} is {spec.dtype}, expected a floating-point weight")
    tied = tied_parameter_names(meta_model)
    params = dict(meta_model.named_parameters())
    missing = [n for n in meta_sd if n not in ckpt.specs and n not in tied and n in params]
    if missing:
        raise InputError(f"{ckpt.path}: {len(missing)} weights missing from the checkpoint (e.g. {sorted(missing)[0]})")


class _Plan:
    """Output specs in order, and for each output name how to produce it."""

    def __init__(self, ckpt: SourceCheckpoint, meta_model, chosen, cfg, family: MoeFormat, dtype):
        self.ckpt, self.meta_model, self.chosen, self.cfg, self.family, self.dtype = (
            ckpt, meta_model, chosen, cfg, family, dtype)
        self.specs: list[TensorSpec] = []
        self.plan: dict[str, tuple] = {}
        self.accounting = Accounting()
        self.roles = expert_rel_names(chosen[0][1])
        self.site_paths = [s.path for _, s in chosen]

    def _out_dtype(self, src_dtype: torch.dtype) -> torch.dtype:
        return self.dtype if (self.dtype is not None and src_dtype.is_floating_point) else src_dtype

    def build(self) -> None:
        site_of = {f"{path}.{suffix}": (index, site) for index, site in self.chosen
                   for path in role_paths(site).values() for suffix in ("weight", "bias")}
        expected = set(self.meta_model.state_dict().keys())
        ignorable = list(getattr(self.meta_model, "_keys_to_ignore_on_load_unexpected", None) or [])
        emitted: set[str] = set()
        for name in self.ckpt.names():
            if name in site_of:
                self.accounting.transformed += 1
                index, site = site_of[name]
                if site.path not in emitted:
                    emitted.add(site.path)
                    self._add_site(index, site)
            elif name not in expected:
                self._drop(name, ignorable)
            else:
                self.accounting.copied += 1
                spec = self.ckpt.specs[name]
                self._add(name, self._out_dtype(spec.dtype), spec.shape, ("copy", name))

    def _drop(self, name: str, ignorable: list[str]) -> None:
        # One rule with the in-memory loaders (transformers' own): names the class declares
        # ignorable are dropped and reported; any other stray tensor is refused, never lost.
        cls = type(self.meta_model).__name__
        if not any(re.search(p, name) for p in ignorable):
            raise InputError(f"{self.ckpt.path}: weights do not match the config: tensor {name} is not a parameter "
                             f"or buffer of {cls}")
        self.accounting.dropped.append(f"{name} (ignored on load by {cls})")

    def _add(self, name: str, dtype: torch.dtype, shape, how: tuple) -> None:
        self.specs.append(TensorSpec(name, dtype, tuple(shape)))
        self.plan[name] = how

    def _add_site(self, index: int, site) -> None:
        cfg = self.cfg
        dense_specs = {role: self.ckpt.specs[f"{p}.weight"] for role, p in role_paths(site).items()}
        tgt_dtype = self._out_dtype(dense_specs["down"].dtype)
        e_inter = site.intermediate_size // cfg.num_experts if cfg.expert_init == "split" else site.intermediate_size
        local = [("router.weight", (cfg.num_experts, site.hidden_size), ("router", index, site))]
        for e in range(cfg.num_experts):
            for role, rel in self.roles.items():
                shape = list(dense_specs[role].shape)
                shape[1 if role == "down" else 0] = e_inter
                local.append((f"experts.{e}.{rel}.weight", tuple(shape), ("expert", index, site, e, role)))
        if cfg.shared_experts:
            for role, rel in self.roles.items():
                local.append((f"shared_expert.{rel}.weight", dense_specs[role].shape, ("shared", index, site, role)))
            local.append(("shared_expert_gate.weight", (1, site.hidden_size), ("shared_gate", index, site)))
        for rel_name, shape, how in local:
            self._add(rename(self.family, self.site_paths, self.roles, f"{site.path}.{rel_name}"), tgt_dtype, shape, how)


class _Producer:
    """Makes each planned tensor; caches one site's dense weights and one expert's tensors."""

    def __init__(self, ckpt: SourceCheckpoint, cfg, plan: dict[str, tuple]):
        self.ckpt, self.cfg, self.plan = ckpt, cfg, plan
        self.init_spec = cfg.init_spec()
        # copy init, unscaled: `expert_tensors` would return clones of the dense weights
        self.exact_copies = self.init_spec.method == "copy" and self.init_spec.routed_scale == 1.0
        self.site = None
        self.dense: dict[str, torch.Tensor] = {}
        self.finite: dict[int, bool] = {}  # id of a dense tensor (held in `dense`) → all finite
        self.partition = None
        self.expert: tuple = (None, None)

    def _read_dense(self, name: str) -> torch.Tensor:
        t = self.ckpt.mapped(name)
        finite = not t.is_floating_point() or all_finite(t)
        if not finite:
            refuse_nonfinite(self.ckpt.path, name, t)  # raises unless --allow-nonfinite
        self.finite[id(t)] = finite
        return t

    def _dense_for(self, index: int, site) -> dict[str, torch.Tensor]:
        if self.site != site.path:
            self.site = site.path
            self.dense, self.finite = {}, {}
            for role, p in role_paths(site).items():
                self.dense[role] = self._read_dense(f"{p}.weight")
                if f"{p}.bias" in self.ckpt.specs:
                    self.dense[f"{role}.bias"] = self._read_dense(f"{p}.bias")
            self.partition = (split_partition(self.dense, site.intermediate_size, self.cfg.num_experts,
                                              self.init_spec, index) if self.cfg.expert_init == "split" else None)
            self.expert = (None, None)
        return self.dense

    def _make(self, how: tuple) -> torch.Tensor:
        cfg = self.cfg
        if how[0] == "copy":
            return refuse_nonfinite(self.ckpt.path, how[1], self.ckpt.mapped(how[1]))
        if how[0] == "router":
            _, index, site = how
            return router_weight(cfg.num_experts, site.hidden_size, cfg.router_init, cfg.router_std, cfg.seed, index)
        if how[0] == "expert":
            _, index, site, e, role = how
            dense = self._dense_for(index, site)
            if self.exact_copies:
                return dense[role]
            if self.expert[0] != (site.path, e):
                self.expert = ((site.path, e), expert_tensors(dense, e, cfg.num_experts, site.intermediate_size,
                                                              self.init_spec, index, self.partition))
            return self.expert[1][role]
        if how[0] == "shared":
            _, index, site, role = how
            return self._dense_for(index, site)[role]
        return torch.zeros(1, how[2].hidden_size)  # the shared expert's gate: closed (exact)

    def locate(self, s: TensorSpec) -> tuple | None:
        """(source file, byte offset) of output tensor `s` when its bytes are a source tensor's
        verbatim (a copied tensor, an exact expert copy, a shared expert, in the source's dtype);
        None otherwise."""
        how = self.plan[s.name]
        if how[0] == "copy":
            name = how[1]
        elif how[0] == "shared" or (how[0] == "expert" and self.exact_copies):
            name = f"{role_paths(how[2])[how[-1]]}.weight"
        else:
            return None
        spec = self.ckpt.specs[name]
        return self.ckpt.location(name) if (spec.dtype, spec.shape) == (s.dtype, s.shape) else None

    def produce(self, s: TensorSpec) -> torch.Tensor:
        how = self.plan[s.name]
        t = self._make(how).to(s.dtype)  # the made tensor itself when the dtype is already right
        finite = self.finite.get(id(t))  # a dense tensor written as it is: checked once, when read
        if how[0] != "copy" and t.is_floating_point() and not (finite if finite is not None else all_finite(t)):
            # finite source weights made non-finite (noise of absurd scale, or overflow in the
            # output dtype): never written, whatever --verify says
            raise VerificationError(f"upcycling produced NaN/Inf in {s.name} ({s.dtype}); nothing was written")
        return t
