"""`quantize`: replace linear layers with bitsandbytes int8 (LLM.int8) or 4-bit (nf4 / fp4) layers.

Promise (lossy, so measured rather than bounded — `output_tolerance = None`):
- every selected linear weight is quantized, or listed in the report with the reason it was
  not (tied to an embedding, a class whose owner reads `.weight` directly, a shape bitsandbytes'
  CPU 4-bit kernel cannot run, a fused 3-D tensor of a layout moeconv does not know);
- native fused 3-D experts (transformers 5.x Mixtral / Qwen-MoE) are first linearised into one
  `nn.Linear` per projection (exact), so every expert is quantized;
- routers and shared-expert gates, embeddings and `lm_head` stay as they are unless asked for;
  routers left alone are checked bit-identical afterwards;
- the report gives the output error against the unquantized model (max |Δlogits|, KL of the
  next-token distributions, top-1 agreement; `moeconv.evaluate.output_error`), perplexity before
  and after on `ctx.evaluation` when given, and bytes per module group before and after.

Only stock bitsandbytes layers are used (no kernels of our own). Each layer's serialized form
is captured at quantization time, before any forward, because bitsandbytes repacks 4-bit
weights in place on their first CPU forward (FIELD.md, "bitsandbytes CPU save trap").
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from moeconv.context import Context
from moeconv.errors import UnsupportedError, VerificationError
from moeconv.module_groups import GROUPS, group_bytes, module_groups, module_tensors
from moeconv.nn.linear_like import in_out_features, is_conv1d, is_linear_like
from moeconv.nn.moe import MoEBlock
from moeconv.nn.native_moe import linearise_native_moe
from moeconv.nn.quantized import (BLOCKSIZES, QuantSpec, is_quantized_layer, kernel_problem,
                                  quantize_linear, serialized_bytes)
from moeconv.pass_base import Contract, Pass, PassConfig, PassResult
from moeconv.report import PassReport
from moeconv.selectors import OptionalSelectors, Selection, Selectors, absent_note
from moeconv.state import ModelState, model_outputs, vocab_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizeConfig(PassConfig):
    method: Literal["int8", "nf4", "fp4"] = "nf4"
    double_quant: bool = Field(False, description="4-bit: quantize the block scales too (QLoRA)")
    blocksize: int | None = Field(None, description="4-bit: weights per scale (default 64)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit: matmul dtype (default: the model's)")
    int8_threshold: float = Field(6.0, ge=0, description="int8: LLM.int8 outlier threshold (0 = none)")
    targets: OptionalSelectors = Field(None, description="linear layers to quantize (default: all): a group, layers:0-3, "
                                                        "every:2, re:REGEX, a module path (moeconv.selectors)")
    ignore: Selectors = Field(default_factory=list, description="linear layers to leave in float (same grammar)")
    quantize_routers: bool = Field(False, description="also quantize MoE routers / shared-expert gates")
    quantize_lm_head: bool = False

    @model_validator(mode="after")
    def _per_method(self):
        if self.method == "int8":
            for name, given in (("double_quant", self.double_quant), ("blocksize", self.blocksize is not None),
                                ("compute_dtype", self.compute_dtype is not None)):
                if given:
                    raise ValueError(f"{name} applies to nf4/fp4 only, not int8")
        elif self.blocksize is not None and self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}")
        return self

    def spec(self) -> QuantSpec:
        return QuantSpec(self.method, self.blocksize or 64, self.double_quant,
                         DTYPES[self.compute_dtype] if self.compute_dtype else None, self.int8_threshold)


class Quantize(Pass):
    name = "quantize"
    summary = "Quantize linear layers with bitsandbytes (int8 / nf4 / fp4); routers, embeddings, lm_head kept."
    Config = QuantizeConfig

    def contract(self) -> Contract:
        provides = {"quantized"}
        if self.config.method == "int8":
            # LLM.int8 weights are int8 + one scale per output row: exact in ONNX (DequantizeLinear)
            provides.add("int8-weights")
        # lossy on purpose (output_tolerance None): the measured error is reported
        return Contract(requires=frozenset({"float-weights"}), provides=frozenset(provides),
                        invalidates=frozenset({"float-weights"}))

    def check(self, state: ModelState, ctx: Context) -> None:
        if any(is_quantized_layer(m) for m in state.module.modules()):
            raise UnsupportedError("quantize: the model is already quantized; quantizing twice is not supported "
                                   "(start from the float checkpoint)")

    def run(self, state: ModelState, ctx: Context) -> PassResult:
        cfg, spec = self.config, self.config.spec()
        model = state.module
        linearised = linearise_native_moe(model)  # fused 3-D experts → one nn.Linear per projection (exact)
        groups = module_groups(state)
        bytes_before = group_bytes(model, groups)
        rows, todo = self.select_layers(model, groups, spec)
        if not todo:
            why = sorted({r["reason"] for r in rows}) or ["the model has no linear layers"]
            note = absent_note(Selection.of(cfg.targets, cfg.ignore), {r["group"] for r in rows}, "linear layer")
            raise UnsupportedError(f"quantize: no layer to quantize ({'; '.join(why)[:300]}){note}")
        fused = _fused_3d(model)
        routers = _router_tensors(model)
        vocab = vocab_size(state.module, state.config)
        inputs = _error_inputs(ctx, vocab)
        ref = model_outputs(model, inputs).float() if inputs is not None else None
        ppl_before = _perplexity(model, ctx)

        for i, (path, row) in enumerate(todo):
            ctx.report_progress("quantize", i, len(todo))
            float_module = model.get_submodule(path)
            q = quantize_linear(float_module, spec)
            model.set_submodule(path, q)
            row["bytes_after"] = serialized_bytes(q)
        ctx.report_progress("quantize", len(todo), len(todo))

        changed = [name for name, t in routers.items() if not _router_unchanged(model, name, t, cfg.quantize_routers)]
        if changed:
            raise VerificationError(f"quantize: router tensors changed: {changed[:3]}")

        bytes_after = group_bytes(model, groups)
        report = self.build_report(rows, bytes_before, bytes_after, fused, linearised, spec)
        if ref is not None:
            from moeconv.evaluate import output_error
            err = output_error(_Replay(ref), model, inputs)
            report.metrics.update({"logits_max_abs_diff": err["max_abs_diff"], "kl": err["kl"],
                                   "top1_agreement": err["top1_agreement"],
                                   "error_inputs": "eval text" if ctx.evaluation is not None else "random tokens",
                                   "logits_scale": ref.abs().max().item()})
        if ppl_before is not None:
            ppl_after = _perplexity(model, ctx)
            report.metrics.update({"ppl_before": ppl_before, "ppl_after": ppl_after,
                                   "ppl_ratio": ppl_after / ppl_before})
        state.artifacts["quantize"] = cfg.model_dump()
        return PassResult(state, bool(todo), report)

    # ------------------------------------------------------------------ selection
    def select_layers(self, model: nn.Module, groups: dict[str, str], spec: QuantSpec):
        """(a row per linear layer of `model` in `groups`: what happens to it and why, the layers
        to quantize as (path, row)). Reads shapes and dtypes only: works on a `meta` skeleton, or
        on one decoder layer with its paths relative to it (the streamed routes)."""
        cfg = self.config
        selection = Selection.of(cfg.targets, cfg.ignore)
        shared = _shared_weights(model)
        rows, todo = [], []
        for path, m in model.named_modules():
            if not is_linear_like(m) or path not in groups:
                continue
            group = groups[path]
            in_f, out_f = in_out_features(m)
            row = {"module": path, "group": group, "shape": [out_f, in_f], "action": "kept", "reason": "",
                   "bytes_before": sum(t.numel() * t.element_size() for t in module_tensors(m).values()),
                   "bytes_after": None}
            rows.append(row)
            if not selection.targeted(path, group):
                row["reason"] = "not in targets"
            elif selection.ignored(path, group):
                row["reason"] = "ignored (--ignore)"
            elif group == "router" and not cfg.quantize_routers:
                row["reason"] = "router: kept in full precision by default"
            elif group == "lm_head" and not cfg.quantize_lm_head:
                row["reason"] = "lm_head: kept in full precision by default"
            else:
                row["reason"] = self._problem(path, m, in_f, out_f, shared, spec) or ""
                if not row["reason"]:
                    row["action"] = spec.method
                    todo.append((path, row))
                    continue
                row["problem"] = True
            row["bytes_after"] = row["bytes_before"]
        return rows, todo

    @staticmethod
    def _problem(path, m, in_f, out_f, shared, spec) -> str | None:
        if type(m) is not nn.Linear and not is_conv1d(m):
            return f"{type(m).__name__} is not a plain nn.Linear (its owner may read .weight directly)"
        if not m.weight.is_floating_point():
            return f"weight is {m.weight.dtype}, not float"
        other = shared.get(id(m.weight))
        if other and other != [path]:
            tied = ", ".join(p for p in other if p != path)
            return f"weight is tied to {tied}"
        return kernel_problem(in_f, out_f, spec)

    # ------------------------------------------------------------------ report
    def build_report(self, rows, before, after, fused, linearised, spec) -> PassReport:
        """The pass's report from `select_layers`' rows and the bytes per group before and after
        (shared by the in-memory run and the streamed routes)."""
        cfg = self.config
        quantized = [r for r in rows if r["action"] != "kept"]
        problems = [r for r in rows if r.get("problem")]
        table = []
        for g in GROUPS:
            if g not in before:
                continue
            in_g = [r for r in rows if r["group"] == g]
            table.append({"group": g, "params": before[g]["params"], "bytes_before": before[g]["bytes"],
                          "bytes_after": after.get(g, {}).get("bytes", 0),
                          "quantized": sum(1 for r in in_g if r["action"] != "kept"),
                          "kept": sum(1 for r in in_g if r["action"] == "kept")})
        total_before = sum(v["bytes"] for v in before.values())
        total_after = sum(v["bytes"] for v in after.values())
        metrics = {"method": spec.method, "blocksize": spec.blocksize if spec.four_bit else None,
                   "double_quant": spec.double_quant if spec.four_bit else None,
                   "modules_quantized": len(quantized), "modules_kept": len(rows) - len(quantized),
                   "modules_not_quantizable": len(problems), "linearised_moe_blocks": len(linearised),
                   "bytes_before": total_before, "bytes_after": total_after,
                   "bytes_ratio": total_after / total_before if total_before else None}
        if "experts" in before:
            fp16 = before["experts"]["params"] * 2
            metrics.update({"experts_fp16_bytes": fp16, "experts_bytes_after": after["experts"]["bytes"],
                            "experts_ratio_vs_fp16": after["experts"]["bytes"] / fp16 if fp16 else None})
        report = PassReport(
            self.name,
            summary=f"{len(quantized)} linear layers → {spec.method}"
                    + (f" (block {spec.blocksize}{', double quant' if spec.double_quant else ''})" if spec.four_bit else "")
                    + f"; {len(rows) - len(quantized)} kept in float ({len(problems)} of them not quantizable)",
            metrics=metrics,
            tables={"groups": table, "modules": rows,
                    "not_quantized": [{"module": r["module"], "group": r["group"], "reason": r["reason"]}
                                      for r in rows if r["action"] == "kept"] +
                                     [{"module": name, "group": "experts", "reason": why} for name, why in fused]},
        )
        if problems:
            report.warnings.append(f"{len(problems)} selected layer(s) left in float: "
                                   + "; ".join(f"{r['module']}: {r['reason']}" for r in problems[:3])
                                   + (" …" if len(problems) > 3 else "") + " (all listed in the report)")
        if fused:
            report.warnings.append(f"{len(fused)} fused 3-D tensor(s) of an unknown layout left in float: "
                                   + ", ".join(n for n, _ in fused[:3]))
        if cfg.quantize_routers and any(r["group"] == "router" and r["action"] != "kept" for r in rows):
            report.warnings.append("routers quantized on request: routing decisions may change "
                                   "(keeping them in full precision is the default for a reason)")
        return report


class _Replay(nn.Module):
    """Stands in for the unquantized model: returns its logits, recorded before quantizing
    (so `output_error` compares against it without keeping a float copy of the model)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids=None, **_):
        return self.logits


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None:
            owners.setdefault(id(w), []).append(path)
    return owners


def _fused_3d(model: nn.Module) -> list[tuple[str, str]]:
    """3-D+ parameters that are not convolution kernels: fused experts moeconv could not linearise."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            continue
        for name, p in m._parameters.items():
            if p is not None and p.dim() >= 3:
                out.append((f"{path}.{name}" if path else name,
                            f"fused {p.dim()}-D tensor {tuple(p.shape)} in {type(m).__name__}: layout unknown, left in float"))
    return out


def _router_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, MoEBlock):
            for sub in ("router", "shared_expert_gate"):
                mod = getattr(m, sub)
                if mod is not None:
                    for k, p in mod._parameters.items():
                        if p is not None:
                            out[f"{path}.{sub}.{k}"] = p.detach().clone()
    return out


def _router_unchanged(model: nn.Module, name: str, before: torch.Tensor, quantized_on_request: bool) -> bool:
    """Bit-identical (dtype included), or quantized because the user asked for it."""
    mod_path, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    if is_quantized_layer(mod):
        return quantized_on_request
    p = mod._parameters.get(pname)
    return p is not None and p.dtype == before.dtype and torch.equal(p.detach(), before)


def _error_inputs(ctx: Context, vocab: int | None) -> torch.Tensor | None:
    if ctx.evaluation is not None:
        return ctx.evaluation[:2]
    return ctx.examples_for(vocab) if vocab is not None else None


def _perplexity(model: nn.Module, ctx: Context) -> float | None:
    if ctx.evaluation is None:
        return None
    from moeconv.evaluate import perplexity
    return perplexity(model, ctx.evaluation)
