"""Checkpoint formats: one interface (`moeconv.formats.base.Format`), one explicit tuple.

Each directory is detected by exactly one format (`detect` is exclusive: a test checks it), and
`FORMATS` is in *writing preference order*: `choose_format` picks the first that can represent the
state exactly (`why_not` is None).
Quantized models go to the formats registered for them, dense HF models to `save_pretrained`,
MoE models to their HF family when it represents them exactly, everything else to moeconv's own
format. GGUF files are a source only (`moeconv.formats.gguf`).
"""
from __future__ import annotations

from pathlib import Path

from moeconv.errors import UnsupportedError
from moeconv.formats.base import Format, ReadDir
from moeconv.formats.compressed import Compressed
from moeconv.formats.hf import HfDense, HfMoe, has_moe_blocks, hf_moe_config
from moeconv.formats.hf_moe import family_for_config
from moeconv.formats.native import Moeconv
from moeconv.formats.quantized import HfBitsandbytes, MoeconvQuantized
from moeconv.state import ModelState

FORMATS: tuple[Format, ...] = (HfBitsandbytes(), MoeconvQuantized(), HfMoe(), HfDense(), Moeconv(), Compressed())

BY_NAME = {f.name: f for f in FORMATS}


def detect_format(path: Path, raw: dict) -> Format:
    """The format of the checkpoint directory `path` (config `raw`)."""
    return next(f for f in FORMATS if f.detect(path, raw))


def read_format(path: Path, raw: dict, *, dtype=None, read_dir: ReadDir) -> ModelState:
    return detect_format(path, raw).read(path, raw, dtype=dtype, read_dir=read_dir)


def choose_format(state: ModelState, fmt: str = "auto") -> Format:
    """The format `state` is written in: `auto` (the first that represents it exactly), `hf` (a
    Hugging Face layout, or `UnsupportedError` with the reason), `moeconv` (moeconv's own)."""
    if fmt not in ("auto", "hf", "moeconv"):
        raise UnsupportedError(f"unknown format {fmt!r}: choose auto, hf or moeconv")
    quantized = "quantized" in state.facts()
    if quantized:
        fmt = "auto"  # quantized models go where their layers can be stored (hf-bitsandbytes or moeconv)
    candidates = [f for f in FORMATS if fmt == "auto" or f.hf == (fmt == "hf")]
    reasons = []
    for f in candidates:
        why = f.why_not(state)
        if why is None:
            return f
        reasons.append(why)
    if fmt == "hf" and has_moe_blocks(state) and family_for_config(getattr(state.config, "model_type", None)):
        hf_moe_config(state)  # raises with the reason the family cannot represent the model
    if fmt == "hf":
        raise UnsupportedError(f"--format hf: no Hugging Face layout for this model "
                               f"({getattr(state.config, 'model_type', None) or type(state.module).__name__})")
    raise UnsupportedError(f"no format can represent this model: {'; '.join(reasons)}")


__all__ = ["BY_NAME", "FORMATS", "Format", "choose_format", "detect_format", "read_format"]
