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
    if fmt == "moeconv":
        return "moeconv"
    if has_moe and family_for_config(model_type) is not None:
        if fmt == "hf":
            hf_moe_config(state)  # raises with the reason when the family cannot represent it
            return "hf-moe"
        try:
            hf_moe_config(state)
            return "hf-moe"
        except UnsupportedError:
            return "moeconv"  # auto: keep what the family cannot represent
    if not has_moe and state.config is not None and hasattr(state.module, "save_pretrained"):
        return "hf-dense"
    if fmt == "hf":
        raise UnsupportedError(f"--format hf: no Hugging Face layout for this model ({model_type or type(state.module).__name__})")
    return "moeconv"


def hf_moe_config(state: ModelState) -> dict:
    """The family config for a model with `MoEBlock`s: a native family (after pruning, say) or an
    upcycled dense source (Llama → Mixtral …). Raises `UnsupportedError` with the reason when the
    family cannot represent the model exactly."""
    config = state.config.to_dict()
    family = family_for_config(config.get("model_type"))
    blocks = [(p, m) for p, m in state.module.named_modules() if isinstance(m, MoEBlock)]
    counts = {(m.num_experts, m.top_k) for _, m in blocks}
    if len(counts) != 1:
        raise UnsupportedError(f"{family.architecture} needs the same number of experts and top-k in every layer; "
                               f"found {sorted(counts)} (use --format moeconv)")
    (n, k), = counts
    if config.get("model_type") == family.target_type:
        return native_config_dict(family, config, n, k)
    from moeconv.formats.hf_moe import check_representable, moe_config_dict
    from moeconv.calibrate import decoder_layers
    sites = [m.source_site for _, m in blocks if getattr(m, "source_site", None) is not None]
    if len(sites) != len(blocks):
        raise UnsupportedError("MoE layers without a recorded source FFN cannot be written as an HF family")
    prefix, layers = decoder_layers(state.module)
    converted = {int(p[len(prefix) + 1:].split(".")[0]) for p, _ in blocks}
    first = blocks[0][1]
    shared = first.shared_expert is not None
    renorm = all(m.renormalize for _, m in blocks)
    check_representable(family, config, layers_selected=len(converted), layers_total=len(layers),
                        renormalize=renorm, top_k=k, num_experts=n,
                        router_bias=any(m.router.bias is not None for _, m in blocks),
                        shared_experts=shared, kinds={s.kind for s in sites})
    if shared and not all(m.shared_expert_gate is not None for _, m in blocks):
        raise UnsupportedError(f"{family.architecture} shared experts are sigmoid-gated")
    expert_inter = int(first.experts[0].down_proj.in_features)
    shared_inter = int(first.shared_expert.down_proj.in_features) if shared else None
    return moe_config_dict(family, config, num_experts=n, top_k=k, expert_intermediate=expert_inter,
                           dense_layers=[i for i in range(len(layers)) if i not in converted],
                           renormalize=renorm, shared_intermediate=shared_inter)


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
    config = hf_moe_config(state)
    family = family_for_config(config.get("model_type"))
    blocks = [p for p, m in state.module.named_modules() if isinstance(m, MoEBlock)]
    dtype = next(p.dtype for p in state.module.parameters() if p.is_floating_point() and p.dtype != torch.float32) \
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in state.module.parameters()) else torch.float32
    source = hf_moe_source(state.module, family, blocks, dtype)
    stats = write_checkpoint(out_dir, source, config, shard_bytes=shard_bytes, on_tensor=on_tensor)
    stats.update({"format": family.name, "consumer": "transformers", "expected_class": family.architecture,
                  "notes": source.notes})
    return stats
