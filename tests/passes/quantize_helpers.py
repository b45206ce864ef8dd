"""Tiny models and checks shared by the quantize tests (tests/passes/test_quantize*.py).

Dense models come from `upcycle_helpers` (hidden 32, intermediate 64, vocab 128, 2 layers,
weights at O(1) output scale). Native MoE models are transformers 5.x classes with fused 3-D
experts. 4-bit tests use `blocksize=32`: with the default 64, bitsandbytes' CPU kernel cannot run
a layer whose input width is 32, and such layers are (correctly) left in float.
"""
from __future__ import annotations

import torch
from torch import nn

from upcycle_helpers import HIDDEN, INTER, VOCAB, randomise_

EXPERTS, TOP_K = 4, 2


def native_moe(kind: str, *, seed: int = 0) -> nn.Module:
    """A random transformers-native MoE model with fused experts: mixtral | qwen3_moe | qwen2_moe."""
    import transformers
    base = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**base, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**base, head_dim=8, moe_intermediate_size=32, num_experts=EXPERTS,
                                          num_experts_per_tok=TOP_K, norm_topk_prob=True)
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**base, moe_intermediate_size=32, shared_expert_intermediate_size=INTER,
                                          num_experts=EXPERTS, num_experts_per_tok=TOP_K)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    return randomise_(transformers.AutoModelForCausalLM.from_config(cfg), seed)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    from moeconv.nn.quantized import is_quantized_layer
    return {p: m for p, m in model.named_modules() if is_quantized_layer(m)}


def expert_projections(model: nn.Module) -> dict[str, nn.Module]:
    """Every projection inside the routed and shared experts of every MoEBlock."""
    from moeconv.nn.moe import MoEBlock
    out = {}
    for path, block in model.named_modules():
        if isinstance(block, MoEBlock):
            for sub in ("experts", "shared_expert"):
                part = getattr(block, sub)
                if part is None:
                    continue
                for rel, m in part.named_modules():
                    if isinstance(m, nn.Linear):
                        out[f"{path}.{sub}.{rel}"] = m
    return out


def router_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router (and shared-expert gate) weights by layer, whatever the block class."""
    from moeconv.nn.moe import MoEBlock
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, MoEBlock):
            out[f"{path}.router"] = m.router.weight.detach().clone()
            if m.shared_expert_gate is not None:
                out[f"{path}.shared_expert_gate"] = m.shared_expert_gate.weight.detach().clone()
        elif hasattr(m, "experts") and isinstance(getattr(getattr(m, "gate", None), "weight", None), torch.Tensor):
            out[f"{path}.router"] = m.gate.weight.detach().float().clone()
            g = getattr(m, "shared_expert_gate", None)
            if g is not None:
                out[f"{path}.shared_expert_gate"] = g.weight.detach().float().clone()
    return out
