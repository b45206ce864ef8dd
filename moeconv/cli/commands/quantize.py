"""`moeconv quantize SRC OUT --method int8|nf4|fp4`: bitsandbytes quantization, verified on reload.

A thin shell over the `quantize` pass and `moeconv.job.run_to_dir`: parse, refuse bad requests
before anything is loaded or written, run, render the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

RELOAD_RTOL_HALF = 1e-2  # transformers reloads float parts in fp32; a half-precision model then differs by rounding


def register(app: typer.Typer) -> None:
    import logging
    # bitsandbytes logs on every LLM.int8 call and about an optional CPU kernel package; checkpoints
    # that transformers loads (moeconv inspect / load of a dense quantized model) would repeat it.
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).setLevel(logging.ERROR)

    @app.command()
    def quantize(
        src: str = typer.Argument(..., help="Float model: HF checkpoint dir (dense or MoE), moeconv dir, .gguf, builtin:NAME, FILE.py."),
        out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory (must not exist unless --force)."),
        method: str = typer.Option("nf4", "--method", "-m", help="int8 (LLM.int8) | nf4 | fp4."),
        double_quant: bool = typer.Option(False, "--double-quant", help="4-bit: quantize the block scales too."),
        blocksize: Optional[int] = typer.Option(None, "--blocksize", help="4-bit: weights per scale, 32…4096 (default 64)."),
        compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype", help="4-bit: float32 | bfloat16 | float16 (default: the model's)."),
        int8_threshold: float = typer.Option(6.0, "--int8-threshold", help="int8: LLM.int8 outlier threshold; activation columns above it run in fp16 (lower: more accurate, slower; 0 = none)."),
        targets: Optional[list[str]] = typer.Option(None, "--targets", help="Only these modules: a group (attention, experts, mlp, shared_expert), re:REGEX, layers:0-3, or a module path. Repeatable."),
        ignore: Optional[list[str]] = typer.Option(None, "--ignore", help="Leave these modules in float (same syntax). Repeatable."),
        quantize_routers: bool = typer.Option(False, "--quantize-routers", help="Also quantize MoE routers (not advised)."),
        quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head", help="Also quantize lm_head (unless tied to the embeddings)."),
        eval_file: Optional[Path] = typer.Option(None, "--eval", help="Held-out text (.txt/.jsonl) or token ids: perplexity before and after."),
        eval_batches: int = typer.Option(16, "--eval-batches", min=1, help="Sequences of --eval-seq-len tokens to evaluate."),
        eval_seq_len: int = typer.Option(256, "--eval-seq-len", min=8),
        shard_size: str = typer.Option("5GB", help="Maximum shard size, e.g. 5GB, 500MB."),
        seed: int = typer.Option(0, help="Seed of the example inputs the output error is measured on."),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    ):
        """Quantize a model with bitsandbytes and write a checkpoint its users can load.

        Dense Hugging Face models load with transformers (`quantization_config`); MoE models are
        written in moeconv's format and load with `moeconv.load` (transformers 5.x would leave their
        experts in float). Routers, embeddings and lm_head stay in full precision by default. The
        error against the unquantized model is measured and reported, not promised.
        """
        from moeconv.cli import _run, _state, err, out

        def go():
            import torch
            from pydantic import ValidationError

            from moeconv import Context, load
            from moeconv.context import check_seed
            from moeconv.io.atomic import check_new_output
            from moeconv.errors import ConfigError, UnsupportedError
            from moeconv.job import run_to_dir
            from moeconv.pass_base import _first_error
            from moeconv.render import Progress
            from moeconv.verify import EXACT
            from passes.quantize import Quantize, QuantizeConfig
            from passes.upcycle_checkpoint import parse_size

            try:
                cfg = QuantizeConfig(method=method, double_quant=double_quant, blocksize=blocksize,
                                     compute_dtype=compute_dtype, int8_threshold=int8_threshold,
                                     targets=targets or None, ignore=ignore or [], quantize_routers=quantize_routers,
                                     quantize_lm_head=quantize_lm_head)
            except ValidationError as exc:
                raise ConfigError(f"quantize: {_first_error(exc)}") from None
            shard_bytes = parse_size(shard_size)
            check_seed(seed)  # before any loading: it reaches every generator of the run
            check_new_output(out_dir, force=force)
            state = load(src)
            if "quantized" in state.facts():
                raise UnsupportedError(f"{src} is already quantized (bitsandbytes layers); quantizing twice "
                                       "is not supported: start from the float checkpoint")
            evaluation = None
            if eval_file is not None:
                from moeconv.data import calibration_tokens
                evaluation = calibration_tokens(eval_file, src, num_samples=eval_batches, seq_len=eval_seq_len,
                                                what="evaluation", seq_len_flag="--eval-seq-len",
                                                samples_flag="--eval-batches")
            dtype = next((p.dtype for p in state.module.parameters() if p.is_floating_point()), torch.float32)
            tolerance = EXACT if dtype == torch.float32 else RELOAD_RTOL_HALF
            with Progress(err, enabled=not _state["verbose"]) as progress:
                ctx = Context(seed=seed, progress=progress, evaluation=evaluation)
                report = run_to_dir(src, out_dir, [Quantize(cfg)], ctx=ctx, shard_bytes=shard_bytes, force=force,
                                    state=state, reload_tolerance=tolerance)
            render_quantize(out, report)
        _run(go)


def render_quantize(console, report: dict) -> None:
    """The summary, bytes per module group, layers left in float and why, warnings."""
    from rich.table import Table
    from rich.text import Text

    from moeconv.render import _bytes, _n
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
        t.add_row("output error", f"max |Δlogits| {m['logits_max_abs_diff']:.4g} (logits up to {m['logits_scale']:.3g}), "
                  f"KL {m['kl']:.4g}, top-1 agreement {m['top1_agreement']:.1%} on {m['error_inputs']}")
    if "ppl_before" in m:
        t.add_row("perplexity", f"{m['ppl_before']:.4g} → {m['ppl_after']:.4g} ({(m['ppl_ratio'] - 1):+.2%}) on --eval text")
    t.add_row("reload check", f"max |Δ| {v['max_abs_diff']:.3g} vs the in-memory quantized model, "
              f"reloaded as {v['consumer_class']}")
    t.add_row("time", f"{report['seconds']} s")
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
