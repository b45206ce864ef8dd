"""`moeconv distill --teacher T --student S OUT --data FILE --mode …`: train the student against the
teacher and write it in the format it was read in, verified on reload.

Runs as one process, or under torchrun (every rank trains its share of each global batch; rank 0
alone writes OUT, metrics and checkpoints):

    torchrun --nproc-per-node 2 --no-python moeconv distill --teacher T --student S OUT --data FILE
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Optional

import typer

TERMS = ("kl", "ce", "hidden", "router", "balance", "z")
# The reloaded student runs in the consumer's implementation (transformers' fused Mixtral experts)
# while the trained one runs in moeconv's per-expert MoEBlock: same tensors (the writer re-reads
# each with SHA-256), different summation order. Measured after a 12-step heal of SmolLM2-MoE
# (30 layers): 1.01e-5 relative, just over the 1e-5 "exact" bound; a layout mistake is O(1).
RELOAD_RTOL = 1e-4


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


def format_of(src: str) -> str:
    """The student's own format: moeconv-format in → moeconv out; HF in → the same HF layout
    (`auto` keeps an HF MoE family and writes a dense HF model with save_pretrained)."""
    import json
    cfg = Path(src) / "config.json"
    try:
        return "moeconv" if "moeconv" in json.loads(cfg.read_text(encoding="utf-8")) else "auto"
    except (OSError, ValueError):
        return "auto"


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
    from moeconv import cli

    @app.command("distill")
    def distill(
        out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory for the trained student."),
        teacher: str = typer.Option(..., "--teacher", help="Teacher model (checkpoint dir, .gguf, moeconv dir)."),
        student: str = typer.Option(..., "--student", help="Student model to train; OUT is written in its format."),
        data: Path = typer.Option(..., "--data", help="Training text (.txt: blank-line separated documents; .jsonl: "
                                  "a 'text' field per line) or token ids (.safetensors / .pt)."),
        mode: str = typer.Option("heal", "--mode", help="heal | moe-to-dense | moe-to-moe | router-only."),
        steps: int = typer.Option(100, "--steps", help="Optimizer steps."),
        lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
        batch_size: int = typer.Option(8, "--batch-size", help="Rows per optimizer step, over all processes."),
        micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Rows per forward "
                                                       "(default: batch / processes). Fix it to compare runs "
                                                       "with different process counts."),
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
                                                  "of trained matrices (2:4 masks); default on for heal."),
        freeze: Optional[list[str]] = typer.Option(None, "--freeze", help="Regex of parameter names not to train. Repeatable."),
        warmup_steps: int = typer.Option(0, "--warmup-steps"),
        schedule: str = typer.Option("cosine", "--schedule", help="cosine | constant (after warm-up)."),
        weight_decay: float = typer.Option(0.0, "--weight-decay"),
        grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max gradient norm (0: off)."),
        eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out data file (default: the "
                                                 "last --eval-fraction of --data)."),
        eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="Share of --data rows held out."),
        eval_rows: int = typer.Option(32, "--eval-rows", help="At most this many held-out rows are evaluated "
                                      "(before, after, every --eval-every steps); 0: no evaluation."),
        eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (always before and after)."),
        checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Checkpoint every N steps (and at the end)."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="metrics.jsonl and checkpoints/ (default: OUT.run)."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue from a checkpoint or run directory."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda (one GPU per process under torchrun)."),
        seed: int = typer.Option(0, "--seed"),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    ):
        """Distil a teacher into a student: heal a pruned/compressed model, MoE → dense, MoE → fewer
        experts, or routers only. Writes the student in its own format, reloads and compares it;
        OUT.run/metrics.jsonl logs every step."""
        def go():
            from pydantic import ValidationError

            from moeconv import Context, load
            from moeconv.io.atomic import check_new_output, output_lock
            from moeconv.errors import ConfigError, InputError
            from moeconv.pass_base import _first_error
            from moeconv.pipeline import Pipeline
            from moeconv.train.data import load_token_data
            from moeconv.train.trainer import init_distributed
            from passes.distill import Distill, DistillConfig, LossWeightsConfig

            rdir = run_dir or out_dir.with_name(out_dir.name + ".run")
            try:
                cfg = DistillConfig(mode=mode, steps=steps, lr=lr, batch_size=batch_size,
                                    micro_batch_size=micro_batch_size, temperature=temperature,
                                    loss_weights=LossWeightsConfig(**parse_loss_weights(loss_weights)),
                                    layer_map=parse_layer_map(layer_map), router_loss=router_loss,
                                    expert_map=parse_expert_map(expert_map), freeze_zeros=keep_zeros,
                                    freeze=freeze or [], warmup_steps=warmup_steps, schedule=schedule,
                                    weight_decay=weight_decay, grad_clip=grad_clip or None,
                                    checkpoint_every=checkpoint_every, eval_every=eval_every, run_dir=str(rdir),
                                    resume=str(resume) if resume else None, seed=seed)
            except ValidationError as exc:
                raise ConfigError(f"distill: {_first_error(exc)}") from None
            if eval_rows < 0:
                raise ConfigError("--eval-rows must be >= 0")
            if device not in ("cpu", "cuda"):
                raise ConfigError(f"--device must be cpu or cuda, not {device!r}")
            check_new_output(out_dir, force=force)
            for name, src in (("--teacher", teacher), ("--student", student)):
                if not str(src).startswith("builtin:") and not Path(src).exists():
                    raise InputError(f"{name} {src}: no such file or directory")
            if not str(teacher).startswith("builtin:") and Path(teacher).resolve() == out_dir.resolve():
                raise InputError(f"output {out_dir} is the teacher; the teacher is never modified")
            check_data_arguments(teacher, student, data, eval_data, seq_len, batch_size, micro_batch_size, resume)
            dist = init_distributed()
            out_lock = contextlib.ExitStack()
            if dist.is_main:  # one run per OUT (and its OUT.run) from the start, not only at the final write
                out_lock.enter_context(output_lock(out_dir))
            try:
                stale = rdir / "checkpoints"
                if force and resume is None and checkpoint_every and dist.is_main and stale.is_dir():
                    shutil.rmtree(stale)  # --force starts over: an earlier run's checkpoints would mix with ours
                if dist.world_size > 1:
                    import torch.distributed as tdist
                    tdist.barrier()
                t_state, s_state = load(teacher), load(student)
                tok = None if data.suffix in (".safetensors", ".pt") else student_tokenizer(student)
                from moeconv.model_limits import model_limits
                rows = load_token_data(data, seq_len=seq_len, tokenizer=tok, eval_fraction=eval_fraction,
                                       eval_path=eval_data, vocab_size=model_limits(s_state).vocab_size,
                                       model=f"--student {student}")
                held_rows = rows.eval[:eval_rows] if rows.eval is not None and eval_rows > 0 else None
                s_state.artifacts["teacher"] = t_state.module
                with TrainProgress(cli.err, enabled=dist.is_main and not cli._state["verbose"]) as progress:
                    ctx = Context(calibration=rows.train, evaluation=held_rows, seed=seed, device=device,
                                  progress=progress)
                    p = Distill(cfg)
                    if dist.is_main:
                        from moeconv.job import run_to_dir
                        report = run_to_dir(student, out_dir, [p], ctx=ctx, fmt=format_of(student), force=force,
                                            state=s_state, reload_tolerance=RELOAD_RTOL)
                    else:
                        Pipeline([p]).run(s_state, ctx)
                        return
                metrics = rdir / "metrics.jsonl"
                if metrics.is_file():
                    shutil.copy2(metrics, out_dir / "metrics.jsonl")
                render_distill(cli.out, report, rdir)
            finally:
                out_lock.close()
                _leave_group(dist)
        cli._run(go)


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
    from moeconv.render import render_reloaded, render_warnings
    rep = report["passes"][0]
    m = rep["metrics"]
    console.print(f"[bold]distill[/bold]: {rep['summary']}")
    w = ", ".join(f"{k}={v:g}" for k, v in m["loss_weights"].items())
    console.print(f"trained {m['trainable_params']:,} parameters ({m['frozen_params']:,} frozen, unchanged), "
                  f"loss weights {w}, {m['world_size']} process(es), {m['tokens']:,} tokens in {m['seconds']} s "
                  f"({m['tokens_per_s'] or 0:,.0f} tok/s)" + (f", resumed at step {m['resumed_from']}"
                                                              if m.get("resumed_from") else ""))
    if m.get("masked_matrices"):
        console.print(f"kept {m['kept_zeros']:,} zeros fixed in {m['masked_matrices']} matrices (checked after training)")
    if "loss_first" in m:
        console.print(f"training loss {m['loss_first']:.4g} → {m['loss_last']:.4g}")
    render_reloaded(console, report, "the trained model")
    render_warnings(console, rep.get("warnings", []))
    console.print(f"metrics: {run_dir}/metrics.jsonl; report: {report['output']}/report.json  ({report['seconds']} s)")

