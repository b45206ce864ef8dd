"""`distill`: train the model (the student) against a teacher snapshot, and `keep-teacher`, which
takes that snapshot inside a pipeline.

Modes (the student is the pipeline's model; the teacher is `state.artifacts["teacher"]`; training
rows are `ctx.calibration`, held-out rows `ctx.evaluation`):
- `heal`: recover what a lossy pass (pruning, expert removal, …) cost; teacher = the model before
  it. Every exact zero of every trained matrix stays exactly zero (`freeze_zeros`, on by default
  here): a 2:4 pattern is kept bit for bit.
- `moe-to-dense`: a dense student (the original dense checkpoint, or a smaller config) learns from
  an MoE teacher; `hidden` adds hidden-state MSE through a layer map, with learned projections
  where the widths differ.
- `moe-to-moe`: an MoE student with fewer / smaller experts; router distillation (KL between
  routing distributions, or CE on the teacher's top-k) plus the load-balance and z-loss
  regularisers.
- `router-only`: only the routers of the student's MoE layers are trained.

Promises (`output_tolerance = None`: the function changes on purpose; measured held-out
perplexity and KL to the teacher before/after are reported, with the loss history):
- `router-only` changes router weights only: every other parameter is bit-identical, checked.
- With `freeze_zeros`, the zero set of every trained matrix is unchanged, checked; if an earlier
  `sparsify` pass recorded an N:M pattern, the pattern is re-checked on its matrices.
- The same global batches give the same weights whether run in one process or under `torchrun`
  (fp32 summation-order tolerance); `resume` continues a checkpointed run to the same weights as
  an uninterrupted one (`moeconv.train.trainer`).
"""
from __future__ import annotations

import copy
import hashlib
import math
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from moeconv.context import Context
from moeconv.errors import ConfigError, InputError, UnsupportedError, VerificationError
from moeconv.nn.moe import MoEBlock
from moeconv.pass_base import Contract, Pass, PassConfig, PassResult
from moeconv.report import PassReport
from moeconv.state import ModelState

Mode = Literal["heal", "moe-to-dense", "moe-to-moe", "router-only"]
Strategy = Literal["auto", "ddp", "fsdp"]

# Loss weights each mode starts from (a weight given in `loss_weights` replaces its default).
MODE_WEIGHTS: dict[str, dict[str, float]] = {
    "heal": {"kl": 1.0},
    "moe-to-dense": {"kl": 1.0},
    "moe-to-moe": {"kl": 1.0, "router": 1.0, "balance": 0.01, "z": 0.001},
    "router-only": {"kl": 1.0, "router": 1.0},
}
HISTORY_ROWS = 50  # loss-history rows kept in the report (the full log is the metrics JSONL)


class LossWeightsConfig(PassConfig):
    """Weights of the loss terms; `None` keeps the mode's default."""

    kl: float | None = Field(None, ge=0, description="KL(teacher ‖ student) on next-token logits, × T²")
    ce: float | None = Field(None, ge=0, description="cross-entropy on the data")
    hidden: float | None = Field(None, ge=0, description="hidden-state MSE through the layer map")
    router: float | None = Field(None, ge=0, description="router distillation per MoE layer pair")
    balance: float | None = Field(None, ge=0, description="Switch load-balance loss (α ≈ 0.01)")
    z: float | None = Field(None, ge=0, description="router z-loss (≈ 0.001)")


class DistillConfig(PassConfig):
    mode: Mode = "heal"
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int = Field(8, ge=1, description="rows per optimizer step, over all processes")
    micro_batch_size: int | None = Field(None, ge=1, description="rows per forward (default: batch / processes)")
    grad_clip: float | None = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)
    loss_weights: LossWeightsConfig = Field(default_factory=LossWeightsConfig)
    layer_map: dict[int, int] | None = Field(None, description="student layer → teacher layer (hidden, router)")
    router_loss: Literal["kl", "topk-ce"] = "kl"
    expert_map: list[int] | None = Field(None, description="teacher expert i → student expert (fewer experts)")
    freeze_zeros: bool | None = Field(None, description="keep every exact zero of trained matrices (default: heal)")
    freeze: list[str] = Field(default_factory=list, description="regexes of parameter names not to train")
    dropout: bool = False
    checkpoint_every: int = Field(0, ge=0)
    eval_every: int = Field(0, ge=0)
    seed: int = 0
    strategy: Strategy = Field("auto", description="under torchrun: ddp (whole model per process), fsdp (sharded), "
                               "auto (fsdp when DDP's per-process estimate exceeds the device)")
    mixed_precision: Literal["bf16"] | None = Field(None, description="fsdp: bf16 compute, fp32 reduction and weights")

    @field_validator("freeze")
    @classmethod
    def _regexes(cls, v):
        for rx in v:
            try:
                re.compile(rx)
            except re.error as exc:
                raise ValueError(f"bad regular expression {rx!r}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _combination(self):
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must divide batch_size ({self.batch_size})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if self.mixed_precision and self.strategy == "ddp":
            raise ValueError("mixed_precision is an FSDP option: use strategy fsdp (or auto)")
        if self.mode == "moe-to-dense":
            for name in ("router", "balance", "z"):
                if getattr(self.loss_weights, name):
                    raise ValueError(f"loss weight {name} needs an MoE student; moe-to-dense trains a dense one")
        return self

    def weights(self) -> dict[str, float]:
        w = dict(MODE_WEIGHTS[self.mode])
        w.update({k: v for k, v in self.loss_weights.model_dump().items() if v is not None})
        return w

    def keeps_zeros(self) -> bool:
        return self.mode == "heal" if self.freeze_zeros is None else self.freeze_zeros


def _teacher(state: ModelState) -> torch.nn.Module:
    t = state.artifacts.get("teacher")
    if isinstance(t, ModelState):
        t = t.module
    if not isinstance(t, torch.nn.Module):
        raise ConfigError("distill needs a teacher: state.artifacts['teacher'] (add `keep-teacher` before the lossy pass)")
    return t


def _has_moe(module: torch.nn.Module) -> bool:
    return any(isinstance(m, MoEBlock) for m in module.modules())


def _digest(params) -> str:
    h = hashlib.sha256()
    for name, p in params:
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Distill(Pass):
    name = "distill"
    summary = "Train the model against a teacher snapshot: heal, moe-to-dense, moe-to-moe or router-only."
    Config = DistillConfig

    def __init__(self, config: DistillConfig | None = None, *, run_dir: str | Path | None = None,
                 resume: str | Path | None = None, **fields):
        """`run_dir` (metrics.jsonl and checkpoints/) and `resume` (a checkpoint or run directory to
        continue from) are where this run keeps its state: not configuration, so not in the recipe."""
        super().__init__(config, **fields)
        if self.config.checkpoint_every and run_dir is None:
            raise ConfigError("distill: checkpoint_every needs a run directory (--run-dir)")
        self.run_dir = str(run_dir) if run_dir is not None else None
        self.resume = str(resume) if resume is not None else None

    def contract(self) -> Contract:
        # No `distilled` fact: training leaves no mark a later pass could derive from the module.
        req = {"teacher", "calibration", "float-weights"}
        if self.config.mode in ("moe-to-moe", "router-only"):
            req.add("moe")
        return Contract(requires=frozenset(req))

    # ---- preconditions -----------------------------------------------------------------------
    def check(self, state: ModelState, ctx: Context) -> None:
        cfg = self.config
        teacher = _teacher(state)
        student = state.module
        if cfg.mode == "moe-to-dense":
            if not _has_moe(teacher) and not _native_moe(teacher):
                raise ConfigError("distill moe-to-dense: the teacher has no MoE layer")
            if _has_moe(student) or _native_moe(student):
                raise ConfigError("distill moe-to-dense: the student has MoE layers; give a dense student")
        if cfg.mode == "moe-to-moe" and not (_has_moe(teacher) or _native_moe(teacher)):
            raise ConfigError("distill moe-to-moe: the teacher has no MoE layer")
        for what, rows in (("training", ctx.calibration), ("held-out", ctx.evaluation)):
            if rows is None:
                continue
            if rows.dim() != 2 or rows.dtype not in (torch.int64, torch.int32) or rows.shape[1] < 2 or not rows.numel():
                raise InputError(f"distill: {what} data must be a (rows, seq_len ≥ 2) tensor of token ids")
        probe = ctx.calibration[:1, :4].long()
        from moeconv.train.objective import model_logits
        with torch.no_grad():
            vs = model_logits(student.eval(), probe).shape[-1]
            vt = model_logits(teacher.eval(), probe).shape[-1]
        if vs != vt:
            raise UnsupportedError(f"distill: student and teacher vocabularies differ ({vs} vs {vt}); "
                                   "logit distillation needs the same tokenizer")
        vocab = vs
        for what, rows in (("training", ctx.calibration), ("held-out", ctx.evaluation)):
            if rows is not None and (int(rows.min()) < 0 or int(rows.max()) >= vocab):
                raise InputError(f"distill: {what} token ids outside the vocabulary (0..{vocab - 1})")

    # ---- the work ----------------------------------------------------------------------------
    def run(self, state: ModelState, ctx: Context) -> PassResult:
        from moeconv.nn.native_moe import linearise_native_moe
        from moeconv.train.objective import DistillObjective, LossWeights, ObjectiveSpec, model_structure
        from moeconv.train.trainer import TrainConfig, Trainer, init_distributed

        cfg = self.config
        student, teacher = state.module, _teacher(state)
        linearise_native_moe(student)  # fused HF experts → per-expert nn.Linear (exact); no-op when done
        linearise_native_moe(teacher)
        weights, notes = self._resolve_weights(model_structure(student), model_structure(teacher))
        try:
            spec = ObjectiveSpec(LossWeights(**weights), cfg.temperature, cfg.layer_map, cfg.router_loss,
                                 cfg.expert_map, cfg.seed)
        except ValueError as exc:
            raise ConfigError(f"distill: {exc}") from None

        flags = {id(p): p.requires_grad for p in student.parameters()}
        trainable = self._select_trainable(student)
        frozen = [(n, p) for n, p in student.named_parameters() if n not in trainable]
        frozen_digest = _digest(frozen)
        for n, p in student.named_parameters():
            p.requires_grad_(n in trainable)
        teacher.eval().requires_grad_(False)
        devices = (next(student.parameters()).device, next(teacher.parameters()).device)
        try:
            try:
                objective = DistillObjective(student, teacher, spec)
            except ValueError as exc:
                raise ConfigError(f"distill: {exc}") from None
            masks = self._masks(student, trainable) if cfg.keeps_zeros() else {}
            dist = init_distributed()
            device = ctx.device
            if dist.world_size > 1 and str(device).startswith("cuda"):
                device = f"cuda:{dist.local_rank}"
            memory, strategy, why = self._plan_memory(state, objective, trainable, ctx, dist, device)
            if strategy == "ddp":  # fsdp moves each rank's shards only
                teacher.to(device)
            tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, batch_size=cfg.batch_size,
                               micro_batch_size=cfg.micro_batch_size, grad_clip=cfg.grad_clip, seed=cfg.seed,
                               checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every, dropout=cfg.dropout,
                               strategy=strategy, mixed_precision=cfg.mixed_precision)
            trainer = Trainer(objective, ctx.calibration.long(), tcfg, eval_rows=_long(ctx.evaluation),
                              masks={f"student.{n}": m for n, m in masks.items()}, run_dir=self.run_dir,
                              on_step=lambda ev: _progress(ctx, ev), dist=dist, device=device)
            result = trainer.fit(self.resume)
        finally:
            for p in student.parameters():
                p.requires_grad_(flags[id(p)])
            student.to(devices[0]).eval()
            teacher.to(devices[1])

        if _digest(frozen) != frozen_digest:
            raise VerificationError("distill changed parameters it was told to freeze")
        self._check_masks(student, masks, state)
        state.artifacts["distill"] = {"mode": cfg.mode, "trained": sorted(trainable), "steps": cfg.steps}
        report = self._report(result, weights, notes, trainable, frozen, masks, dist, objective)
        report.metrics.update({"strategy": strategy, "strategy_why": why,
                               "memory_per_rank": {"estimate": memory, "measured": result.memory}})
        return PassResult(state, True, report)

    def _plan_memory(self, state, objective, trainable: set[str], ctx: Context, dist, device) -> tuple[dict, str, str]:
        """(per-rank estimate for ddp and fsdp, the strategy to use, why): `strategy` as configured,
        or for auto fsdp when DDP would not fit the device (`moeconv.train.memory`)."""
        from moeconv.model_limits import activation_bytes, model_limits
        from moeconv.train.memory import both, choose_strategy, device_capacity, sizes_of
        cfg = self.config
        if cfg.strategy == "fsdp" and dist.world_size <= 1:
            raise ConfigError("distill: --strategy fsdp shards the models over processes; run under torchrun with "
                              "2 or more (--nproc-per-node), or use ddp")
        if cfg.mixed_precision and cfg.strategy == "auto" and dist.world_size <= 1:
            raise ConfigError("distill: --mixed-precision is an FSDP option; run under torchrun with 2 or more")
        per_rank_rows = cfg.batch_size // max(1, dist.world_size)
        micro = cfg.micro_batch_size or per_rank_rows
        seq = int(ctx.calibration.shape[1])
        acts = activation_bytes(model_limits(state), micro, seq, rows_per_forward=micro, training=True)
        trained = {f"student.{n}" for n in trainable} | {n for n, _ in objective.named_parameters()
                                                         if not n.startswith("student.")}  # + projections
        sizes = sizes_of(objective, trained, acts)
        estimate = both(sizes, dist.world_size, micro_batches=max(1, per_rank_rows // micro))
        capacity = device_capacity(str(device))
        if capacity is not None and not str(device).startswith("cuda"):
            capacity += sizes.student + sizes.teacher  # loaded already: not in what is still available
        strategy, why = choose_strategy(cfg.strategy, estimate, capacity, dist.world_size)
        if cfg.mixed_precision and strategy != "fsdp":
            raise ConfigError(f"distill: --mixed-precision is an FSDP option and auto chose ddp ({why}); "
                              "add --strategy fsdp")
        return estimate, strategy, why

    def _resolve_weights(self, s, t) -> tuple[dict[str, float], list[str]]:
        """Mode defaults + explicit weights; a *default* router loss that cannot be computed (no
        MoE teacher layer at the mapped positions, or expert counts differ without an expert_map)
        is switched off with a note instead of guessing a correspondence."""
        cfg = self.config
        w = cfg.weights()
        notes: list[str] = []
        if w.get("router") and cfg.loss_weights.router is None:
            from moeconv.train.objective import default_layer_map
            lmap = cfg.layer_map or default_layer_map(s.num_layers, t.num_layers)
            pairs = [(j, i) for j, i in lmap.items() if j in s.moe and i in t.moe]
            mismatch = [(j, i) for j, i in pairs if s.moe[j].num_experts != t.moe[i].num_experts]
            if not pairs:
                w["router"] = 0.0
                notes.append("router distillation off: the teacher has no MoE layer at the student's MoE positions")
            elif mismatch and cfg.expert_map is None:
                j, i = mismatch[0]
                w["router"] = 0.0
                notes.append(f"router distillation off: teacher layer {i} has {t.moe[i].num_experts} experts, student "
                             f"layer {j} has {s.moe[j].num_experts}; give expert_map to turn it on")
        if not s.moe:
            for k in ("balance", "z"):
                if w.get(k) and getattr(cfg.loss_weights, k) is None:
                    w[k] = 0.0
        return {k: v for k, v in w.items() if v}, notes

    def _select_trainable(self, student: torch.nn.Module) -> set[str]:
        cfg = self.config
        if cfg.mode == "router-only":
            routers = {id(m.router) for m in student.modules() if isinstance(m, MoEBlock)}
            names = {f"{mp}.{pn}" if mp else pn for mp, m in student.named_modules() if id(m) in routers
                     for pn, _ in m.named_parameters(recurse=False)}
        else:
            names = {n for n, p in student.named_parameters() if p.is_floating_point()}
        rxs = [re.compile(r) for r in cfg.freeze]
        names = {n for n in names if not any(r.search(n) for r in rxs)}
        if not names:
            raise ConfigError(f"distill {cfg.mode}: no parameter left to train"
                              + (f" after freeze {cfg.freeze}" if cfg.freeze else ""))
        return names

    @staticmethod
    def _masks(student: torch.nn.Module, trainable: set[str]) -> dict[str, torch.Tensor]:
        """True where a trained matrix holds an exact zero now (it must stay zero)."""
        out = {}
        for n, p in student.named_parameters():
            if n in trainable and p.dim() >= 2:
                z = p.detach() == 0
                if bool(z.any()):
                    out[n] = z
        return out

    def _check_masks(self, student: torch.nn.Module, masks: dict[str, torch.Tensor], state: ModelState) -> None:
        params = dict(student.named_parameters())
        for n, m in masks.items():
            if bool((params[n].detach()[m.to(params[n].device)] != 0).any()):
                raise VerificationError(f"distill: {n} lost zeros it had to keep")
        record = state.artifacts.get("sparsify")
        if masks and isinstance(record, dict) and ":" in str(record.get("pattern", "")):
            from moeconv.nn.linear_like import weight_out_in
            from moeconv.sparsity import SparsityPattern, check_pattern
            pattern = SparsityPattern.parse(record["pattern"])
            for name in record.get("matrices", []):
                check_pattern(weight_out_in(student.get_submodule(name)).detach(), pattern, name)

    def _report(self, result, weights, notes, trainable, frozen, masks, dist, objective) -> PassReport:
        cfg = self.config
        before = result.evals[0] if result.evals else {}
        after = result.evals[-1] if len(result.evals) > 1 else {}
        n_trained = sum(p.numel() for n, p in objective.student.named_parameters() if n in trainable)
        metrics = {"mode": cfg.mode, "steps": cfg.steps, "resumed_from": result.resumed_from,
                   "world_size": dist.world_size, "loss_weights": weights, "temperature": cfg.temperature,
                   "trainable_params": n_trained, "frozen_params": sum(p.numel() for _, p in frozen),
                   "frozen_unchanged": True, "tokens": result.tokens, "seconds": round(result.seconds, 2),
                   "tokens_per_s": round(result.tokens / result.seconds, 1) if result.seconds else None,
                   "masked_matrices": len(masks), "kept_zeros": int(sum(int(m.sum()) for m in masks.values())),
                   "layer_pairs": [list(p) for p in objective.pairs], "router_pairs": [list(p) for p in objective.router_pairs]}
        if result.history:
            metrics["loss_first"] = result.history[0]["loss"]
            metrics["loss_last"] = result.history[-1]["loss"]
        for key in ("eval_ppl", "eval_ce", "eval_kl", "teacher_ppl"):
            if key in before:
                metrics[f"{key}_before"] = before[key]
            if key in after:
                metrics[f"{key}_after"] = after[key]
        if self.run_dir:
            metrics["run_dir"] = self.run_dir
        summary = f"{cfg.mode}: {cfg.steps} steps"
        if "eval_ppl" in before and "eval_ppl" in after:
            summary += f", held-out perplexity {before['eval_ppl']:.4g} → {after['eval_ppl']:.4g}"
            if "teacher_ppl" in after:
                summary += f" (teacher {after['teacher_ppl']:.4g})"
            if "eval_kl" in after:
                summary += f", KL to teacher {before['eval_kl']:.4g} → {after['eval_kl']:.4g}"
        elif result.history:
            summary += f", loss {metrics['loss_first']:.4g} → {metrics['loss_last']:.4g}"
        history = result.history
        if len(history) > HISTORY_ROWS:
            stride = math.ceil(len(history) / HISTORY_ROWS)
            history = history[::stride] + ([history[-1]] if (len(history) - 1) % stride else [])
        report = PassReport(self.name, summary=summary, metrics=metrics,
                            tables={"history": [{k: v for k, v in r.items() if k != "kind"} for r in history],
                                    "evals": result.evals})
        report.warnings.extend(notes)
        if cfg.keeps_zeros() and not masks:
            report.warnings.append("freeze_zeros: the trained matrices hold no exact zeros; nothing to keep fixed")
        if before and after and after.get("eval_ppl", 0) > before.get("eval_ppl", math.inf):
            report.warnings.append("held-out perplexity went up: try a lower --lr or more data")
        return report


def _native_moe(module: torch.nn.Module) -> bool:
    from moeconv.nn.native_moe import is_hf_sparse_moe
    return any(is_hf_sparse_moe(m) for m in module.modules())


def _long(rows):
    return None if rows is None else rows.long()


def _progress(ctx: Context, event) -> None:
    """Bar progress through the Context protocol, plus loss / tokens/s / ETA for a progress object
    that also has `train_step(event)` (the CLI's)."""
    ctx.report_progress("distill", event.step, event.steps)
    extra = getattr(ctx.progress, "train_step", None)
    if callable(extra):
        extra(event)


# ---- the teacher snapshot -------------------------------------------------------------------------

class KeepTeacherConfig(PassConfig):
    pass


class KeepTeacher(Pass):
    """Deep-copies the current model into `state.artifacts["teacher"]`, e.g. before `sparsify` so
    that a later `distill` (heal) learns from the unpruned model. Changes nothing (exact)."""

    name = "keep-teacher"
    summary = "Snapshot the current model as the teacher for a later `distill` (heal after a lossy pass)."
    Config = KeepTeacherConfig
    provides = frozenset({"teacher"})
    output_tolerance = 0.0

    def run(self, state: ModelState, ctx: Context) -> PassResult:
        state.artifacts["teacher"] = copy.deepcopy(state.module).eval()
        n = state.parameter_count()
        return PassResult(state, False, PassReport(self.name, summary=f"teacher snapshot kept ({n:,} parameters)",
                                                   metrics={"teacher_params": n}))
