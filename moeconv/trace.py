"""Tracing: turn a module tree into FX graphs that pattern matching can read.

Whole-model `symbolic_trace` fails on current Hugging Face models (caches, masks built with data-
dependent control flow). `trace_forest` therefore uses a *leaf-tolerant* tracer: when tracing a
module fails inside one of its submodules, that submodule's class becomes a leaf and the trace is
retried; a module whose own code cannot be traced is skipped and its children are traced instead.
The result is a forest of graphs ("islands") that together cover every traceable part of the
model: for a HF decoder, one graph per decoder layer with its attention as a leaf.

The graph is how we *see*; passes change the module tree (see DESIGN.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import fx, nn

from moeconv.nn.linear_like import is_linear_like

# Modules we never trace into: their internals are irrelevant to FFN structure, and keeping them
# opaque makes graphs small and tracing robust.
_ALWAYS_LEAF = (
    nn.Embedding,
    nn.LayerNorm,
    nn.Dropout,
    nn.GroupNorm,
    nn.Conv1d,
    nn.Conv2d,
)

_MAX_RETRIES = 64


@dataclass
class TracedIsland:
    """One FX graph covering the module at `path` (""= the root)."""

    path: str
    graph_module: fx.GraphModule
    leaf_paths: list[str] = field(default_factory=list)


class LeafTolerantTracer(fx.Tracer):
    """`fx.Tracer` that records which submodule it was inside when tracing failed.

    Leaves are linear-like modules, parameter-free modules (activations, dropout, rotary helpers),
    norms and embeddings, plus any class the caller marks as a leaf after a failed attempt.
    """

    def __init__(self, leaf_classes: set[type], opaque: frozenset[int] = frozenset()):
        super().__init__()
        self.leaf_classes = leaf_classes
        self.opaque = opaque  # ids of modules kept whole: never traced into
        self._stack: list[nn.Module] = []
        self.failed_in: nn.Module | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.opaque or type(m) in self.leaf_classes or isinstance(m, _ALWAYS_LEAF) or is_linear_like(m):
            return True
        if _is_norm(m):
            return True
        if not any(True for _ in m.parameters()) and not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            return True  # activations, rotary embeddings, …: opaque, probed later if needed
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self._stack.append(m)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None and len(self._stack) > 0:
                self.failed_in = self._stack[-1]
            raise
        self._stack.pop()
        return out


def _is_norm(m: nn.Module) -> bool:
    # RMSNorm variants differ per model family; a norm is a module with a single 1-D weight
    # (and maybe a bias) and no children. It is never part of an FFN pattern.
    params = list(m.named_parameters(recurse=False))
    if list(m.children()) or not params:
        return False
    return all(p.dim() == 1 for _, p in params) and {n for n, _ in params} <= {"weight", "bias"}


def trace_module(root: nn.Module, leaf_classes: set[type] | None = None,
                 opaque: frozenset[int] = frozenset()) -> tuple[fx.GraphModule | None, set[type]]:
    """Trace `root`, turning failing submodule classes into leaves. Returns (graph or None, leaves).

    None means `root`'s own forward cannot be traced (the caller then traces its children).
    `opaque`: ids of submodules that are leaves whatever their class (see `trace_forest`).
    """
    leaves = set(leaf_classes or ())
    wrapper = _FirstInputOnly(root)
    for _ in range(_MAX_RETRIES):
        tracer = LeafTolerantTracer(leaves, opaque)
        try:
            graph = tracer.trace(wrapper)
        except Exception:
            culprit = tracer.failed_in
            if culprit is None or culprit is root or type(culprit) in leaves:
                return None, leaves
            leaves.add(type(culprit))
            continue
        if any(n.op == "call_module" and n.target == "inner" for n in graph.nodes):
            return None, leaves  # the root itself was a leaf class
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                node.target = node.target[len("inner."):]
        return fx.GraphModule(root, graph, root.__class__.__name__), leaves
    return None, leaves


class _FirstInputOnly(nn.Module):
    """Traces `inner` as called with its first input only, every other argument at its default.

    Symbolic tracing turns *every* parameter into a proxy, `**kwargs` included, and HF forwards
    fail on that (`**kwargs` unpacking, `if mask is not None`). FFN structure only needs the main
    input to flow.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def trace_forest(model: nn.Module, opaque: Iterable[str] = ()) -> list[TracedIsland]:
    """Trace `model` into islands of FX graphs; every module is inside an island or untraceable.

    Modules that became leaves because they failed to trace (attention, whole decoder stacks) are
    traced again as roots of their own, so nothing with structure is left unseen. The modules at
    the paths `opaque` are the exception: each is one leaf node where it is called, and nothing
    inside it is traced (a caller that discards what lies inside MoE blocks: tracing the experts
    of a 32-layer Mixtral was 1.5 s of its streamed quantize, for sites it threw away).
    """
    islands: list[TracedIsland] = []
    leaf_classes: set[type] = set()
    todo: list[tuple[str, nn.Module]] = [("", model)]
    hidden = frozenset(id(model.get_submodule(p)) for p in opaque)
    seen: set[int] = set(hidden)
    while todo:
        path, mod = todo.pop(0)
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            todo.extend((_join(path, n), c) for n, c in mod.named_children())
            continue
        if is_linear_like(mod) or not any(True for _ in mod.parameters()):
            continue
        gm, leaf_classes = trace_module(mod, leaf_classes, hidden)
        if gm is None:
            todo.extend((_join(path, n), c) for n, c in mod.named_children())
            continue
        leaf_paths = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        islands.append(TracedIsland(path, gm, leaf_paths))
        # Leaves that hold parameters and are not linear-like/norms may hide structure: trace them.
        for lp in leaf_paths:
            sub = gm.get_submodule(lp)
            if type(sub) in leaf_classes and any(True for _ in sub.parameters()):
                todo.append((_join(path, lp), sub))
    return islands


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def export_graph(model: nn.Module, example_inputs: tuple, **kwargs) -> fx.GraphModule:
    """Whole-model aten-level FX graph via `torch.export` (for whole-model analysis and ONNX)."""
    ep = torch.export.export(model, example_inputs, kwargs=kwargs or None, strict=False)
    return ep.graph_module
