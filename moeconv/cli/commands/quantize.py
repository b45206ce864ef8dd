"""`moeconv quantize SRC OUT --method int8|nf4|fp4|w4a16|w8a16|fp8`: bitsandbytes quantization, or
compressed-tensors (w4a16, w8a16, fp8: what vLLM serves; `moeconv.jobs.quantize_ct`), verified on reload.

A thin shell over the `quantize` pass and `moeconv.jobs.pipeline_job.run_to_dir`: parse, refuse bad requests
before anything is loaded or written, run, render the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from moeconv.cli.common import (calib_option, calib_samples_option, calib_seq_len_option, device_option, eval_option,
                                eval_samples_option, force_option, ignore_option, max_memory_option, seed_option,
                                shard_size_option, targets_option)

RELOAD_RTOL_HALF = 1e-2  # transformers reloads float parts in fp32; a half-precision model then differs by rounding


def register(app: typer.Typer) -> None:
    import logging
    # bitsandbytes logs on every LLM.int8 call and about an optional CPU kernel package; checkpoints
    # that transformers loads (moeconv inspect / load of a dense quantized model) would repeat it.
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)
    app.command()(quantize)


def quantize(
    src: str = typer.Argument(..., help="Float model: HF checkpoint dir (dense or MoE), moeconv dir, .gguf, builtin:NAME, FILE.py."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory (must not exist unless --force)."),
    method: str = typer.Option("nf4", "--method", "-m", help="bitsandbytes: int8 (LLM.int8) | nf4 | fp4; "
                               "compressed-tensors (vLLM, transformers): w4a16 | w8a16 | fp8."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="w4a16 / w8a16: inputs per scale "
                                             "(must divide every quantized matrix's width).", show_default="128"),
    algorithm: str = typer.Option("rtn", "--algorithm", help="w4a16 / w8a16 / fp8: rtn (round to nearest, no "
                                  "data) | gptq (needs --calib; each expert's Hessian from the tokens routed to it)."),
    calib: Optional[Path] = calib_option("gptq: calibration text (.txt/.jsonl) or token ids."),
    calib_samples: int = calib_samples_option(32, help="gptq: calibration sequences taken from --calib."),
    calib_seq_len: Optional[int] = calib_seq_len_option(None, help="gptq: tokens per calibration sequence."),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="w4a16 / w8a16: zero point "
                                             "fixed at 0 (keeps 2:4 zeros exactly). --asymmetric is "
                                             "refused: transformers 5.25 cannot load its packed zero points.",
                                             show_default="symmetric"),
    double_quant: bool = typer.Option(False, "--double-quant", help="4-bit: quantize the block scales too."),
    block_size: Optional[int] = typer.Option(None, "--block-size", "--blocksize", help="4-bit: weights per scale, "
                                             "32…4096.", show_default="64"),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype", help="4-bit: float32 | bfloat16 | float16.",
                                                show_default="the model's"),
    int8_threshold: float = typer.Option(6.0, "--int8-threshold", help="int8: LLM.int8 outlier threshold; activation columns above it run in fp16 (lower: more accurate, slower; 0 = none)."),
    targets: Optional[list[str]] = targets_option("Only these modules", "every linear layer"),
    ignore: Optional[list[str]] = ignore_option("Leave these modules in float"),
    quantize_routers: bool = typer.Option(False, "--quantize-routers", help="Also quantize MoE routers (not advised)."),
    quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head", help="Also quantize lm_head (unless tied to the embeddings)."),
    eval_file: Optional[Path] = eval_option("Held-out text (.txt/.jsonl) or token ids: perplexity before and after."),
    eval_samples: int = eval_samples_option(16, "--eval-batches", help="Sequences of --eval-seq-len tokens to evaluate."),
    eval_seq_len: int = typer.Option(256, "--eval-seq-len", min=8, help="Tokens per evaluated sequence."),
    shard_size: str = shard_size_option(),
    seed: int = seed_option("Seed of the example inputs the output error is measured on."),
    force: bool = force_option(),
    max_memory: Optional[str] = max_memory_option(),
    device: str = device_option(),
):
    """Quantize a model and write a checkpoint its users can load: compressed-tensors (w4a16, w8a16,
    fp8; what vLLM serves, transformers loads it; --algorithm gptq with --calib) or bitsandbytes.

    compressed-tensors: every expert the same scheme, routers and lm_head in float, reloaded by
    stock transformers before OUT appears. bitsandbytes:

    Dense Hugging Face models load with transformers (`quantization_config`); MoE models are
    written in moeconv's format and load with `moeconv.load` (transformers 5.x would leave their
    experts in float). Routers, embeddings and lm_head stay in full precision by default. The
    error against the unquantized model is measured and reported, not promised.
    """
    args = QuantizeArgs(**locals())  # first statement: exactly the options above
    from moeconv import cli
    cli._run(lambda: _run_quantize(args))


@dataclass(frozen=True)
class QuantizeArgs:
    """`moeconv quantize`'s options as typer parsed them (see `quantize` for their meaning)."""
    src: str
    out_dir: Path
    method: str
    group_size: Optional[int]
    algorithm: str
    calib: Optional[Path]
    calib_samples: int
    calib_seq_len: Optional[int]
    symmetric: Optional[bool]
    double_quant: bool
    block_size: Optional[int]
    compute_dtype: Optional[str]
    int8_threshold: float
    targets: Optional[list[str]]
    ignore: Optional[list[str]]
    quantize_routers: bool
    quantize_lm_head: bool
    eval_file: Optional[Path]
    eval_samples: int
    eval_seq_len: int
    shard_size: str
    seed: int
    force: bool
    max_memory: Optional[str]
    device: str


def _quantize_config(a: QuantizeArgs):
    """The pass's typed config; an invalid combination is one `ConfigError` line."""
    from pydantic import ValidationError

    from moeconv.errors import ConfigError
    from moeconv.pass_base import _first_error
    from passes.quantize import QuantizeConfig
    try:
        return QuantizeConfig(method=a.method, double_quant=a.double_quant, blocksize=a.block_size,
                              compute_dtype=a.compute_dtype, int8_threshold=a.int8_threshold,
                              targets=a.targets or None, ignore=a.ignore or [], quantize_routers=a.quantize_routers,
                              quantize_lm_head=a.quantize_lm_head)
    except ValidationError as exc:  # the config's `blocksize` is this command's --block-size
        raise ConfigError(f"quantize: {_first_error(exc)}".replace("blocksize", "--block-size")) from None


def _reload_tolerance(state) -> float:
    """Exact for an fp32 model; a half-precision one differs by rounding when reloaded in fp32."""
    import torch

    from moeconv.verify import EXACT
    dtype = next((p.dtype for p in state.module.parameters() if p.is_floating_point()), torch.float32)
    return EXACT if dtype == torch.float32 else RELOAD_RTOL_HALF


def _run_quantize(a: QuantizeArgs) -> None:
    from moeconv import cli
    from moeconv.formats.compressed_tensors_io import METHODS as CT_METHODS
    from moeconv.jobs.routes import refuse_off_route
    from moeconv.stream.skeleton import stream_device
    stream_device(a.device)  # before anything is read
    if a.method in CT_METHODS:
        refuse_off_route(a.device, "in-memory", f"quantize --method {a.method} is not streamed")
        return _run_compressed_tensors(a)
    from moeconv.context import check_seed
    from moeconv.io.atomic import check_new_output
    from moeconv.jobs.routes import choose_route
    from moeconv.memory_plan import plan_and_check
    from moeconv.units import parse_size
    from passes.quantize import Quantize

    cfg = _quantize_config(a)
    shard_bytes = parse_size(a.shard_size)
    check_seed(a.seed)  # before any loading: it reaches every generator of the run
    check_new_output(a.out_dir, force=a.force)
    route, why = choose_route(a.src, "quantize")
    refuse_off_route(a.device, route, why)
    plan = plan_and_check(a.src, [Quantize(cfg)], max_memory=a.max_memory, route=route,
                          device=a.device)  # before any tensor is read
    extra = {"memory_plan": plan.to_dict(), "route": {"route": route, "why": why}}
    report = (_quantize_streamed if route == "streaming" else _quantize_in_memory)(a, cfg, shard_bytes, extra)
    render_quantize(cli.out, report)


def _run_compressed_tensors(a: QuantizeArgs) -> None:
    """w4a16 / w8a16 / fp8: round-to-nearest into compressed-tensors, reloaded by transformers."""
    from moeconv import cli
    from moeconv.context import check_seed
    from moeconv.errors import ConfigError
    from moeconv.jobs.quantize_ct import quantize_ct_to_dir
    from moeconv.units import parse_size
    bnb_only = {"--double-quant": a.double_quant, "--block-size": a.block_size, "--compute-dtype": a.compute_dtype,
                "--targets": a.targets, "--ignore": a.ignore, "--quantize-routers": a.quantize_routers,
                "--quantize-lm-head": a.quantize_lm_head, "--eval": a.eval_file}
    given = [flag for flag, v in bnb_only.items() if v]
    if given:
        raise ConfigError(f"quantize --method {a.method}: {given[0]} is a bitsandbytes option")
    check_seed(a.seed)
    calibration = None
    if a.algorithm not in ("rtn", "gptq"):
        raise ConfigError(f"quantize: --algorithm must be rtn or gptq, not {a.algorithm!r}")
    if a.algorithm == "gptq" and a.calib is None:
        raise ConfigError("quantize --algorithm gptq needs calibration text: --calib FILE")
    if a.calib is not None:
        if a.algorithm != "gptq":
            raise ConfigError("quantize: --calib is read by --algorithm gptq only")
        from moeconv.data import calibration_tokens
        calibration = calibration_tokens(a.calib, a.src, num_samples=a.calib_samples, seq_len=a.calib_seq_len,
                                         seq_len_flag="--calib-seq-len", samples_flag="--calib-samples")
    from moeconv.progress import Progress
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        report = quantize_ct_to_dir(a.src, a.out_dir, method=a.method, group_size=a.group_size,
                                    symmetric=a.symmetric, algorithm=a.algorithm, calibration=calibration,
                                    force=a.force, seed=a.seed, shard_bytes=parse_size(a.shard_size),
                                    max_memory=a.max_memory, progress=progress)
    render_compressed_tensors(cli.out, report)


def render_compressed_tensors(console, report: dict) -> None:
    from rich.table import Table

    from moeconv.render import render_warnings
    from moeconv.report_format import fmt_bytes as _bytes, fmt_float, fmt_pct, fmt_seconds
    w, e, v = report["written"], report["error_vs_float"], report["verification"]
    args = report["weights"]
    scheme = f"{args['num_bits']}-bit {args['type']}, " + (f"groups of {args['group_size']}" if args.get("group_size")
                                                           else f"per {args['strategy']}")
    t = Table(title="quantize", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("output", f"{report['output']}  (compressed-tensors, loads with transformers.AutoModelForCausalLM; "
              "served by vLLM)")
    t.add_row("method", f"{report['method']} ({report.get('algorithm', 'rtn')}): {scheme}, {'symmetric' if args.get('symmetric') else 'asymmetric'}; "
              f"{report['quantized_modules']} matrices, {len(report['float_modules'])} left in float (routers, lm_head)")
    t.add_row("bytes", f"written {_bytes(w['bytes'])} in {w['shards']} shard(s), re-read and checksummed")
    t.add_row("output error", f"relative max |Δlogits| {fmt_float(e['rel_max_diff'])}, KL {fmt_float(e['kl'])}, "
              f"top-1 agreement {fmt_pct(e['top1_agreement'])} vs the float model")
    if report["zeros"]["before"]:
        t.add_row("zeros", f"{report['zeros']['kept']:,} of {report['zeros']['before']:,} exact zeros kept")
    t.add_row("reload check", f"{v['consumer_class']}: no missing or unexpected weight, max |Δ| {fmt_float(v['max_abs_diff'])} "
              f"vs the in-memory quantized model, {v['routers_bit_identical']} router(s) bit-identical")
    t.add_row("time", fmt_seconds(report["seconds"]))
    console.print(t)
    render_warnings(console, report.get("warnings", []))


def _evaluation(a: QuantizeArgs):
    if a.eval_file is None:
        return None
    from moeconv.data import calibration_tokens
    return calibration_tokens(a.eval_file, a.src, num_samples=a.eval_samples, seq_len=a.eval_seq_len,
                              what="evaluation", seq_len_flag="--eval-seq-len", samples_flag="--eval-samples")


def _quantize_streamed(a: QuantizeArgs, cfg, shard_bytes: int, extra: dict) -> dict:
    """A safetensors checkpoint, one layer at a time (`moeconv.jobs.stream_quantize`)."""
    from moeconv import Context, cli
    from moeconv.jobs.stream_quantize import quantize_streamed
    from moeconv.progress import Progress
    from moeconv.stream.skeleton import Skeleton
    skel = Skeleton.open(Path(a.src))  # the checkpoint is refused as such before its tokenizer is used
    evaluation = _evaluation(a)
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        ctx = Context(seed=a.seed, progress=progress, evaluation=evaluation, device=a.device)
        return quantize_streamed(a.src, a.out_dir, cfg, force=a.force, shard_bytes=shard_bytes, ctx=ctx,
                                 extra_report=extra, skeleton=skel)


def _quantize_in_memory(a: QuantizeArgs, cfg, shard_bytes: int, extra: dict) -> dict:
    from moeconv import Context, cli, load
    from moeconv.errors import UnsupportedError
    from moeconv.jobs.pipeline_job import run_to_dir
    from moeconv.progress import Progress
    from passes.quantize import Quantize
    state = load(a.src)
    if "quantized" in state.facts():
        raise UnsupportedError(f"{a.src} is already quantized (bitsandbytes layers); quantizing twice "
                               "is not supported: start from the float checkpoint")
    evaluation = _evaluation(a)
    tolerance = _reload_tolerance(state)
    with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
        ctx = Context(seed=a.seed, progress=progress, evaluation=evaluation)
        report = run_to_dir(a.src, a.out_dir, [Quantize(cfg)], ctx=ctx, shard_bytes=shard_bytes, force=a.force,
                            state=state, reload_tolerance=tolerance, extra_report=extra)
    return report


def render_quantize(console, report: dict) -> None:
    """The summary, bytes per module group, layers left in float and why, warnings."""
    from rich.table import Table
    from rich.text import Text

    from moeconv.render import _n
    from moeconv.report_format import fmt_bytes as _bytes, fmt_change, fmt_float, fmt_pct, fmt_seconds
    p = report["passes"][0]
    m, w, v = p["metrics"], report["written"], report["verification"]
    t = Table(title="quantize", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("output", f"{report['output']}  ({w['format']}, loads with "
              f"{'transformers.AutoModelForCausalLM' if w['consumer'] == 'transformers' else 'moeconv.load'})")
    t.add_row("method", p["summary"])
    ratio = f" ({m['bytes_ratio']:.3f}×)" if m.get("bytes_ratio") else ""
    t.add_row("bytes", f"{_bytes(m['bytes_before'])} → {_bytes(m['bytes_after'])}{ratio}; "
              f"written {_bytes(w['bytes'])} in {w['shards']} shard(s), re-read and checksummed")
    if m.get("experts_fp16_bytes"):
        t.add_row("experts", f"{_bytes(m['experts_bytes_after'])} = {m['experts_ratio_vs_fp16']:.3f}× their fp16 size")
    if "kl" in m:
        t.add_row("output error", f"max |Δlogits| {fmt_float(m['logits_max_abs_diff'])} (logits up to {fmt_float(m['logits_scale'])}), "
                  f"KL {fmt_float(m['kl'])}, top-1 agreement {fmt_pct(m['top1_agreement'])} on {m['error_inputs']}")
    if "ppl_before" in m:
        t.add_row("perplexity", f"{fmt_change(m['ppl_before'], m['ppl_after'])} on --eval text")
    if w.get("route") == "streaming":
        t.add_row("check", "written one layer at a time; its layers rebuilt from the files and run beside the "
                  "float source one at a time (max |Δlogits| above)")
    else:
        t.add_row("reload check", f"max |Δ| {fmt_float(v['max_abs_diff'])} vs the in-memory quantized model, "
                  f"reloaded as {v['consumer_class']}")
    t.add_row("time", fmt_seconds(report["seconds"]))
    console.print(t)
    g = Table(title="bytes per module group")
    for col in ("group", "parameters", "before", "after", "ratio", "layers quantized / kept"):
        g.add_column(col)
    for row in p["tables"]["groups"]:
        r = row["bytes_after"] / row["bytes_before"] if row["bytes_before"] else 1.0
        g.add_row(row["group"], _n(row["params"]), _bytes(row["bytes_before"]), _bytes(row["bytes_after"]),
                  f"{r:.3f}", f"{row['quantized']} / {row['kept']}")
    console.print(g)
    problems = [r for r in p["tables"]["modules"] if r.get("problem")]
    if problems:
        k = Table(title=f"{len(problems)} selected layer(s) left in float (all in report.json)")
        k.add_column("module", no_wrap=True)
        k.add_column("reason")
        for r in problems[:10]:
            k.add_row(r["module"], r["reason"])
        console.print(k)
    for msg in p.get("warnings", []):
        if problems and msg.startswith(f"{len(problems)} selected layer(s) left in float"):
            continue  # the table above lists them
        console.print(Text.assemble(("warning: ", "yellow"), msg))
