"""`export_onnx_to_dir`: the `moeconv export onnx SRC OUT` job — load → `ExportOnnx` (its parity
check is the promise) → the driver's reports, tokenizer and rename.

On success OUT holds `model.onnx` (+ `model.onnx.data` for big models), `report.json`,
`report.html`, `recipe.json`, the source's tokenizer files and, for a transformers model,
`config.json` and `generation_config.json` describing the graph; with `--with-past` also
`genai_config.json`, so onnxruntime-genai generates from OUT directly (`moeconv.onnx.genai_config`).
On a parity failure OUT is *not* created (an existing OUT is left as it was); the failed export
goes to `OUT.failed/` with a `FAILED` marker (the reason) and `report.json` (`"status": "failed"`,
every case measured), and a `ParityError` (exit code 2 in the CLI) is raised. Any other error
leaves nothing behind.
"""
from __future__ import annotations

from pathlib import Path

from moeconv.context import Context
from moeconv.io.load import load
from moeconv.jobs.driver import JobResult, run_job
from moeconv.pipeline import Pipeline
from moeconv.state import ModelState
from passes.export_onnx import ExportOnnx, ExportOnnxConfig, ParityError


def export_onnx_to_dir(src, out, cfg: ExportOnnxConfig, *, force: bool = False, progress=None,
                       state: ModelState | None = None) -> dict:
    """Export `src` (or `state`) to an ONNX directory `out`; returns the report (also report.json)."""
    out = Path(out)
    failed_dir = out.with_name(out.name + ".failed")

    def work(tmp: Path) -> JobResult:
        ctx = Context(seed=cfg.seed, progress=progress)
        ctx.report_progress("loading model", 0, 1)
        loaded = state or load(src)
        ctx.report_progress("loading model", 1, 1)
        result = Pipeline([ExportOnnx(cfg, workdir=tmp)]).run(loaded, ctx)
        pass_report = result.report.passes[0].to_dict()
        files = list(pass_report["metrics"]["files"])
        if hasattr(getattr(loaded.module, "config", None), "save_pretrained"):  # a transformers model
            from moeconv.onnx.genai_config import write_model_files
            # what loaders (onnxruntime-genai, optimum, a hand-written loop) read beside the graph
            files += write_model_files(tmp, loaded.module, with_past=cfg.with_past)
        written = {"format": "onnx" + (" (KV cache)" if cfg.with_past else ""), "consumer": "onnxruntime"}
        return JobResult({"status": "ok", "passes": [pass_report], "files": files, "written": written},
                         loaded.source)
    try:
        return run_job(src, out, force=force, recipe=[{"pass": ExportOnnx.name, **cfg.model_dump()}], work=work)
    except ParityError as exc:
        raise ParityError(f"{exc}; {out} was not written, the failed export and its report are in {failed_dir}",
                          exc.report, failed_dir) from None
