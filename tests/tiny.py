"""Tiny Hugging Face models built from configs in code (no network, no hub).

    from tests.tiny import tiny_hf, TINY_KINDS, EXPECTED
    model = tiny_hf("llama")                      # eval mode, seeded weights
    model = tiny_hf("gpt2", tmp_path / "gpt2")    # ... and saved there with save_pretrained
    model = tiny_hf("qwen2", num_hidden_layers=3) # any config field can be overridden

Every kind uses hidden 32, intermediate 64, 2 layers, vocab 128 unless overridden. `EXPECTED`
describes, per kind, what FFN discovery should find (kind, path template, role paths); use
`expected_sites(kind, num_layers)` to expand it.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
VOCAB = 128

TINY_KINDS = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "phi3")


def _decoder_base() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, tie_word_embeddings=False)


def _spec(kind: str):
    """(config class, model class, default config kwargs) for `kind`."""
    import transformers as tf
    if kind == "llama":
        return tf.LlamaConfig, tf.LlamaForCausalLM, _decoder_base()
    if kind == "mistral":
        return tf.MistralConfig, tf.MistralForCausalLM, dict(_decoder_base(), sliding_window=None)
    if kind == "qwen2":
        return tf.Qwen2Config, tf.Qwen2ForCausalLM, _decoder_base()
    if kind == "qwen3":
        return tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(_decoder_base(), head_dim=8)
    if kind == "phi3":
        return tf.Phi3Config, tf.Phi3ForCausalLM, dict(_decoder_base(), pad_token_id=0)
    if kind == "gpt2":
        return tf.GPT2Config, tf.GPT2LMHeadModel, dict(
            vocab_size=VOCAB, n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=4,
            n_positions=64)
    if kind == "bert":
        return tf.BertConfig, tf.BertModel, dict(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64)
    raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_KINDS)}")


def tiny_config(kind: str, **overrides):
    config_cls, _, base = _spec(kind)
    return config_cls(**{**base, **overrides})


def tiny_hf(kind: str, tmp_path: str | Path | None = None, *, seed: int = 0, **overrides):
    """A tiny HF model of `kind` in eval mode, weights seeded by `seed`.

    `overrides` are config fields (e.g. `num_hidden_layers=3`, `hidden_act="gelu"`). With
    `tmp_path`, the model is also written there with `save_pretrained` (one safetensors file;
    call `model.save_pretrained(path, max_shard_size=...)` yourself for a sharded checkpoint).
    """
    _, model_cls, _ = _spec(kind)
    config = tiny_config(kind, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if tmp_path is not None:
        path = Path(tmp_path)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
    return model


# What FFN discovery should report for each kind: site kind, site path template ({i} = layer),
# and role → full path templates. `hidden`/`intermediate` are the tiny defaults.
EXPECTED: dict[str, dict] = {
    "llama": dict(kind="gated", path="model.layers.{i}.mlp",
                  roles=dict(up="model.layers.{i}.mlp.up_proj", gate="model.layers.{i}.mlp.gate_proj",
                             down="model.layers.{i}.mlp.down_proj")),
    "mistral": dict(kind="gated", path="model.layers.{i}.mlp",
                    roles=dict(up="model.layers.{i}.mlp.up_proj", gate="model.layers.{i}.mlp.gate_proj",
                               down="model.layers.{i}.mlp.down_proj")),
    "qwen2": dict(kind="gated", path="model.layers.{i}.mlp",
                  roles=dict(up="model.layers.{i}.mlp.up_proj", gate="model.layers.{i}.mlp.gate_proj",
                             down="model.layers.{i}.mlp.down_proj")),
    "qwen3": dict(kind="gated", path="model.layers.{i}.mlp",
                  roles=dict(up="model.layers.{i}.mlp.up_proj", gate="model.layers.{i}.mlp.gate_proj",
                             down="model.layers.{i}.mlp.down_proj")),
    "phi3": dict(kind="fused_gated", path="model.layers.{i}.mlp",
                 roles=dict(up="model.layers.{i}.mlp.gate_up_proj", gate=None,
                            down="model.layers.{i}.mlp.down_proj")),
    "gpt2": dict(kind="conv1d", path="transformer.h.{i}.mlp",
                 roles=dict(up="transformer.h.{i}.mlp.c_fc", gate=None, down="transformer.h.{i}.mlp.c_proj")),
    "bert": dict(kind="split", path="encoder.layer.{i}.intermediate",
                 roles=dict(up="encoder.layer.{i}.intermediate.dense", gate=None,
                            down="encoder.layer.{i}.output.dense")),
}


def expected_sites(kind: str, num_layers: int = LAYERS) -> list[dict]:
    """EXPECTED[kind] expanded per layer: dicts with path, kind, up, gate, down."""
    e = EXPECTED[kind]
    out = []
    for i in range(num_layers):
        row = {"path": e["path"].format(i=i), "kind": e["kind"]}
        for role, tmpl in e["roles"].items():
            row[role] = tmpl.format(i=i) if tmpl is not None else None
        out.append(row)
    return out
