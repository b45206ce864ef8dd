"""A plain PyTorch training loop with exact data-parallel equivalence and exact resume.

Why not `transformers.Trainer`: moeconv's promises are about *which* numbers come out, and each
one needs a part of the loop we control line by line:
- identical results for 1 or N processes per global batch: the global batch is cut into
  fixed-size micro-batches that are spread over ranks, and the gradient is the mean over all of
  them whatever the world size (Trainer ties accumulation to per-device batch size and lets
  accelerate decide the split);
- exact resume: the data position is a pure function of the step, and the checkpoint holds only
  what changes (trainable parameters, optimizer, RNG, masks) — Trainer saves the whole model and
  resumes by skipping dataloader batches;
- fixed sparsity masks re-applied between the optimizer step and the next forward, and a
  router-only mode where every other tensor is provably untouched;
- the objective runs two models (a teacher under `no_grad`) and reads router logits and hidden
  states through hooks on arbitrary `nn.Module`s that hold `MoEBlock`s, not HF-shaped outputs.
The whole loop is a few hundred lines with no hidden behaviour, no dataset/collator machinery and
no logging integrations to switch off.

Distributed: launched under `torchrun` (`WORLD_SIZE` > 1) the loop initialises the default process
group (NCCL with CUDA, gloo on CPU) and wraps the objective in `DistributedDataParallel`. Each rank
takes its slice of every global batch, accumulates over its micro-batches (`no_sync` until the
last) and DDP averages gradients: the update equals the single-process update over the same
micro-batches up to floating-point summation order. Only batch-statistic terms (the load-balance
loss) depend on the micro-batch size, which is why it is a setting and not derived from the world
size. Rank 0 writes metrics and checkpoints; each rank saves its own RNG state.

FSDP (`TrainConfig.strategy="fsdp"`), for models whose training state does not fit one device:
the loop trains a sharded copy of the module (`moeconv.train.fsdp`: FSDP2 `fully_shard` on every
decoder layer of the student and the teacher, then on each model) and frees the module's own
tensors meanwhile; the optimizer is built on the shards, so its state is sharded too. The rest is
the DDP loop: micro-batches accumulate with `set_requires_gradient_sync(last)` instead of
`no_sync()`, masks are cut to each rank's shard, `clip_grad_norm_` works on the sharded
gradients. Checkpoints have the one format above, gathered whole (rank 0 writes) and cut back into
shards on resume, so a run may resume under the other strategy. At the end every parameter is
gathered back into the module, which is plain again. Measured on this machine (gloo, CPU,
`tests/slow/test_distill_torchrun.py`): the same weights as DDP over the same processes, and as
one process to fp32 tolerance. Before reaching for FSDP, note that `router-only` and `--freeze`
shrink the optimizer state (often the part that does not fit) to the trained tensors.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moeconv.errors import ConfigError, InputError, VerificationError
from moeconv.train.data import fingerprint

CHECKPOINT_FORMAT = 1
_EVAL_SUMS = ("ce_sum", "tokens", "kl_sum", "kl_tokens", "teacher_ce_sum")
# Changing these between an interrupted run and its resume would not be an exact continuation.
_RESUME_FIELDS = ("steps", "lr", "weight_decay", "betas", "warmup_steps", "schedule", "min_lr_ratio",
                  "batch_size", "micro_batch_size", "grad_clip", "seed", "dropout", "mixed_precision")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine (to min_lr_ratio·lr) | constant, after the linear warm-up
    min_lr_ratio: float = 0.1
    batch_size: int = 8  # global rows per optimizer step
    micro_batch_size: int | None = None  # rows per forward; default batch_size // world_size
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    dropout: bool = False  # train mode (dropout on); off keeps runs independent of the world size
    strategy: str = "ddp"  # ddp: whole model on every rank | fsdp: sharded (moeconv.train.fsdp)
    mixed_precision: str | None = None  # fsdp only: "bf16" compute, fp32 reduction and master weights

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.mixed_precision not in (None, "bf16"):
            raise ConfigError(f"mixed precision must be bf16 or none, not {self.mixed_precision!r}")
        if self.mixed_precision and self.strategy != "fsdp":
            raise ConfigError("mixed precision is an FSDP option (--strategy fsdp)")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the `torchrun` process group when there is one (NCCL with CUDA, gloo otherwise)."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    dist.get_backend())


@dataclass
class StepEvent:
    step: int
    steps: int
    loss: float
    parts: dict[str, float]
    lr: float
    tokens: int            # tokens processed by this run so far (all ranks)
    tokens_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    history: list[dict] = field(default_factory=list)   # one row per step of this run
    evals: list[dict] = field(default_factory=list)     # every evaluation, including before training
    seconds: float = 0.0
    tokens: int = 0
    memory: dict = field(default_factory=dict)  # bytes this rank held after its first step, by kind


class Trainer:
    """Optimise the trainable parameters of `module` (`forward(ids) -> (loss, parts)`) on `train_rows`.

    `masks` maps trainable parameter names to bool tensors, True where the weight must stay exactly
    zero (e.g. a 2:4 pattern): gradients there are zeroed and the weights re-zeroed after every step.
    `module.evaluate(ids)`, if present, returns sums used for held-out metrics.
    """

    def __init__(self, module: nn.Module, train_rows: torch.Tensor, config: TrainConfig, *,
                 eval_rows: torch.Tensor | None = None, masks: dict[str, torch.Tensor] | None = None,
                 run_dir: Path | None = None, on_step: Callable[[StepEvent], None] | None = None,
                 dist: DistInfo | None = None, device: str | torch.device = "cpu"):
        self.module = module
        self.cfg = config
        self.dist = dist or DistInfo()
        self.device = torch.device(device)
        self.train_rows = train_rows
        self.eval_rows = eval_rows
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.on_step = on_step
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: every parameter is frozen")
        self.masks = {n: m.to(self.device) for n, m in (masks or {}).items()}
        unknown = set(self.masks) - {n for n, _ in self.params}
        if unknown:
            raise ConfigError(f"masks for parameters that are not trained: {sorted(unknown)[:3]}")
        self.micro = self._micro_batch_size()
        self._perms: dict[int, torch.Tensor] = {}
        self.sharded = None  # the FSDP copy of `module` while `fit` runs with strategy fsdp
        self.full_masks = self.masks  # whole masks (checkpoints); `masks`: what this rank applies

    # ---- batches -------------------------------------------------------------------------------
    def _micro_batch_size(self) -> int:
        cfg, world = self.cfg, self.dist.world_size
        if cfg.steps < 1 or cfg.batch_size < 1:
            raise ConfigError("steps and batch size must be at least 1")
        if cfg.batch_size % world:
            raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {world} processes")
        per_rank = cfg.batch_size // world
        micro = cfg.micro_batch_size or per_rank
        if micro < 1 or per_rank % micro:
            raise ConfigError(f"micro-batch size {micro} must divide the {per_rank} rows each of the {world} "
                              f"process(es) takes from a batch of {cfg.batch_size}")
        if self.train_rows.dim() != 2 or self.train_rows.shape[0] == 0:
            raise InputError("training data must be a non-empty (rows, seq_len) tensor of token ids")
        return micro

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            if len(self._perms) > 1:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.train_rows.shape[0], generator=g)
        return self._perms[epoch]

    def global_batch(self, step: int) -> torch.Tensor:
        """Row indices of the global batch of `step` (1-based): a pure function of the step, so a
        resumed run reads exactly what the interrupted one would have read. Epochs reshuffle."""
        n, b = self.train_rows.shape[0], self.cfg.batch_size
        start = (step - 1) * b
        return torch.stack([self._perm((start + k) // n)[(start + k) % n] for k in range(b)])

    def local_micro_batches(self, step: int) -> list[torch.Tensor]:
        idx = self.global_batch(step)
        per_rank = self.cfg.batch_size // self.dist.world_size
        mine = idx[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
        return [self.train_rows[chunk] for chunk in mine.split(self.micro)]

    # ---- the loop ------------------------------------------------------------------------------
    def _start(self, resume: Path | None) -> tuple[torch.optim.Optimizer, TrainResult, int]:
        """Place (or shard) the model, build the optimizer on what is trained, and restore a
        checkpoint or start fresh; returns (optimizer, result so far, steps already done)."""
        cfg = self.cfg
        if cfg.strategy == "fsdp":
            self._shard()
        else:
            self.module.to(self.device)
        self._model().train(cfg.dropout)
        opt = torch.optim.AdamW([p for _, p in self.params], lr=cfg.lr, betas=cfg.betas,
                                weight_decay=cfg.weight_decay)
        result = TrainResult(steps=cfg.steps, resumed_from=None)
        start = 0
        if resume is not None:
            start, result.evals = self._load_checkpoint(Path(resume), opt)
            result.resumed_from = start
        else:
            self._refuse_stale_checkpoints()
            torch.manual_seed(cfg.seed + self.dist.rank)  # dropout (if on); the data order has its own
            self._apply_masks(grads=False)
        return opt, result, start

    def fit(self, resume: Path | None = None) -> TrainResult:
        cfg = self.cfg
        opt, result, start = self._start(resume)
        runner = self._wrap()
        metrics = self._metrics_file(start)
        if start == 0 and self.eval_rows is not None:
            result.evals.append(self.evaluate(0))
            self._log(metrics, {"kind": "eval", **result.evals[-1]})
        t_begin = time.perf_counter()
        tokens_per_step = cfg.batch_size * self.train_rows.shape[1]
        try:
            for step in range(start + 1, cfg.steps + 1):
                lr = cfg.lr_at(step)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss, parts = self._step(runner, opt, step)
                if not math.isfinite(loss):
                    raise VerificationError(f"training diverged: loss is {loss} at step {step} (lower --lr)")
                done = step - start
                elapsed = time.perf_counter() - t_begin
                event = StepEvent(step, cfg.steps, loss, parts, lr, done * tokens_per_step,
                                  done * tokens_per_step / max(elapsed, 1e-9), elapsed,
                                  elapsed / done * (cfg.steps - step))
                row = {"kind": "train", "step": step, "loss": loss, **parts, "lr": lr,
                       "tokens_per_s": round(event.tokens_per_s, 2), "elapsed_s": round(elapsed, 3),
                       "eta_s": round(event.eta_s, 1)}
                result.history.append(row)
                self._log(metrics, row)
                evaluate_now = self.eval_rows is not None and (
                    step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
                if evaluate_now:
                    result.evals.append(self.evaluate(step))
                    self._log(metrics, {"kind": "eval", **result.evals[-1]})
                if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                    self._save_checkpoint(step, opt, result.evals)
                if not result.memory:
                    result.memory = self._memory(opt)
                if self.on_step is not None and self.dist.is_main:
                    self.on_step(event)
        finally:
            if metrics is not None:
                metrics.close()
        if self.sharded is not None:
            self.sharded.gather_back()  # the caller's module holds the trained weights, plain again
            self.sharded = None
        self.module.eval()
        result.seconds = time.perf_counter() - t_begin
        result.tokens = (cfg.steps - start) * tokens_per_step
        return result

    def _model(self) -> nn.Module:
        """The module the loop runs: `module`, or its FSDP copy."""
        return self.sharded.objective if self.sharded is not None else self.module

    def _shard(self) -> None:
        """Shard a copy of `module` over the process group (`moeconv.train.fsdp`), train its
        parameters from here on and free the module's own full tensors until `fit` gathers them back."""
        if self.dist.world_size <= 1:
            raise ConfigError("strategy fsdp shards the model over processes: run under torchrun with 2 or more "
                              "(--nproc-per-node), or use ddp")
        from moeconv.train.fsdp import local, shard_objective, shard_like
        names = [n for n, _ in self.params]
        self.sharded = shard_objective(self.module, device=self.device, mixed_precision=self.cfg.mixed_precision)
        params = dict(self.sharded.objective.named_parameters())
        self.params = [(n, params[n]) for n in names]
        self.masks = {n: local(shard_like(m, params[n])) for n, m in self.full_masks.items()}
        self.sharded.release()

    def _memory(self, opt) -> dict:
        """Bytes this rank holds, by kind: parameters (student, teacher, projections), gradients,
        optimizer state (its shards of them under FSDP)."""
        from moeconv.train.fsdp import local_bytes, optimizer_tensors
        model = self._model()
        teacher = getattr(model, "teacher", None)
        params = list(model.parameters()) + (list(teacher.parameters()) if teacher is not None else [])
        return {"parameters": local_bytes(params), "gradients": local_bytes(p.grad for _, p in self.params),
                "optimizer_state": local_bytes(optimizer_tensors(opt)), "strategy": self.cfg.strategy,
                "world_size": self.dist.world_size}

    def _wrap(self):
        if self.sharded is not None:
            return self.sharded.objective
        if self.dist.world_size <= 1:
            return self.module
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Buffers (rotary tables, …) are identical on every rank: synced once at init, not per forward.
        kwargs = {"find_unused_parameters": self._has_unused_parameters(), "forward_sync_buffers": False}
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index or 0]
        return DDP(self.module, **kwargs)

    def _has_unused_parameters(self) -> bool:
        """Probe one tiny forward/backward (2 tokens, eval mode: no RNG drawn) for trainable
        parameters outside the graph. DDP needs to know (it errors on them otherwise), and looking
        for them every step costs a graph traversal, so it only does so when there are some."""
        was_training = self.module.training
        self.module.eval()
        try:
            loss, _ = self.module(self.train_rows[:1, :2].to(self.device))
            loss.backward()
            unused = any(p.grad is None for _, p in self.params)
        finally:
            for _, p in self.params:
                p.grad = None
            self.module.train(was_training)
        return unused

    def _step(self, runner, opt, step: int) -> tuple[float, dict[str, float]]:
        opt.zero_grad(set_to_none=True)
        batches = self.local_micro_batches(step)
        ddp = runner is not self.module and self.sharded is None
        sums: dict[str, torch.Tensor] = {}
        for k, ids in enumerate(batches):
            last = k == len(batches) - 1
            if self.sharded is not None:  # accumulate unsharded, reduce-scatter after the last
                self.sharded.set_gradient_sync(last)
            sync = runner.no_sync() if ddp and not last else nullcontext()
            with sync:
                loss, parts = runner(ids.to(self.device))
                (loss / len(batches)).backward()
            for name, v in (("loss", loss.detach()), *parts.items()):
                sums[name] = sums.get(name, 0.0) + v.detach().float()
        with torch.no_grad():
            for _, p in self.params:
                if p.grad is None:  # unused this step: DDP would hand it zeros; so do we, everywhere
                    p.grad = torch.zeros_like(p)
            self._apply_masks(grads=True)
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.grad_clip)
        opt.step()
        self._apply_masks(grads=False)
        names = sorted(sums)
        vec = torch.stack([sums[n] for n in names]) / len(batches)
        if self.dist.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(vec)
            vec /= self.dist.world_size
        values = dict(zip(names, vec.tolist()))
        loss = values.pop("loss")
        return loss, values

    @torch.no_grad()
    def _apply_masks(self, grads: bool) -> None:
        if not self.masks:
            return
        from moeconv.train.fsdp import local
        for n, p in self.params:
            m = self.masks.get(n)
            if m is not None:
                local(p.grad if grads else p).masked_fill_(m, 0)  # this rank's shard and its mask

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Held-out metrics: student perplexity, and with a teacher KL(teacher ‖ student) and its perplexity."""
        model = self._model()
        evaluate = getattr(model, "evaluate", None)
        if evaluate is None or self.eval_rows is None:
            return {"step": step}
        was_training = model.training
        model.eval()
        mine = self.eval_rows[self.dist.rank::self.dist.world_size]
        totals = dict.fromkeys(_EVAL_SUMS, 0.0)  # fixed keys: a rank with no rows still all-reduces
        for ids in mine.split(self.micro):
            for k, v in evaluate(ids.to(self.device)).items():
                totals[k] += v
        names = list(_EVAL_SUMS)
        vec = torch.tensor([totals[n] for n in names], dtype=torch.float64)
        if self.dist.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(vec)
        t = dict(zip(names, vec.tolist()))
        model.train(was_training)
        out = {"step": step, "eval_ce": t["ce_sum"] / t["tokens"]}
        out["eval_ppl"] = math.exp(min(out["eval_ce"], 700))
        if t["kl_tokens"]:
            out["eval_kl"] = t["kl_sum"] / t["kl_tokens"]
            out["teacher_ppl"] = math.exp(min(t["teacher_ce_sum"] / t["tokens"], 700))
        return out

    # ---- metrics ------------------------------------------------------------------------------
    def _metrics_file(self, start: int):
        if self.run_dir is None or not self.dist.is_main:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        kept = []
        if start and path.is_file():  # resumed: keep what led up to the checkpoint, drop the rest
            with path.open("rb") as old:
                for raw in old:  # a row we did not write (broken, not an object, no step) is dropped
                    try:
                        line = raw.decode("utf-8").rstrip("\r\n")
                        row = json.loads(line)
                    except (UnicodeDecodeError, ValueError, RecursionError):
                        continue
                    step = row.get("step", 0) if isinstance(row, dict) else None
                    if type(step) is int and step <= start and row.get("kind") != "resume":
                        kept.append(line)
        f = path.open("w", encoding="utf-8")
        for line in kept:
            f.write(line + "\n")
        if start:
            f.write(json.dumps({"kind": "resume", "step": start}) + "\n")
        f.flush()
        return f

    @staticmethod
    def _log(f, row: dict) -> None:
        if f is not None:
            f.write(json.dumps(row) + "\n")
            f.flush()

    # ---- checkpoints --------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            import torch.distributed as dist
            dist.barrier()

    def _refuse_stale_checkpoints(self) -> None:
        # A fresh run must not mix its checkpoints with an earlier run's: "the newest checkpoint"
        # could then belong to the other run.
        if self.run_dir is None or not self.cfg.checkpoint_every:
            return
        old = sorted((self.run_dir / "checkpoints").glob("step-*"))
        if old:
            raise ConfigError(f"{self.run_dir / 'checkpoints'} holds checkpoints of an earlier run ({old[-1].name}); "
                              "resume from them, or remove them (--force does) to start over")

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _save_checkpoint(self, step: int, opt, evals: list[dict]) -> None:
        """`run_dir/checkpoints/step-NNNNNNNN/`, written into a hidden sibling and renamed into
        place complete: trainable.safetensors, masks.safetensors, optimizer.pt, rng-rankR.pt,
        trainer.json. Only the newest `keep_checkpoints` are kept."""
        if self.run_dir is None:
            raise ConfigError("checkpoints need a run directory")
        from safetensors.torch import save_file
        root = self.run_dir / "checkpoints"
        final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        torch.save(self._rng_state(), tmp / f"rng-rank{self.dist.rank}.pt")
        tensors, opt_state = None, None
        if self.sharded is not None:  # gathered whole (collectives: every rank), written by rank 0
            from moeconv.train.fsdp import full_tensor, gather_optimizer_state
            tensors = {n: full_tensor(p.detach()).cpu().contiguous() for n, p in self.params}
            opt_state = gather_optimizer_state(opt)
        elif self.dist.is_main:
            tensors = {n: p.detach().cpu().contiguous() for n, p in self.params}
            opt_state = opt.state_dict()
        if self.dist.is_main:
            save_file(tensors, tmp / "trainable.safetensors")
            if self.full_masks:
                save_file({n: m.cpu().contiguous() for n, m in self.full_masks.items()}, tmp / "masks.safetensors")
            torch.save(opt_state, tmp / "optimizer.pt")
            meta = {"format_version": CHECKPOINT_FORMAT, "step": step, "world_size": self.dist.world_size,
                    "config": asdict(self.cfg), "data": fingerprint(self.train_rows),
                    "trainable": {n: list(p.shape) for n, p in self.params}, "evals": evals}
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n")
        self._barrier()
        if self.dist.is_main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            old = sorted(p for p in root.glob("step-*") if p.is_dir())[:-max(1, self.cfg.keep_checkpoints)]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
        self._barrier()

    def _load_checkpoint(self, path: Path, opt) -> tuple[int, list[dict]]:
        """Restore a checkpoint written by `_save_checkpoint`. Everything is read and checked
        against this run (config, data, parameter names and shapes, optimizer state, RNG state)
        before anything is changed; a mismatch or a broken file is one `InputError`/`ConfigError`."""
        ckpt, meta = read_checkpoint(path, rank=self.dist.rank)
        self._check_resume_meta(ckpt, meta)
        saved, masks = self._read_trained_tensors(ckpt)
        opt_state = _torch_load(ckpt / "optimizer.pt", self.device)
        _check_optimizer_state(ckpt / "optimizer.pt", opt_state, [p for _, p in self.params], opt.param_groups[0])
        rng = _read_rng_state(ckpt / f"rng-rank{self.dist.rank}.pt")
        # everything checked: now change the model, optimizer and RNG (under FSDP each rank takes
        # its shard of the whole tensors every rank read)
        from moeconv.train.fsdp import local, shard_like, shard_optimizer_state
        with torch.no_grad():
            for n, p in self.params:
                local(p).copy_(local(shard_like(saved[n].to(p.dtype), p)))
        if masks is not None:
            self.full_masks = {n: m.to(self.device) for n, m in masks.items()}
            params = dict(self.params)
            self.masks = {n: local(shard_like(m, params[n])) for n, m in self.full_masks.items()}
        if self.sharded is not None:
            opt_state = shard_optimizer_state(opt_state, [p for _, p in self.params])
        try:
            opt.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise InputError(f"{ckpt / 'optimizer.pt'}: optimizer state does not fit this run "
                             f"({exc.__class__.__name__}: {' '.join(str(exc).split())[:120]})") from None
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        return meta["step"], list(meta["evals"])

    def _check_resume_meta(self, ckpt: Path, meta: dict) -> None:
        """A checkpoint's trainer.json against this run: resume-relevant config fields, step,
        process count, data fingerprint and trainable parameter shapes."""
        now = asdict(self.cfg)
        was = meta["config"]
        diff = [k for k in _RESUME_FIELDS if json.dumps(was.get(k)) != json.dumps(now.get(k))]
        if diff:
            changes = ", ".join(f"{k} was {str(was.get(k))[:40]}, now {now.get(k)!r}" for k in diff)
            raise ConfigError(f"{ckpt}: cannot resume exactly: {changes}")
        if meta["step"] > self.cfg.steps:
            raise InputError(f"{ckpt}: trainer.json: step {meta['step']} is past the run's {self.cfg.steps} steps")
        if meta["world_size"] != self.dist.world_size:
            raise ConfigError(f"{ckpt}: written by {meta['world_size']} process(es), resumed with {self.dist.world_size}; "
                              "use the same number for an exact continuation")
        if meta["data"] != fingerprint(self.train_rows):
            raise InputError(f"{ckpt}: the training data differs from the data this checkpoint was trained on")
        shapes = {n: list(p.shape) for n, p in self.params}
        if meta["trainable"] != shapes:
            raise InputError(f"{ckpt}: its trainable parameters do not match this model and mode "
                             f"({_first_difference(meta['trainable'], shapes)})")

    def _read_trained_tensors(self, ckpt: Path) -> tuple[dict, dict | None]:
        """(trained parameters, sparsity masks or None) of a checkpoint, checked against this run's
        trainable parameters; nothing is changed."""
        params = dict(self.params)
        saved = _read_tensors(ckpt / "trainable.safetensors")
        for n, p in self.params:
            t = saved.get(n)
            if t is None or list(t.shape) != list(p.shape) or not t.is_floating_point():
                raise InputError(f"{ckpt / 'trainable.safetensors'}: tensor {n} is missing or not a float tensor of "
                                 f"shape {list(p.shape)}")
        masks = None
        if (ckpt / "masks.safetensors").is_file():
            masks = _read_tensors(ckpt / "masks.safetensors")
            for n, m in masks.items():
                if n not in params or m.dtype != torch.bool or m.shape != params[n].shape:
                    raise InputError(f"{ckpt / 'masks.safetensors'}: mask {n[:80]} is not a bool tensor shaped like "
                                     "a trained parameter")
        elif self.masks:
            raise InputError(f"{ckpt}: no masks saved, but this run keeps sparsity masks")
        return saved, masks


def _read_rng_state(rng_file: Path) -> dict:
    """A rank's saved random-number-generator state (`torch`, and `cuda` if it was saved), checked."""
    rng = _torch_load(rng_file, "cpu")
    if (not isinstance(rng, dict) or not _plain(rng.get("torch"))
            or rng["torch"].dtype != torch.uint8 or rng["torch"].shape != torch.get_rng_state().shape
            or ("cuda" in rng and not (_plain(rng["cuda"]) and rng["cuda"].dtype == torch.uint8))):
        raise InputError(f"{rng_file}: not a saved random-number-generator state")
    return rng


MAX_TRAINER_JSON_BYTES = 64 * 2**20


def read_checkpoint(path: Path, rank: int = 0) -> tuple[Path, dict]:
    """(checkpoint directory, its trainer.json) for `--resume PATH`, checked for shape: every field
    `_load_checkpoint` reads has the right type, the step matches the directory name, and the files
    it reads exist. Cheap (no tensor is read): the CLI calls it before loading any model."""
    ckpt = find_checkpoint(path)
    meta_path = ckpt / "trainer.json"
    if meta_path.stat().st_size > MAX_TRAINER_JSON_BYTES:
        raise InputError(f"{meta_path}: larger than {MAX_TRAINER_JSON_BYTES // 2**20} MiB; not a moeconv trainer state")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{meta_path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: expected a JSON object")
    version = meta.get("format_version")
    if type(version) is not int or version != CHECKPOINT_FORMAT:
        raise InputError(f"{meta_path}: unsupported checkpoint format {json.dumps(version)[:40]} "
                         f"(this moeconv reads format {CHECKPOINT_FORMAT})")

    def field(name, kind, ok=lambda v: True, what=""):
        v = meta.get(name)
        if not isinstance(v, kind) or isinstance(v, bool) or not ok(v):
            raise InputError(f"{meta_path}: field `{name}` must be {what}, not {json.dumps(v)[:40]}")
        return v

    step = field("step", int, lambda v: 1 <= v < 2**53, "a step number (1 or more)")
    field("world_size", int, lambda v: 1 <= v <= 2**20, "a process count (1 or more)")
    field("config", dict, what="an object")
    field("data", str, what="a data fingerprint")
    field("trainable", dict, lambda v: all(isinstance(s, list) and all(type(d) is int for d in s)
                                           for s in v.values()), "an object of parameter shapes")
    evals = meta.get("evals", [])
    if evals is None:
        evals = []
    if not isinstance(evals, list) or not all(isinstance(e, dict) for e in evals):
        raise InputError(f"{meta_path}: field `evals` must be a list of objects")
    meta["evals"] = evals
    if ckpt.name.startswith("step-") and ckpt.name[5:].isdigit() and int(ckpt.name[5:]) != step:
        raise InputError(f"{meta_path}: step {step} does not match its directory {ckpt.name}")
    for name in ("trainable.safetensors", "optimizer.pt", f"rng-rank{rank}.pt"):
        if not (ckpt / name).is_file():
            raise InputError(f"{ckpt}: {name} is missing; not a complete checkpoint")
    return ckpt, meta


def _first_difference(saved: dict, now: dict) -> str:
    for n in sorted(set(saved) | set(now)):
        if n not in now:
            return f"{n[:80]} is not trained here"
        if n not in saved:
            return f"{n[:80]} is not in the checkpoint"
        if saved[n] != now[n]:
            return f"{n[:80]} is {saved[n]} there, {now[n]} here"
    return "different order"


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as exc:  # SafetensorError and friends: a broken file
        raise InputError(f"{path}: unreadable ({exc.__class__.__name__}: {' '.join(str(exc).split())[:120]})") from None


def _torch_load(path: Path, device):
    """`torch.load(weights_only=True)`: tensors and plain containers only; a pickle that would run
    code (or any other broken file) is refused, never executed."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, zip errors: all "unreadable"
        raise InputError(f"{path}: unreadable ({exc.__class__.__name__}); not a checkpoint file "
                         "written by moeconv") from None


def _same(saved, now) -> bool:
    """`saved == now` for a saved optimizer setting (plain values and tuples of them), without
    ever comparing a tensor (its truth value can be ambiguous)."""
    if type(saved) is not type(now):
        return False
    if isinstance(now, (tuple, list)):
        return len(saved) == len(now) and all(_same(a, b) for a, b in zip(saved, now))
    return saved == now


def _plain(t) -> bool:
    """A dense tensor with real storage (not sparse, quantized or on the meta device)."""
    return isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta and not t.is_quantized


def _check_optimizer_state(path: Path, state, params: list[torch.Tensor], group: dict) -> None:
    """An AdamW state dict for exactly these parameters (shapes included) and this run's settings:
    torch's own `load_state_dict` compares neither shapes nor hyperparameters (it adopts the saved
    ones), so a mismatch would only fail, or silently change the run, at the next step."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        raise InputError(f"{path}: not an optimizer state (expected `state` and `param_groups`)")
    groups = state["param_groups"]
    if len(groups) != 1 or not isinstance(groups[0], dict) or not isinstance(groups[0].get("params"), list) \
            or len(groups[0]["params"]) != len(params) or not all(type(i) is int for i in groups[0]["params"]) \
            or len(set(groups[0]["params"])) != len(params):
        raise InputError(f"{path}: optimizer state for a different set of parameters "
                         f"(this run trains {len(params)} tensors)")
    for key, now in group.items():  # the learning rate is set every step; the rest must be this run's
        if key in ("params", "lr", "initial_lr") or key not in groups[0]:
            continue
        was = groups[0][key]
        if not _same(was, now):
            raise InputError(f"{path}: optimizer setting `{key}` is {str(was)[:40]}, this run's is {now}")
    ids = groups[0]["params"]
    for k, v in state["state"].items():
        if type(k) is not int or k not in ids or not isinstance(v, dict):
            raise InputError(f"{path}: optimizer state for unknown parameter {str(k)[:40]}")
        p = params[ids.index(k)]
        for name in ("exp_avg", "exp_avg_sq"):
            t = v.get(name)
            if not _plain(t) or t.shape != p.shape or not t.is_floating_point():
                raise InputError(f"{path}: optimizer `{name}` of parameter {k} is not a float tensor of "
                                 f"shape {list(p.shape)}")
        step = v.get("step")
        if not _plain(step) or step.numel() != 1 or step.is_complex() or not bool(torch.isfinite(step.double()).all()) \
                or not 0 <= float(step) < 2**53:
            raise InputError(f"{path}: optimizer step count of parameter {k} is missing")


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the newest one under a run directory / its `checkpoints/`."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        steps = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file()) if root.is_dir() else []
        if steps:
            return steps[-1]
    raise InputError(f"{path}: no training checkpoint here (expected trainer.json, or checkpoints/step-*/)")
