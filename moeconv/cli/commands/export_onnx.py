"""`moeconv export onnx SRC OUT`: ONNX export with live routing, parity-checked, optionally quantized."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moeconv.cli.common import force_option, max_memory_option, seed_option


def _export_group(app: typer.Typer) -> typer.Typer:
    """The `export` sub-app, shared with other exporters that register under it."""
    for group in getattr(app, "registered_groups", []):
        if group.name == "export" and group.typer_instance is not None:
            return group.typer_instance
    group = typer.Typer(no_args_is_help=True, help="Export a model for deployment (onnx, gguf).")
    app.add_typer(group, name="export")
    return group


def register(app: typer.Typer) -> None:
    export = _export_group(app)

    @export.command("onnx")
    def onnx_cmd(
        src: str = typer.Argument(..., help="Model: HF checkpoint dir, moeconv dir, .gguf, builtin:NAME, FILE.py."),
        out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory (must not exist unless --force)."),
        strategy: str = typer.Option("auto", help="auto | portable (standard ONNX ops) | fused (onnxruntime's com.microsoft.MoE)."),
        quantize: Optional[str] = typer.Option(None, help="int8 (dynamic) | int4 (MatMulNBits / QMoE); routers stay float.",
                                               show_default="none: float weights"),
        quant_scheme: Optional[str] = typer.Option(None, help="int8: block | tensor (quantize_dynamic); int4: hqq (most accurate; "
                                                              "float zero points run through onnxruntime's slower CPU path) | rtn | "
                                                              "rtn-asym (fast CPU kernels).",
                                                   show_default="block for int8, hqq for int4"),
        with_past: bool = typer.Option(False, "--with-past", help="KV-cache decode graph (causal LMs) for generation."),
        opset: int = typer.Option(18, help="ONNX opset (17-23)."),
        atol: float = typer.Option(1e-4, help="Parity bound on max |Δ| between onnxruntime and PyTorch (fp32)."),
        block_size: int = typer.Option(32, help="int4 / QMoE block size (power of two ≥ 16)."),
        accuracy_level: int = typer.Option(4, help="MatMulNBits accuracy level: 0 fp32 activations … 4 int8 activations."),
        quantize_lm_head: bool = typer.Option(True, "--quantize-lm-head/--float-lm-head", help="Quantize the output projection too."),
        head_bits: int = typer.Option(8, help="Bits of the quantized output projection (8 or 4; --quantize int4 keeps it at 8 unless told)."),
        seed: int = seed_option("Seed for the example and parity inputs."),
        force: bool = force_option(),
        max_memory: Optional[str] = max_memory_option(),
    ):
        """Export to ONNX with routing computed at run time; check onnxruntime against PyTorch.

        Parity is checked on inputs of other lengths and batch sizes and on inputs routed to
        other experts than the export's example. If it fails, OUT is not written: the export and
        its report go to OUT.failed/ (with a FAILED marker) and the exit code is 2.
        """
        from moeconv import cli

        def go():
            from moeconv.errors import ConfigError
            from moeconv.pass_base import _first_error
            from moeconv.progress import Progress
            from moeconv.jobs.export_onnx import export_onnx_to_dir
            from passes.export_onnx import ExportOnnxConfig
            from pydantic import ValidationError
            try:
                cfg = ExportOnnxConfig(strategy=strategy, quantize=quantize, quant_scheme=quant_scheme,
                                       with_past=with_past, opset=opset, atol=atol,
                                       block_size=block_size, accuracy_level=accuracy_level,
                                       quantize_lm_head=quantize_lm_head, head_bits=head_bits, seed=seed)
            except ValidationError as exc:
                raise ConfigError(f"export onnx: {_first_error(exc)}") from None
            _check_memory(src, cfg, max_memory)  # before any tensor is read
            with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
                report = export_onnx_to_dir(src, out_dir, cfg, force=force, progress=progress)
            render_export(cli.out, report)
        cli._run(go)


def _check_memory(src: str, cfg, max_memory: str | None) -> None:
    """Refuse (exit 2, one line) an export whose estimated peak memory exceeds --max-memory."""
    from moeconv.memory_plan import plan_and_check
    from passes.export_onnx import ExportOnnx
    plan_and_check(src, [ExportOnnx(cfg)], max_memory=max_memory, reload_check=False)


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def render_export(console, report: dict) -> None:
    from rich.table import Table
    from moeconv.report_format import fmt_bytes as _bytes, fmt_float, fmt_seconds
    p = report["passes"][0]
    m = p["metrics"]
    par = m["parity"]
    t = Table(title="export onnx", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("output", f"{report['output']}  ({', '.join(m['files'])})")
    t.add_row("graph", f"{m['graph']}, opset {m['opset']}; MoE: {m['lowering']}")
    routing = ""
    if "cases_reaching_experts_the_example_did_not" in par:
        routing = (f"; {par['cases_reaching_experts_the_example_did_not']} of them reach experts the example input "
                   f"did not")
    within = (f"all within atol {par['atol']:g}" if par["cases_within_atol"] == par["cases"] else
              f"{par['cases_within_atol']} within atol {par['atol']:g}, the rest within {par['noise_factor']:g}× "
              f"PyTorch's own rounding noise (≤ {par['max_torch_noise']:.2g})")
    t.add_row("parity", f"max |Δ| {fmt_float(par['max_abs_diff'])} on {par['cases']} inputs (other lengths, batch sizes, "
              f"padding{', decode steps' if 'with past' in m['graph'] else ''}), {within}" + routing)
    if "generation" in par:
        g = par["generation"]
        t.add_row("generation", f"{g['tokens']} greedy tokens {'identical' if g['equal'] else 'DIFFER'} "
                  "in onnxruntime and PyTorch")
    q = m.get("quantization")
    if q:
        e = q["error_vs_float"]
        agree = f", top-1 agreement ≥ {e['min_top1_agreement']:.3f}" if "min_top1_agreement" in e else ""
        qmoe = f", {q['qmoe_blocks']} fused MoE → QMoE" if q["qmoe_blocks"] else ""
        t.add_row("quantized", f"{q['mode']} ({q['scheme']}): {q['quantized_nodes']} MatMuls{qmoe}, {len(q['kept_float'])} kept float "
                  f"(routers); max |Δ| vs float {fmt_float(e['max_abs_diff'])}{agree}")
        t.add_row("size", f"{_bytes(q['bytes'])} ({q['size_ratio']:.2f}× the float {_bytes(m['float_bytes'])})")
    else:
        t.add_row("size", _bytes(m["bytes"]))
    i8 = m.get("int8_weights")
    if i8:
        d = i8["default_session"]
        t.add_row("int8 weights", f"{i8['int8_layers_carried']} of {i8['int8_layers']} bitsandbytes int8 layers carried as "
                  f"int8 + row scales (DequantizeLinear); {_bytes(i8['bytes'])} vs {_bytes(i8['dequantized_float_bytes'])} "
                  f"with float weights; parity is against the dequantized float model")
        t.add_row("vs bitsandbytes", f"max |Δ| {fmt_float(i8['vs_bitsandbytes']['max_abs_diff'])} (bitsandbytes also quantizes "
                  f"activations); a default onnxruntime session (int8 activations): {fmt_float(d['vs_dequantized']['max_abs_diff'])} "
                  f"vs dequantized, {fmt_float(d['vs_bitsandbytes']['max_abs_diff'])} vs bitsandbytes")
    lat = m.get("latency")
    if lat:
        line = f"{lat['tokens']}-token forward: onnxruntime {_ms(lat['ort_prefill_ms'])} vs PyTorch {_ms(lat['torch_prefill_ms'])}"
        if "ort_decode_ms" in lat:
            line += f"; 1-token decode: {_ms(lat['ort_decode_ms'])} vs {_ms(lat['torch_decode_ms'])}"
        t.add_row("latency", line)
    t.add_row("time", f"{fmt_seconds(report['seconds'])} (export {fmt_seconds(m['export_seconds'])})")
    console.print(t)
    for w in p.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")
