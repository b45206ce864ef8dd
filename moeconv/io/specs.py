"""Models named by a spec rather than a checkpoint: `builtin:gpt|llama|bert` and `FILE.py:factory`.

Running a `FILE.py` runs the user's code: only a spec the user named in this process (or one a
checkpoint records, with MOECONV_TRUST_CODE=1) is ever run. A checkpoint never makes moeconv run
code (`may_run_spec`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from moeconv.errors import InputError
from moeconv.state import ModelState, SourceInfo

BUILTINS = ("gpt", "llama", "bert")

# `FILE.py:factory` specs the user named in this process (trusted: they chose to run that file).
# A moeconv-format checkpoint built from one records the spec; loading it in another process runs
# the file only with MOECONV_TRUST_CODE=1, since a checkpoint must never make moeconv run code.
TRUSTED_SPECS: set[str] = set()


def trust_code_default() -> bool:
    return os.environ.get("MOECONV_TRUST_CODE", "") == "1"


def may_run_spec(spec: str) -> bool:
    """Whether loading `spec` recorded in a checkpoint may run code: built-in models always; a
    `FILE.py:factory` only when the user named it in this process or set MOECONV_TRUST_CODE=1."""
    return spec.startswith("builtin:") or spec in TRUSTED_SPECS or trust_code_default()


def is_spec(text: str) -> bool:
    """Whether `text` names a model by spec (`builtin:NAME`, `FILE.py`, `FILE.py:factory`)."""
    return text.startswith("builtin:") or text.endswith(".py") or ".py:" in text


def load_spec(text: str) -> ModelState:
    """Build the model a spec names (see the module docstring); random weights seeded with 0."""
    if text.startswith("builtin:"):
        return _load_builtin(text.split(":", 1)[1])
    file_part, sep, factory = text.partition(".py:")
    return _load_python(Path((file_part if sep else text[:-3]) + ".py"), factory or "build_model")


def _load_builtin(name: str) -> ModelState:
    if name not in BUILTINS:
        raise InputError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTINS)}")
    module = importlib.import_module(f"models.{name}")
    torch.manual_seed(0)  # built-in weights are random but reproducible
    return ModelState(module.build_model(), None, SourceInfo("builtin", spec=f"builtin:{name}"))


def _load_python(path: Path, factory: str) -> ModelState:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        raise InputError(f"{path}: failed to import ({exc.__class__.__name__}: {exc})") from None
    fn = getattr(mod, factory, None)
    if not callable(fn):
        raise InputError(f"{path}: no function {factory}() returning a model")
    torch.manual_seed(0)
    model = fn()
    if not isinstance(model, nn.Module):
        raise InputError(f"{path}:{factory}() returned {type(model).__name__}, not an nn.Module")
    spec = f"{path.resolve()}:{factory}"
    TRUSTED_SPECS.add(spec)
    return ModelState(model.eval(), getattr(model, "config", None), SourceInfo("module", path, spec=spec))
