"""`export-onnx`: write the model as an ONNX graph that onnxruntime runs with the same routing
decisions as PyTorch for any input, check that on varied inputs, and optionally quantize it.

Promise: the PyTorch model is returned unchanged (`output_tolerance = 0`). The ONNX graph's own
promise is checked after every export (parity): on at least 7 inputs — other batch sizes and
lengths, one token, a padded batch, a same-shaped batch routed as differently as possible from
the export's example, and with `with_past` decode steps on a PyTorch-made cache — onnxruntime's
outputs (logits / hidden states, and present keys and values) agree with PyTorch's at every real
position within max(`atol`, 4 × PyTorch's own rounding noise on that input: how far PyTorch moves
from itself when the batch is laid out differently), and with `with_past` greedy generation yields
the same tokens. Both numbers are reported per input. A failed check raises `ParityError`
carrying the report; nothing is left that looks complete.

Routing stays dynamic (`moeconv.onnx.moe_export`): `portable` lowers every MoE block to standard
ONNX ops with data-dependent sizes; `fused` uses onnxruntime's `com.microsoft.MoE`; `auto` uses
`fused` for every block where a probe shows onnxruntime reproduces it, `portable` elsewhere.

Quantization (`quantize`) uses onnxruntime's own quantizers (`moeconv.onnx.quantize`); routers
stay float. Its output error against the float model is measured and reported (not a promise).
Provenance (moeconv version, the recipe, the source) is written into the model's `metadata_props`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from moeconv.context import Context
from moeconv.errors import UnsupportedError, VerificationError
from moeconv.onnx import graph, parity, runtime
from moeconv.onnx.int8_weights import FLOAT_ARITHMETIC, FOURBIT_HINT, bnb_methods, carry_int8, dequantized, int8_layers, refuse_4bit
from moeconv.onnx.exporter import export_program
from moeconv.onnx.moe_export import custom_translation_table, lowered, plan_lowering
from moeconv.onnx.quantize import lm_head_weight, quantize_model
from moeconv.onnx.signature import build_signature
from moeconv.pass_base import Pass, PassConfig, PassResult
from moeconv.report import PassReport
from moeconv.state import ModelState

MODEL_FILE = "model.onnx"


class ExportOnnxConfig(PassConfig):
    strategy: Literal["auto", "portable", "fused"] = "auto"
    with_past: bool = Field(False, description="KV-cache decode graph (causal LMs)")
    opset: int = Field(18, ge=17, le=23)
    atol: float = Field(1e-4, gt=0, description="parity bound on max |Δ| of outputs (fp32)")
    quantize: Literal["int8", "int4"] | None = None
    quant_scheme: Literal["block", "tensor", "hqq", "rtn", "rtn-asym"] | None = Field(
        None, description="int8: block (default) | tensor; int4: hqq (default) | rtn (see moeconv.onnx.quantize)")
    block_size: int = Field(32, ge=16, le=256, description="int4 / QMoE block size")
    accuracy_level: int = Field(4, ge=0, le=4, description="MatMulNBits accuracy level (4: int8 activations)")
    quantize_lm_head: bool = Field(True, description="also quantize the output projection")
    head_bits: Literal[4, 8] = Field(8, description="bits of the quantized output projection (int4 mode: 4-bit "
                                                    "heads cost small models far more than 4-bit experts)")
    generation_tokens: int = Field(20, ge=0, le=256, description="with_past: greedy tokens compared")
    latency_runs: int = Field(5, ge=0, le=100)
    seed: int = 0

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v):
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v

    @model_validator(mode="after")
    def _scheme_fits_mode(self):
        from moeconv.onnx.quantize import SCHEMES
        if self.quant_scheme is not None:
            if self.quantize is None:
                raise ValueError("quant_scheme needs quantize")
            if self.quant_scheme not in SCHEMES[self.quantize]:
                raise ValueError(f"quant_scheme {self.quant_scheme!r} does not apply to {self.quantize} "
                                 f"(choose {' or '.join(SCHEMES[self.quantize])})")
        return self

    def lowering_strategy(self) -> str:
        """`auto` with int4 HQQ lowers MoE blocks portably: HQQ's float zero points then reach every
        expert (2-D MatMuls), where the fused QMoE would hold round-to-nearest experts."""
        if self.strategy == "auto" and self.quantize == "int4" and self.quant_scheme in (None, "hqq"):
            return "portable"
        return self.strategy


class ParityError(VerificationError):
    """onnxruntime disagrees with PyTorch beyond the tolerance; carries the full report."""

    def __init__(self, message: str, report: dict, output_dir: Path):
        super().__init__(message)
        self.report = report
        self.output_dir = output_dir


class ExportOnnx(Pass):
    name = "export-onnx"
    summary = "Export to ONNX with live routing (portable ops or onnxruntime's fused MoE), parity-checked, optionally int8/int4."
    Config = ExportOnnxConfig
    # float weights, or bitsandbytes int8 ones (carried as int8 + row scales, `moeconv.onnx.int8_weights`);
    # with `quantize` (onnxruntime quantizes the float graph) float weights only: see __init__
    requires = frozenset()
    requires_any = (frozenset({"float-weights", "int8-weights"}),)
    provides = frozenset()
    invalidates = frozenset()
    output_tolerance = 0.0  # the PyTorch model is not changed; the ONNX promise is the parity check

    def __init__(self, config: ExportOnnxConfig | None = None, *, workdir: Path | None = None, **fields):
        super().__init__(config, **fields)
        self.workdir = Path(workdir) if workdir is not None else None  # where files go (default: a temp dir)
        if self.config.quantize is not None:
            self.requires, self.requires_any = frozenset({"float-weights"}), ()

    def fix_for(self, fact: str) -> str | None:
        if fact == "float-weights" and self.config.quantize is not None:
            return ("the model is quantized already (bitsandbytes), and export's `quantize` would quantize it "
                    "twice: drop `quantize` from `export-onnx` (`--quantize`; int8 weights are carried into ONNX as they are), "
                    "or move `export-onnx` before `quantize`")
        if fact == "float-weights | int8-weights":
            return "4-bit (nf4/fp4) weights have no exact ONNX form: " + FOURBIT_HINT
        return None

    def check(self, state: ModelState, ctx: Context) -> None:
        methods = set(bnb_methods(state.module).values())
        if methods and self.config.quantize is not None:
            raise UnsupportedError(
                f"export-onnx: the model is quantized already (bitsandbytes {', '.join(sorted(methods))}); "
                f"--quantize {self.config.quantize} would quantize it twice",
                hint="drop --quantize (int8 weights are carried into ONNX as they are), or export the float model")
        refuse_4bit(state.module)

    def run(self, state: ModelState, ctx: Context) -> PassResult:
        cfg = self.config
        self.check(state, ctx)  # also when called outside a Pipeline
        temporary = self.workdir is None
        out_dir = self.workdir or Path(tempfile.mkdtemp(prefix="moeconv-onnx-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        module = state.module
        layers = int8_layers(module)
        # fp32 first (the model's own dtype is read while the bitsandbytes layers are in place), then
        # the int8 layers become float ones for the export, and everything is put back in reverse
        with _float32(module) as cast_from, dequantized(module, layers) as swap:
            report, files = self._export(state, module, ctx, out_dir, layers, swap)
        if cast_from is not None:
            report.warnings.append(f"exported in float32 (the model is {cast_from}; cast back afterwards, exactly)")
        state.artifacts["onnx"] = {"dir": str(out_dir), "model": MODEL_FILE, "files": files, "temporary": temporary}
        return PassResult(state, False, report)

    # ------------------------------------------------------------------------------------------
    def _export(self, state: ModelState, module, ctx: Context, out_dir: Path, layers=(), swap=None):
        cfg = self.config
        step = _Steps(ctx)
        t0 = time.perf_counter()
        sig = build_signature(module, with_past=cfg.with_past, seed=cfg.seed, example_ids=ctx.example_inputs)
        step("planning MoE lowering")
        plans = plan_lowering(module, cfg.lowering_strategy())
        fused = [p for p in plans if p.lowering == "fused"]
        lowering = _lowering_summary(plans)
        float_path = out_dir / MODEL_FILE if cfg.quantize is None else out_dir / "float" / MODEL_FILE
        float_path.parent.mkdir(parents=True, exist_ok=True)
        props = graph.provenance({
            "recipe": [{"pass": self.name, **cfg.model_dump()}],
            "source": _source(state), "graph": {"kind": sig.kind, "with_past": sig.with_past,
                                                "inputs": sig.input_names, "outputs": sig.output_names[:3]},
            "moe_lowering": lowering, "source_recipe": _source_recipe(state)})
        step("exporting (torch.export → ONNX)")
        with lowered(module, plans):
            program = export_program(sig, opset=cfg.opset, translations=custom_translation_table() if fused else None)
        graph.finish_exported(program, sig, props)
        external = graph.save_program(program, float_path)
        del program
        int8 = None
        if layers:
            step("carrying bitsandbytes int8 weights (int8 + row scales → DequantizeLinear)")
            dequantized_bytes = graph.file_bytes(float_path)
            model = graph.load_model(float_path)
            carried = carry_int8(model, layers)
            external = graph.save_model(model, float_path, {
                "moeconv.onnxruntime_session_config": json.dumps(FLOAT_ARITHMETIC)})
            del model
            int8 = {**carried.to_dict(), "dequantized_float_bytes": dequantized_bytes,
                    "bytes": graph.file_bytes(float_path)}
            int8["size_ratio"] = round(int8["bytes"] / dequantized_bytes, 4)
        export_s = time.perf_counter() - t0

        step("parity: onnxruntime vs PyTorch")
        threads = torch.get_num_threads()
        session_config = FLOAT_ARITHMETIC if layers else None
        sess = runtime.session(float_path, threads, config=session_config)
        baseline = parity.routed(sig, sig.example)
        cases = parity.parity_cases(sig, baseline, seed=cfg.seed)
        rows, refs = parity.compare(sess, sig, cases, baseline=baseline, atol=cfg.atol)
        summary = parity.summarise(rows, cfg.atol)
        if sig.with_past and cfg.generation_tokens:
            summary["generation"] = _generation_check(sess, sig, module, cfg)
            summary["ok"] = summary["ok"] and summary["generation"]["equal"]
        float_bytes = graph.file_bytes(float_path)
        report = PassReport(self.name, tables={"parity": rows, "moe_blocks": [p.row() for p in plans]})
        if int8 is not None:
            # bitsandbytes' CPU kernel also quantizes activations (per row, int8): its distance to the
            # ONNX graph is measured, not promised. The promise (above) is against the same weights in
            # float arithmetic.
            step("measuring: onnxruntime vs the bitsandbytes model")
            with swap.bnb():
                bnb_refs = [runtime.run_torch(sig, c.ids, c.mask, c.past) for c in cases]
            bnb_rows, _ = parity.compare(sess, sig, cases, bnb_refs)
            report.tables["vs_bitsandbytes"] = bnb_rows
            int8["parity_against"] = "the dequantized float model (int8 weights × row scales, float arithmetic)"
            int8["parity_session_config"] = dict(FLOAT_ARITHMETIC)
            int8["vs_bitsandbytes"] = parity.summarise(bnb_rows)
            # A default onnxruntime session fuses DequantizeLinear → MatMul into MatMulNBits with
            # int8 activations: measured against both references.
            step("measuring: a default onnxruntime session (int8 activations)")
            default_sess = runtime.session(float_path, threads)
            d_rows, _ = parity.compare(default_sess, sig, cases, refs)
            d_bnb_rows, _ = parity.compare(default_sess, sig, cases, bnb_refs)
            del default_sess
            report.tables["default_session_vs_dequantized"] = d_rows
            int8["default_session"] = {"vs_dequantized": parity.summarise(d_rows),
                                       "vs_bitsandbytes": parity.summarise(d_bnb_rows)}
            if carried.missing:
                report.warnings.append(f"{len(carried.missing)} int8 layer(s) were exported as float weights "
                                       f"(their rows were not found in the graph): {', '.join(carried.missing[:3])}")
        metrics = {"graph": sig.kind + (" with past" if sig.with_past else ""), "strategy": cfg.strategy,
                   "lowering": lowering, "opset": cfg.opset, "external_data": external,
                   "export_seconds": round(export_s, 2), "float_bytes": float_bytes,
                   "parity": summary, "ops": graph.op_counts(float_path)}
        if int8 is not None:
            metrics["int8_weights"] = int8
        # The step's measured error, as for every pass: its output (the ONNX graph) against its input
        # (the PyTorch model), relative to the output scale like the numeric-check instrument's.
        metrics["max_abs_diff"] = summary["max_abs_diff"]
        metrics["rel_max_diff"] = max((r["max_abs_diff"] / max(1.0, r["ref_max_abs"]) for r in rows), default=0.0)
        report.metrics.update(metrics)
        if not summary["ok"]:
            del sess
            report.summary = "parity FAILED"
            bad = [r for r in rows if r["max_abs_diff"] > r["bound"]]
            why = (f"max |Δ| {bad[0]['max_abs_diff']:.3g} > bound {bad[0]['bound']:.3g} (atol {cfg.atol:g}; "
                   f"PyTorch's own noise there {bad[0]['torch_noise']:.2g})" if bad else "greedy generation differs")
            raise ParityError(f"onnxruntime output differs from PyTorch: {why} "
                              f"(worst case: {_worst(rows)})", report.to_dict(), out_dir)

        final_path, final_sess = float_path, sess
        if cfg.quantize:
            step(f"quantizing ({cfg.quantize}, onnxruntime)")
            del sess
            model = graph.load_model(float_path)
            keep = set()
            if not cfg.quantize_lm_head and sig.output_is_logits:
                head = lm_head_weight(model, sig.output_names[0])
                keep = {head} if head else set()
            qmodel, qres = quantize_model(model, cfg.quantize, scheme=cfg.quant_scheme, block_size=cfg.block_size,
                                          accuracy_level=cfg.accuracy_level, keep_float=keep,
                                          quantize_head=cfg.quantize_lm_head, head_bits=cfg.head_bits,
                                          work_dir=out_dir)
            del model
            report.warnings.extend(qres.notes)
            final_path = out_dir / MODEL_FILE
            graph.save_model(qmodel, final_path, {**props, "moeconv.quantization": json.dumps(qres.to_dict())})
            del qmodel
            shutil.rmtree(float_path.parent)
            step("measuring quantized error")
            final_sess = runtime.session(final_path, threads, config=session_config)
            qrows, _ = parity.compare(final_sess, sig, cases, refs)
            report.tables["quantized_error"] = qrows
            qsum = parity.summarise(qrows)
            report.metrics["quantization"] = {**qres.to_dict(), "error_vs_float": qsum,
                                              "bytes": graph.file_bytes(final_path),
                                              "size_ratio": round(graph.file_bytes(final_path) / float_bytes, 4)}
        if cfg.latency_runs:
            step("measuring latency")
            report.metrics["latency"] = runtime.latency(final_sess, sig, runs=cfg.latency_runs)
        del final_sess
        files = [p.name for p in graph.data_files(final_path)]
        report.metrics["bytes"] = graph.file_bytes(final_path)
        report.metrics["files"] = files
        carried_note = (f", {int8['int8_layers_carried']} bitsandbytes int8 layers carried as int8"
                        if int8 is not None else "")
        report.summary = (f"{sig.kind}{' + KV cache' if sig.with_past else ''} → {MODEL_FILE} "
                          f"({lowering}{', ' + cfg.quantize if cfg.quantize else ''}{carried_note}); parity max |Δ| "
                          f"{summary['max_abs_diff']:.3g} on {summary['cases']} inputs"
                          + (f"; vs the bitsandbytes model {int8['vs_bitsandbytes']['max_abs_diff']:.3g}"
                             if int8 is not None else ""))
        for p in plans:
            if p.reason and cfg.lowering_strategy() == "auto":
                report.warnings.append(f"{p.path}: portable lowering ({p.reason})")
                break
        if cfg.lowering_strategy() != cfg.strategy:
            report.warnings.append("int4 (HQQ): MoE blocks lowered portably so every expert is HQQ-quantized "
                                   "(fused QMoE experts would be round-to-nearest)")
        step.done()
        report.metrics["step_seconds"] = step.seconds
        return report, files


# ---------------------------------------------------------------------------------------------


class _Steps:
    """Progress as one task per step (the CLI shows each with a spinner and a tick)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.current = None
        self.seconds: dict[str, float] = {}
        self._t0 = 0.0

    def __call__(self, name: str):
        self.done()
        self.current = name
        self._t0 = time.perf_counter()
        self.ctx.report_progress(name, 0, 1)

    def done(self):
        if self.current is not None:
            self.seconds[self.current] = round(time.perf_counter() - self._t0, 2)
            self.ctx.report_progress(self.current, 1, 1)
            self.current = None


class _float32:
    """Cast a non-fp32 model to fp32 for the export and back afterwards (bf16/fp16 → fp32 → back is exact)."""

    def __init__(self, module):
        self.module = module
        counts = Counter(p.dtype for p in module.parameters() if p.is_floating_point())
        self.dtype = counts.most_common(1)[0][0] if counts else torch.float32

    def __enter__(self):
        if self.dtype == torch.float32:
            return None
        self.module.float()
        return str(self.dtype).removeprefix("torch.")

    def __exit__(self, *exc):
        if self.dtype != torch.float32:
            self.module.to(self.dtype)


def _lowering_summary(plans) -> str:
    if not plans:
        return "dense (no MoE layers)"
    kinds = Counter(p.lowering for p in plans)
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + " MoE blocks"


def _source(state: ModelState) -> dict:
    s = state.source
    return {"kind": s.kind, "path": str(s.path) if s.path else None, "spec": s.spec,
            "class": type(state.module).__name__}


def _source_recipe(state: ModelState):
    path = state.source.path
    if path is not None and Path(path).is_dir() and (Path(path) / "recipe.json").is_file():
        try:
            return json.loads((Path(path) / "recipe.json").read_text())
        except (OSError, ValueError):
            return None
    return None


def _worst(rows: list[dict]) -> str:
    r = max(rows, key=lambda r: r["max_abs_diff"] / r["bound"])
    return f"{r['case']}, batch {r['batch']} × {r['tokens']} tokens, max |Δ| {r['max_abs_diff']:.3g}"


def _generation_check(sess, sig, module, cfg) -> dict:
    g = torch.Generator().manual_seed(cfg.seed + 2000)
    prompt = torch.randint(0, sig.vocab, (1, 7), generator=g)
    n = min(cfg.generation_tokens, sig.max_len - prompt.shape[1])
    ref = runtime.greedy_torch(module, prompt, n)
    got = runtime.greedy_ort(sess, sig, prompt, n)
    return {"tokens": n, "equal": ref == got, "torch": ref, "onnxruntime": got}


# --------------------------------------------------------------------------------------------- job


def export_onnx_to_dir(src, out, cfg: ExportOnnxConfig, *, force: bool = False, progress=None,
                       state: ModelState | None = None) -> dict:
    """The `moeconv export onnx SRC OUT` job: load → `ExportOnnx` → report.json, atomically.

    On success OUT holds `model.onnx` (+ `model.onnx.data` for big models), `report.json`,
    `recipe.json` and the source's tokenizer files. On a parity failure OUT is *not* created (an
    existing OUT is left as it was); the failed export goes to `OUT.failed/` with a `FAILED`
    marker (the reason) and `report.json` (`"status": "failed"`, every case measured), and a
    `ParityError` (exit code 2 in the CLI) is raised. Any other error leaves nothing behind.
    """
    from moeconv import __version__
    from moeconv.io.atomic import atomic_output_dir
    from moeconv.io.load import TOKENIZER_FILES, load
    from moeconv.pipeline import Pipeline

    t0 = time.perf_counter()
    out = Path(out)
    failed_dir = out.with_name(out.name + ".failed")
    src_path = None if isinstance(src, (torch.nn.Module, ModelState)) or str(src).startswith("builtin:") else Path(str(src))
    inputs = tuple(p for p in (src_path,) if p is not None and p.exists())
    recipe = [{"pass": ExportOnnx.name, **cfg.model_dump()}]
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        ctx = Context(seed=cfg.seed, progress=progress)
        ctx.report_progress("loading model", 0, 1)
        state = state or load(src)
        ctx.report_progress("loading model", 1, 1)
        base = {"moeconv_version": __version__, "source": str(src), "recipe": recipe}
        try:
            result = Pipeline([ExportOnnx(cfg, workdir=tmp)]).run(state, ctx)
        except ParityError as exc:
            report = {**base, "status": "failed", "output": str(failed_dir), "error": str(exc),
                      "passes": [exc.report], "seconds": round(time.perf_counter() - t0, 2)}
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
            (tmp / "FAILED").write_text(f"parity check failed: {exc}\nsee report.json; this model must not be used.\n")
            if failed_dir.exists():
                shutil.rmtree(failed_dir)
            tmp.rename(failed_dir)
            raise ParityError(f"{exc}; {out} was not written, the failed export and its report are in {failed_dir}",
                              exc.report, failed_dir) from None
        copied = []
        tok_dir = state.source.tokenizer_dir
        if tok_dir is not None and Path(tok_dir).is_dir():
            for name in TOKENIZER_FILES:
                if (Path(tok_dir) / name).is_file():
                    shutil.copy2(Path(tok_dir) / name, tmp / name)
                    copied.append(name)
        pass_report = result.report.passes[0].to_dict()
        report = {**base, "status": "ok", "output": str(out), "passes": [pass_report],
                  "files": pass_report["metrics"]["files"], "tokenizer_files": copied,
                  "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if failed_dir.exists():  # a stale failure report must not sit next to a good export
        shutil.rmtree(failed_dir, ignore_errors=True)
    return report
