"""`moeconv sparsify SRC OUT`: prune the weights inside each expert to 2:4 (or N:M, or
unstructured) with magnitude, Wanda or SparseGPT and routing-aware calibration; write the source's
format (dense weights with zeros, loadable everywhere), optionally also the compressed form, and
verify both on reload."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from moeconv.cli.common import (offload_dir_option, calib_option, calib_samples_option, calib_seq_len_option, device_option,
                                force_option, ignore_option, max_memory_option, seed_option, shard_size_option,
                                targets_option)

# sparsify's calibration rows are longer than the other commands' (moeconv.data.DEFAULT_SEQ_LEN):
# SparseGPT's Hessians want many tokens per expert; a model with fewer positions gets its own count
DEFAULT_CALIB_SEQ_LEN = 256


def register(app: typer.Typer) -> None:
    app.command("sparsify")(sparsify)


def sparsify(
    src: str = typer.Argument(..., help="Model: MoE checkpoint dir (Mixtral / Qwen-MoE / moeconv format), or any model with --targets."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory (must not exist unless --force)."),
    pattern: str = typer.Option("2:4", "--pattern", help="N:M (keep N of every M inputs, 2:4 for sparse tensor cores) or 'unstructured'."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction pruned per row with --pattern unstructured.",
                                          show_default="0.5"),
    method: str = typer.Option("sparsegpt", "--method", help="magnitude (no data) | wanda | sparsegpt."),
    calib: Optional[Path] = calib_option("Calibration text (.txt / .jsonl 'text') or token ids (.safetensors / .pt). "
                                         "Required by --method wanda and sparsegpt (the default)."),
    calib_samples: int = calib_samples_option(64, "--num-samples"),
    calib_seq_len: Optional[int] = calib_seq_len_option(
        None, "--seq-len", show_default=f"{DEFAULT_CALIB_SEQ_LEN}, or the model's context if shorter"),
    dampening: float = typer.Option(0.01, "--dampening", help="SparseGPT Hessian dampening, relative to mean(diag H)."),
    block_size: int = typer.Option(128, "--block-size", help="SparseGPT lazy-update block (a multiple of M)."),
    min_coverage: float = typer.Option(0.01, "--min-coverage", help="Experts receiving fewer than this fraction of a "
                                       "layer's calibration tokens use the fallback statistics."),
    fallback: str = typer.Option("all-tokens", "--fallback", help="all-tokens (statistics from every token of the layer) | magnitude."),
    targets: Optional[list[str]] = targets_option("Matrices to prune", "experts"),
    ignore: Optional[list[str]] = ignore_option("Matrices to leave dense"),
    compressed: bool = typer.Option(False, "--compressed", help="Also write OUT/compressed: kept values + bitmask, restored exactly by moeconv.load."),
    shard_size: str = shard_size_option(),
    seed: int = seed_option("Seed for the check inputs."),
    force: bool = force_option(),
    max_memory: Optional[str] = max_memory_option(),
    device: str = device_option(),
    offload_dir: Optional[Path] = offload_dir_option(),
):
    """Prune expert weights to 2:4 (N:M / unstructured) with the least damage, verified on reload.

    Every pruned matrix is checked against the pattern; routers, attention and embeddings stay
    bit-identical unless selected. Each expert is calibrated on the tokens its router sends it;
    under-covered experts fall back to all tokens of their layer and are named. On CPU, 2:4
    saves storage (--compressed), not time.
    """
    args = SparsifyArgs(**locals())  # first statement: exactly the options above
    from moeconv import cli
    cli._run(lambda: _run_sparsify(args))


@dataclass(frozen=True)
class SparsifyArgs:
    """`moeconv sparsify`'s options as typer parsed them (see `sparsify` for their meaning)."""
    src: str
    out_dir: Path
    pattern: str
    ratio: Optional[float]
    method: str
    calib: Optional[Path]
    calib_samples: int
    calib_seq_len: Optional[int]
    dampening: float
    block_size: int
    min_coverage: float
    fallback: str
    targets: Optional[list[str]]
    ignore: Optional[list[str]]
    compressed: bool
    shard_size: str
    seed: int
    force: bool
    max_memory: Optional[str]
    device: str
    offload_dir: Optional[Path]


def _with_seq_len(a: SparsifyArgs) -> SparsifyArgs:
    """`a` with --calib-seq-len set: given, or DEFAULT_CALIB_SEQ_LEN, or the model's positions if
    fewer (read from its config; a default the model cannot take is never refused)."""
    if a.calib_seq_len is not None:
        return a
    from dataclasses import replace
    from moeconv.model_limits import model_limits
    return replace(a, calib_seq_len=model_limits(a.src).seq_len(DEFAULT_CALIB_SEQ_LEN))


def _sparsify_pass(a: SparsifyArgs):
    """(the configured `Sparsify` pass, shard size in bytes); a request that cannot run is refused
    here, before anything is loaded."""
    from moeconv.errors import ConfigError
    from moeconv.units import parse_size
    from passes.sparsify import Sparsify
    p = Sparsify(pattern=a.pattern, ratio=a.ratio, method=a.method, targets=a.targets or ["experts"],
                 ignore=a.ignore or [], dampening=a.dampening, block_size=a.block_size,
                 min_coverage=a.min_coverage, fallback=a.fallback)
    if a.method != "magnitude" and a.calib is None:
        raise ConfigError(f"sparsify --method {a.method} needs calibration data: --calib FILE "
                          "(text, .jsonl, or token ids), or use --method magnitude")
    if a.calib_samples < 1 or a.calib_seq_len < 2:
        raise ConfigError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    return p, parse_size(a.shard_size)


def _run_streamed(a: SparsifyArgs, p, shard_bytes: int, extra: dict, spill: dict) -> dict:
    """Magnitude pruning of a safetensors checkpoint, one tensor at a time (`moeconv.jobs.stream_sparsify`)."""
    from moeconv import Context, cli
    from moeconv.jobs.stream_sparsify import sparsify_streamed
    from moeconv.progress import Progress
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        return sparsify_streamed(a.src, a.out_dir, p.config, force=a.force, shard_bytes=shard_bytes,
                                 ctx=Context(seed=a.seed, progress=progress, device=a.device), compressed=a.compressed,
                                 extra_report=extra)


def _run_streamed_layers(a: SparsifyArgs, p, shard_bytes: int, extra: dict, spill: dict) -> dict:
    """Wanda / SparseGPT on a safetensors checkpoint, one decoder layer at a time
    (`moeconv.jobs.stream_layerwise`); `spill`: its hidden states' budget and offload directory."""
    from moeconv import Context, cli
    from moeconv.jobs.stream_layerwise import run_streamed
    from moeconv.progress import Progress
    from moeconv.stream.skeleton import Skeleton
    skeleton = Skeleton.open(Path(a.src))  # a broken model is named as such, before the calibration text
    calibration = _calibration(a)
    more = _compressed_output(p, shard_bytes) if a.compressed else None
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        ctx = Context(calibration=calibration, seed=a.seed, progress=progress, device=a.device)
        return run_streamed(a.src, a.out_dir, [p], ctx=ctx, force=a.force, extra_report=extra, extra_outputs=more,
                            skeleton=skeleton, **spill)


def _calibration(a: SparsifyArgs):
    from moeconv.data import calibration_tokens
    if a.calib is None:
        return None
    return calibration_tokens(a.calib, a.src, num_samples=a.calib_samples, seq_len=a.calib_seq_len,
                              seq_len_flag="--calib-seq-len", samples_flag="--calib-samples")


def _memory_plan(a: SparsifyArgs, p, route: str):
    """The run's memory plan; the streamed route's is refused here (exit 2, one line) when it
    exceeds --max-memory, the in-memory route's by the caller, before any weight is read."""
    from moeconv.memory_plan import calibration_size, plan_memory, plan_streaming, refuse_over
    # calibration_size refuses rows the model cannot take, naming them rather than their memory
    tokens, seq = (calibration_size(a.calib, a.calib_samples, a.calib_seq_len, model=a.src)
                   if a.calib is not None else (None, None))
    if route == "streaming" and a.method == "magnitude":
        return refuse_over(plan_streaming(a.src, device=a.device), a.max_memory)
    if route == "streaming":
        plan = plan_streaming(a.src, [p], calib_tokens=tokens, calib_seq_len=seq, device=a.device,
                              flags={"calib": "--calib-samples / --calib-seq-len", "method": "--method magnitude"})
        return refuse_over(plan, a.max_memory)
    return plan_memory(a.src, [p], calib_tokens=tokens, calib_seq_len=seq,
                       flags={"calib": "--calib-samples / --calib-seq-len", "method": "--method magnitude"})


def _compressed_output(p, shard_bytes: int):
    """The `extra_outputs` hook of `run_to_dir` that also writes OUT/compressed."""
    from moeconv.formats.compressed import write_compressed
    label = p.config.sparsity_pattern().label

    def extra(state, tmp):
        return {"compressed": write_compressed(tmp, pattern=label, shard_bytes=shard_bytes)}
    return extra


def _run_sparsify(a: SparsifyArgs) -> None:
    from moeconv import Context, cli, load
    from moeconv.cli.common import format_of
    from moeconv.context import check_seed
    from moeconv.errors import InputError
    from moeconv.io.atomic import check_new_output
    from moeconv.jobs.pipeline_job import run_to_dir
    from moeconv.progress import Progress
    from moeconv.stream.skeleton import stream_device
    a = _with_seq_len(a)
    p, shard_bytes = _sparsify_pass(a)
    stream_device(a.device)  # before anything is read
    check_seed(a.seed)  # before any loading: it reaches every generator of the run
    check_new_output(a.out_dir, force=a.force)
    if not str(a.src).startswith("builtin:") and ".py" not in str(a.src) and not Path(a.src).exists():
        raise InputError(f"{a.src}: no such file or directory")
    from moeconv.jobs.routes import choose_route, refuse_off_route
    from moeconv.memory_plan import refuse_over
    route, why = choose_route(a.src, "sparsify", method=a.method, passes=[p], calibrated=a.calib is not None)
    refuse_off_route(a.device, route, why)
    plan = _memory_plan(a, p, route)  # from the headers: no tensor is read
    report_extra = {"memory_plan": plan.to_dict(), "route": {"route": route, "why": why}}
    if route == "streaming":
        from moeconv.cli.common import activation_spill
        spill = activation_spill(plan, a.max_memory, a.offload_dir)
        run = _run_streamed if a.method == "magnitude" else _run_streamed_layers
        return render_sparsify(cli.out, run(a, p, shard_bytes, report_extra, spill))
    refuse_over(plan, a.max_memory)  # before any weight is read
    state = load(a.src)  # a broken model is named as such, not as "no tokenizer for the calibration text"
    calibration = _calibration(a)
    extra = _compressed_output(p, shard_bytes) if a.compressed else None
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        report = run_to_dir(a.src, a.out_dir, [p], ctx=Context(calibration=calibration, seed=a.seed, progress=progress),
                            fmt=format_of(a.src), shard_bytes=shard_bytes, force=a.force, extra_outputs=extra,
                            state=state, extra_report=report_extra)
    render_sparsify(cli.out, report)


def _f(v, spec: str | None = None) -> str:
    """A number as report.html writes it (`fmt_float`), or in `spec` (a count, a share)."""
    from moeconv.report_format import fmt_float
    return fmt_float(v) if spec is None or v is None else format(v, spec)


def render_sparsify(console, report: dict) -> None:
    """The summary table, then per layer / per expert and any other pruned matrices, then warnings."""
    from moeconv.render import reloaded_text, render_warnings, summary_table
    from moeconv.report_format import fmt_bytes, fmt_seconds
    from rich.table import Table
    rep = report["passes"][0]
    m, tables = rep["metrics"], rep["tables"]
    s = summary_table("sparsify")
    s.add_row("output", str(report["output"]))
    s.add_row("pruned", rep["summary"])
    s.add_row("weights", f"{m['matrices_pruned']} matrices, {m['target_params']:,} weights, {m['target_sparsity']:.1%} "
              f"zero ({m['model_sparsity']:.1%} of the model)")
    s.add_row("reconstruction error", f"mean {_f(m['rel_error_mean'])}, max {_f(m['rel_error_max'])}")
    if "rel_max_diff" in m:
        s.add_row("output change", f"relative max |Δlogits| {_f(m['rel_max_diff'])} vs the unpruned model "
                  "(example inputs)")
    s.add_row("check", reloaded_text(report, "the in-memory result", layout=", dense with zeros"))
    comp = (report.get("extra_outputs") or {}).get("compressed")
    if comp:
        s.add_row("compressed form", f"{report['output']}/{comp['path']}: {fmt_bytes(comp['bytes'])} vs "
                  f"{fmt_bytes(comp['dense_bytes'])} dense ({comp['ratio']:.1%}), {comp['compressed_tensors']} "
                  "tensors as values + bitmask, each restored and compared byte for byte")
    s.add_row("speed", m["speed"])
    s.add_row("report", f"{report['output']}/report.json")
    s.add_row("time", fmt_seconds(report["seconds"]))
    console.print(s)
    layer_err = {r["layer"]: r for r in tables.get("layers", [])}
    t = Table(title="per layer / per expert (tokens routed during calibration; error = ‖ΔW·X‖²/‖W·X‖² on those tokens)")
    for col in ("layer", "Δ layer", "expert", "tokens", "share", "statistics", "sparsity", "error (max)"):
        t.add_column(col, overflow="fold")
    last = object()
    for r in tables.get("experts", []):
        first = r["layer"] != last
        last = r["layer"]
        lr = layer_err.get(r["layer"], {})
        t.add_row(str(r["layer"]) if first else "", _f(lr.get("layer_rel_error")) if first else "",
                  str(r["expert"]), _f(r["tokens"], "d"), _f(r["share"], ".1%"),
                  r["stats"], f"{r['sparsity']:.1%}", _f(r["rel_error_max"]),
                  style="yellow" if r["fallback"] else None)
    if tables.get("experts"):
        console.print(t)
    others = [r for r in tables.get("matrices", []) if ".experts." not in r["matrix"]]
    if others:
        t2 = Table(title="other pruned matrices")
        for col in ("matrix", "shape", "statistics", "sparsity", "error"):
            t2.add_column(col, overflow="fold")
        for r in others:
            t2.add_row(r["matrix"], "×".join(map(str, r["shape"])), r["stats"], f"{r['sparsity']:.1%}", _f(r["rel_error"]))
        console.print(t2)
    render_warnings(console, [w for w in rep.get("warnings", []) if not w.startswith("2:4 on CPU")])
