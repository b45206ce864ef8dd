"""GGUF files as a *source*: read through transformers' `gguf_file=` loader (the `gguf` package
underneath), dequantized to float (FIELD.md, "GGUF input"). A file, not a directory, so the
loader dispatches on its suffix rather than through `FORMATS`; its tokenizer lives inside it and is
carried by the job driver."""
from __future__ import annotations

from pathlib import Path

import torch

from moeconv.errors import InputError
from moeconv.io.transformers_io import load_causal_lm
from moeconv.state import ModelState, SourceInfo


def read_gguf(path: Path, dtype=None) -> ModelState:
    """The model in the GGUF file `path`, as float weights (float32 unless `dtype`)."""
    try:
        model = load_causal_lm(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    except ImportError as exc:
        raise InputError(f"{path}: reading GGUF needs the `gguf` package ({exc})") from None
    except Exception as exc:
        raise InputError(f"{path}: failed to read GGUF ({exc.__class__.__name__}: {' '.join(str(exc).split())[:200]})") from None
    # A GGUF-loaded model carries a quantizer marker that blocks save_pretrained; the weights are
    # already dequantized floats, so the marker is dropped (FIELD.md, "GGUF input").
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return ModelState(model.eval(), model.config, SourceInfo("gguf", path, gguf_file=path.name, tokenizer_dir=None))
