"""`moeconv export gguf SRC OUT`: a GGUF file for llama.cpp / Ollama, checked in llama.cpp itself."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from moeconv.cli.commands.export_onnx import _export_group
    from moeconv.cli.common import force_option, seed_option
    export = _export_group(app)

    @export.command("gguf")
    def gguf_cmd(
        src: str = typer.Argument(..., help="Model: HF checkpoint dir (Llama, Mistral, Mixtral, Qwen2/3, "
                                            "Qwen2/3-MoE; upcycled or native) or .gguf."),
        out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory: model.gguf, Modelfile, "
                                                                "report.json (must not exist unless --force)."),
        gguf_type: str = typer.Option("f16", "--type", help="f16 | bf16 | f32 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1. "
                                                            "Norms, biases and routers stay F32 whatever the type."),
        atol: Optional[float] = typer.Option(None, "--atol", help="Bound on relative max |Δlogits| (max |Δ| / max "
                                             "|logit|) between llama.cpp and PyTorch; the lossy types are gated on "
                                             "top-1 only.", show_default="by --type: f32 1e-4, f16 1e-2"),
        min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Least share of positions where llama.cpp "
                                                 "and PyTorch pick the same next token.",
                                                 show_default="by --type: f16 0.95, q8_0 0.9, q4_0 0.3"),
        seed: int = seed_option("Seed for the check's token ids."),
        force: bool = force_option(),
    ):
        """Write OUT/model.gguf with the tensor names, stacked experts and metadata llama.cpp's own
        converter writes, and the tokenizer embedded. The file is read back, then evaluated in
        llama.cpp (when llama-cpp-python is installed) against PyTorch on the same token ids; a
        model llama.cpp would compute differently is refused before anything is written.

        Run it: llama-cli -m OUT/model.gguf, or ollama create NAME -f OUT/Modelfile."""
        from moeconv import cli

        def go():
            from moeconv.jobs.export_gguf import export_gguf_to_dir
            report = export_gguf_to_dir(src, out_dir, gguf_type=gguf_type, tolerance=atol, min_top1=min_top1,
                                        force=force, seed=seed)
            _render(cli.out, report)
        cli._run(go)


def _render(console, report: dict) -> None:
    from rich.table import Table

    from moeconv.render import render_warnings
    from moeconv.report_format import fmt_bytes, fmt_float, fmt_pct, fmt_seconds
    w, check = report["written"], report["verification"]
    t = Table(title=f"export gguf: {report['output']}/model.gguf ({report['architecture']}, {report['type']})")
    t.add_column("")
    t.add_column("")
    t.add_row("size", fmt_bytes(w["bytes"]))
    t.add_row("tensors", f"{w['tensors']} ({', '.join(f'{n} {k}' for k, n in sorted(w['types'].items()))}); read back")
    t.add_row("tokenizer", report["tokenizer"]["kind"])
    if check["status"] == "skipped":
        t.add_row("llama.cpp check", "skipped (llama-cpp-python not installed)")
    else:
        t.add_row("llama.cpp check", f"{check['status']}: relative max |Δlogits| {fmt_float(check['relative_max_abs_diff'])} "
                                     f"(≤ {check['tolerance']:g}), top-1 {fmt_pct(check['top1_agreement'])} on "
                                     f"{check['tokens']} tokens")
    t.add_row("time", fmt_seconds(report["seconds"]))
    console.print(t)
    render_warnings(console, report.get("warnings", []))
