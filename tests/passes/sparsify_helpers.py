"""Tiny MoE checkpoints for the sparsify tests: an upcycled Mixtral (identical expert copies, random
router) and transformers-native random Mixtral / Qwen3-MoE; all hidden 32, expert intermediate 64,
2 layers, 4 experts top-2, vocab 128."""
from __future__ import annotations

from pathlib import Path

import torch

from upcycle_helpers import HIDDEN, INTER, VOCAB, build_dense, randomise_, save_dense


def native_moe(kind: str, seed: int = 0):
    import transformers
    common = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
                  num_experts_per_tok=2)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=4, **common)
        model = transformers.MixtralForCausalLM(cfg)
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=INTER, head_dim=8, norm_topk_prob=True,
                                          decoder_sparse_step=1, mlp_only_layers=[], **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    return randomise_(model, seed)


def save_native(kind: str, path: Path) -> Path:
    native_moe(kind).save_pretrained(path)
    return Path(path)


def save_upcycled(path: Path, *, router_std: float = 0.5) -> Path:
    """A Mixtral directory upcycled from a tiny Llama (with tokenizer)."""
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    path = Path(path)
    dense = save_dense(build_dense("llama"), path.parent / (path.name + "-dense"), tokenizer=True)
    upcycle_checkpoint(dense, path, UpcycleConfig(num_experts=4, top_k=2, router_init="normal", router_std=router_std))
    return path


def calib_tokens(samples: int = 12, seq: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, seq), generator=torch.Generator().manual_seed(seed))


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint as stock transformers loads it (fused expert tensors), fp32."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def is_expert_tensor(name: str) -> bool:
    return ".experts." in name and not name.endswith(("gate.weight", "router.weight"))
