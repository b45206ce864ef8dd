"""`run_to_dir`: the shape of every `moeconv COMMAND SRC OUT` job — load, run a pipeline, save in
the consumer's format into a hidden sibling directory, reload with that consumer and compare with
the in-memory result, write report.json / recipe.json, then rename into place."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from moeconv import __version__
from moeconv.context import Context
from moeconv.io.atomic import atomic_output_dir
from moeconv.io.load import TOKENIZER_FILES, load
from moeconv.io.save import save_checkpoint
from moeconv.pipeline import Pipeline
from moeconv.state import ModelState
from moeconv.report_html import write_html
from moeconv.summary import bytes_per_group, expert_load, expert_sparsity
from moeconv.verify import EXACT, check_inputs, compare_outputs, load_consumer


def run_to_dir(src, out, passes: list, *, ctx: Context | None = None, fmt: str = "auto",
               shard_bytes: int = 5 * 10**9, force: bool = False, reload_tolerance: float | None = EXACT,
               state: ModelState | None = None, extra_outputs=None) -> dict:
    """Run `passes` on `src` and write the result to `out`; returns the report (also report.json).

    `reload_tolerance`: how closely the reloaded output must match the in-memory result (exact by
    default; a writer that re-encodes, e.g. a quantization format, may need a bound).
    `extra_outputs(state, tmp_dir) -> dict`: writes more files (e.g. a compressed form) after the
    checkpoint is verified, inside the atomic directory; its dict goes to report["extra_outputs"].
    """
    t0 = time.perf_counter()
    ctx = ctx or Context()
    out = Path(out)
    src_path = Path(str(src)) if not isinstance(src, (torch.nn.Module, ModelState)) and not str(src).startswith("builtin:") else None
    inputs = tuple(p for p in (src_path,) if p is not None and p.exists())
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        state = state or load(src)
        input_summary = {"bytes_per_group": bytes_per_group(state.module), "parameters": state.parameter_count()}
        result = Pipeline(passes).run(state, ctx)
        written = save_checkpoint(result.state, tmp, fmt=fmt, shard_bytes=shard_bytes)
        vocab = _vocab(result.state)
        reloaded = load_consumer(tmp, written["consumer"], written.get("expected_class"))
        verification = compare_outputs(_reference_for(result.state, written["consumer"]), reloaded,
                                       check_inputs(vocab, ctx.seed + 1),
                                       tolerance=reload_tolerance, what="in-memory result")
        copied = _copy_tokenizer(state, tmp)
        onnx_files = _move_onnx(result.state, tmp, out)
        extra = extra_outputs(result.state, tmp) if extra_outputs is not None else None
        recipe = [{"pass": p.name, **p.config.model_dump()} for p in passes]
        report = {"moeconv_version": __version__, "source": str(src), "output": str(out),
                  "passes": [r.to_dict() for r in result.report.passes], "written": written,
                  "verification": verification, "tokenizer_files": copied, "recipe": recipe,
                  "input_model": input_summary, "model": _model_summary(result.state, ctx, vocab),
                  "seconds": round(time.perf_counter() - t0, 2)}
        if onnx_files:
            report["onnx_files"] = onnx_files
        if extra is not None:
            report["extra_outputs"] = extra
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_html(report, tmp / "report.html")
    return report


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


def _model_summary(state: ModelState, ctx: Context, vocab: int) -> dict:
    batches = ctx.calibration if ctx.calibration is not None else check_inputs(vocab, ctx.seed + 2, batch=8, seq=32)
    return {"parameters": state.parameter_count(), "active_parameters": state.active_parameter_count(),
            "bytes_per_group": bytes_per_group(state.module), "expert_load": expert_load(state.module, batches[:16]),
            "expert_sparsity": expert_sparsity(state.module)}


def _vocab(state: ModelState) -> int:
    v = getattr(state.config, "vocab_size", None)
    if isinstance(v, int):
        return v
    for m in state.module.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    raise ValueError("cannot find the vocabulary size")


def _copy_tokenizer(state: ModelState, tmp: Path) -> list[str]:
    src = state.source.tokenizer_dir
    copied = []
    if src is not None and Path(src).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file() and not (tmp / name).exists():
                shutil.copy2(Path(src) / name, tmp / name)
                copied.append(name)
    elif state.source.kind == "gguf" and state.source.path is not None:
        # A GGUF file carries its tokenizer inside: write it out so OUT is usable on its own.
        # Added for quantize (a .gguf SRC).
        try:
            from moeconv.io.transformers_io import read_tokenizer
            copied = [Path(f).name for f in read_tokenizer(state.source.path).save_pretrained(tmp)]
        except Exception:  # the weights are the job; report.json lists what was carried (nothing)
            copied = []
    return copied


def _reference_for(state: ModelState, consumer: str) -> torch.nn.Module:
    """What the reload is compared with. transformers reloads in fp32 (`verify.load_consumer`): a
    half-precision float model is compared through an fp32 copy, since bf16 arithmetic (e.g. a
    router's top-k) differs from the fp32 reload by more than rounding. Added for prune-experts."""
    module = state.module
    if consumer != "transformers" or "quantized" in state.facts():
        return module
    if {p.dtype for p in module.parameters() if p.is_floating_point()} <= {torch.float32}:
        return module
    import copy
    return copy.deepcopy(module).float().eval()
