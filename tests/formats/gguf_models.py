"""Tiny checkpoints for the GGUF export tests: an upcycled Llama (→ Mixtral), native random
Qwen2-MoE and Qwen3-MoE, dense Llama / Qwen2 / Qwen3, and a byte-level BPE tokenizer with merges
(what llama.cpp reads)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))

from upcycle_helpers import HIDDEN, INTER, VOCAB, randomise_  # noqa: E402

LAYERS = 2
MOE = {  # kind → (config class, extra config kwargs)
    "qwen2moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
    "qwen3moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "head_dim": 8, "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
}


def native(kind: str, path: Path, *, vocab: int = VOCAB, seed: int = 0, std: float = 0.2, **overrides) -> Path:
    """A randomised transformers model of `kind` (see `MOE`; matrices N(0, `std`)), saved to `path`."""
    import transformers
    cls, extra = MOE[kind]
    cfg = getattr(transformers, cls)(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                     max_position_embeddings=64,
                                     **{"tie_word_embeddings": False, **extra, **overrides})
    torch.manual_seed(seed)
    model = randomise_(transformers.AutoModelForCausalLM.from_config(cfg), seed=seed, std=std)
    model.save_pretrained(path)
    return path


def upcycled_llama(root: Path, std: float = 0.2, vocab: int = VOCAB, tokenizer: bool = False) -> Path:
    """A tiny dense Llama upcycled by moeconv to a 4-expert Mixtral (copy init, exact); with
    `tokenizer`, a byte-level BPE tokenizer of `vocab` ids carried along."""
    from typer.testing import CliRunner

    from moeconv.cli import app
    dense = native("llama", root / "llama-dense", std=std, vocab=vocab)
    if tokenizer:
        bpe_tokenizer(dense, vocab)
    r = CliRunner().invoke(app, ["upcycle", str(dense), str(root / "llama-moe"), "--num-experts", "4",
                                 "--top-k", "2", "--router-init", "normal"])
    assert r.exit_code == 0, r.output
    return root / "llama-moe"


def bpe_tokenizer(path: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer with merges, trained on a few words, of exactly `vocab` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog " * 4, "moeconv writes gguf files for llama cpp " * 4]
    trainer = trainers.BpeTrainer(vocab_size=vocab - 1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(path)
