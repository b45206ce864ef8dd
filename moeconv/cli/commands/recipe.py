"""`moeconv run RECIPE` and `moeconv plan RECIPE`: recipes from the command line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from typer.core import TyperCommand

from moeconv.cli.common import (offload_dir_option, calib_option, calib_samples_option, calib_seq_len_option, device_option,
                                force_option, max_memory_option, seed_option)

# What a dense Hugging Face checkpoint offers before any pass: the default for `plan` without --model.
DENSE_FACTS = {"dense-ffn", "float-weights", "hf-config"}
# The fixes a memory plan may name, in a recipe's terms (`moeconv.memory_plan.plan_memory`).
RECIPE_FLAGS = {"method": "--set sparsify.method=magnitude"}


def register(app: typer.Typer) -> None:
    app.command(cls=PlanCommand)(plan)
    app.command()(run)


class PlanCommand(TyperCommand):
    """`plan --calib` used to be a switch ("plan as if calibration data will be given"); it now
    takes the file, as `run --calib` does. A bare `--calib` (the last word, or followed by another
    option) keeps the old meaning, through the hidden `--assume-calib`."""

    def parse_args(self, ctx, args):
        args = ["--assume-calib" if a == "--calib" and (i + 1 == len(args) or args[i + 1].startswith("-")) else a
                for i, a in enumerate(args)]
        return super().parse_args(ctx, args)


def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML (steps: - pass: NAME + its fields)."),
    model: Optional[str] = typer.Option(None, "--model", help="Plan against this model's facts "
                                        "(default: a dense float checkpoint)."),
    calib: Optional[Path] = calib_option("The calibration data the run will be given (its size, not its text, is "
                                         "planned)."),
    calib_samples: int = calib_samples_option(),
    calib_seq_len: Optional[int] = calib_seq_len_option(),
    assume_calib: bool = typer.Option(False, "--assume-calib", hidden=True,
                                      help="Plan as if calibration data will be given (the old `plan --calib`)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override STEP.FIELD=VALUE (repeatable)."),
    max_memory: Optional[str] = max_memory_option("With --model: the memory the run may use (0: the memory "
                                                  "available here)."),
    processes: int = typer.Option(2, "--processes", min=1, help="With --model and a distill step: the torchrun "
                                  "processes it would run on (each one's memory under ddp and fsdp)."),
):
    """Print the step × facts table, every problem with its fix and, with --model, the run's
    estimated peak memory with its breakdown (read from the checkpoint's headers)."""
    from moeconv import cli
    calibration = _Calibration(calib, calib_samples, calib_seq_len, given=assume_calib or calib is not None)
    cli._run(lambda: _plan_recipe(recipe, model, calibration, set_ or [], max_memory, processes))


def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    model: str = typer.Option(..., "--model", help="Source model (checkpoint dir, .gguf, builtin:NAME, FILE.py)."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (must not exist unless --force)."),
    calib: Optional[Path] = calib_option(),
    calib_samples: int = calib_samples_option(),
    calib_seq_len: Optional[int] = calib_seq_len_option(),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override STEP.FIELD=VALUE (repeatable)."),
    fmt: str = typer.Option("auto", "--format", help="auto (HF MoE family when there is one) | hf | moeconv."),
    seed: int = seed_option("Seed for example inputs and every random choice not set in the recipe."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan only: check the recipe against the model."),
    force: bool = force_option(),
    max_memory: Optional[str] = max_memory_option(),
    device: str = device_option(),
    offload_dir: Optional[Path] = offload_dir_option(),
):
    """Run a recipe's passes on a model and write the verified result with report.json."""
    from moeconv import cli
    calibration = _Calibration(calib, calib_samples, calib_seq_len, given=calib is not None)
    cli._run(lambda: _run_recipe(recipe, model, out_dir, calibration, set_ or [], fmt, seed, dry_run, force,
                                 max_memory, device, offload_dir))


@dataclass(frozen=True)
class _Calibration:
    """--calib FILE with --calib-samples / --calib-seq-len; `given`: the plan has the `calibration`
    fact (a file, or `plan`'s old bare --calib)."""
    file: Optional[Path]
    samples: int
    seq_len: Optional[int]
    given: bool

    def size(self, model: str) -> tuple[int | None, int | None]:
        """(tokens, sequence length) the run will calibrate on, from the file's header at most;
        rows longer than `model`'s positions are refused, as the cause."""
        from moeconv.memory_plan import calibration_size
        if self.file is not None:
            return calibration_size(self.file, self.samples, self.seq_len, model=model)
        if self.given:
            from moeconv.data import DEFAULT_SEQ_LEN
            seq = self.seq_len or DEFAULT_SEQ_LEN
            return self.samples * seq, seq
        return None, None

    def tokens(self, model: str):
        from moeconv.data import calibration_tokens
        return calibration_tokens(self.file, model, num_samples=self.samples, seq_len=self.seq_len,
                                  seq_len_flag="--calib-seq-len", samples_flag="--calib-samples")


def _passes(recipe: Path, overrides: list[str]) -> list:
    """The recipe's passes, with `--set` overrides applied, each with its typed config."""
    from moeconv.recipe import apply_overrides, build_passes, load_recipe
    steps = load_recipe(recipe)
    apply_overrides(steps, overrides)
    return build_passes(steps, str(recipe))


def _render_plan(passes: list, facts: set[str]) -> None:
    """Plan `passes` against `facts`, print the table; a plan with problems is a `PlanError`: its
    one `error:` line is where each problem and its fix are printed, once."""
    from moeconv import cli
    from moeconv.errors import PlanError
    from moeconv.pipeline import Pipeline
    from moeconv.render import render_plan
    result = Pipeline(passes).plan(facts)
    render_plan(cli.out, result)
    if not result.ok:
        raise PlanError(result.problems)


def _plan_recipe(recipe: Path, model: str | None, calib: _Calibration, overrides: list[str],
                 max_memory: str | None, processes: int = 2) -> None:
    passes = _passes(recipe, overrides)
    if calib.file is not None and not calib.file.is_file():
        from moeconv.errors import InputError
        raise InputError(f"--calib {calib.file}: no such file")
    if model:
        from moeconv import cli, load
        from moeconv.memory_plan import check_plan, parse_max_memory, plan_memory
        limit = parse_max_memory(max_memory)
        tokens, seq = calib.size(model)  # headers only
        memory = plan_memory(model, passes, calib_tokens=tokens, calib_seq_len=seq, flags=RECIPE_FLAGS,
                             processes=processes)
        render_memory(cli.out, memory)
        check_plan(memory, limit, given=max_memory)  # before the model is loaded for its facts
        facts = load(model).facts()
    else:
        facts = set(DENSE_FACTS)
    if calib.given:
        facts.add("calibration")
    _render_plan(passes, facts)


def render_memory(console, plan) -> None:
    """The memory plan: the estimate, when it peaks, its parts, whole-model passes and notes."""
    from rich.table import Table

    from moeconv.io.config_checks import format_bytes
    # with a GPU, `total` is host memory and what sits on the GPU is counted apart
    gpu = f" of host memory, {format_bytes(sum(plan.on_device.values()))} on the {plan.device} GPU,"
    gpu = gpu if plan.on_device else ""
    t = Table(title=f"memory: about {format_bytes(plan.total)}{gpu} at the peak ({plan.peak}; {plan.route} route, "
                    "estimated from the checkpoint's headers)")
    t.add_column("held by")
    t.add_column("estimate", justify="right")
    for part, size in plan.parts.items():
        t.add_row(part, format_bytes(size))
    for part, size in plan.on_device.items():
        t.add_row(f"{part} (on {plan.device})", format_bytes(size))
    console.print(t)
    for name, need in plan.whole_model.items():
        console.print(f"{name} needs the whole model in memory: about {format_bytes(need)} for it alone")
    if plan.training:
        render_training_memory(console, plan.training)
    for note in plan.notes:
        console.print(f"note: {note}")


def render_training_memory(console, training: dict) -> None:
    """distill under torchrun: what each process holds with ddp and with fsdp, side by side."""
    from rich.table import Table

    from moeconv.io.config_checks import format_bytes
    from moeconv.train.memory import PARTS
    n = training["processes"]
    t = Table(title=f"distill, per process with {n} process{'es' if n != 1 else ''} (torchrun --nproc-per-node {n})")
    t.add_column("held by")
    t.add_column("--strategy ddp", justify="right")
    t.add_column("--strategy fsdp", justify="right")
    for part in (*PARTS, "total"):
        t.add_row(part.replace("_", " "), format_bytes(training["ddp"][part]), format_bytes(training["fsdp"][part]))
    console.print(t)


def _run_recipe(recipe: Path, model: str, out_dir: Path, calib: _Calibration, overrides: list[str], fmt: str, seed: int,
                dry_run: bool, force: bool, max_memory: str | None = None, device: str = "cpu",
                offload_dir: Path | None = None) -> None:
    from moeconv import Context, cli, load
    from moeconv.jobs.routes import refuse_off_route
    from moeconv.progress import Progress
    from moeconv.render import render_run
    from moeconv.stream.skeleton import stream_device
    stream_device(device)  # before anything is read
    _check_seed(seed)
    passes = _passes(recipe, overrides)
    route, why = _route(model, passes, calib, fmt)
    refuse_off_route(device, route, why)
    memory = _memory_plan(model, passes, calib, max_memory, show=dry_run, route=route,
                          device=device)  # before any tensor is read
    skeleton = _skeleton(model) if route == "streaming" else None  # a broken model named before its text is read
    from moeconv.cli.common import activation_spill
    spill = activation_spill(memory, max_memory, offload_dir) if route == "streaming" else {}
    calibration = calib.tokens(model) if calib.file is not None else None
    if dry_run:
        _render_plan(passes, load(model).facts() | ({"calibration"} if calibration is not None else set()))
        return
    extra = {"memory_plan": memory.to_dict(), "route": {"route": route, "why": why}}
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        ctx = Context(calibration=calibration, seed=seed, progress=progress, device=device)
        if route == "streaming":
            from moeconv.jobs.stream_layerwise import run_streamed
            report = run_streamed(model, out_dir, passes, ctx=ctx, force=force, extra_report=extra, skeleton=skeleton,
                                  **spill)
        else:
            from moeconv.jobs.pipeline_job import run_to_dir
            report = run_to_dir(model, out_dir, passes, ctx=ctx, fmt=fmt, force=force, extra_report=extra)
    render_run(cli.out, report)


def _check_seed(seed: int) -> None:
    from moeconv.context import check_seed
    from moeconv.errors import ConfigError
    try:
        check_seed(seed)
    except ConfigError as exc:
        raise ConfigError(f"--seed: {exc}") from None


def _route(model: str, passes: list, calib: _Calibration, fmt: str) -> tuple[str, str]:
    """("streaming" | "in-memory", why): a recipe of calibrated layer-by-layer passes (and a final
    quantize) on a safetensors checkpoint runs as one streamed sweep (`moeconv.jobs.routes`)."""
    from moeconv.jobs.routes import choose_route
    if fmt != "auto":
        return "in-memory", f"--format {fmt} is written from a model in memory"
    return choose_route(model, "run", passes=passes, calibrated=calib.given)


def _skeleton(model: str):
    from moeconv.stream.skeleton import Skeleton
    return Skeleton.open(Path(model))


def _memory_plan(model: str, passes: list, calib: _Calibration, max_memory: str | None, *, show: bool,
                 route: str = "in-memory", device: str = "cpu"):
    """The run's memory plan (printed with `show`; with `device` cuda, what sits on the GPU apart),
    refused (exit 2, one line) over --max-memory or over the GPU's free memory."""
    from moeconv import cli
    from moeconv.memory_plan import check_plan, parse_max_memory, plan_memory, plan_streaming
    limit = parse_max_memory(max_memory)
    tokens, seq = calib.size(model)
    if route == "streaming":
        plan = plan_streaming(model, passes, calib_tokens=tokens, calib_seq_len=seq, flags=RECIPE_FLAGS, device=device)
    else:
        plan = plan_memory(model, passes, calib_tokens=tokens, calib_seq_len=seq, flags=RECIPE_FLAGS, device=device)
    if show:
        render_memory(cli.out, plan)
    check_plan(plan, limit, given=max_memory)
    return plan
