"""`moeconv distill --teacher T --student S OUT --data FILE --mode …`: train the student against the
teacher and write it in the format it was read in, verified on reload.

Runs as one process, or under torchrun (every rank trains its share of each global batch; rank 0
alone writes OUT, metrics and checkpoints):

    torchrun --nproc-per-node 2 --no-python moeconv distill --teacher T --student S OUT --data FILE

Under torchrun `--strategy fsdp` shards the student, the teacher, the gradients and the optimizer
state over the processes (FSDP2; `auto`, the default, picks it when DDP's estimate per process
does not fit the device), for models whose training state does not fit one device.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from moeconv.cli.common import eval_option, eval_samples_option, force_option, seed_option

TERMS = ("kl", "ce", "hidden", "router", "balance", "z")
# The reloaded student runs in the consumer's implementation (transformers' fused Mixtral experts)
# while the trained one runs in moeconv's per-expert MoEBlock: same tensors (the writer re-reads
# each with SHA-256), different summation order. Measured after a 12-step heal of SmolLM2-MoE
# (30 layers): 1.01e-5 relative, just over the 1e-5 "exact" bound; a layout mistake is O(1).
RELOAD_RTOL = 1e-4


def reload_tolerance(state) -> float:
    """`RELOAD_RTOL` for an fp32 student. A half-precision student's checkpoint holds its routers,
    trained in fp32 (`MoEBlock` routes in fp32), rounded to the checkpoint's dtype: 3.2e-4 relative
    on a bf16 Mixtral after 2 steps (scripts/bench_fsdp_memory.py), so the bound of every other
    half-precision reload applies (`quantize.RELOAD_RTOL_HALF`)."""
    import torch

    from moeconv.cli.commands.quantize import RELOAD_RTOL_HALF
    dtype = next((p.dtype for p in state.module.parameters() if p.is_floating_point()), torch.float32)
    return RELOAD_RTOL if dtype == torch.float32 else RELOAD_RTOL_HALF


def parse_loss_weights(text: str | None) -> dict[str, float]:
    """'kl=1,ce=0.1' → {'kl': 1.0, 'ce': 0.1}."""
    from moeconv.errors import ConfigError
    out: dict[str, float] = {}
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep or key not in TERMS:
            raise ConfigError(f"--loss-weights: expected NAME=VALUE with NAME in {', '.join(TERMS)}, got {part!r}")
        try:
            out[key] = float(val)
        except ValueError:
            raise ConfigError(f"--loss-weights: {key}={val!r} is not a number") from None
    return out


def parse_layer_map(text: str | None) -> dict[int, int] | None:
    """'0:1,1:3' (student layer:teacher layer) → {0: 1, 1: 3}."""
    from moeconv.errors import ConfigError
    if not text:
        return None
    try:
        pairs = [p.split(":") for p in text.replace(" ", "").split(",") if p]
        out = {int(s): int(t) for s, t in pairs}
    except ValueError:
        raise ConfigError(f"--layer-map must look like 0:1,1:3 (student:teacher), not {text!r}") from None
    if len(out) != len(pairs):
        raise ConfigError("--layer-map lists a student layer twice")
    return out


def parse_expert_map(text: str | None) -> list[int] | None:
    from moeconv.errors import ConfigError
    if not text:
        return None
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ConfigError(f"--expert-map must list a student expert per teacher expert (0,0,1,1), not {text!r}") from None


def student_tokenizer(src: str):
    """The tokenizer shipped with the student (a checkpoint dir or a GGUF file), or None."""
    from moeconv.errors import InputError
    from moeconv.io.transformers_io import read_tokenizer
    p = Path(src)
    try:
        if p.suffix == ".gguf" or (p.is_dir() and any((p / f).is_file() for f in
                                                        ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))):
            return read_tokenizer(p)
    except InputError:
        raise
    except Exception:
        return None
    return None


class TrainProgress:
    """`progress(task, done, total)` plus `train_step(event)`: a bar with loss, tokens/s and ETA on a
    terminal, a plain line every ~5% of the steps otherwise (logs of torchrun jobs)."""

    def __init__(self, console, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._p = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                           TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
        self._task = None
        self._last = 0.0

    def __enter__(self):
        if self.live:
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self._p.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int | None) -> None:
        pass  # the bar follows train_step, which carries the numbers

    def train_step(self, ev) -> None:
        if not self.enabled:
            return
        loss, tps = f"{ev.loss:.4f}", f"{ev.tokens_per_s:,.0f}"
        if self.live:
            if self._task is None:
                self._task = self._p.add_task("distill", total=ev.steps, completed=ev.step - 1, loss=loss, tps=tps)
            self._p.update(self._task, completed=ev.step, loss=loss, tps=tps)
            return
        every = max(1, ev.steps // 20)
        if ev.step % every == 0 or ev.step == ev.steps or time.monotonic() - self._last > 60:
            self._last = time.monotonic()
            eta = time.strftime("%H:%M:%S", time.gmtime(ev.eta_s))
            self.console.print(f"step {ev.step}/{ev.steps}  loss {loss}  {tps} tok/s  ETA {eta}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)


def distill(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory for the trained student."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher model (checkpoint dir, .gguf, moeconv dir)."),
    student: str = typer.Option(..., "--student", help="Student model to train; OUT is written in its format."),
    data: Path = typer.Option(..., "--data", metavar="FILE", help="Training text (.txt: blank-line separated documents; .jsonl: "
                              "a 'text' field per line) or token ids (.safetensors / .pt)."),
    mode: str = typer.Option("heal", "--mode", help="heal | moe-to-dense | moe-to-moe | router-only."),
    steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per optimizer step, over all processes."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Rows per forward. Fix it to "
                                                   "compare runs with different process counts.",
                                                   show_default="--batch-size / processes"),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per packed row."),
    temperature: float = typer.Option(1.0, "--temperature", help="KL temperature T (loss scaled by T²)."),
    loss_weights: Optional[str] = typer.Option(None, "--loss-weights", help="Override the mode's weights: "
                                               "kl=1,ce=0.1,hidden=0,router=1,balance=0.01,z=0.001."),
    layer_map: Optional[str] = typer.Option(None, "--layer-map", help="Student:teacher layer pairs for hidden "
                                            "and router losses, e.g. 0:1,1:3."),
    router_loss: str = typer.Option("kl", "--router-loss", help="kl | topk-ce."),
    expert_map: Optional[str] = typer.Option(None, "--expert-map", help="Student expert for each teacher "
                                             "expert (fewer experts), e.g. 0,0,1,1."),
    keep_zeros: Optional[bool] = typer.Option(None, "--keep-zeros/--no-keep-zeros", help="Keep every exact zero "
                                              "of trained matrices (2:4 masks).", show_default="on for --mode heal"),
    freeze: Optional[list[str]] = typer.Option(None, "--freeze", help="Regex of parameter names not to train. Repeatable."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear learning-rate warm-up steps."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine | constant (after warm-up)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max gradient norm (0: off)."),
    eval_data: Optional[Path] = eval_option("Held-out data file.", "--eval-data",
                                              show_default="the last --eval-fraction of --data"),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Share of --data rows held out."),
    eval_rows: int = eval_samples_option(32, "--eval-rows", minimum=0, help="At most this many held-out rows are "
                                         "evaluated (before, after, every --eval-every steps); 0: no evaluation."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (always before and after)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Checkpoint every N steps (and at the end)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="metrics.jsonl and checkpoints/.",
                                           show_default="OUT.run"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a checkpoint or run directory."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (one GPU per process under torchrun)."),
    strategy: str = typer.Option("auto", "--strategy", help="Under torchrun: ddp (the whole model, gradients "
                                 "and optimizer state in every process), fsdp (each process holds 1/N of them), "
                                 "auto (fsdp when DDP's estimate per process exceeds the device's memory)."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="With fsdp: bf16 (bf16 "
                                                  "forward/backward, fp32 gradient reduction and weights).",
                                                  show_default="off: fp32"),
    seed: int = seed_option("Seed for the data order, the held-out split and every random choice of training."),
    force: bool = force_option(),
):
    """Distil a teacher into a student: heal a pruned/compressed model, MoE → dense, MoE → fewer
    experts, or routers only. Writes the student in its own format, reloads and compares it;
    OUT.run/metrics.jsonl logs every step."""
    args = DistillArgs(**locals())  # first statement: exactly the options above
    from moeconv import cli
    cli._run(lambda: _run_distill(args))


@dataclass(frozen=True)
class DistillArgs:
    """`moeconv distill`'s options as typer parsed them (see `distill` for their meaning)."""
    out_dir: Path
    teacher: str
    student: str
    data: Path
    mode: str
    steps: int
    lr: float
    batch_size: int
    micro_batch_size: Optional[int]
    seq_len: int
    temperature: float
    loss_weights: Optional[str]
    layer_map: Optional[str]
    router_loss: str
    expert_map: Optional[str]
    keep_zeros: Optional[bool]
    freeze: Optional[list[str]]
    warmup_steps: int
    schedule: str
    weight_decay: float
    grad_clip: float
    eval_data: Optional[Path]
    eval_fraction: float
    eval_rows: int
    eval_every: int
    checkpoint_every: int
    run_dir: Optional[Path]
    resume: Optional[Path]
    device: str
    strategy: str
    mixed_precision: Optional[str]
    seed: int
    force: bool

    @property
    def run_path(self) -> Path:
        """metrics.jsonl and checkpoints/: --run-dir, or OUT.run next to OUT."""
        return self.run_dir or self.out_dir.with_name(self.out_dir.name + ".run")


def _distill_config(a: DistillArgs):
    """The pass's typed `DistillConfig`; a bad value is one `ConfigError` line."""
    from pydantic import ValidationError

    from moeconv.errors import ConfigError
    from moeconv.pass_base import _first_error
    from passes.distill import DistillConfig, LossWeightsConfig
    try:
        return DistillConfig(mode=a.mode, steps=a.steps, lr=a.lr, batch_size=a.batch_size,
                             micro_batch_size=a.micro_batch_size, temperature=a.temperature,
                             loss_weights=LossWeightsConfig(**parse_loss_weights(a.loss_weights)),
                             layer_map=parse_layer_map(a.layer_map), router_loss=a.router_loss,
                             expert_map=parse_expert_map(a.expert_map), freeze_zeros=a.keep_zeros,
                             freeze=a.freeze or [], warmup_steps=a.warmup_steps, schedule=a.schedule,
                             weight_decay=a.weight_decay, grad_clip=a.grad_clip or None,
                             checkpoint_every=a.checkpoint_every, eval_every=a.eval_every, seed=a.seed,
                             strategy=a.strategy, mixed_precision=a.mixed_precision)
    except ValidationError as exc:
        raise ConfigError(f"distill: {_first_error(exc)}") from None


def _check_request(a: DistillArgs) -> None:
    """Everything refused before a model is loaded: options, OUT, the models' and data's paths."""
    from moeconv.errors import ConfigError, InputError
    from moeconv.io.atomic import check_new_output
    if a.eval_rows < 0:
        raise ConfigError("--eval-samples must be >= 0")
    if a.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, not {a.device!r}")
    check_new_output(a.out_dir, force=a.force)
    for name, src in (("--teacher", a.teacher), ("--student", a.student)):
        if not str(src).startswith("builtin:") and not Path(src).exists():
            raise InputError(f"{name} {src}: no such file or directory")
    if not str(a.teacher).startswith("builtin:") and Path(a.teacher).resolve() == a.out_dir.resolve():
        raise InputError(f"output {a.out_dir} is the teacher; the teacher is never modified")
    check_data_arguments(a.teacher, a.student, a.data, a.eval_data, a.seq_len, a.batch_size, a.micro_batch_size,
                         a.resume)


def _run_distill(a: DistillArgs) -> None:
    from moeconv import cli
    from moeconv.io.atomic import output_lock
    from moeconv.train.trainer import init_distributed
    cfg = _distill_config(a)
    _check_request(a)
    dist = init_distributed()
    if dist.world_size <= 1 and (cfg.strategy == "fsdp" or cfg.mixed_precision):
        from moeconv.errors import ConfigError
        raise ConfigError(f"--{'strategy fsdp' if cfg.strategy == 'fsdp' else 'mixed-precision'} shards the models "
                          "over processes: run under torchrun --nproc-per-node 2 (or more), or leave it out")
    out_lock = contextlib.ExitStack()
    if dist.is_main:  # one run per OUT (and its OUT.run) from the start, not only at the final write
        out_lock.enter_context(output_lock(a.out_dir))
    try:
        stale = a.run_path / "checkpoints"
        if a.force and a.resume is None and a.checkpoint_every and dist.is_main and stale.is_dir():
            shutil.rmtree(stale)  # --force starts over: an earlier run's checkpoints would mix with ours
        if dist.world_size > 1:
            import torch.distributed as tdist
            tdist.barrier()
        report = _train(a, cfg, dist)
        if report is None:  # not rank 0: rank 0 writes OUT and renders
            return
        metrics = a.run_path / "metrics.jsonl"
        if metrics.is_file():
            shutil.copy2(metrics, a.out_dir / "metrics.jsonl")
        render_distill(cli.out, report, a.run_path)
    finally:
        out_lock.close()
        _leave_group(dist)


def _train(a: DistillArgs, cfg, dist) -> dict | None:
    """Load both models and the data, train; rank 0 writes OUT and returns the report, other
    ranks return None."""
    from moeconv import Context, cli, load
    from moeconv.cli.common import format_of
    from moeconv.model_limits import model_limits
    from moeconv.pipeline import Pipeline
    from moeconv.train.data import load_token_data
    from passes.distill import Distill
    t_state, s_state = load(a.teacher), load(a.student)
    tok = None if a.data.suffix in (".safetensors", ".pt") else student_tokenizer(a.student)
    rows = load_token_data(a.data, seq_len=a.seq_len, tokenizer=tok, eval_fraction=a.eval_fraction,
                           eval_path=a.eval_data, vocab_size=model_limits(s_state).vocab_size,
                           model=f"--student {a.student}")
    held_rows = rows.eval[:a.eval_rows] if rows.eval is not None and a.eval_rows > 0 else None
    s_state.artifacts["teacher"] = t_state.module
    with TrainProgress(cli.err, enabled=dist.is_main and not cli._state["verbose"]) as progress:
        ctx = Context(calibration=rows.train, evaluation=held_rows, seed=a.seed, device=a.device, progress=progress)
        p = Distill(cfg, run_dir=a.run_path, resume=a.resume)
        if not dist.is_main:
            Pipeline([p]).run(s_state, ctx)
            return None
        from moeconv.jobs.pipeline_job import run_to_dir
        return run_to_dir(a.student, a.out_dir, [p], ctx=ctx, fmt=format_of(a.student), force=a.force,
                          state=s_state, reload_tolerance=reload_tolerance(s_state))


def check_data_arguments(teacher: str, student: str, data: Path, eval_data: Path | None, seq_len: int,
                         batch_size: int, micro_batch_size: int | None, resume: Path | None) -> None:
    """What can be refused before any model is loaded: missing data files, a sequence length past
    either model's position table or whose activations cannot fit, a resume directory that is not
    a complete moeconv checkpoint."""
    from moeconv.model_limits import check_sequences, model_limits
    from moeconv.errors import ConfigError
    from moeconv.train.data import check_data_file
    for f in (data, eval_data):
        if f is not None:
            check_data_file(f)
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2, not {seq_len}")
    rows, rows_flag = (micro_batch_size, "--micro-batch-size") if micro_batch_size else (batch_size, "--batch-size")
    for flag, src in (("--teacher", teacher), ("--student", student)):
        check_sequences(model_limits(src, f"{flag} {src}"), rows, seq_len, seq_len_flag="--seq-len",
                        samples_flag=rows_flag, rows_per_forward=rows, training=flag == "--student")
    if resume is not None:
        from moeconv.train.trainer import read_checkpoint
        read_checkpoint(resume)


def _leave_group(dist) -> None:
    if dist.world_size > 1:
        import torch.distributed as tdist
        if tdist.is_initialized():
            tdist.destroy_process_group()


def render_distill(console, report: dict, run_dir: Path) -> None:
    """The summary table (training, strategy, losses, the reload check), then warnings."""
    from moeconv.render import reloaded_text, render_warnings, summary_table
    from moeconv.report_format import fmt_float, fmt_seconds
    rep = report["passes"][0]
    m = rep["metrics"]
    s = summary_table("distill")
    s.add_row("output", str(report["output"]))
    s.add_row("trained", rep["summary"])
    s.add_row("parameters", f"{m['trainable_params']:,} trained ({m['frozen_params']:,} frozen, unchanged)")
    s.add_row("loss weights", ", ".join(f"{k}={v:g}" for k, v in m["loss_weights"].items()))
    s.add_row("throughput", f"{m['world_size']} process(es), {m['tokens']:,} tokens in {fmt_seconds(m['seconds'])} "
              f"({m['tokens_per_s'] or 0:,.0f} tok/s)" + (f", resumed at step {m['resumed_from']}"
                                                          if m.get("resumed_from") else ""))
    if m.get("strategy"):
        s.add_row("strategy", f"{m['strategy']} ({m['strategy_why']}); "
                  + _memory_line(m.get("memory_per_rank", {}), m["strategy"]))
    if m.get("masked_matrices"):
        s.add_row("zeros", f"kept {m['kept_zeros']:,} zeros fixed in {m['masked_matrices']} matrices (checked after "
                  "training)")
    if "loss_first" in m:
        s.add_row("training loss", f"{fmt_float(m['loss_first'], 4)} → {fmt_float(m['loss_last'], 4)}")
    s.add_row("check", reloaded_text(report, "the trained model"))
    s.add_row("metrics", f"{run_dir}/metrics.jsonl")
    s.add_row("report", f"{report['output']}/report.json")
    s.add_row("time", fmt_seconds(report["seconds"]))
    console.print(s)
    render_warnings(console, rep.get("warnings", []))


def _memory_line(memory: dict, strategy: str) -> str:
    """'per process: parameters 1.2 GiB, …, measured …' from the pass's `memory_per_rank`."""
    from moeconv.io.config_checks import format_bytes
    est = memory.get("estimate", {}).get(strategy, {})
    got = memory.get("measured", {})
    parts = ("parameters", "gradients", "optimizer_state")
    text = "per process: " + ", ".join(f"{k.replace('_', ' ')} {format_bytes(est[k])}" for k in parts if k in est)
    if all(k in got for k in parts):
        text += " estimated; " + ", ".join(f"{format_bytes(got[k])}" for k in parts) + " measured"
    return text
