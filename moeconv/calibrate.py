"""Layer-by-layer calibration: observe (and optionally modify) one decoder layer at a time.

Only one layer's activations are in memory at once: the inputs of the first repeated layer are
captured (with the keyword arguments the model passes it: masks, rotary embeddings …), then each
layer is run on the cached inputs while the caller's hooks observe it, the caller may change the
layer (prune, quantize), and the layer is run again to produce the next layer's inputs — from the
*modified* layer, so errors do not compound unseen (the GPTQ/SparseGPT recipe).

Routing-awareness comes for free from `MoEBlock`: it calls each expert only on the tokens routed
to it, so a hook on an expert's projection sees exactly that expert's tokens. `expert_coverage`
counts them; callers fall back to all tokens of the layer for under-covered experts.

Hooks are owned by context managers and always removed (observe, then mutate).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from moeconv.errors import UnsupportedError
from moeconv.nn.hooks import removed_on_exit


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated block stack: the `ModuleList` holding the most parameters."""
    best, best_n = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    if best is None:
        raise UnsupportedError(f"{type(model).__name__}: no repeated layer stack found for layer-wise calibration")
    return best


def _call(model, batch):
    from moeconv.state import call_model
    return call_model(model, batch)


@dataclass
class LayerInputs:
    args: list[tuple]      # per batch: positional args of the layer call (hidden states first)
    kwargs: list[dict]     # per batch: keyword args
    # when set, batch i's hidden states are hidden[i] (bounded in memory, see
    # `moeconv.stream.activations`) and args[i][0] is None
    hidden: object | None = None

    def batch(self, i: int) -> tuple[tuple, dict]:
        """(positional args, keyword args) of batch `i`'s layer call."""
        a = self.args[i]
        return ((self.hidden[i],) + a[1:] if self.hidden is not None else a), self.kwargs[i]


def capture_first_layer_inputs(model: nn.Module, batches: list[torch.Tensor], hidden=None) -> LayerInputs:
    """The first decoder layer's call arguments for each batch (the model run up to that layer).
    `hidden`: a `moeconv.stream.activations.HiddenStates` to keep the hidden states in."""
    _, layers = decoder_layers(model)
    first = layers[0]
    args, kwargs = [], []

    def pre_hook(_m, a, kw):
        a = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in a)
        if hidden is not None:
            hidden.append(a[0])
            a = (None,) + a[1:]
        args.append(a)
        kwargs.append(dict(kw))
        raise _Stop

    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for b in batches:
                try:
                    _call(model, b)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return LayerInputs(args, kwargs, hidden)


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class Residency:
    """Where the layers' weights live during a sweep: in memory already (this base class: every
    step is a no-op), or read from disk one decoder layer at a time (`moeconv.stream.executor`)."""

    def enter_outer(self) -> None:
        """Before the first layer's inputs are captured: the parts outside the layer stack."""

    def enter(self, index: int, path: str) -> None:
        """Before layer `index` is observed or changed: its weights."""

    def leave(self, index: int, path: str, layer: nn.Module) -> None:
        """After layer `index` produced the next layer's inputs: it is final (write it, free it)."""

    def leave_outer(self) -> None:
        """After the last layer: the parts outside the layer stack are final."""


IN_MEMORY = Residency()


def run_layerwise(model: nn.Module, batches: list[torch.Tensor],
                  on_layer: Callable[[int, str, nn.Module, Callable[[], None]], None],
                  progress: Callable[[str, int, int], None] | None = None,
                  after_layer: Callable[[int, str, nn.Module, list[torch.Tensor]], None] | None = None,
                  residency: Residency = IN_MEMORY, activations=None) -> None:
    """For each decoder layer: `on_layer(index, path, layer, forward)` where `forward()` runs the
    layer on every cached batch (the caller installs its hooks around it, and may change the layer
    afterwards). The next layer then gets the outputs of the (possibly modified) layer; with
    `after_layer`, the caller sees those outputs too (one hidden-state tensor per batch, a list or
    a store that iterates like one), e.g. to measure how much its change moved them. `residency`
    brings each layer's weights in before it is used and takes them out once it is final (one
    layer in memory at a time when streaming). `activations`: a
    `moeconv.stream.activations.ActivationBudget`; the cached hidden states are then kept within
    it, the rest written to files and read back one batch at a time."""
    prefix, layers = decoder_layers(model)
    new_store = activations.store if activations is not None else (lambda: None)
    residency.enter_outer()
    inputs = capture_first_layer_inputs(model, batches, hidden=new_store())
    for i, layer in enumerate(layers):
        path = f"{prefix}.{i}" if prefix else str(i)
        if progress:
            progress("calibrate", i, len(layers))
        residency.enter(i, path)

        def forward(layer=layer):
            with torch.inference_mode():
                for b in range(len(inputs.args)):
                    a, kw = inputs.batch(b)
                    layer(*a, **kw)

        on_layer(i, path, layer, forward)
        nxt = new_store()
        with torch.inference_mode():
            new_args = []
            for b in range(len(inputs.args)):
                a, kw = inputs.batch(b)
                h = _hidden(layer(*a, **kw))
                if nxt is not None:
                    nxt.append(h)
                    h = None
                new_args.append((h,) + tuple(a[1:]))
        if inputs.hidden is not None:
            inputs.hidden.release()
        inputs = LayerInputs(new_args, inputs.kwargs, nxt)
        if after_layer is not None:
            after_layer(i, path, layer, nxt if nxt is not None else [a[0] for a in new_args])
        residency.leave(i, path, layer)
    if inputs.hidden is not None:
        inputs.hidden.release()
    residency.leave_outer()
    if progress:
        progress("calibrate", len(layers), len(layers))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])


def _hooks(modules: dict[str, nn.Module], register: Callable[[str, nn.Module], object]):
    return removed_on_exit([register(name, m) for name, m in modules.items()])


def observe_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Context: call `fn(name, input_2d)` with every input (flattened to (tokens, features)) of each module."""
    return _hooks(modules, lambda name, m: m.register_forward_pre_hook(lambda _m, args: fn(name, _flat(args[0]))))


def observe_outputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]):
    """Context: call `fn(name, output_2d)` with every output (flattened to (tokens, features)) of each module."""
    return _hooks(modules, lambda name, m: m.register_forward_hook(lambda _m, _args, out: fn(name, _flat(out))))


@contextmanager
def expert_coverage(block: nn.Module) -> Iterator[dict[int, int]]:
    """Count the tokens each expert of an `MoEBlock` receives while the context is open."""
    counts = {e: 0 for e in range(len(block.experts))}
    handles = []
    for e, expert in enumerate(block.experts):
        def hook(_m, args, e=e):
            counts[e] += int(args[0].reshape(-1, args[0].shape[-1]).shape[0])
        handles.append(expert.register_forward_pre_hook(hook))
    with removed_on_exit(handles):
        yield counts
