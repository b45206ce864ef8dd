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

import tempfile
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from moeconv.context import Context
from moeconv.errors import ParityError, UnsupportedError
from moeconv.onnx import MODEL_FILE
from moeconv.onnx.int8_weights import FOURBIT_HINT, bnb_methods, dequantized, int8_layers, refuse_4bit
from moeconv.pass_base import Contract, Pass, PassConfig, PassResult
from moeconv.state import ModelState

__all__ = ["ExportOnnx", "ExportOnnxConfig", "ParityError", "MODEL_FILE"]

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


class ExportOnnx(Pass):
    name = "export-onnx"
    summary = "Export to ONNX with live routing (portable ops or onnxruntime's fused MoE), parity-checked, optionally int8/int4."
    Config = ExportOnnxConfig

    def __init__(self, config: ExportOnnxConfig | None = None, *, workdir: Path | None = None, **fields):
        super().__init__(config, **fields)
        self.workdir = Path(workdir) if workdir is not None else None  # where files go (default: a temp dir)

    def contract(self) -> Contract:
        # The PyTorch model is not changed (exact); the ONNX promise is the parity check.
        if self.config.quantize is not None:  # onnxruntime quantizes the float graph: float weights only
            return Contract(requires=frozenset({"float-weights"}), output_tolerance=0.0)
        # float weights, or bitsandbytes int8 ones (carried as int8 + row scales, `moeconv.onnx.int8_weights`)
        return Contract(requires_any=(frozenset({"float-weights", "int8-weights"}),), output_tolerance=0.0)

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
        # the exporter, onnx and onnxruntime are imported here, not with the pass: every command
        # imports the pass registry, and onnx alone cost ~1.2 s of each CLI start
        from moeconv.onnx.export_run import ExportRun
        run = ExportRun(self.name, self.config, state, module, ctx, out_dir, layers, swap)
        try:
            run.export()
            run.check_parity()
            run.quantize()
            return run.finish()
        finally:
            run.aside.restore()  # the experts set aside while onnxruntime ran are back, bit for bit


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
