"""`moeconv run RECIPE` and `moeconv plan RECIPE`: recipes from the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# What a dense Hugging Face checkpoint offers before any pass: the default for `plan` without --model.
DENSE_FACTS = {"dense-ffn", "float-weights", "hf-config"}


def register(app: typer.Typer) -> None:
    app.command()(plan)
    app.command()(run)


def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML (steps: - pass: NAME + its fields)."),
    model: Optional[str] = typer.Option(None, "--model", help="Plan against this model's facts "
                                        "(default: a dense float checkpoint)."),
    calib: bool = typer.Option(False, "--calib", help="Plan as if calibration data will be given."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override STEP.FIELD=VALUE (repeatable)."),
):
    """Print the step × facts table and every problem with its fix, before touching a tensor."""
    from moeconv import cli
    cli._run(lambda: _plan_recipe(recipe, model, calib, set_ or []))


def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    model: str = typer.Option(..., "--model", help="Source model (checkpoint dir, .gguf, builtin:NAME, FILE.py)."),
    out_dir: Path = typer.Option(..., "--out", help="Output directory (must not exist unless --force)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration text / JSONL / token ids."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override STEP.FIELD=VALUE (repeatable)."),
    fmt: str = typer.Option("auto", "--format", help="auto | hf | moeconv"),
    seed: int = typer.Option(0, help="Seed for example inputs and every random choice not set in the recipe."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan only: check the recipe against the model."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Run a recipe's passes on a model and write the verified result with report.json."""
    from moeconv import cli
    cli._run(lambda: _run_recipe(recipe, model, out_dir, calib, set_ or [], fmt, seed, dry_run, force))


def _passes(recipe: Path, overrides: list[str]) -> list:
    """The recipe's passes, with `--set` overrides applied, each with its typed config."""
    from moeconv.recipe import apply_overrides, build_passes, load_recipe
    steps = load_recipe(recipe)
    apply_overrides(steps, overrides)
    return build_passes(steps, str(recipe))


def _render_plan(passes: list, facts: set[str]) -> None:
    """Plan `passes` against `facts`, print the table; a plan with problems is a `PlanError`."""
    from moeconv import cli
    from moeconv.errors import PlanError
    from moeconv.pipeline import Pipeline
    from moeconv.render import render_plan
    result = Pipeline(passes).plan(facts)
    render_plan(cli.out, result)
    if not result.ok:
        raise PlanError(result.problems)


def _plan_recipe(recipe: Path, model: str | None, calib: bool, overrides: list[str]) -> None:
    passes = _passes(recipe, overrides)
    if model:
        from moeconv import load
        facts = load(model).facts()
    else:
        facts = set(DENSE_FACTS)
    if calib:
        facts.add("calibration")
    _render_plan(passes, facts)


def _run_recipe(recipe: Path, model: str, out_dir: Path, calib: Path | None, overrides: list[str], fmt: str, seed: int,
                dry_run: bool, force: bool) -> None:
    from moeconv import Context, cli, load
    from moeconv.context import check_seed
    from moeconv.errors import ConfigError
    from moeconv.jobs.pipeline_job import run_to_dir
    from moeconv.render import Progress, render_run
    try:
        check_seed(seed)
    except ConfigError as exc:
        raise ConfigError(f"--seed: {exc}") from None
    passes = _passes(recipe, overrides)
    calibration = None
    if calib is not None:
        from moeconv.data import calibration_tokens
        calibration = calibration_tokens(calib, model)
    if dry_run:
        _render_plan(passes, load(model).facts() | ({"calibration"} if calibration is not None else set()))
        return
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        report = run_to_dir(model, out_dir, passes, ctx=Context(calibration=calibration, seed=seed, progress=progress),
                            fmt=fmt, force=force)
    render_run(cli.out, report)
