"""`sparsify`: prune the weights inside each expert to an N:M pattern (2:4 by default) or to an
unstructured ratio, by magnitude, Wanda or SparseGPT, with routing-aware calibration.

Promises:
- Every pruned matrix satisfies the pattern exactly (N:M: at most N non-zeros in every group of
  M consecutive input weights; unstructured: at least ⌊ratio·in⌋ zeros per row), checked on the
  stored weights after pruning; pruned weights are exact zeros and the values stay finite.
- Only the selected matrices change (`targets` minus `ignore`, the grammar of `moeconv.selectors`;
  default `experts`: the routed and shared experts of every MoE layer). Routers are never pruned;
  attention, embeddings, norms and dense FFNs are untouched unless selected; this is checked (no
  other parameter is written to) and reported.
- Calibration is layer by layer (one decoder layer's activations in memory). Each expert's
  statistics come from the tokens its router sends it (`MoEBlock` calls an expert only on its
  routed tokens, so a hook on its projections sees exactly those). An expert below
  `min_coverage` (fraction of the layer's tokens) falls back to statistics from *all* tokens of
  that layer (`fallback="all-tokens"`) or to magnitude (`fallback="magnitude"`) — never to empty
  statistics — and is named in the report.
- The function changes on purpose (`output_tolerance = None`): the measured change is reported
  (per-matrix reconstruction error on its calibration inputs, per-layer relative change of the
  layer's residual update, and the pipeline's logits check).
- On CPU, 2:4 saves storage, not time; the report says so.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from moeconv.calibrate import decoder_layers, expert_coverage, observe_inputs, observe_outputs, run_layerwise
from moeconv.context import Context
from moeconv.errors import ConfigError, InputError, VerificationError
from moeconv.formats.compressed import compressed_nbytes
from moeconv.module_groups import module_groups
from moeconv.nn.linear_like import is_conv1d, is_linear_like, weight_out_in
from moeconv.nn.moe import MoEBlock
from moeconv.pass_base import Contract, LayerJob, Pass, PassConfig, PassResult
from moeconv.report import PassReport
from moeconv.selectors import Selection, Selectors, absent_note
from moeconv.sparse_cuda import speed_note
from moeconv.sparsity import SparsityPattern, check_pattern, zero_count
from moeconv.stream.allocator import release_freed
from moeconv.state import ModelState
from moeconv.hessian import InputStats
from moeconv.stream.activations import HiddenStates
from passes.sparsify_methods import magnitude, reconstruction_error, sparsegpt, wanda

MAX_BATCH_BYTES = 256 * 2**20  # one batched SparseGPT solve holds at most this much weight


class SparsifyConfig(PassConfig):
    pattern: str = Field("2:4", description="N:M (keep N of every M along the input dim) or 'unstructured'")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction pruned per row, for 'unstructured' (0.5)")
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    targets: Selectors = Field(default_factory=lambda: ["experts"],
                               description="matrices to prune: a group (experts, attention, dense-ffn, …), "
                                           "layers:0-3, every:2, re:REGEX, a module path (moeconv.selectors)")
    ignore: Selectors = Field(default_factory=list)
    dampening: float = Field(0.01, gt=0, description="SparseGPT: λ = dampening · mean(diag H)")
    block_size: int = Field(128, ge=1, description="SparseGPT: columns per lazy-update block")
    min_coverage: float = Field(0.01, ge=0, le=1, description="experts seeing fewer than this fraction "
                                "of the layer's tokens use the fallback statistics")
    fallback: Literal["all-tokens", "magnitude"] = "all-tokens"
    batch_size: int = Field(8, ge=1, description="calibration samples per forward")

    @model_validator(mode="after")
    def _combination(self):
        pat = self.sparsity_pattern()  # raises ValueError with the reason
        if pat.is_nm and self.block_size % pat.m and "block_size" in self.model_fields_set:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of M ({pat.m})")
        if not self.targets:
            raise ValueError("targets is empty")
        return self

    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern, self.ratio)

    def effective_block_size(self) -> int:
        """`block_size`, or the default rounded up to a multiple of M (e.g. 130 for 2:5)."""
        pat = self.sparsity_pattern()
        return self.block_size if not pat.is_nm else -(-self.block_size // pat.m) * pat.m


class Sparsify(Pass):
    name = "sparsify"
    summary = "Prune expert weights to N:M (2:4) or unstructured sparsity: magnitude, Wanda or SparseGPT."
    Config = SparsifyConfig

    def contract(self) -> Contract:
        # No `sparse` fact: it is not derivable from the module (zeros are weights like any
        # other), and no pass needs it; the pattern is checked by `verify` instead.
        req = {"float-weights"}
        if self.config.method != "magnitude":
            req.add("calibration")
        if self.config.targets == ["experts"]:
            req.add("moe")
        return Contract(requires=frozenset(req))

    def check(self, state: ModelState, ctx: Context) -> None:
        calib = ctx.calibration
        if calib is not None:
            emb = state.module.get_input_embeddings() if hasattr(state.module, "get_input_embeddings") else None
            vocab = getattr(emb, "num_embeddings", None)
            if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32) or calib.numel() == 0:
                raise InputError("sparsify: calibration must be a non-empty (samples, seq) tensor of token ids")
            if vocab is not None and (int(calib.max()) >= vocab or int(calib.min()) < 0):
                raise InputError(f"sparsify: calibration token ids outside the vocabulary (0..{vocab - 1})")

    def run(self, state: ModelState, ctx: Context) -> PassResult:
        job = self._job(state, ctx)
        model = state.module
        # Cheap proof that nothing else is written: every other parameter keeps its version counter.
        target_ids = {id(t.weight) for t in job.targets.values()}
        untouched = {id(p): p._version for p in model.parameters() if id(p) not in target_ids}
        if ctx.calibration is None:
            job.prune_without_data()
        else:
            job.prune_layerwise()
        changed = [n for n, p in model.named_parameters() if id(p) in untouched and p._version != untouched[id(p)]]
        if changed:
            raise VerificationError(f"sparsify wrote to parameters it must not touch: {changed[:3]}")
        return job.finish()

    def layer_job(self, state: ModelState, ctx: Context) -> LayerJob | None:
        if ctx.calibration is None and self.config.method != "magnitude":
            return None
        job = self._job(state, ctx)
        job.refuse_outside("a layer-by-layer sweep prunes inside the decoder layers")
        return job

    def _job(self, state: ModelState, ctx: Context) -> _Job:
        """The run's matrices chosen and checked against the pattern (no weight is read)."""
        from moeconv.nn.native_moe import linearise_native_moe
        cfg, pat = self.config, self.config.sparsity_pattern()
        linearise_native_moe(state.module)  # fused HF experts → per-expert nn.Linear (exact); no-op when done
        targets = select_targets(state, cfg.targets, cfg.ignore)
        for name, m in targets.items():
            cols = weight_out_in(m).shape[1]
            if pat.is_nm and cols % pat.m:
                raise ConfigError(f"sparsify: {name} has {cols} inputs, not a multiple of {pat.m}; "
                                  f"leave it out with ignore")
        return _Job(cfg, pat, state, targets, ctx, self.name)

    def verify(self, result: PassResult, ctx: Context) -> None:
        pat = self.config.sparsity_pattern()
        for name in result.state.artifacts["sparsify"]["matrices"]:
            check_pattern(weight_out_in(result.state.module.get_submodule(name)).detach(), pat, name)


# ---- which matrices ------------------------------------------------------------------------------

def _router_like(model: nn.Module) -> set[int]:
    out = set()
    for m in model.modules():
        if isinstance(m, MoEBlock):
            out.add(id(m.router))
            if m.shared_expert_gate is not None:
                out.add(id(m.shared_expert_gate))
    return out


def select_targets(state: ModelState, targets: list[str], ignore: list[str]) -> dict[str, nn.Module]:
    """Linear-like modules chosen by `targets` minus `ignore` (`moeconv.selectors`, each in its
    `module_groups` group), in module order. Routers and any weight shared with an embedding (tied
    `lm_head`) are never candidates. ConfigError when nothing is chosen."""
    model = state.module
    routers = _router_like(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears = {n: m for n, m in model.named_modules()
               if is_linear_like(m) and id(m) not in routers and id(m.weight) not in embeddings}
    groups = module_groups(state)
    selection = Selection.of(targets, ignore)
    chosen = {n: m for n, m in linears.items() if selection.selects(n, groups.get(n))}
    if not chosen:
        raise ConfigError(f"sparsify: no matrix matches targets {targets}" + (f" minus ignore {ignore}" if ignore else "")
                          + _candidates_note(selection, linears, groups))
    return chosen


def _candidates_note(selection: Selection, linears: dict[str, nn.Module], groups: dict[str, str]) -> str:
    """' (found N candidate matrices in groups …: a, b, …)': what the selectors could have chosen."""
    if not linears:
        return " (the model has no candidate matrix)"
    present = sorted({groups.get(n, "other") for n in linears})
    names = ", ".join(list(linears)[:2]) + (", …" if len(linears) > 2 else "")
    return (f" (found {len(linears)} candidate matrices in groups {', '.join(present)}: {names})"
            + absent_note(selection, present, "candidate matrix"))


# ---- the work ------------------------------------------------------------------------------------

def _set_weight(m: nn.Module, w_out_in: torch.Tensor) -> None:
    with torch.no_grad():
        w = w_out_in.t() if is_conv1d(m) else w_out_in
        m.weight.copy_(w.to(m.weight.dtype))


@dataclass
class _Observed:
    """What one forward of a decoder layer showed (`_Job._observe`)."""
    stats: InputStats
    block_inputs: dict[str, HiddenStates] | None  # MoE block → its input rows (`Context.hidden_store`)
    outputs: HiddenStates = field(default_factory=HiddenStates)  # the layer's outputs, before pruning
    resid: float = 0.0  # Σ ‖layer output − layer input‖²: the scale of the layer's update
    counts: dict[str, dict[int, int]] = field(default_factory=dict)  # MoE block → expert → tokens routed to it


@dataclass
class _Pending:
    """A layer pruned by `_Job.on_layer` whose output change `_Job.after_layer` still has to
    measure, once the pruned layer has run again."""
    index: int
    path: str
    outputs: list[torch.Tensor]  # the unpruned layer's outputs
    resid: float
    matrices: int
    fallback: list[str]  # experts of this layer that fell back
    t0: float
    t_end: float  # when pruning ended: the re-run of the layer is timed from here
    phases: dict[str, float]  # observe_s, fallback_s, prune_s


class _Job(LayerJob):
    """One run of the pass: the per-matrix rows and per-layer rows it measured."""

    def __init__(self, cfg: SparsifyConfig, pat: SparsityPattern, state: ModelState,
                 targets: dict[str, nn.Module], ctx: Context, pass_name: str):
        self.cfg, self.pat, self.state, self.targets, self.ctx = cfg, pat, state, targets, ctx
        self.model, self.pass_name, self.batch_size = state.module, pass_name, cfg.batch_size
        self.tokens = 0 if ctx.calibration is None else int(ctx.calibration.numel())
        self.bytes: dict[str, tuple[int, int]] = {}  # matrix → (dense, compressed) bytes as pruned
        self.matrices: dict[str, dict] = {}
        self.layers: list[dict] = []
        self.experts: list[dict] = []
        self.fallback: list[str] = []
        self._expert_info: dict[tuple[str, int], tuple[int, int, bool]] = {}
        self._pending: _Pending | None = None

    # -- without data: magnitude only
    def prune_without_data(self) -> None:
        for i, (name, m) in enumerate(self.targets.items()):
            self.ctx.report_progress("sparsify", i, len(self.targets))
            self._apply(name, m, magnitude(weight_out_in(m).detach().float(), self.pat), None, "none")
        self.ctx.report_progress("sparsify", len(self.targets), len(self.targets))
        for bpath, block in self._blocks(self.targets):
            for e in range(block.num_experts):
                self._expert_row(None, bpath, block, e, None, 0, False)

    # -- layer by layer, routing-aware
    def prune_layerwise(self) -> None:
        outside = self._outside()
        if outside and self.cfg.method != "magnitude":
            self.refuse_outside(f"{self.cfg.method} calibrates layer by layer (use method magnitude for it, "
                                "or leave it out with ignore)")
        for name in outside:
            self._apply(name, self.targets[name], magnitude(weight_out_in(self.targets[name]).detach().float(), self.pat),
                        None, "none")
        device = next(self.model.parameters()).device
        batches = [b.to(device) for b in self.ctx.calibration.split(self.cfg.batch_size)]
        run_layerwise(self.model, batches, self.on_layer, after_layer=self.after_layer,
                      progress=lambda task, done, total: self.ctx.report_progress("sparsify layers", done, total))

    def _outside(self) -> list[str]:
        prefix, _ = decoder_layers(self.model)
        return [n for n in self.targets if not n.startswith(f"{prefix}.")]

    def refuse_outside(self, why: str) -> None:
        """ConfigError when a selected matrix lies outside the decoder layers."""
        outside = self._outside()
        if outside:
            raise ConfigError(f"sparsify: {outside[0]} is outside the decoder layers; {why}")

    def finish(self) -> PassResult:
        self.state.artifacts["sparsify"] = {"pattern": self.pat.label, "method": self.cfg.method,
                                            "matrices": list(self.targets)}
        return PassResult(self.state, True, self.report(self.pass_name, self.state))

    def part_checks(self, path: str | None, module: nn.Module) -> None:
        """The pattern of every pruned matrix in the part, on its final weights."""
        for name in self.targets:
            if path is not None and name.startswith(path + "."):
                check_pattern(weight_out_in(module.get_submodule(name[len(path) + 1:])).detach(), self.pat, name)

    def on_layer(self, index: int, path: str, layer: nn.Module, forward) -> None:
        """Calibrate and prune the targets inside decoder layer `index`; `after_layer` then
        measures the change of its output."""
        t0 = time.perf_counter()
        mine = self._resolve(path, layer)
        if not mine:
            return
        blocks = self._blocks(mine)
        if self.ctx.calibration is None:  # magnitude without data (a data-free sweep): what `prune_without_data` does
            for name, m in mine.items():
                self._apply(name, m, magnitude(weight_out_in(m).detach().float(), self.pat), None, "none")
            for bpath, block in blocks:
                for e in range(block.num_experts):
                    self._expert_row(None, bpath, block, e, None, 0, False)
            return
        seen = self._observe(layer, mine, blocks, forward)
        t_observe = time.perf_counter()
        source, layer_fallback = self._routing_aware(mine, blocks, seen)
        for kept in seen.block_inputs.values():  # every routed token of the layer: free it before pruning
            kept.release()
        seen.block_inputs = None
        t_stats = time.perf_counter()
        self._prune(mine, seen.stats, source)
        t_prune = time.perf_counter()
        self._pending = _Pending(index=index, path=path, outputs=seen.outputs, resid=seen.resid, t0=t0,
                                 matrices=len(mine), fallback=layer_fallback, t_end=t_prune,
                                 phases={"observe_s": t_observe - t0, "fallback_s": t_stats - t_observe,
                                         "prune_s": t_prune - t_stats})
        for bpath, block in blocks:
            for e in range(block.num_experts):
                info = self._expert_info.get((bpath, e))
                if info is not None:
                    self._expert_row(index, bpath, block, e, *info)

    def _resolve(self, path: str, layer: nn.Module) -> dict[str, nn.Module]:
        """The targets inside layer `path`, looked up by name in the layer as it is now: a pass
        before this one in the same sweep may have removed or replaced modules (prune-experts
        renumbers the kept experts); a name that no longer exists is no longer a target."""
        mine = {}
        for name in [n for n in self.targets if n.startswith(path + ".")]:
            try:
                mine[name] = layer.get_submodule(name[len(path) + 1:])
            except AttributeError:
                del self.targets[name]
                continue
            self.targets[name] = mine[name]
        return mine

    def _observe(self, layer: nn.Module, mine: dict[str, nn.Module], blocks, forward) -> _Observed:
        """One forward of the layer: the targets' input statistics, each MoE block's inputs and
        expert token counts, the layer's outputs and the energy of its residual update."""
        seen = _Observed(InputStats(), {p: self.ctx.hidden_store() for p, _ in blocks}, self.ctx.hidden_store())

        def keep_block_input(name, x):
            seen.block_inputs[name].append(x.clone())

        def layer_hook(_m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            seen.outputs.append(y)
            seen.resid += float((y.float() - x.float()).pow(2).sum())

        with ExitStack() as stack:
            stack.enter_context(observe_inputs(mine, seen.stats.add))
            stack.enter_context(observe_outputs(mine, self._energy_hook(seen.stats, mine)))
            stack.enter_context(observe_inputs(dict(blocks), keep_block_input))
            seen.counts = {p: stack.enter_context(expert_coverage(b)) for p, b in blocks}
            handle = layer.register_forward_hook(layer_hook, with_kwargs=True)
            stack.callback(handle.remove)
            forward()
        seen.stats.release()
        return seen

    def _routing_aware(self, mine: dict[str, nn.Module], blocks, seen: _Observed) -> tuple[dict[str, str], list[str]]:
        """Where each matrix's statistics come from (matrix → label), and the experts of this
        layer that fell back: under-covered experts never keep empty statistics."""
        source = {n: "all tokens" for n in mine}
        layer_fallback = []
        for bpath, block in blocks:
            inputs = seen.block_inputs[bpath]
            total = sum(inputs.shape(i)[0] for i in range(len(inputs)))  # spilled batches are not read
            need = max(1, math.ceil(self.cfg.min_coverage * total))
            for e, expert in enumerate(block.experts):
                names = self._expert_names(bpath, e, mine)
                if not names:
                    continue
                covered = seen.counts[bpath][e]
                fell_back = covered < need
                for n in names:
                    source[n] = "routed"
                if fell_back:
                    label = f"{bpath}.experts.{e}"
                    layer_fallback.append(label)
                    self.fallback.append(f"{label} received {covered} of {total} calibration tokens (< {need}): "
                                         + ("pruned with statistics from all tokens of the layer"
                                            if self.cfg.fallback == "all-tokens" else "pruned by magnitude"))
                    self._fall_back(expert, {n: mine[n] for n in names}, seen.stats, inputs, source)
                self._expert_info[(bpath, e)] = (covered, total, fell_back)
        return source, layer_fallback

    def _fall_back(self, expert: nn.Module, again: dict[str, nn.Module], stats: InputStats,
                   inputs: list[torch.Tensor], source: dict[str, str]) -> None:
        """Replace the routed statistics of one under-covered expert's matrices (`again`): with
        statistics from all of the block's inputs, or none (pruned by magnitude)."""
        stats.drop(list(again))
        for n in again:
            source[n] = "all tokens (fallback)" if self.cfg.fallback == "all-tokens" else "magnitude (fallback)"
        if self.cfg.fallback == "all-tokens":
            with observe_inputs(again, stats.add), observe_outputs(again, self._energy_hook(stats, again)), \
                    torch.inference_mode():
                for x in inputs:
                    expert(x)
            stats.release()

    @staticmethod
    def _energy_hook(stats: InputStats, modules: dict[str, nn.Module]):
        return lambda name, y: stats.add_output(name, y, getattr(modules[name], "bias", None))

    def after_layer(self, index: int, path: str, layer: nn.Module, new_outputs: list[torch.Tensor]) -> None:
        p = self._pending
        if p is None or p.index != index:
            return
        diff = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(new_outputs, p.outputs))
        self.layers.append({"layer": index, "path": path, "matrices": p.matrices,
                            "layer_rel_error": math.sqrt(diff / p.resid) if p.resid > 0 else None,
                            "fallback_experts": len(p.fallback),
                            "seconds": round(time.perf_counter() - p.t0, 3),
                            **{k: round(v, 3) for k, v in p.phases.items()},
                            "next_inputs_s": round(time.perf_counter() - p.t_end, 3)})
        p.outputs.release()
        self._pending = None

    def _prune(self, mine: dict[str, nn.Module], stats: InputStats, source: dict[str, str]) -> None:
        method = self.cfg.method
        pending_gpt = []
        for name, m in mine.items():
            w = weight_out_in(m).detach().float()
            h = stats.hessian.get(name)
            den = stats.energy.get(name)
            if h is None or method == "magnitude" or source[name].startswith("magnitude"):
                self._apply(name, m, magnitude(w, self.pat), h, source[name], error_den=den)
            elif method == "wanda":
                self._apply(name, m, wanda(w, h, self.pat), h, source[name], error_den=den)
            else:
                pending_gpt.append(name)
        if pending_gpt:
            self._sparsegpt(pending_gpt, mine, stats, source)

    def _sparsegpt(self, names: list[str], mine: dict[str, nn.Module], stats: InputStats, source: dict[str, str]) -> None:
        # Matrices with the same input (gate+up, q/k/v) share H: stack their rows into one unit.
        units: list[dict] = []
        for name in names:
            h = stats.hessian[name]
            parent = name.rsplit(".", 1)[0]
            for u in units:
                if u["parent"] == parent and u["h"].shape == h.shape and torch.equal(u["h"], h):
                    u["names"].append(name)
                    break
            else:
                units.append({"parent": parent, "h": h, "names": [name]})
        by_shape: dict[tuple, list[dict]] = {}
        for u in units:
            u["w"] = torch.cat([weight_out_in(mine[n]).detach().float() for n in u["names"]])
            by_shape.setdefault(tuple(u["w"].shape), []).append(u)
        for (rows, cols), group in by_shape.items():
            per = max(1, MAX_BATCH_BYTES // (4 * (rows * cols + cols * cols)))
            for start in range(0, len(group), per):
                chunk = group[start:start + per]
                w = torch.stack([u["w"] for u in chunk])
                h = torch.stack([u["h"] for u in chunk])
                try:
                    new, damp, row_error = sparsegpt(w, h, self.pat, block_size=self.cfg.effective_block_size(),
                                                     dampening=self.cfg.dampening)
                except FloatingPointError as exc:
                    raise VerificationError(f"sparsify: {chunk[0]['names'][0]}: {exc}") from None
                for u, nw, d, re in zip(chunk, new, damp.tolist(), row_error):
                    r0 = 0
                    for n in u["names"]:
                        r = weight_out_in(mine[n]).shape[0]
                        # The sweep's own error is exact up to rounding, which the subtraction of
                        # a large dampening would amplify: measure directly then.
                        num = re[r0:r0 + r].sum() if d <= 0.1 else None
                        self._apply(n, mine[n], nw[r0:r0 + r], u["h"], source[n], damp=d, error_num=num,
                                    error_den=stats.energy.get(n))
                        r0 += r
                del new, damp, row_error, w, h
                # the batch's freed temporaries back to the system now, not at the layer's end:
                # otherwise the allocator's free space grew ~130 MB a layer inside the layer's work
                # (hidden 1024, 8 experts), and with it the peak (measured: 2834 -> 2958 MiB over 4
                # layers; flat at 2681 MiB with this, for ~1.7 s more per layer)
                release_freed()

    def _apply(self, name: str, m: nn.Module, new: torch.Tensor, h: torch.Tensor | None, source: str, damp=None,
               error_num: torch.Tensor | None = None, error_den: torch.Tensor | None = None) -> None:
        """Write `new` into `m`, check its pattern and record its row. The relative output error
        is ‖ΔW X‖² / ‖W X‖² on the matrix's calibration inputs; both terms may come from what was
        already computed (SparseGPT's sweep, the observed outputs), else from H."""
        old = weight_out_in(m).detach().float()
        if not torch.isfinite(new).all():
            raise VerificationError(f"sparsify: {name}: non-finite weights after pruning")
        err = None if h is None else reconstruction_error(
            old[None], new[None], h[None], numerator=None if error_num is None else error_num.reshape(1),
            denominator=None if error_den is None else error_den.reshape(1))[0]
        _set_weight(m, new)
        stored = weight_out_in(m).detach()
        sp = check_pattern(stored, self.pat, name)
        row = {"matrix": name, "shape": list(stored.shape), "sparsity": round(sp, 4), "stats": source,
               "rel_error": err, "params": stored.numel(), "zeros": zero_count(stored)}
        self.bytes[name] = (stored.numel() * stored.element_size(), compressed_nbytes(m.weight.detach()))
        if damp is not None:
            row["dampening"] = damp
        self.matrices[name] = row

    # -- bookkeeping
    def _blocks(self, names) -> list[tuple[str, MoEBlock]]:
        out = []
        for p, b in self.model.named_modules():
            if isinstance(b, MoEBlock) and any(n.startswith(p + ".") for n in names):
                out.append((p, b))
        return out

    @staticmethod
    def _expert_names(bpath: str, e: int, names) -> list[str]:
        pre = f"{bpath}.experts.{e}."
        return [n for n in names if n.startswith(pre)]

    def _expert_row(self, layer, bpath, block, e, covered, total, fell_back) -> None:
        names = self._expert_names(bpath, e, self.matrices)
        if not names:
            return
        rows = [self.matrices[n] for n in names]
        errs = [r["rel_error"] for r in rows if r["rel_error"] is not None]
        self.experts.append({"layer": layer, "block": bpath, "expert": e, "tokens": covered,
                             "share": round(covered / total, 4) if covered is not None and total else None,
                             "fallback": fell_back, "stats": rows[0]["stats"],
                             "sparsity": round(sum(r["zeros"] for r in rows) / sum(r["params"] for r in rows), 4),
                             "rel_error_max": max(errs) if errs else None})

    def report(self, pass_name: str, state: ModelState) -> PassReport:
        rows = list(self.matrices.values())
        params = sum(r["params"] for r in rows)
        zeros = sum(r["zeros"] for r in rows)
        total_params = sum(p.numel() for p in self.model.parameters())
        dense_bytes = sum(d for d, _ in self.bytes.values())
        compressed = sum(c for _, c in self.bytes.values())
        errs = [r["rel_error"] for r in rows if r["rel_error"] is not None]
        metrics = {"pattern": self.pat.label, "method": self.cfg.method, "matrices_pruned": len(rows),
                   "target_params": params, "target_sparsity": round(zeros / max(1, params), 4),
                   "model_sparsity": round(zeros / max(1, total_params), 4),
                   "calibration_tokens": self.tokens, "min_coverage": self.cfg.min_coverage,
                   "fallback_experts": len(self.fallback),
                   "rel_error_mean": sum(errs) / len(errs) if errs else None,
                   "rel_error_max": max(errs) if errs else None,
                   "target_dense_bytes": dense_bytes, "target_compressed_bytes": compressed,
                   "speed": speed_note()}
        coverage = [r["share"] for r in self.experts if r["share"] is not None]
        if coverage:
            metrics["expert_share_min"] = min(coverage)
        warnings = list(self.fallback)
        if not torch.cuda.is_available():
            warnings.append("2:4 on CPU saves storage, not time (no CPU sparse kernels); see metrics.speed")
        stats_kind = "no calibration data (magnitude)" if self.ctx.calibration is None else \
            f"{self.tokens} calibration tokens, routing-aware"
        summary = (f"{len(rows)} matrices → {self.pat.label} by {self.cfg.method} ({stats_kind}); "
                   f"{metrics['target_sparsity']:.1%} of their weights are zero, {len(self.fallback)} experts fell back")
        return PassReport(pass_name, summary=summary, metrics=metrics,
                          tables={"layers": self.layers, "experts": self.experts, "matrices": rows},
                          warnings=warnings)
