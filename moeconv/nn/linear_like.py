"""What counts as a linear projection: `nn.Linear` (and subclasses such as bitsandbytes layers)
and GPT-2's `Conv1D` (a linear with a transposed weight). One table of module *kinds*, not of
architectures."""
from __future__ import annotations

import torch
from torch import nn


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or moved: no Conv1D models then
        return None
    return Conv1D


def is_conv1d(m: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(m, cls)


def is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def in_out_features(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if is_conv1d(m):
        return int(m.weight.shape[0]), int(m.weight.shape[1])
    return int(m.in_features), int(m.out_features)


def weight_out_in(m: nn.Module) -> torch.Tensor:
    """The weight as (out, in), the nn.Linear convention, whatever the module stores."""
    return m.weight.t() if is_conv1d(m) else m.weight
