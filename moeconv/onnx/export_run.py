"""One ONNX export, step by step (`passes.export_onnx.ExportOnnx` runs it): graph → (int8
carry) → parity (the promise) → (quantization) → summary. Its own module so that importing the
pass (every command imports the pass registry) does not import onnx, onnxruntime and the exporter."""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

from moeconv.context import Context
from moeconv.errors import ParityError
from moeconv.nn.moe import MoEBlock
from moeconv.onnx import MODEL_FILE, graph, parity, runtime
from moeconv.onnx.exporter import export_program
from moeconv.onnx.int8_weights import FLOAT_ARITHMETIC, carry_int8
from moeconv.onnx.moe_export import custom_translation_table, lowered, plan_lowering
from moeconv.onnx.quantize import lm_head_weight, quantize_model
from moeconv.onnx.signature import build_signature
from moeconv.onnx.spill import ParameterSpill
from moeconv.report import PassReport
from moeconv.state import ModelState
from moeconv.stream.allocator import free_memory, module_bytes


class ExportRun:
    """One export, step by step: graph → (int8 carry) → parity (the promise) → (quantization) →
    summary. Each step records what it measured in `report`."""

    def __init__(self, name: str, cfg, state: ModelState, module, ctx: Context, out_dir: Path,
                 layers, swap):
        self.name, self.cfg, self.state, self.module, self.out_dir = name, cfg, state, module, out_dir
        self.layers, self.swap = layers, swap
        self.step = _Steps(ctx)
        self.t0 = time.perf_counter()
        self.sig = build_signature(module, with_past=cfg.with_past, seed=cfg.seed, example_ids=ctx.example_inputs)
        self.int8 = None
        self.carried = None
        self.aside = ParameterSpill(out_dir / ".experts-aside")
        self.held = module_bytes(module)  # how big a model `free_memory` is cleaning up after
        self.session_config = FLOAT_ARITHMETIC if layers else None

    # -- the graph -----------------------------------------------------------------------------
    def export(self) -> None:
        cfg, sig, step = self.cfg, self.sig, self.step
        step("planning MoE lowering")
        self.plans = plan_lowering(self.module, cfg.lowering_strategy())
        fused = [p for p in self.plans if p.lowering == "fused"]
        self.lowering = _lowering_summary(self.plans)
        self.float_path = self.out_dir / MODEL_FILE if cfg.quantize is None else self.out_dir / "float" / MODEL_FILE
        self.float_path.parent.mkdir(parents=True, exist_ok=True)
        self.props = graph.provenance({
            "recipe": [{"pass": self.name, **cfg.model_dump()}],
            "source": _source(self.state), "graph": {"kind": sig.kind, "with_past": sig.with_past,
                                                     "inputs": sig.input_names, "outputs": sig.output_names[:3]},
            "moe_lowering": self.lowering, "source_recipe": _source_recipe(self.state)})
        step("exporting (torch.export → ONNX)")
        # Once a block's experts are stacked, its per-expert weights are set aside until the export
        # (and the int8 rewrite) is over, so the experts are never in memory twice (on SmolLM2
        # upcycled to 4 experts, 1.3 GB): int8 layers' float weights are freed and rebuilt from the
        # int8 rows, every other expert weight waits on disk (`ParameterSpill`).
        spill = ParameterSpill(self.out_dir / ".experts-spill")

        def set_aside(path, block):
            if self.swap is not None:
                self.swap.release_under(path)
            spill.spill(block.experts)
        try:
            with lowered(self.module, self.plans, after_fuse=set_aside):
                program = export_program(sig, opset=cfg.opset, translations=custom_translation_table() if fused else None)
            graph.finish_exported(program, sig, self.props)
            rewritten = bool(self.layers) or cfg.quantize is not None
            self.external = graph.save_program(program, self.float_path, external=True if rewritten else None)
            del program
            free_memory(self.held)  # the exported IR is full of reference cycles that hold the stacked experts
            if self.layers:
                self._carry_int8()
                free_memory(self.held)
        finally:
            if self.swap is not None:
                self.swap.rebuild()
            spill.restore()
        self.export_s = time.perf_counter() - self.t0

    def _carry_int8(self) -> None:
        self.step("carrying bitsandbytes int8 weights (int8 + row scales → DequantizeLinear)")
        dequantized_bytes = graph.file_bytes(self.float_path)
        float_files = graph.data_files(self.float_path)
        # the float weights are read one initializer at a time from the external data, so the float
        # model is never in memory whole; only the ones that stay float are loaded, to be written
        model = graph.load_model(self.float_path, external_data=False)
        self.carried = carry_int8(model, self.layers, base_dir=self.float_path.parent)
        graph.load_remaining_external_data(model, self.float_path.parent)
        self.external = graph.save_model(model, self.float_path, {
            "moeconv.onnxruntime_session_config": json.dumps(FLOAT_ARITHMETIC)})
        del model
        kept = set(graph.data_files(self.float_path))
        for stale in float_files:
            if stale not in kept:
                stale.unlink(missing_ok=True)
        self.int8 = {**self.carried.to_dict(), "dequantized_float_bytes": dequantized_bytes,
                     "bytes": graph.file_bytes(self.float_path)}
        self.int8["size_ratio"] = round(self.int8["bytes"] / dequantized_bytes, 4)

    # -- the promise ---------------------------------------------------------------------------
    def check_parity(self) -> None:
        cfg, sig = self.cfg, self.sig
        self.step("parity: onnxruntime vs PyTorch")
        self.threads = torch.get_num_threads()
        baseline = parity.routed(sig, sig.example)
        self.cases = parity.parity_cases(sig, baseline, seed=cfg.seed)
        # PyTorch first, then its experts wait on disk while onnxruntime holds the graph: the two
        # would otherwise hold the weights twice (SmolLM2 as a 4-expert MoE: 1.4 GB + 1.6 GB)
        torch_results = parity.torch_side(sig, self.cases, baseline=baseline, atol=cfg.atol)
        generation = _generation_prompt(sig, cfg) if sig.with_past and cfg.generation_tokens else None
        if generation is not None:
            generation["torch"] = runtime.greedy_torch(self.module, generation["prompt"], generation["tokens"])
        for block in (m for m in self.module.modules() if isinstance(m, MoEBlock)):
            self.aside.spill(block.experts)
        free_memory(self.held)
        self.sess = runtime.session(self.float_path, self.threads, config=self.session_config)
        self.rows, self.refs = parity.compare(self.sess, sig, self.cases, baseline=baseline, atol=cfg.atol,
                                              torch_results=torch_results)
        summary = parity.summarise(self.rows, cfg.atol)
        if generation is not None:
            summary["generation"] = _generation_result(self.sess, sig, generation)
            summary["ok"] = summary["ok"] and summary["generation"]["equal"]
        self.summary = summary
        self.float_bytes = graph.file_bytes(self.float_path)
        self.report = PassReport(self.name, tables={"parity": self.rows, "moe_blocks": [p.row() for p in self.plans]})
        if self.int8 is not None:
            self._measure_int8()
        self.report.metrics.update(self._metrics())
        if not summary["ok"]:
            self._fail()

    def _measure_int8(self) -> None:
        # bitsandbytes' CPU kernel also quantizes activations (per row, int8): its distance to the
        # ONNX graph is measured, not promised. The promise (above) is against the same weights in
        # float arithmetic.
        sig, cases, report, int8 = self.sig, self.cases, self.report, self.int8
        self.step("measuring: onnxruntime vs the bitsandbytes model")
        # PyTorch runs again: every expert weight set aside comes back (a layer the quantizer left
        # in float runs as it is), then the float copies of the int8 layers go, since only their
        # bitsandbytes form runs from here on (self.refs hold what the float model computed)
        self.aside.restore()
        self.swap.release_all()
        with self.swap.bnb():
            bnb_refs = [runtime.run_torch(sig, c.ids, c.mask, c.past) for c in cases]
        bnb_rows, _ = parity.compare(self.sess, sig, cases, bnb_refs)
        report.tables["vs_bitsandbytes"] = bnb_rows
        int8["parity_against"] = "the dequantized float model (int8 weights × row scales, float arithmetic)"
        int8["parity_session_config"] = dict(FLOAT_ARITHMETIC)
        int8["vs_bitsandbytes"] = parity.summarise(bnb_rows)
        # A default onnxruntime session fuses DequantizeLinear → MatMul into MatMulNBits with
        # int8 activations: measured against both references.
        self.step("measuring: a default onnxruntime session (int8 activations)")
        default_sess = runtime.session(self.float_path, self.threads)
        d_rows, _ = parity.compare(default_sess, sig, cases, self.refs)
        d_bnb_rows, _ = parity.compare(default_sess, sig, cases, bnb_refs)
        del default_sess
        report.tables["default_session_vs_dequantized"] = d_rows
        int8["default_session"] = {"vs_dequantized": parity.summarise(d_rows),
                                   "vs_bitsandbytes": parity.summarise(d_bnb_rows)}
        if self.carried.missing:
            report.warnings.append(f"{len(self.carried.missing)} int8 layer(s) were exported as float weights "
                                   f"(their rows were not found in the graph): {', '.join(self.carried.missing[:3])}")

    def _metrics(self) -> dict:
        cfg, summary = self.cfg, self.summary
        metrics = {"graph": self.sig.kind + (" with past" if self.sig.with_past else ""), "strategy": cfg.strategy,
                   "lowering": self.lowering, "opset": cfg.opset, "external_data": self.external,
                   "export_seconds": round(self.export_s, 2), "float_bytes": self.float_bytes,
                   "parity": summary, "ops": graph.op_counts(self.float_path)}
        if self.int8 is not None:
            metrics["int8_weights"] = self.int8
        # The step's measured error, as for every pass: its output (the ONNX graph) against its input
        # (the PyTorch model), relative to the output scale like the numeric-check instrument's.
        metrics["max_abs_diff"] = summary["max_abs_diff"]
        metrics["rel_max_diff"] = max((r["max_abs_diff"] / max(1.0, r["ref_max_abs"]) for r in self.rows), default=0.0)
        return metrics

    def _fail(self) -> None:
        del self.sess
        self.report.summary = "parity FAILED"
        rows, atol = self.rows, self.cfg.atol
        bad = [r for r in rows if r["max_abs_diff"] > r["bound"]]
        why = (f"max |Δ| {bad[0]['max_abs_diff']:.3g} > bound {bad[0]['bound']:.3g} (atol {atol:g}; "
               f"PyTorch's own noise there {bad[0]['torch_noise']:.2g})" if bad else "greedy generation differs")
        raise ParityError(f"onnxruntime output differs from PyTorch: {why} "
                          f"(worst case: {_worst(rows)})", self.report.to_dict(), self.out_dir)

    # -- optional quantization, measured -------------------------------------------------------
    def quantize(self) -> None:
        self.final_path, self.final_sess = self.float_path, self.sess
        cfg = self.cfg
        if not cfg.quantize:
            return
        self.step(f"quantizing ({cfg.quantize}, onnxruntime)")
        del self.sess
        self.final_sess = None
        free_memory(self.held)
        model = graph.load_model(self.float_path, external_data=False)  # read as it is quantized
        keep = set()
        if not cfg.quantize_lm_head and self.sig.output_is_logits:
            head = lm_head_weight(model, self.sig.output_names[0])
            keep = {head} if head else set()
        qmodel, qres = quantize_model(model, cfg.quantize, scheme=cfg.quant_scheme, block_size=cfg.block_size,
                                      accuracy_level=cfg.accuracy_level, keep_float=keep,
                                      quantize_head=cfg.quantize_lm_head, head_bits=cfg.head_bits,
                                      work_dir=self.out_dir, base_dir=self.float_path.parent)
        del model
        self.report.warnings.extend(qres.notes)
        self.final_path = self.out_dir / MODEL_FILE
        graph.save_model(qmodel, self.final_path, {**self.props, "moeconv.quantization": json.dumps(qres.to_dict())})
        del qmodel
        free_memory(self.held)
        shutil.rmtree(self.float_path.parent)
        self.step("measuring quantized error")
        self.final_sess = runtime.session(self.final_path, self.threads, config=self.session_config)
        qrows, _ = parity.compare(self.final_sess, self.sig, self.cases, self.refs)
        self.report.tables["quantized_error"] = qrows
        qbytes = graph.file_bytes(self.final_path)
        self.report.metrics["quantization"] = {**qres.to_dict(), "error_vs_float": parity.summarise(qrows),
                                               "bytes": qbytes, "size_ratio": round(qbytes / self.float_bytes, 4)}

    # -- what the user reads -------------------------------------------------------------------
    def finish(self):
        cfg, report, summary, int8 = self.cfg, self.report, self.summary, self.int8
        if cfg.latency_runs:
            self.aside.restore()  # latency times PyTorch too
            self.step("measuring latency")
            report.metrics["latency"] = runtime.latency(self.final_sess, self.sig, runs=cfg.latency_runs)
        self.final_sess = None
        files = [p.name for p in graph.data_files(self.final_path)]
        report.metrics["bytes"] = graph.file_bytes(self.final_path)
        report.metrics["files"] = files
        carried_note = (f", {int8['int8_layers_carried']} bitsandbytes int8 layers carried as int8"
                        if int8 is not None else "")
        report.summary = (f"{self.sig.kind}{' + KV cache' if self.sig.with_past else ''} → {MODEL_FILE} "
                          f"({self.lowering}{', ' + cfg.quantize if cfg.quantize else ''}{carried_note}); parity max |Δ| "
                          f"{summary['max_abs_diff']:.3g} on {summary['cases']} inputs"
                          + (f"; max |Δ| {int8['vs_bitsandbytes']['max_abs_diff']:.3g} against bitsandbytes' own "
                             "int8 kernels, which also quantize activations (measured, not a parity bound)"
                             if int8 is not None else ""))
        self._warn_lowering()
        self.step.done()
        report.metrics["step_seconds"] = self.step.seconds
        return report, files

    def _warn_lowering(self) -> None:
        cfg = self.cfg
        for p in self.plans:
            if p.reason and cfg.lowering_strategy() == "auto":
                self.report.warnings.append(f"{p.path}: portable lowering ({p.reason})")
                break
        if cfg.lowering_strategy() != cfg.strategy:
            self.report.warnings.append("int4 (HQQ): MoE blocks lowered portably so every expert is HQQ-quantized "
                                        "(fused QMoE experts would be round-to-nearest)")


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


def _generation_prompt(sig, cfg) -> dict:
    g = torch.Generator().manual_seed(cfg.seed + 2000)
    prompt = torch.randint(0, sig.vocab, (1, 7), generator=g)
    return {"prompt": prompt, "tokens": min(cfg.generation_tokens, sig.max_len - prompt.shape[1])}


def _generation_result(sess, sig, generation: dict) -> dict:
    """onnxruntime's greedy tokens from the prompt PyTorch generated from (`generation["torch"]`)."""
    got = runtime.greedy_ort(sess, sig, generation["prompt"], generation["tokens"])
    ref = generation["torch"]
    return {"tokens": generation["tokens"], "equal": ref == got, "torch": ref, "onnxruntime": got}
