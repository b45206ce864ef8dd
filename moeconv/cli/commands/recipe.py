"""`moeconv run RECIPE` and `moeconv plan RECIPE`: recipes from the command line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

# What a dense Hugging Face checkpoint offers before any pass: the default for `plan` without --model.
DENSE_FACTS = {"dense-ffn", "float-weights", "hf-config"}


def register(app: typer.Typer) -> None:
    from moeconv import cli

    @app.command()
    def plan(
        recipe: Path = typer.Argument(..., help="Recipe YAML (steps: - pass: NAME + its fields)."),
        model: Optional[str] = typer.Option(None, "--model", help="Plan against this model's facts "
                                            "(default: a dense float checkpoint)."),
        calib: bool = typer.Option(False, "--calib", help="Plan as if calibration data will be given."),
        set_: Optional[list[str]] = typer.Option(None, "--set", help="Override STEP.FIELD=VALUE (repeatable)."),
    ):
        """Print the step × facts table and every problem with its fix, before touching a tensor."""
        def go():
            from moeconv.errors import PlanError
            from moeconv.pipeline import Pipeline
            from moeconv.recipe import apply_overrides, build_passes, load_recipe
            from moeconv.render import render_plan
            steps = load_recipe(recipe)
            apply_overrides(steps, set_ or [])
            passes = build_passes(steps, str(recipe))
            if model:
                from moeconv import load
                facts = load(model).facts()
            else:
                facts = set(DENSE_FACTS)
            if calib:
                facts.add("calibration")
            result = Pipeline(passes).plan(facts)
            render_plan(cli.out, result)
            if not result.ok:
                raise PlanError(result.problems)
        cli._run(go)

    @app.command()
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
        def go():
            from moeconv import Context, load
            from moeconv.errors import PlanError
            from moeconv.job import run_to_dir
            from moeconv.pipeline import Pipeline
            from moeconv.recipe import apply_overrides, build_passes, load_recipe
            from moeconv.context import check_seed
            from moeconv.errors import ConfigError
            from moeconv.render import Progress, render_plan, render_run
            try:
                check_seed(seed)
            except ConfigError as exc:
                raise ConfigError(f"--seed: {exc}") from None
            steps = load_recipe(recipe)
            apply_overrides(steps, set_ or [])
            passes = build_passes(steps, str(recipe))
            calibration = None
            if calib is not None:
                from moeconv.data import calibration_tokens
                calibration = calibration_tokens(calib, model)
            if dry_run:
                facts = load(model).facts() | ({"calibration"} if calibration is not None else set())
                result = Pipeline(passes).plan(facts)
                render_plan(cli.out, result)
                if not result.ok:
                    raise PlanError(result.problems)
                return
            with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
                report = run_to_dir(model, out_dir, passes, ctx=Context(calibration=calibration, seed=seed,
                                                                         progress=progress),
                                    fmt=fmt, force=force)
            render_run(cli.out, report)
        cli._run(go)
