"""`upcycle`: replace every selected dense FFN with an N-expert top-k `MoEBlock`.

Promise: with `expert_init="copy"` and renormalised routing (or `top_k == num_experts` … no:
renormalisation is what makes it exact) the upcycled model computes the same function as the
dense one, whatever the router init: checked on example inputs, max |Δ| reported. `split` with
`top_k == num_experts` and a zero router is exact too. `noise`, `drop` and `split` with fewer
active experts change the function on purpose; the measured deviation is reported instead.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from moeconv.context import Context
from moeconv.errors import ConfigError, UnsupportedError
from moeconv.expert_init import InitSpec, expert_tensors, kmeans_centroids, router_weight, split_partition
from moeconv.nn.moe import MoEBlock, RoutingConfig
from moeconv.pass_base import Contract, Pass, PassConfig, PassResult
from moeconv.report import PassReport
from moeconv.selectors import OptionalSelectors, Selectors
from moeconv.sites import build_expert, dense_tensors, replace_site, select_sites
from moeconv.state import ModelState, call_model


class UpcycleConfig(PassConfig):
    # 65,536: two orders of magnitude above any released MoE (512), and still a plan that fits memory
    num_experts: int = Field(8, ge=2, le=2**16, description="experts per MoE layer")
    top_k: int = Field(2, ge=1, description="experts each token is routed to")
    targets: OptionalSelectors = Field(None, description="FFN sites to convert (default: all): layers:4-27, every:2[+1], "
                                                        "re:REGEX, a module path (moeconv.selectors)")
    ignore: Selectors = Field(default_factory=list)
    router_init: Literal["zeros", "normal", "hidden"] = "zeros"
    router_std: float = Field(0.02, gt=0)
    router_bias: bool = False
    expert_init: Literal["copy", "noise", "drop", "split"] = "copy"
    noise_scale: float = Field(0.01, gt=0)
    drop_ratio: float = Field(0.5, gt=0, lt=1)
    split_mode: Literal["random", "clustered"] = "random"
    shared_experts: bool = Field(False, description="an always-on, sigmoid-gated shared expert; left unset, "
                                                   "the job sets it as the output family needs (`for_family`)")
    renormalize: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _combination(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        return self

    def for_family(self, needs_shared_expert: bool) -> "UpcycleConfig":
        """This config for an output family. `shared_experts` left unset follows the family: Qwen2-MoE
        always has a shared expert, so adding one (a copy of the FFN behind a closed gate, the routed
        experts scaled by 0.5) is the only exact way to write it. Set explicitly, it stays, and the
        writer refuses what the family cannot hold."""
        if "shared_experts" in self.model_fields_set or self.shared_experts == needs_shared_expert:
            return self
        return self.model_copy(update={"shared_experts": needs_shared_expert})

    def init_spec(self) -> InitSpec:
        return InitSpec(self.expert_init, self.noise_scale, self.drop_ratio, self.split_mode, self.seed,
                        routed_scale=0.5 if self.shared_experts else 1.0)

    def is_exact(self) -> bool:
        if self.expert_init == "copy":
            return self.renormalize or self.top_k == self.num_experts
        return self.expert_init == "split" and self.top_k == self.num_experts and self.router_init == "zeros"


class Upcycle(Pass):
    name = "upcycle"
    summary = "Turn each dense FFN into an N-expert top-k MoE initialised from it (exact with copy init)."
    Config = UpcycleConfig

    def contract(self) -> Contract:
        # The promise depends on the config: exact inits promise equality, others report. Every
        # FFN converted (no targets, nothing ignored) leaves no dense FFN: a second upcycle is
        # refused by the plan, before any work.
        every_ffn = not self.config.targets and not self.config.ignore
        return Contract(requires=frozenset({"dense-ffn", "float-weights"}), provides=frozenset({"moe"}),
                        invalidates=frozenset({"dense-ffn"} if every_ffn else ()),
                        output_tolerance=0.0 if self.config.is_exact() else None)

    def check(self, state: ModelState, ctx: Context) -> None:
        if self.config.router_init == "hidden" and ctx.calibration is None:
            raise ConfigError("upcycle: router_init='hidden' needs calibration data (--calib FILE)")
        self._check_memory(state)

    def _check_memory(self, state: ModelState) -> None:
        """The expert copies must fit in memory: refused before the first one is made."""
        from moeconv.io.config_checks import check_fits_memory
        cfg = self.config
        chosen = select_sites(state.ffn_sites(), cfg.targets, cfg.ignore)
        ffn_bytes = sum(t.numel() * t.element_size() for _, site in chosen
                        for t in dense_tensors(state.module, site).values())
        copies = (1 if cfg.expert_init == "split" else cfg.num_experts) + int(cfg.shared_experts)
        check_fits_memory("upcycle", ffn_bytes * copies,
                          f"{cfg.num_experts} experts for each of {len(chosen)} FFNs ({copies} FFN copies)")

    def run(self, state: ModelState, ctx: Context) -> PassResult:
        cfg = self.config
        model = state.module
        sites = state.ffn_sites()
        chosen = select_sites(sites, cfg.targets, cfg.ignore)
        if cfg.expert_init == "split":
            for _, s in chosen:
                if s.intermediate_size % cfg.num_experts:
                    raise ConfigError(f"upcycle: split needs num_experts to divide the intermediate size "
                                      f"({s.intermediate_size} at {s.path})")
        centroids = _hidden_centroids(model, [s for _, s in chosen], cfg, ctx) if cfg.router_init == "hidden" else {}
        params_before = state.parameter_count()
        spec = cfg.init_spec()
        rows = []
        for n_done, (index, site) in enumerate(chosen):
            ctx.report_progress("upcycle", n_done, len(chosen))
            dense = dense_tensors(model, site)
            partition = (split_partition(dense, site.intermediate_size, cfg.num_experts, spec, index)
                         if cfg.expert_init == "split" else None)
            experts = [build_expert(model, site, expert_tensors(dense, e, cfg.num_experts, site.intermediate_size,
                                                                spec, index, partition))
                       for e in range(cfg.num_experts)]
            shared = build_expert(model, site, {k: v.clone() for k, v in dense.items()}) if cfg.shared_experts else None
            block = MoEBlock(experts, site.hidden_size, RoutingConfig(cfg.top_k, cfg.renormalize),
                             router_bias=cfg.router_bias, shared_expert=shared, shared_expert_gate=cfg.shared_experts)
            ref = next(iter(dense.values()))
            block.to(ref.device)
            with torch.no_grad():
                block.router.weight.copy_(router_weight(cfg.num_experts, site.hidden_size, cfg.router_init,
                                                        cfg.router_std, cfg.seed, index, centroids.get(site.path)))
            block.source_site = site  # what the block replaced: writers and loaders rebuild from it
            replace_site(model, site, block)
            rows.append({"site": site.path, "kind": site.kind, "experts": cfg.num_experts, "top_k": cfg.top_k,
                         "expert_intermediate": site.intermediate_size // (cfg.num_experts if cfg.expert_init == "split" else 1)})
        ctx.report_progress("upcycle", len(chosen), len(chosen))
        state.artifacts["upcycle"] = cfg.model_dump()
        report = PassReport(
            self.name,
            summary=f"{len(chosen)} of {len(sites)} FFN sites → {cfg.num_experts} experts, top-{cfg.top_k} "
                    f"({cfg.expert_init} init, {cfg.router_init} router)",
            metrics={"sites_converted": len(chosen), "sites_found": len(sites),
                     "params_before": params_before, "params_after": state.parameter_count(),
                     "active_params_after": state.active_parameter_count(), "exact": cfg.is_exact()},
            tables={"sites": rows},
        )
        if not cfg.is_exact():
            report.warnings.append("this init changes the model on purpose; the measured deviation is reported")
        return PassResult(state, True, report)


def _hidden_centroids(model, sites, cfg: UpcycleConfig, ctx: Context) -> dict[str, torch.Tensor]:
    """Router rows from k-means of each FFN's inputs on calibration tokens (observe, then mutate:
    hooks are owned here and always removed)."""
    captured: dict[str, list[torch.Tensor]] = {s.path: [] for s in sites}
    handles = []
    for s in sites:
        def hook(_m, args, _out, path=s.path):
            captured[path].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        handles.append(model.get_submodule(s.path).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for batch in ctx.calibration.split(8):
                call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for s in sites:
        x = torch.cat(captured[s.path])
        try:
            out[s.path] = kmeans_centroids(x, cfg.num_experts, cfg.seed)
        except ValueError as exc:
            raise UnsupportedError(f"upcycle: router_init='hidden' at {s.path}: {exc}") from None
    return out
