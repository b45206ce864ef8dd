"""Layers read from disk for a sweep (`moeconv.calibrate.run_layerwise`), one at a time.

Promise: while a sweep runs, the parts outside the decoder layers (embeddings, final norm, head)
and at most one decoder layer hold real weights; every other parameter is on `meta`. Each layer is
read just before its turn and, once it has produced the next layer's inputs, handed to `on_final`
(which writes it) and freed, so peak memory does not grow with depth.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from moeconv.calibrate import Residency
from moeconv.stream.allocator import release_freed
from moeconv.stream.skeleton import Skeleton

# on_final(path, module): `path` None for the parts outside the decoder layers (then `module` is
# the whole model, its layers on `meta`).
OnFinal = Callable[[str | None, nn.Module], None]


class StreamedLayers(Residency):
    """`skeleton`'s weights brought in and out layer by layer; `on_final` sees each final part."""

    def __init__(self, skeleton: Skeleton, on_final: OnFinal | None = None):
        self.skel, self.on_final = skeleton, on_final

    def enter_outer(self) -> None:
        self.skel.load_part(None)

    def enter(self, index: int, path: str) -> None:
        self.skel.load_part(path)

    def leave(self, index: int, path: str, layer: nn.Module) -> None:
        if self.on_final is not None:
            self.on_final(path, layer)
        self.skel.drop_part(path)
        release_freed()  # the layer's weights go back to the system before the next one is read

    def leave_outer(self) -> None:
        if self.on_final is not None:
            self.on_final(None, self.skel.module)
        self.skel.drop_part(None)
        release_freed()
