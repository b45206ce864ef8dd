"""Expert modules moeconv builds when the source FFN is not one module of its own."""
from __future__ import annotations

from torch import nn


class SplitFfn(nn.Module):
    """`down(act(up(x)))` assembled from the parts of a split FFN (BERT's Intermediate/Output).

    The parts are the source modules themselves (copied by the caller), so quantizers, pruners and
    exporters see ordinary `nn.Linear` weights.
    """

    def __init__(self, up: nn.Module, act: nn.Module, down: nn.Module):
        super().__init__()
        self.up = up
        self.act = act
        self.down = down

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class FunctionalAct(nn.Module):
    """Wraps an activation that the source model applied as a function (e.g. `F.gelu`)."""

    def __init__(self, name: str):
        super().__init__()
        import torch.nn.functional as F
        import torch
        table = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "relu6": F.relu6, "mish": F.mish,
                 "elu": F.elu, "selu": F.selu, "leaky_relu": F.leaky_relu, "tanh": torch.tanh,
                 "sigmoid": torch.sigmoid, "hardswish": F.hardswish}
        self.name = name
        self.fn = table[name]

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name
