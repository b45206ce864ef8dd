"""`moeconv prune-experts SRC OUT`: remove or merge whole experts by measured importance, repair
the router, write the result in the source's format and verify it on reload."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moeconv.cli.common import (offload_dir_option, calib_option, calib_samples_option, calib_seq_len_option, device_option,
                                force_option, format_of, ignore_option, max_memory_option, seed_option,
                                targets_option)


def parse_per_layer(text: str | None):
    """'6,6,5,…' → [6, 6, 5, …]; 'global' stays; None stays."""
    if text is None or text.strip() == "global":
        return None if text is None else "global"
    from moeconv.errors import ConfigError
    try:
        counts = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise ConfigError(f"--per-layer must be 'global' or a comma-separated list of counts, not {text!r}") from None
    if not counts:
        raise ConfigError("--per-layer: empty list")
    return counts


def register(app: typer.Typer) -> None:
    from moeconv import cli

    @app.command("prune-experts")
    def prune_experts(
        src: str = typer.Argument(..., help="MoE model: Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint dir or a moeconv-format dir."),
        out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory (must not exist unless --force)."),
        keep: Optional[int] = typer.Option(None, "--keep", help="Experts kept in every MoE layer. One budget is "
                                           "required: --keep, --ratio or a --per-layer list."),
        ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of each layer's experts removed "
                                              "(0.25: 8 → 6); instead of --keep."),
        per_layer: Optional[str] = typer.Option(None, "--per-layer", help="Counts per MoE layer ('6,6,5,…'), or 'global' "
                                                "with --keep/--ratio: allocate that total across layers by importance. "
                                                "Only for moeconv-format models (HF MoE families hold one count)."),
        criterion: str = typer.Option("reap", "--criterion", help="frequency | mass | reap | reconstruction."),
        targets: Optional[list[str]] = targets_option("MoE layers to prune", "every MoE layer"),
        ignore: Optional[list[str]] = ignore_option("MoE layers left as they are"),
        calib: Path = calib_option(required=True),
        merge: bool = typer.Option(False, "--merge", help="Fold removed experts into their most similar kept expert instead of dropping them."),
        recalibrate_router: bool = typer.Option(False, "--recalibrate-router", help="Router-only distillation against the unpruned layer outputs."),
        calib_samples: int = calib_samples_option(32),
        calib_seq_len: Optional[int] = calib_seq_len_option(),
        max_tokens: int = typer.Option(8192, "--max-tokens", help="Calibration tokens per layer used for scoring."),
        recalib_steps: int = typer.Option(100, "--recalib-steps", help="Optimiser steps per layer for --recalibrate-router."),
        seed: int = seed_option("Seed for the held-out split and the check inputs."),
        force: bool = force_option(),
        max_memory: Optional[str] = max_memory_option(),
        device: str = device_option(),
        offload_dir: Optional[Path] = offload_dir_option(),
    ):
        """Drop (or merge) the least important experts of every MoE layer and repair the router.

        Kept experts and their router rows are bit-identical to the source; no layer keeps fewer
        experts than its top_k. report.json lists every expert's scores and fate, per layer.
        --targets/--ignore limit it to some MoE layers; the others are left as they are.
        """
        def go():
            from moeconv.io.atomic import check_new_output
            from moeconv.errors import ConfigError, InputError
            from moeconv.stream.skeleton import stream_device
            from passes.prune_experts import PruneExperts
            p = PruneExperts(keep=keep, ratio=ratio, per_layer=parse_per_layer(per_layer), criterion=criterion,
                             targets=targets or None, ignore=ignore or [], merge=merge,
                             recalibrate_router=recalibrate_router, max_tokens=max_tokens,
                             recalib_steps=recalib_steps, seed=seed)
            if calib_samples < 1 or (calib_seq_len is not None and calib_seq_len < 2):
                raise ConfigError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
            stream_device(device)  # before anything is read
            check_new_output(out_dir, force=force)
            if not Path(src).exists():
                raise InputError(f"{src}: no such file or directory")
            report = _prune(src, out_dir, p, calib, calib_samples, calib_seq_len, max_memory, seed, force, device,
                            offload_dir)
            render_prune(cli.out, report)
        cli._run(go)


def _prune(src: str, out_dir: Path, p, calib: Path, samples: int, seq_len: int | None, max_memory: str | None, seed: int,
           force: bool, device: str = "cpu", offload_dir: Path | None = None) -> dict:
    """Run the pass on the route `moeconv.jobs.routes` picks (streamed for a safetensors
    checkpoint; `device` cuda and `offload_dir` on that route only); returns the report."""
    from moeconv import Context, cli
    from moeconv.data import calibration_tokens
    from moeconv.jobs.routes import choose_route, refuse_off_route
    from moeconv.progress import Progress
    route, why = choose_route(src, "prune-experts", passes=[p], calibrated=True)
    refuse_off_route(device, route, why)
    plan, state = _planned_load(src, p, calib, samples, seq_len, max_memory, route, device)
    from moeconv.cli.common import activation_spill
    spill = activation_spill(plan, max_memory, offload_dir) if route == "streaming" else {}
    calibration = calibration_tokens(calib, src, num_samples=samples, seq_len=seq_len,
                                     seq_len_flag="--calib-seq-len", samples_flag="--calib-samples")
    extra = {"memory_plan": plan.to_dict(), "route": {"route": route, "why": why}}
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        ctx = Context(calibration=calibration, seed=seed, progress=progress, device=device)
        if route == "streaming":
            from moeconv.jobs.stream_layerwise import run_streamed
            return run_streamed(src, out_dir, [p], ctx=ctx, force=force, extra_report=extra, skeleton=state, **spill)
        from moeconv.jobs.pipeline_job import run_to_dir
        return run_to_dir(src, out_dir, [p], ctx=ctx, fmt=format_of(src), force=force, state=state,
                          extra_report=extra)


def _planned_load(src: str, p, calib: Path, samples: int, seq_len: int | None, max_memory: str | None, route: str,
                  device: str = "cpu"):
    """(the run's memory plan, the loaded model or, streamed, its skeleton): a plan over --max-memory
    is refused (exit 2, one line) before any tensor is read."""
    from moeconv import load
    from moeconv.memory_plan import calibration_size, plan_and_check
    tokens, seq = calibration_size(calib, samples, seq_len, model=src)  # refuses rows the model cannot take
    plan = plan_and_check(src, [p], max_memory=max_memory, calib_tokens=tokens, calib_seq_len=seq, route=route,
                          device=device, flags={"calib": "--calib-samples / --calib-seq-len"})
    if route == "streaming":
        from moeconv.stream.skeleton import Skeleton
        return plan, Skeleton.open(Path(src))  # the config and headers checked, no weight read
    return plan, load(src)  # a broken model is named as such, not as "no tokenizer for the calibration text"


def _scores_cell(rows: list[dict], criterion: str) -> str:
    from moeconv.report_format import fmt_float as fmt
    marks = {"kept": "", "dropped": "✗", "merged": "→"}
    return " ".join(f"{r['expert']}{marks[r['status']]}{'' if r['merged_into'] is None else r['merged_into']}:"
                    f"{fmt(r[criterion])}" for r in rows)


def render_prune(console, report: dict) -> None:
    """The summary table, then the per-layer table (scores and fates), then warnings."""
    from moeconv.render import reloaded_text, render_warnings, summary_table
    from moeconv.report_format import fmt_float, fmt_seconds
    from rich.table import Table
    rep = report["passes"][0]
    m = rep["metrics"]
    recal = "mean_recal_error_before" in m
    s = summary_table("prune-experts")
    s.add_row("output", str(report["output"]))
    s.add_row("experts", rep["summary"])
    s.add_row("parameters", f"{m['params_before']:,} → {m['params_after']:,} ({m['active_params_after']:,} active "
              "per token)")
    s.add_row("block error", f"mean {fmt_float(m['mean_error_pruned'], 4)} (relative, on calibration tokens)")
    if recal:
        s.add_row("router re-calibration", f"{fmt_float(m['mean_recal_error_before'], 4)} → {fmt_float(m['mean_recal_error_after'], 4)} "
                  f"(improved {m['recal_layers_improved']} of {m['moe_layers']} layers)")
    skipped = rep["tables"].get("skipped", [])
    if skipped:
        s.add_row("left as they are", ", ".join(r["layer"] for r in skipped) + " (not selected by --targets/--ignore)")
    if "rel_max_diff" in m:
        s.add_row("output change", f"relative max |Δ| {fmt_float(m['rel_max_diff'])} vs the unpruned model (example inputs)")
    s.add_row("check", reloaded_text(report, "the in-memory result"))
    s.add_row("report", f"{report['output']}/report.json")
    s.add_row("time", fmt_seconds(report["seconds"]))
    console.print(s)
    t = Table(title=f"per layer ({m['criterion']} scores; ✗ dropped, →k merged into k)")
    for col in ("layer", "experts", "scores", "dropped", "merged", "block error"):
        t.add_column(col, overflow="fold")
    if recal:
        t.add_column("router re-cal (held-out)")
    by_layer: dict[str, list] = {}
    for r in rep["tables"]["experts"]:
        by_layer.setdefault(r["layer"], []).append(r)
    for lr in rep["tables"]["layers"]:
        merged = ", ".join(f"{d}→{k}" for d, k in lr["merged"].items()) or "-"
        cells = [lr["layer"], f"{lr['experts_before']} → {lr['experts_after']}",
                 _scores_cell(by_layer.get(lr["layer"], []), m["criterion"]),
                 ", ".join(map(str, lr["dropped"])) or "-", merged, f"{lr['error_pruned']:.4g}"]
        if recal:
            cells.append(f"{lr['recal_error_before']:.4g} → {lr['recal_error_after']:.4g}"
                         if "recal_error_before" in lr else "-")
        t.add_row(*cells)
    console.print(t)
    render_warnings(console, rep.get("warnings", []))
