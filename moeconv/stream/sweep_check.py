"""The source side of the streamed check, run inside a write sweep instead of after it.

A streamed conversion reads every source tensor to write the output, then the check read the
source a second time to run it beside the output. When the write sweep visits the decoder layers
once each, in order (the writer's order is the modules' order), the source's layers can run on the
check's batches while the sweep holds them: `SweepCheck.enter(block)` is told which part each
output tensor comes from, materialises a decoder layer whole when the sweep first reaches it, runs
it, and drops it when the sweep moves on. The logits equal `streamed_logits` of the source, bit for
bit (the same layers, batches and order); the source is read once (measured on the 32-layer int8
benchmark: the second read and its NaN/Inf scan were ~4 s of a 44 s run).
"""
from __future__ import annotations

import torch

from moeconv.stream.allocator import release_freed
from moeconv.stream.compare import LayerByLayer
from moeconv.stream.skeleton import Skeleton


def visits_layers_in_order(blocks: list[str | None], layer_paths: list[str]) -> bool:
    """Whether a sweep producing tensors from `blocks` (each tensor's decoder layer, None outside
    them) reaches every decoder layer once, in order, and never comes back to one."""
    runs = [b for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
    return runs == layer_paths


class SweepCheck:
    """Runs `skel`'s layers on `batches` as a write sweep reaches them (see the module's note).
    `observe(path, layer)`: as `streamed_logits`' (the report's facts about the source). Holds the
    parts outside the decoder layers from the first `enter` to `close`, and one decoder layer."""

    def __init__(self, skel: Skeleton, batches: list[torch.Tensor], observe=None):
        self.skel = skel
        self.run = LayerByLayer(skel, batches, observe)
        self.block: str | None = None
        self.started = False

    def enter(self, block: str | None) -> None:
        """The sweep's next tensor comes from `block` (a decoder layer's path, or None): its
        parameters are materialised when this returns."""
        if not self.started:
            self.skel.load_part(None)
            self.started = True
            self.run.begin()
        if block == self.block:
            return
        if self.block is not None:
            self.skel.drop_part(self.block)
            release_freed()  # the finished layer's memory back to the system: flat RSS with depth
        self.block = block
        if block is not None:
            self.skel.load_part(block)
            self.run.step(block)

    def logits(self) -> list[torch.Tensor]:
        """The source's logits on the batches, once the sweep has passed every layer."""
        self.enter(None)
        return self.run.logits()

    def close(self) -> None:
        """Every part back on `meta` (also after a failed sweep)."""
        if self.block is not None:
            self.skel.drop_part(self.block)
            self.block = None
        if self.started:
            self.skel.drop_part(None)
            self.started = False
        release_freed()
