"""The export call itself: `torch.export` (non-strict) → `torch.onnx.export` (the torch.export-based
exporter), with failures turned into one-line `UnsupportedError`s that name the failing module.

- A model `torch.export` cannot trace (data-dependent Python control flow, unsupported Python) is
  named by the innermost module that was running when tracing failed (forward hooks keep the stack).
- An op the ONNX exporter cannot translate is named with the module that called it (the FX node's
  `nn_module_stack`).
Library chatter (exporter progress lines, warnings) is silenced: a pass never prints.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings

import torch
from torch import nn

from moeconv.errors import UnsupportedError
from moeconv.onnx.signature import Signature


@contextlib.contextmanager
def _module_stack(root: nn.Module):
    stack: list[str] = []
    failed: list[str] = []
    handles = []
    for name, m in root.named_modules():
        if not name:
            continue

        def pre(_m, _a, name=name):
            stack.append(name)

        def post(_m, _a, _o, name=name):
            if stack and stack[-1] == name:
                stack.pop()
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        yield stack, failed
    finally:
        for h in handles:
            h.remove()


def _describe(wrapper: nn.Module, path: str) -> str:
    """`layers.0.mlp (MoEBlock)` for a path inside the export wrapper (whose child is `model`)."""
    try:
        cls = type(wrapper.get_submodule(path)).__name__
    except AttributeError:
        cls = "?"
    inner = path.removeprefix("model").removeprefix(".")
    return f"{inner} ({cls})" if inner else f"the model ({cls})"


def _one_line(exc: BaseException, limit: int = 220) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] + ("…" if len(text) > limit else "")


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript",
                                               "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def export_program(sig: Signature, *, opset: int, translations: dict | None = None):
    """The `ONNXProgram` of `sig.wrapper` with dynamic axes; raises `UnsupportedError` naming the
    module that could not be exported."""
    wrapper = sig.wrapper
    with _quiet():
        with _module_stack(wrapper) as (stack, _):
            try:
                ep = torch.export.export(wrapper, sig.example, dynamic_shapes=sig.dynamic_shapes(), strict=False)
            except Exception as exc:
                where = _describe(wrapper, stack[-1] if stack else "model")
                raise UnsupportedError(f"{where}: torch.export cannot trace it "
                                       f"[{exc.__class__.__name__}: {_one_line(exc)}]") from None
        try:
            program = torch.onnx.export(ep, sig.example, dynamo=True, opset_version=opset, optimize=False,
                                        input_names=sig.input_names, output_names=sig.output_names,
                                        custom_translation_table=translations or None, verbose=False)
        except Exception as exc:
            raise UnsupportedError(_conversion_message(ep, exc)) from None
        optimize(program.model)
    return program


def optimize(model) -> None:
    """onnxscript's `optimize_ir` without its pattern-rewrite pass: constant folding (weight
    transposes become initializers, which quantizers need), dead-code removal, initializer
    deduplication, CSE. The rewrite rules only tidy the graph (onnxruntime optimizes it again at
    load) and cost a third of the export time on MoE graphs with many data-dependent shapes."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding
    passes = ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([_constant_folding.FoldConstantsPass(
            shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
            common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
            steps=2, early_stop=True),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )
    passes(model)


def _conversion_message(ep, exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"target=([\w.:]+)\]", text) or re.search(r"target=([\w.:]+)", text)
    op = m.group(1) if m else None
    where = None
    if op is not None:
        wanted = {op, op.removeprefix("torch.ops.")}
        for node in ep.graph.nodes:
            if node.op == "call_function" and str(node.target) in wanted:
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    path, cls = list(stack.values())[-1]
                    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                    inner = path.removeprefix("model").removeprefix(".")
                    where = f"{inner or 'the model'} ({cls_name.rsplit('.', 1)[-1]})"
                break
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    what = f"op {op}" if op else "the graph"
    return (f"{where or 'model'}: the ONNX exporter cannot convert {what} "
            f"[{cause.__class__.__name__}: {_one_line(cause, 160)}]")
