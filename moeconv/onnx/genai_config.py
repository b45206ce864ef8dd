"""The files onnxruntime-genai (and optimum-style loaders) read beside a KV-cache decoder graph:
`genai_config.json`, `config.json` and `generation_config.json` (the tokenizer files are carried by
the job driver).

`genai_config.json` is built from the graph itself where the two could disagree: the layer count
and the KV heads and head size come from the graph's `present.*` outputs, not from the model's
config (a config whose KV-head count differs from the graph's makes a consumer allocate the cache
wrongly, the mismatch #21 met with optimum), and `model.decoder.inputs` lists only the inputs the
graph has (this graph computes position ids from the attention mask, as `generate` does, so it has
no `position_ids` input and onnxruntime-genai feeds none). `past_present_share_buffer` is off: the
graph grows the cache by concatenation.
"""
from __future__ import annotations

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


def genai_config(model_path: Path, config, generation_config=None) -> dict:
    """onnxruntime-genai's config for the decoder graph `model_path` of a transformers model."""
    inputs, outputs = graph_io(model_path)
    layers = sum(1 for name in outputs if name.startswith("present.") and name.endswith(".key"))
    if not layers or "logits" not in outputs:
        raise VerificationError(f"{model_path.name}: not a KV-cache decoder graph (no logits / present.*.key)")
    kv_heads, head_size = outputs["present.0.key"][1], outputs["present.0.key"][3]
    if not isinstance(kv_heads, int) or not isinstance(head_size, int):
        raise VerificationError(f"{model_path.name}: present.0.key has no fixed KV-head count and head size")
    configured = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if configured != kv_heads:
        raise VerificationError(f"{model_path.name}: the graph's cache has {kv_heads} KV heads, the model's config "
                                f"{configured}")
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


def write_decoder_files(out_dir: Path, model, model_file: str = "model.onnx") -> list[str]:
    """genai_config.json, config.json and generation_config.json beside `out_dir/model_file`;
    returns the names written."""
    config = model.config
    gen = getattr(model, "generation_config", None)
    cfg = genai_config(out_dir / model_file, config, gen)
    (out_dir / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    config.save_pretrained(out_dir)
    written = ["genai_config.json", "config.json"]
    if gen is not None:
        gen.save_pretrained(out_dir)
        written.append("generation_config.json")
    return written
