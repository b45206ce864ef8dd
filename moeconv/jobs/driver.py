"""`run_job`: the one place an output directory is made (the only caller of `atomic_output_dir`).

The shape every job has: refuse a bad OUT before any work → do the work into a hidden sibling
directory → carry the source's tokenizer → write report.json, report.html and recipe.json → rename
into place. Nothing is left that looks complete unless all of it succeeded; a failure the job
marks as *reportable* (an ONNX parity failure) is kept as `OUT.failed/` with a `FAILED` marker and
its report (report.json and report.html), for the user to inspect, and OUT is not created.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moeconv.errors import ReportedVerificationError
from moeconv.io.atomic import atomic_output_dir, check_new_output
from moeconv.io.tokenizer_files import carry_tokenizer
from moeconv.report_html import write_html
from moeconv.state import ModelState, SourceInfo
from moeconv.version import __version__


@dataclass
class JobResult:
    """What a job's work returns: its report fields and where the model came from (for the
    tokenizer). `extra_files` are written by the work itself and listed in the report."""

    report: dict
    source: SourceInfo | None = None
    warnings: list[str] = field(default_factory=list)


def source_paths(src) -> tuple[Path, ...]:
    """The input paths of `src` that exist (OUT must not be inside or equal to them)."""
    if isinstance(src, (torch.nn.Module, ModelState)) or str(src).startswith("builtin:"):
        return ()
    path = Path(str(src))
    return (path,) if path.exists() else ()


def check_output(src, out, *, force: bool) -> None:
    """Fail fast on an OUT the driver would refuse, before a job loads anything."""
    check_new_output(Path(out), force=force, inputs=source_paths(src))


def run_job(src, out, *, force: bool, recipe: list[dict], work: Callable[[Path], JobResult],
            html: bool = True) -> dict:
    """Run `work(tmp_dir)` and publish `tmp_dir` as `out`; returns the report (also report.json)."""
    t0 = time.perf_counter()
    out = Path(out)
    failed_dir = out.with_name(out.name + ".failed")
    base = {"moeconv_version": __version__, "source": str(src), "output": str(out)}
    with atomic_output_dir(out, force=force, inputs=source_paths(src)) as tmp:
        try:
            result = work(tmp)
        except ReportedVerificationError as exc:
            _keep_failed(tmp, failed_dir, {**base, "recipe": recipe, "seconds": _since(t0)}, exc)
            raise
        copied, warning = carry_tokenizer(result.source, tmp)
        report = {**base, **result.report, "tokenizer_files": copied, "recipe": recipe, "seconds": _since(t0)}
        warnings = result.warnings + ([warning] if warning else [])
        if warnings:
            report["warnings"] = report.get("warnings", []) + warnings
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        if html:
            write_html(report, tmp / "report.html")
    if failed_dir.exists():  # a stale failure report must not sit next to a good output
        shutil.rmtree(failed_dir, ignore_errors=True)
    return report


def _keep_failed(tmp: Path, failed_dir: Path, base: dict, exc: ReportedVerificationError) -> None:
    report = {**base, "status": "failed", "output": str(failed_dir), "error": str(exc), "passes": [exc.report]}
    (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_html(report, tmp / "report.html")  # what was measured, readable, for the user deciding what to change
    (tmp / "FAILED").write_text(f"{exc.what} failed: {exc}\nsee report.json; this output must not be used.\n")
    if failed_dir.exists():
        shutil.rmtree(failed_dir)
    tmp.rename(failed_dir)
    tmp.mkdir()  # atomic_output_dir removes its (now empty) temporary directory on the way out


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)
