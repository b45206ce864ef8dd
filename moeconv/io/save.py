"""Saving a `ModelState` in the format its consumers load, streamed and verified.

`auto` picks, in order: the model's HF MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE — native or
upcycled from Llama/Mistral/Qwen2/Qwen3) when it has MoE layers; plain `save_pretrained` for a
dense HF model; moeconv's own format for everything else. Quantized models go through the
format registered for them (`moeconv.formats.quantized`), never through a writer that would
drop their quantization state.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moeconv.errors import UnsupportedError
from moeconv.formats.hf_moe import family_for_config, hf_moe_source, native_config_dict
from moeconv.formats.writer import write_checkpoint
from moeconv.nn.moe import MoEBlock
from moeconv.state import ModelState


def choose_format(state: ModelState, fmt: str = "auto") -> str:
    """"hf-moe" | "hf-dense" | "moeconv"."""
    model_type = getattr(state.config, "model_type", None)
    has_moe = any(isinstance(m, MoEBlock) for m in state.module.modules())
    family = family_for_config(model_type)
    if fmt == "moeconv":
        return "moeconv"
    if has_moe and family is not None:
        return "hf-moe"
    if not has_moe and state.config is not None and hasattr(state.module, "save_pretrained"):
        return "hf-dense"
    if fmt == "hf":
        raise UnsupportedError(f"--format hf: no Hugging Face layout for this model ({model_type or type(state.module).__name__})")
    return "moeconv"


def save_checkpoint(state: ModelState, out_dir: Path, *, fmt: str = "auto", shard_bytes: int = 5 * 10**9,
                    on_tensor=None) -> dict:
    """Write `state` into `out_dir` (which exists and is empty); returns what was written."""
    if "quantized" in state.facts():
        from moeconv.formats import quantized  # registered by the quantize work
        return quantized.save_quantized(state, out_dir, shard_bytes=shard_bytes)
    kind = choose_format(state, fmt)
    if kind == "hf-moe":
        return _save_hf_moe(state, out_dir, shard_bytes, on_tensor)
    if kind == "hf-dense":
        state.module.save_pretrained(out_dir, max_shard_size=shard_bytes)
        return {"format": "hf", "consumer": "transformers", "expected_class": type(state.module).__name__}
    from moeconv.formats.native import save_moeconv
    stats = save_moeconv(state, out_dir, shard_bytes=shard_bytes, on_tensor=on_tensor)
    stats.update({"format": "moeconv", "consumer": "moeconv"})
    return stats


def _save_hf_moe(state: ModelState, out_dir: Path, shard_bytes: int, on_tensor) -> dict:
    config = state.config.to_dict()
    family = family_for_config(config.get("model_type"))
    blocks = [(p, m) for p, m in state.module.named_modules() if isinstance(m, MoEBlock)]
    counts = {(m.num_experts, m.top_k) for _, m in blocks}
    if len(counts) != 1:
        raise UnsupportedError(f"{family.architecture} needs the same number of experts and top-k in every layer; "
                               f"found {sorted(counts)} (use --format moeconv)")
    if config.get("model_type") != family.target_type:
        raise UnsupportedError("internal: an upcycled dense model is written by the upcycle job")
    (n, k), = counts
    config = native_config_dict(family, config, n, k)
    dtype = next(p.dtype for p in state.module.parameters() if p.is_floating_point())
    source = hf_moe_source(state.module, family, [p for p, _ in blocks], dtype)
    stats = write_checkpoint(out_dir, source, config, shard_bytes=shard_bytes, on_tensor=on_tensor)
    stats.update({"format": family.name, "consumer": "transformers", "expected_class": family.architecture,
                  "notes": source.notes})
    return stats
