"""`load()`: any supported source → `ModelState`. Never contacts a hub, never runs checkpoint code.

Sources: a checkpoint directory in any of `moeconv.formats.FORMATS` (Hugging Face dense, MoE or
bitsandbytes, moeconv's own format, quantized or compressed), a GGUF file (dequantized to float),
`builtin:gpt|llama|bert`, a `FILE.py:factory` that returns a module (`moeconv.io.specs`), or an
in-memory `nn.Module`. This module only dispatches; each format reads its own files.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moeconv.errors import InputError
from moeconv.formats import read_format
from moeconv.formats.gguf import read_gguf
from moeconv.io.json_files import read_json_object
from moeconv.io.specs import is_spec, load_spec
from moeconv.nn.native_moe import linearise_native_moe
from moeconv.state import ModelState, SourceInfo


def allow_nonfinite_default() -> bool:
    return os.environ.get("MOECONV_ALLOW_NONFINITE", "") == "1"


def all_finite(t: torch.Tensor) -> bool:
    """Whether the floating-point tensor `t` holds no NaN and no Inf. One min/max pass: NaN
    propagates through both and an infinity is the min or the max; ~10× faster than
    `isfinite(t).all()`, which writes a mask as large as the tensor."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def refuse_nonfinite(where, name: str, t: torch.Tensor) -> torch.Tensor:
    """`t`, or `InputError` when this floating-point tensor holds NaN or Inf and the user did not
    allow it: the one rule for tensors read one at a time (the streamed routes)."""
    if t.is_floating_point() and not allow_nonfinite_default() and not all_finite(t):
        raise InputError(f"{where}: weight {name} contains NaN or Inf (pass --allow-nonfinite to convert anyway)")
    return t


def check_finite(state: ModelState, allow: bool | None = None) -> ModelState:
    """Refuse (or, when allowed, warn about) NaN/Inf weights: converting them only spreads them."""
    allow = allow_nonfinite_default() if allow is None else allow
    where = f"{state.source.path}: " if state.source.path is not None else ""
    for name, t in list(state.module.named_parameters()) + list(state.module.named_buffers()):
        if t.is_floating_point() and t.device.type != "meta" and not all_finite(t):
            if not allow:
                raise InputError(f"{where}weight {name} contains NaN or Inf (pass --allow-nonfinite to convert anyway)")
            state.artifacts.setdefault("warnings", []).append(f"weight {name} contains NaN or Inf")
    return state


def load(source, *, dtype: torch.dtype | None = None, allow_nonfinite: bool | None = None) -> ModelState:
    """Load `source` (see module docstring) and check its weights are finite."""
    return check_finite(_load(source, dtype=dtype), allow_nonfinite)


def _load(source, *, dtype: torch.dtype | None = None) -> ModelState:
    if isinstance(source, nn.Module):
        linearise_native_moe(source)  # documented: native HF MoE blocks become equivalent MoEBlocks in place
        return ModelState(source.eval(), getattr(source, "config", None), SourceInfo("module"))
    if isinstance(source, ModelState):
        return source
    text = str(source)
    if is_spec(text):
        return load_spec(text)
    path = Path(text)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf(path, dtype)
    if path.is_file():
        raise InputError(f"{path}: not a checkpoint directory, .gguf file, or .py model file")
    return read_dir(path, dtype=dtype)


def read_dir(path: Path, *, dtype: torch.dtype | None = None) -> ModelState:
    """A checkpoint directory, read by the format that detects it."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    return read_format(path, read_json_object(config_path), dtype=dtype, read_dir=read_dir)
