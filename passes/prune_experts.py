"""`prune-experts`: remove (or merge) whole experts of every MoE layer by measured importance, and
repair the router. `targets` / `ignore` (`moeconv.selectors`; an MoE layer is a candidate at its
block's path, in group `experts`) limit it to some MoE layers: the others are left exactly as they
are and reported as skipped (refused for Hugging Face MoE families, which hold one expert count).

Calibration is layer by layer (`moeconv.calibrate.run_layerwise`): each layer is scored on the
outputs of the already-pruned layers before it, so errors do not compound unseen. Importance
criteria are defined in `passes.expert_importance` (frequency, mass, REAP, reconstruction).

Promises (the function changes on purpose: `output_tolerance = None`, the error is measured):
- Dropping: kept experts are the source modules themselves (bit-identical weights, order kept);
  the router keeps exactly the kept experts' rows (bit-identical, bias too); the shared expert
  and its gate are untouched. No layer is left with fewer experts than its `top_k` (refused).
- Merging (`merge=True`): each removed expert is folded into the kept expert whose outputs on
  the calibration tokens are most similar (cosine), as a token-frequency-weighted average of
  their parameters; experts nothing was folded into stay bit-identical.
- `recalibrate_router=True`: a short router-only distillation (every other weight frozen) makes
  the pruned block's output match the unpruned block's on calibration tokens; the relative error
  on held-out calibration tokens is reported before and after, and the re-calibrated router is
  kept only when that error went down (so it never makes the held-out error worse).
- The report lists, per layer, every expert's scores and whether it was kept, merged (into which)
  or dropped.
"""
from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from moeconv.calibrate import observe_inputs, run_layerwise
from moeconv.context import Context
from moeconv.errors import ConfigError, UnsupportedError
from moeconv.nn.moe import MoEBlock
from moeconv.pass_base import LayerJob, Pass, PassConfig, PassResult
from moeconv.report import PassReport
from moeconv.selectors import MOE_LAYER_GROUP, OptionalSelectors, Selection, Selectors, absent_note
from moeconv.state import ModelState
from passes.expert_importance import (BlockObservation, best_subset, combine, expert_outputs, expert_scores,
                                      observe_block, rank_keep, reference_output)

# Every expert's output on the same tokens is kept for the output-based steps: at most this much.
OUTPUT_BYTES = 2 * 2**30

Criterion = Literal["frequency", "mass", "reap", "reconstruction"]


class PruneExpertsConfig(PassConfig):
    keep: int | None = Field(None, ge=1, description="experts kept in every MoE layer")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of each layer's experts removed")
    per_layer: list[int] | Literal["global"] | None = Field(
        None, description="experts kept per MoE layer (in model order), or 'global': the keep/ratio total "
                          "allocated across layers from the importance scores")
    criterion: Criterion = "reap"
    targets: OptionalSelectors = Field(None, description="MoE layers to prune (default: all): layers:0-3, every:2, "
                                                        "re:REGEX, a module path (moeconv.selectors)")
    ignore: Selectors = Field(default_factory=list, description="MoE layers left as they are (same grammar)")
    merge: bool = False
    recalibrate_router: bool = False
    max_tokens: int = Field(8192, ge=8, description="calibration tokens per layer used for scoring (evenly spaced)")
    diagnostic_tokens: int = Field(1024, ge=8, description="tokens for the reported reconstruction scores and "
                                   "block error when no decision needs every expert's output")
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward")
    beam_width: int = Field(4, ge=1, description="reconstruction search beam, when exhaustive search is too big")
    max_combinations: int = Field(512, ge=1, description="reconstruction: search exhaustively up to this many subsets")
    recalib_steps: int = Field(100, ge=1)
    recalib_lr: float = Field(1e-3, gt=0)
    recalib_holdout: float = Field(0.2, gt=0, lt=1, description="share of calibration tokens held out to judge it")
    seed: int = 0

    @model_validator(mode="after")
    def _budget(self):
        explicit = isinstance(self.per_layer, list)
        given = [n for n, v in (("keep", self.keep), ("ratio", self.ratio)) if v is not None]
        if explicit:
            if given:
                raise ValueError(f"give either an explicit per_layer list or {given[0]}, not both")
            if not self.per_layer or min(self.per_layer) < 1:
                raise ValueError("per_layer: every layer must keep at least one expert")
        elif len(given) != 1:
            raise ValueError("give exactly one budget: keep, ratio or an explicit per_layer list"
                             + (" ('global' needs keep or ratio)" if self.per_layer == "global" else ""))
        return self


class PruneExperts(Pass):
    name = "prune-experts"
    summary = "Drop or merge whole experts by measured importance (frequency, mass, REAP, reconstruction); repair the router."
    Config = PruneExpertsConfig
    requires = frozenset({"moe", "calibration", "float-weights"})
    provides = frozenset()
    invalidates = frozenset()
    output_tolerance = None

    # ---- plan ------------------------------------------------------------------------------
    def check(self, state: ModelState, ctx: Context) -> None:
        blocks, skipped = select_blocks(state, self.config)
        if self.config.per_layer is not None:
            _one_count_only(state, blocks + skipped, "per-layer budgets are", "use --keep or --ratio")
        if skipped:
            _one_count_only(state, blocks + skipped, "pruning only some MoE layers is",
                            "select every MoE layer (no --targets/--ignore)")
        _uniform_budgets(self.config, blocks)

    def run(self, state: ModelState, ctx: Context) -> PassResult:
        job = self.layer_job(state, ctx)
        device = next(state.module.parameters()).device
        batches = [b.to(device) for b in ctx.calibration.split(self.config.batch_size)]
        for sweep in job.pre_sweeps():
            run_layerwise(state.module, batches, sweep, progress=ctx.report_progress)
        run_layerwise(state.module, batches, job.on_layer, progress=ctx.report_progress)
        return job.finish()

    def layer_job(self, state: ModelState, ctx: Context) -> LayerJob:
        return _PruneJob(self, state, ctx)

    # ---- per block ----------------------------------------------------------------------------
    @torch.no_grad()
    def _prune_block(self, path: str, block: MoEBlock, x: torch.Tensor, keep: int):
        cfg = self.config
        # Every expert on every token costs E/k routed forwards: on all tokens only when a decision
        # needs it, else on a sample for the reported reconstruction scores and block error.
        decides = cfg.criterion == "reconstruction" or cfg.merge or cfg.recalibrate_router
        limit = _output_budget(block) if decides else min(_output_budget(block), cfg.diagnostic_tokens)
        obs = observe_block(block, _subsample(x, limit))
        scores = expert_scores(block, x, obs)
        e = block.num_experts
        search = None
        if keep >= e:
            kept = list(range(e))
        elif cfg.criterion == "reconstruction":
            kept, _, search = best_subset(obs, keep, beam_width=cfg.beam_width,
                                                max_combinations=cfg.max_combinations)
        else:
            kept = rank_keep(scores[cfg.criterion], keep)
        removed = [j for j in range(e) if j not in kept]
        into = merge_targets(obs, kept, removed) if cfg.merge else {}
        apply_prune(block, kept, into, scores["tokens"])
        student = _student_outputs(block, obs, kept, into)
        err_pruned = block_error(obs, block.router(obs.x).float(), student)
        recal = recalibrate_router(block, obs, student, cfg) if cfg.recalibrate_router and removed else None

        new_index = {j: i for i, j in enumerate(kept)}
        rows = []
        for j in range(e):
            status = "kept" if j in new_index else ("merged" if j in into else "dropped")
            row = {"layer": path, "expert": j, "status": status, "new_index": new_index.get(j),
                   "merged_into": into.get(j), "tokens": int(scores["tokens"][j])}
            for c in ("frequency", "mass", "reap", "reconstruction"):
                v = float(scores[c][j])
                row[c] = v if math.isfinite(v) else None
            rows.append(row)
        lrow = {"layer": path, "experts_before": e, "experts_after": len(kept), "top_k": block.top_k,
                "kept": kept, "dropped": [j for j in removed if j not in into],
                "merged": {str(j): t for j, t in into.items()}, "tokens": int(x.shape[0]),
                "tokens_output_based": obs.num_tokens,
                "error_pruned": err_pruned, "search": search}
        if recal is not None:
            lrow.update(recal)
        warn = [f"{path}: expert {j} received no calibration tokens (its frequency, mass and REAP are 0; "
                f"rare experts can be specialists: give more calibration data)"
                for j in range(e) if scores["tokens"][j] == 0]
        return rows, lrow, warn

    def _report(self, state, params_before, expert_rows, layer_rows, warnings, allocation, calib_tokens) -> PassReport:
        cfg = self.config
        before = sum(r["experts_before"] for r in layer_rows)
        after = sum(r["experts_after"] for r in layer_rows)
        metrics = {"criterion": cfg.criterion, "mode": "merge" if cfg.merge else "drop",
                   "moe_layers": len(layer_rows), "experts_before": before, "experts_after": after,
                   "params_before": params_before, "params_after": state.parameter_count(),
                   "active_params_after": state.active_parameter_count(), "calibration_tokens": calib_tokens,
                   "mean_error_pruned": _mean(r["error_pruned"] for r in layer_rows)}
        if allocation:
            metrics["allocation"] = allocation
        if cfg.recalibrate_router:
            recal = [r for r in layer_rows if "recal_error_before" in r]
            metrics["mean_recal_error_before"] = _mean(r["recal_error_before"] for r in recal)
            metrics["mean_recal_error_after"] = _mean(r["recal_error_after"] for r in recal)
            metrics["recal_layers_improved"] = sum(r["recal_improved"] for r in recal)
        verb = "merged" if cfg.merge else "dropped"
        summary = (f"{before} → {after} experts over {len(layer_rows)} MoE layers by {cfg.criterion} "
                   f"({before - after} {verb})" + (", router re-calibrated" if cfg.recalibrate_router else ""))
        report = PassReport(self.name, summary=summary, metrics=metrics,
                            tables={"layers": layer_rows, "experts": expert_rows}, warnings=warnings)
        report.warnings.append("expert pruning changes the model on purpose; the measured error is reported")
        return report


class _PruneJob(LayerJob):
    """One run of `prune-experts`, layer by layer (`LayerJob`): with a global budget, a first
    read-only sweep scores every layer on the unpruned model."""

    def __init__(self, owner: PruneExperts, state: ModelState, ctx: Context):
        self.owner, self.cfg, self.state, self.ctx = owner, owner.config, state, ctx
        self.batch_size = self.cfg.batch_size
        self.blocks, self.skipped = select_blocks(state, self.cfg)
        self.params_before = state.parameter_count()
        self.budgets = _uniform_budgets(self.cfg, self.blocks)
        self.scores: dict[str, torch.Tensor] = {}
        self.budget_of: dict[str, int] | None = None
        self.expert_rows, self.layer_rows, self.warnings, self.visited = [], [], [], set()

    def pre_sweeps(self) -> list:
        return [self._score] if self.cfg.per_layer == "global" else []

    def _score(self, _i, path, layer, forward) -> None:
        """Each layer's scores on the unpruned model, for the global allocation."""
        chosen = {p for p, _ in self.blocks}
        inner = [(p, b) for p, b in _blocks_in(layer, path) if p in chosen]
        if inner:
            captured = _capture(inner, forward, self.ctx, self.cfg.max_tokens)
            for full_path, block in inner:
                x = captured[full_path]
                obs = (observe_block(block, _subsample(x, _output_budget(block)))
                       if self.cfg.criterion == "reconstruction" else None)
                self.scores[full_path] = expert_scores(block, x, obs)[self.cfg.criterion]

    def _budgets(self) -> dict[str, int]:
        if self.budget_of is None:
            budgets = self.budgets
            if self.cfg.per_layer == "global":
                budgets = allocate_global(self.scores, budgets, [(p, b.num_experts, b.top_k) for p, b in self.blocks])
            self.budget_of = dict(zip((p for p, _ in self.blocks), budgets))
        return self.budget_of

    def on_layer(self, _i, path, layer, forward) -> None:
        budget_of = self._budgets()
        inner = [(p, b) for p, b in _blocks_in(layer, path) if p in budget_of]
        if not inner:
            return
        captured = _capture(inner, forward, self.ctx, self.cfg.max_tokens)
        for full_path, block in inner:
            self.visited.add(full_path)
            x = captured[full_path]
            rows, lrow, warn = self.owner._prune_block(full_path, block, x, budget_of[full_path])
            self.expert_rows.extend(rows)
            self.layer_rows.append(lrow)
            self.warnings.extend(warn)

    def finish(self) -> PassResult:
        missed = [p for p, _ in self.blocks if p not in self.visited]
        if missed:
            raise UnsupportedError(f"prune-experts: MoE layers outside the decoder layer stack are not supported ({missed[0]})")
        _update_config(self.state)
        allocation = "global (from first-pass scores)" if self.cfg.per_layer == "global" else None
        report = self.owner._report(self.state, self.params_before, self.expert_rows, self.layer_rows, self.warnings,
                                    allocation, int(self.ctx.calibration.numel()))
        _report_skipped(report, self.skipped)
        return PassResult(self.state, True, report)


# ---- which layers, budgets -------------------------------------------------------------------

def select_blocks(state: ModelState, cfg: PruneExpertsConfig) -> tuple[list[tuple[str, MoEBlock]], list]:
    """(selected, skipped) MoE layers, in model order: `targets` minus `ignore` select
    (`moeconv.selectors`; an MoE layer is a candidate at its block's path, in group `experts`).
    Skipped layers are left exactly as they are. ConfigError when the selectors choose none."""
    selection = Selection.of(cfg.targets, cfg.ignore)
    chosen, skipped = [], []
    for path, m in state.moe_blocks():
        (chosen if selection.selects(path, MOE_LAYER_GROUP) else skipped).append((path, m))
    if skipped and not chosen:
        found = ", ".join(p for p, _ in skipped[:3]) + (", …" if len(skipped) > 3 else "")
        raise ConfigError(f"prune-experts: no MoE layer selected by {selection.describe()} (found {len(skipped)}: "
                          f"{found}); check targets/ignore" + absent_note(selection, [MOE_LAYER_GROUP], "MoE layer"))
    for path, m in chosen:
        if not isinstance(m, MoEBlock):
            raise UnsupportedError(f"prune-experts: {path} is a {type(m).__name__}, which moeconv cannot prune "
                                   "(supported: moeconv MoE layers and Mixtral / Qwen2-MoE / Qwen3-MoE)")
    return chosen, skipped


def _one_count_only(state: ModelState, blocks, what: str, fix: str) -> None:
    """Refuse `what` (a plan leaving MoE layers with different expert counts) when a layer came
    from a Hugging Face MoE family, whose checkpoint format holds one count for every layer."""
    native = [p for p, b in blocks if getattr(b, "source_site", None) is None]
    if native:
        arch = (getattr(state.config, "architectures", None) or [type(state.module).__name__])[0]
        key = "num_local_experts" if getattr(state.config, "model_type", "") == "mixtral" else "num_experts"
        raise ConfigError(f"prune-experts: {what} not possible for {arch}: its checkpoint "
                          f"format holds one expert count for every layer (`{key}`); {fix}")


def _report_skipped(report: PassReport, skipped) -> None:
    report.metrics["moe_layers_skipped"] = len(skipped)
    if skipped:
        report.tables["skipped"] = [{"layer": p, "experts": getattr(m, "num_experts", None),
                                     "reason": "not selected by targets/ignore"} for p, m in skipped]
        report.summary += f"; {len(skipped)} MoE layer{'s' if len(skipped) > 1 else ''} skipped (not selected)"


def _uniform_budgets(cfg: PruneExpertsConfig, blocks) -> list[int]:
    """Experts kept per MoE layer, checked against each layer's top_k. For 'global' these are the
    per-layer shares of the total budget (the allocation itself needs the scores)."""
    if isinstance(cfg.per_layer, list):
        if len(cfg.per_layer) != len(blocks):
            which = "selected " if cfg.targets or cfg.ignore else ""
            raise ConfigError(f"prune-experts: per_layer gives {len(cfg.per_layer)} counts for {len(blocks)} "
                              f"{which}MoE layers")
        budgets = list(cfg.per_layer)
    elif cfg.keep is not None:
        budgets = [min(cfg.keep, b.num_experts) for _, b in blocks]
    else:
        budgets = [b.num_experts - math.floor(b.num_experts * cfg.ratio + 0.5) for _, b in blocks]
    for (path, b), n in zip(blocks, budgets):
        if n > b.num_experts:
            raise ConfigError(f"prune-experts: cannot keep {n} experts in {path}: it has {b.num_experts}")
        if n < b.top_k and cfg.per_layer != "global":
            raise ConfigError(f"prune-experts: keeping {n} experts in {path} leaves fewer than its top_k={b.top_k}")
    if cfg.per_layer == "global" and sum(budgets) < sum(b.top_k for _, b in blocks):
        raise ConfigError(f"prune-experts: a global budget of {sum(budgets)} experts is below the sum of the "
                          f"layers' top_k ({sum(b.top_k for _, b in blocks)})")
    if all(n == b.num_experts for (_, b), n in zip(blocks, budgets)):
        raise ConfigError("prune-experts: this budget removes no expert (every layer would keep all of its experts)")
    return budgets


def allocate_global(scores: dict[str, torch.Tensor], budgets: list[int], layers) -> list[int]:
    """Spread sum(budgets) kept experts over the layers: remove the experts with the smallest
    *share* of their layer's total score first (scores are made comparable across layers by
    normalising each layer to sum 1), never going below a layer's top_k."""
    removable = sum(e for _, e, _ in layers) - sum(budgets)
    cands = []
    for li, (path, e, _k) in enumerate(layers):
        s = scores[path].double().clone()
        s[~torch.isfinite(s)] = s[torch.isfinite(s)].max() if torch.isfinite(s).any() else 1.0
        total = float(s.sum())
        share = s / total if total > 0 else torch.full_like(s, 1.0 / e)
        cands.extend((float(share[j]), li, j) for j in range(e))
    cands.sort()
    kept = [e for _, e, _ in layers]
    for _share, li, _j in cands:
        if removable == 0:
            break
        if kept[li] > layers[li][2]:
            kept[li] -= 1
            removable -= 1
    return kept


# ---- surgery ---------------------------------------------------------------------------------

def merge_targets(obs: BlockObservation, kept: list[int], removed: list[int]) -> dict[int, int]:
    """Removed expert → the kept expert whose outputs on the calibration tokens are most similar
    (cosine of the flattened outputs; ties and all-zero outputs go to the lowest index)."""
    if not removed:
        return {}
    flat = obs.outputs.reshape(obs.num_experts, -1)
    unit = F.normalize(flat, dim=1)
    sims = unit[removed] @ unit[kept].T                       # (removed, kept)
    return {d: kept[int(torch.argmax(sims[i]))] for i, d in enumerate(removed)}


@torch.no_grad()
def merge_experts(modules: list[nn.Module], weights) -> nn.Module:
    """A copy of `modules[0]` whose every parameter is the `weights`-weighted average of the
    modules' same-named parameters (frequency-weighted merging; equal weights if all are 0)."""
    w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))
    merged = copy.deepcopy(modules[0])
    params = [dict(m.named_parameters()) for m in modules]
    for name, p in merged.named_parameters():
        parts = [q.get(name) for q in params]
        if any(t is None or t.shape != p.shape for t in parts) or any(type(m) is not type(modules[0]) for m in modules):
            raise UnsupportedError(f"prune-experts: cannot merge experts of different structure ({name})")
        avg = sum(float(wi) * t.double() for wi, t in zip(w, parts))
        p.copy_(avg.to(p.dtype))
    return merged


@torch.no_grad()
def apply_prune(block: MoEBlock, kept: list[int], into: dict[int, int], tokens) -> None:
    """Keep `kept` experts (merging `into` removed → kept) and exactly their router rows."""
    groups = {k: [d for d, t in into.items() if t == k] for k in kept}
    experts = []
    for k in kept:
        if groups[k]:
            members = [k] + groups[k]
            experts.append(merge_experts([block.experts[j] for j in members], [tokens[j] for j in members]))
        else:
            experts.append(block.experts[k])
    old = block.router
    router = nn.Linear(old.in_features, len(kept), bias=old.bias is not None, dtype=torch.float32,
                       device=old.weight.device)
    idx = torch.as_tensor(kept, dtype=torch.long, device=old.weight.device)
    router.weight.copy_(old.weight.index_select(0, idx))
    if old.bias is not None:
        router.bias.copy_(old.bias.index_select(0, idx))
    block.experts = nn.ModuleList(experts)
    block.router = router


def _student_outputs(block: MoEBlock, obs: BlockObservation, kept: list[int], into: dict[int, int]) -> torch.Tensor:
    merged_into = set(into.values())
    out = obs.outputs[torch.as_tensor(kept, dtype=torch.long)].clone()
    for i, k in enumerate(kept):
        if k in merged_into:
            out[i] = expert_outputs([block.experts[i]], obs.x)[0]
    return out


def block_error(obs: BlockObservation, logits: torch.Tensor, outputs: torch.Tensor, rows=None) -> float:
    """Relative squared error of a (pruned) block's output against the unpruned block's."""
    ref = reference_output(obs)
    full = ref if obs.shared is None else ref + obs.shared
    if rows is not None:
        ref, full, logits, outputs = ref[rows], full[rows], logits[rows], outputs[:, rows]
    got = combine(logits, outputs, obs.top_k, obs.renormalize)
    return float((got - ref).pow(2).sum()) / max(float(full.pow(2).sum()), 1e-30)


def recalibrate_router(block: MoEBlock, obs: BlockObservation, student: torch.Tensor, cfg: PruneExpertsConfig) -> dict:
    """Router-only distillation: Adam on the router weights (and bias) to match the unpruned
    block's output; the best router on held-out tokens is kept if it beats the starting one. Each
    candidate is judged as it will be stored: rounded to the experts' dtype (a bf16 family stores
    its router in bf16), so the kept router is exactly the one measured."""
    n = obs.num_tokens
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=gen).to(obs.x.device)
    n_val = max(1, int(n * cfg.recalib_holdout))
    val, train = perm[:n_val], perm[n_val:]
    if train.numel() == 0:
        train = val
    ref = reference_output(obs)
    full = ref if obs.shared is None else ref + obs.shared
    x_t, y_t, ref_t = obs.x[train], student[:, train], ref[train]
    scale_t = full[train].pow(2).sum().clamp_min(1e-30)
    weight = block.router.weight.detach().clone().requires_grad_(True)
    bias = block.router.bias.detach().clone().requires_grad_(True) if block.router.bias is not None else None
    params = [weight] + ([bias] if bias is not None else [])

    stored = next(block.experts[0].parameters()).dtype if len(block.experts) else weight.dtype

    def as_stored() -> list[torch.Tensor]:
        return [p.detach().to(stored).to(p.dtype) for p in params]

    def val_error(candidate):
        with torch.no_grad():
            return block_error(obs, F.linear(obs.x, candidate[0], candidate[1] if bias is not None else None),
                               student, rows=val)

    before = val_error(params)
    best, best_state = before, None
    opt = torch.optim.Adam(params, lr=cfg.recalib_lr)
    every = max(1, cfg.recalib_steps // 20)
    with torch.enable_grad():
        for step in range(1, cfg.recalib_steps + 1):
            opt.zero_grad()
            got = combine(F.linear(x_t, weight, bias), y_t, obs.top_k, obs.renormalize)
            loss = (got - ref_t).pow(2).sum() / scale_t
            loss.backward()
            opt.step()
            if step % every == 0 or step == cfg.recalib_steps:
                candidate = as_stored()
                err = val_error(candidate)
                if err < best:
                    best, best_state = err, candidate
    improved = best_state is not None
    if improved:
        with torch.no_grad():
            block.router.weight.copy_(best_state[0])
            if bias is not None:
                block.router.bias.copy_(best_state[1])
    return {"recal_error_before": before, "recal_error_after": best, "recal_improved": improved,
            "recal_tokens": {"train": int(train.numel()), "held_out": int(val.numel())}}


# ---- helpers ---------------------------------------------------------------------------------

def _blocks_in(layer: nn.Module, path: str) -> list[tuple[str, MoEBlock]]:
    return [(f"{path}.{name}" if name else path, m) for name, m in layer.named_modules() if isinstance(m, MoEBlock)]


def _capture(inner, forward, ctx: Context, limit: int) -> dict[str, torch.Tensor]:
    """The input rows each block sees while `forward()` runs, `_subsample`d to `limit` (cloned
    out of inference mode, so the router re-calibration may differentiate through them). The
    rows are gathered in the run's hidden-state stores (`ctx.hidden_store()`: within the sweep's
    activation budget, spilled beyond it), not in RAM whole: a block sees every calibration token,
    and only `limit` of them are kept."""
    stores = {p: ctx.hidden_store() for p, _ in inner}
    try:
        with observe_inputs(dict(inner), lambda name, x: stores[name].append(x)):
            forward()
        return {p: _subsample_store(store, limit) for p, store in stores.items()}
    finally:
        for store in stores.values():
            store.release()


def _subsample_store(store, limit: int) -> torch.Tensor:
    """`_subsample(torch.cat(list(store)), limit).clone()`, reading one batch at a time."""
    rows = [store.shape(i)[0] for i in range(len(store))]
    total = sum(rows)
    if total <= limit:
        return torch.cat(list(store)).clone()
    idx = torch.arange(limit) * total // limit  # `_subsample`'s evenly spaced rows
    pieces, start = [], 0
    for i, n in enumerate(rows):
        local = idx[(idx >= start) & (idx < start + n)] - start
        if local.numel():
            batch = store[i]
            pieces.append(batch.index_select(0, local.to(batch.device)))
        start += n
    return torch.cat(pieces).clone()


def _subsample(x: torch.Tensor, limit: int) -> torch.Tensor:
    if x.shape[0] <= limit:
        return x
    idx = torch.arange(limit, device=x.device) * x.shape[0] // limit
    return x.index_select(0, idx)


def _output_budget(block: MoEBlock) -> int:
    """Tokens on which every expert's output is kept (reconstruction, merging, re-calibration):
    E·tokens·H fp32 values within OUTPUT_BYTES."""
    return max(64, OUTPUT_BYTES // (4 * block.num_experts * block.hidden_size))


def _update_config(state: ModelState) -> None:
    # Keep the in-memory HF config honest when every layer has the same count (writers use it).
    counts = {getattr(m, "num_experts", None) for _, m in state.moe_blocks()}
    if state.config is None or len(counts) != 1:
        return
    (n,) = counts
    for key in ("num_local_experts", "num_experts"):
        if hasattr(state.config, key) and isinstance(getattr(state.config, key), int):
            setattr(state.config, key, n)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
