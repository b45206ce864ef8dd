"""The files a consumer reads beside an exported graph: `config.json` and
`generation_config.json` for every transformers model (with or without past), and for the
KV-cache decoder graph also `genai_config.json` (onnxruntime-genai). The tokenizer files are
carried by the job driver.

Each file describes the graph, not the PyTorch model it came from, and is checked against the
graph before it is written: the vocabulary against the logits' last axis, and with past the layer
count, KV heads and head size against the graph's `present.*` outputs (a config whose KV-head count
differs from the graph's makes a consumer allocate the cache wrongly). `config.json` is the model's
own config with what the graph changed: `dtype` float32 (the graph computes in float32 whatever the
model's dtype; int8/int4 weights are dequantized inside it), `use_cache` true only for the past
graph, no `quantization_config` (a bitsandbytes source's int8 weights are ONNX tensors now), and
`head_dim` stated where the config left it to be derived.

Issue #21's "4 KV heads in the config vs 2 in the graph" was neither file's fault: optimum-onnx's
`ORTModelForCausalLM` reads `num_key_value_heads` from config.json only for the model types it
lists (llama, mistral, qwen2, qwen3, qwen3_moe, …; not mixtral or qwen2_moe) and otherwise
allocates its first, empty cache with `num_attention_heads`; the README gives the one-line fix.

`genai_config.json` takes the layer count, KV heads and head size from the graph's `present.*`
outputs, and `model.decoder.inputs` lists only the inputs the graph has (this graph computes
position ids from the attention mask, as `generate` does, so it has no `position_ids` input and
onnxruntime-genai feeds none). `past_present_share_buffer` is off: the graph grows the cache by
concatenation.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from moeconv.errors import VerificationError


def graph_io(model_path: Path) -> tuple[list[str], dict[str, list]]:
    """(input names, {output name: shape as ints or axis names}) of an ONNX file, weights unread."""
    import onnx
    model = onnx.load(str(model_path), load_external_data=False)

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
    return [i.name for i in model.graph.input], {o.name: dims(o) for o in model.graph.output}


def cache_shape(model_path: Path, outputs: dict[str, list]) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of a KV-cache decoder graph, from its `present.*` outputs."""
    layers = sum(1 for name in outputs if name.startswith("present.") and name.endswith(".key"))
    if not layers or "logits" not in outputs:
        raise VerificationError(f"{model_path.name}: not a KV-cache decoder graph (no logits / present.*.key)")
    kv_heads, head_size = outputs["present.0.key"][1], outputs["present.0.key"][3]
    if not isinstance(kv_heads, int) or not isinstance(head_size, int):
        raise VerificationError(f"{model_path.name}: present.0.key has no fixed KV-head count and head size")
    return layers, kv_heads, head_size


def configured_cache(config) -> tuple[int, int, int]:
    """(layers, KV heads, head size) as a config states them (GQA models: `num_key_value_heads`;
    `head_dim` where set, else hidden / heads), which is what loaders allocate from."""
    heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return int(config.num_hidden_layers), int(kv_heads), int(head_dim)


def check_config(model_path: Path, config, *, with_past: bool, causal_lm: bool = True) -> None:
    """Refuse a config that disagrees with the graph `model_path`: a causal LM's vocabulary, and
    with past its cache. (An encoder's `logits` may be class scores, so its vocabulary is not checked.)"""
    _, outputs = graph_io(model_path)
    vocab = outputs.get("logits", [None])[-1]
    if causal_lm and isinstance(vocab, int) and getattr(config, "vocab_size", vocab) != vocab:
        raise VerificationError(f"{model_path.name}: the graph's logits have {vocab} entries, the model's config "
                                f"says vocab_size {config.vocab_size}")
    if not with_past:
        return
    graph = cache_shape(model_path, outputs)
    stated = configured_cache(config)
    for what, g, c in zip(("layers", "KV heads", "head size"), graph, stated):
        if g != c:
            raise VerificationError(f"{model_path.name}: the graph's cache has {g} {what}, the model's config {c}")


def genai_config(model_path: Path, config, generation_config=None) -> dict:
    """onnxruntime-genai's config for the decoder graph `model_path` of a transformers model."""
    inputs, outputs = graph_io(model_path)
    check_config(model_path, config, with_past=True)
    layers, kv_heads, head_size = cache_shape(model_path, outputs)
    gen = generation_config or config

    def token(name):
        v = getattr(gen, name, None)
        v = getattr(config, name, None) if v is None else v
        return v[0] if isinstance(v, (list, tuple)) and v else v
    eos, bos = token("eos_token_id"), token("bos_token_id")
    pad = token("pad_token_id")
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids"}
    decoder_inputs = {k: v for k, v in names.items() if v in inputs}
    decoder_inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    context = int(getattr(config, "max_position_embeddings", 2048))
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": bos if bos is not None else 0,
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
            "context_length": context,
            "vocab_size": int(config.vocab_size),
            "decoder": {
                "filename": model_path.name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_size,
                "hidden_size": int(config.hidden_size),
                "num_attention_heads": int(config.num_attention_heads),
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": layers,
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "num_return_sequences": 1},
    }


def graph_config(config, *, with_past: bool):
    """A copy of the model's config saying what the graph is (see the module docstring)."""
    config = copy.deepcopy(config)
    config.use_cache = with_past
    config.dtype = "float32"
    if hasattr(config, "head_dim") and config.head_dim is None and hasattr(config, "num_attention_heads"):
        # stated, not left for each reader to derive (what the cache check compares with the graph)
        config.head_dim = configured_cache(config)[2]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def write_model_files(out_dir: Path, model, *, with_past: bool, model_file: str = "model.onnx") -> list[str]:
    """config.json and generation_config.json (+ genai_config.json with past) beside
    `out_dir/model_file`, each checked against the graph; returns the names written."""
    config = graph_config(model.config, with_past=with_past)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen = copy.deepcopy(gen)
        gen.use_cache = with_past
    from moeconv.onnx.signature import model_kind
    check_config(out_dir / model_file, config, with_past=with_past, causal_lm=model_kind(model) == "causal-lm")
    written = []
    if with_past:
        cfg = genai_config(out_dir / model_file, config, gen)
        (out_dir / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        written.append("genai_config.json")
    config.save_pretrained(out_dir)
    written.append("config.json")
    if gen is not None:
        gen.save_pretrained(out_dir)
        written.append("generation_config.json")
    return written


def write_decoder_files(out_dir: Path, model, model_file: str = "model.onnx") -> list[str]:
    """`write_model_files` for the KV-cache decoder graph."""
    return write_model_files(out_dir, model, with_past=True, model_file=model_file)
