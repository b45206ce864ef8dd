"""`run_to_dir`: the `moeconv quantize|sparsify|prune-experts|distill|run SRC OUT` job — load, run
a pipeline, save in the consumer's format, reload with that consumer and compare with the
in-memory result, then the driver writes the reports and renames into place."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from moeconv.context import Context
from moeconv.errors import VerificationError
from moeconv.formats.hf_moe import format_for
from moeconv.io.load import load
from moeconv.io.save import save_checkpoint
from moeconv.jobs.driver import JobResult, run_job
from moeconv.jobs.upcycle import shared_expert_note
from moeconv.pipeline import Pipeline
from moeconv.state import ModelState, vocab_size
from moeconv.summary import model_summary, summary_inputs
from moeconv.verify import EXACT, check_inputs, compare_outputs, load_consumer
from passes.upcycle import Upcycle


def run_to_dir(src, out, passes: list, *, ctx: Context | None = None, fmt: str = "auto",
               shard_bytes: int = 5 * 10**9, force: bool = False, reload_tolerance: float | None = EXACT,
               state: ModelState | None = None, extra_outputs=None, extra_report: dict | None = None) -> dict:
    """Run `passes` on `src` and write the result to `out`; returns the report (also report.json).

    `reload_tolerance`: how closely the reloaded output must match the in-memory result (exact by
    default; a writer that re-encodes, e.g. a quantization format, may need a bound).
    `extra_outputs(state, tmp_dir) -> dict`: writes more files (e.g. a compressed form) after the
    checkpoint is verified, inside the atomic directory; its dict goes to report["extra_outputs"].
    `extra_report`: more fields for report.json (the memory plan, the route taken and why).
    """
    ctx = ctx or Context()
    recipe = [{"pass": p.name, **p.config.model_dump()} for p in passes]

    def work(tmp: Path) -> JobResult:
        loaded = state or load(src)
        # the family is known once the model is read (a GGUF's too); the recorded recipe follows
        run_passes, shared_note = _for_output_family(passes, loaded, fmt)
        recipe[:] = [{"pass": p.name, **p.config.model_dump()} for p in run_passes]
        # measured before the passes run: they change the model in place
        input_summary = model_summary(loaded, summary_inputs(loaded, ctx.seed, ctx.calibration))
        result = Pipeline(run_passes).run(loaded, ctx)
        written = save_checkpoint(result.state, tmp, fmt=fmt, shard_bytes=shard_bytes)
        vocab = vocab_size(result.state.module, result.state.config)
        if vocab is None:
            raise VerificationError("cannot find the vocabulary size to build check inputs")
        reloaded = load_consumer(tmp, written["consumer"], written.get("expected_class"))
        verification = compare_outputs(_reference_for(result.state, written["consumer"]), reloaded,
                                       check_inputs(vocab, ctx.seed + 1),
                                       tolerance=reload_tolerance, what="in-memory result")
        report = {"passes": [r.to_dict() for r in result.report.passes], "written": written,
                  "verification": verification, "input_model": input_summary,
                  "model": model_summary(result.state, summary_inputs(result.state, ctx.seed, ctx.calibration))}
        onnx_files = _move_onnx(result.state, tmp, Path(out))
        if onnx_files:
            report["onnx_files"] = onnx_files
        if shared_note is not None:
            report["shared_expert"] = shared_note
        if extra_outputs is not None:
            report["extra_outputs"] = extra_outputs(result.state, tmp)
        report.update(extra_report or {})
        return JobResult(report, loaded.source)
    return run_job(src, out, force=force, recipe=recipe, work=work)


def _for_output_family(passes: list, state: ModelState, fmt: str) -> tuple[list, str | None]:
    """`passes`, with an `upcycle` step that leaves `shared_experts` unset following the HF MoE family
    the output is written as, the rule `moeconv upcycle` applies (`UpcycleConfig.for_family`):
    Qwen2-MoE always has a shared expert, so without one a Qwen2 recipe could only be written in
    moeconv's own format. An explicit `shared_experts: false` is kept (that output is moeconv's
    format, as asked). Returns the passes and the report's note on the shared expert it added."""
    family = format_for(getattr(state.config, "model_type", None)) if fmt != "moeconv" else None
    if family is None:
        return passes, None
    chosen, note = [], None
    for p in passes:
        if isinstance(p, Upcycle) and "shared_experts" not in p.config.model_fields_set:
            cfg = p.config.for_family(family.shared_expert)
            if cfg is not p.config:
                p, note = type(p)(cfg), shared_expert_note(cfg, family)
        chosen.append(p)
    return chosen, note


def _move_onnx(state: ModelState, tmp: Path, out: Path) -> list[str]:
    """An export pass in the list left its files in a work directory (`artifacts["onnx"]`): they
    belong in OUT, next to the checkpoint. Added for recipes that end with export-onnx."""
    art = state.artifacts.get("onnx")
    if not art:
        return []
    src = Path(art["dir"])
    names = list(art.get("files") or [art["model"]])
    for name in names:
        if (tmp / name).exists():
            raise FileExistsError(f"{name} would overwrite a checkpoint file")  # a bug, not a user error
        shutil.copy2(src / name, tmp / name)
    if art.get("temporary"):
        shutil.rmtree(src, ignore_errors=True)
    art.update(dir=str(out), temporary=False)
    return names


def _reference_for(state: ModelState, consumer: str) -> torch.nn.Module:
    """What the reload is compared with. transformers reloads in fp32 (`verify.load_consumer`): a
    half-precision float model is compared through an fp32 copy, since bf16 arithmetic (e.g. a
    router's top-k) differs from the fp32 reload by more than rounding. Added for prune-experts."""
    module = state.module
    if consumer != "transformers" or "quantized" in state.facts():
        return module
    if {p.dtype for p in module.parameters() if p.is_floating_point()} <= {torch.float32}:
        return module
    return copy.deepcopy(module).float().eval()
