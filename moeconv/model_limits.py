"""What a model accepts, read from its configuration without building it: vocabulary size,
position table, widths and depth (`ModelLimits`), and an estimate of the activation memory that
a number of sequences needs. Calibration, evaluation and training data are checked against these
before any model is loaded, so a 100,000-token sequence is refused in one line, not by the OOM
killer."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moeconv.errors import ConfigError, InputError
from moeconv.io.config_checks import format_bytes, total_memory
from moeconv.io.json_files import json_object_or_none


@dataclass(frozen=True)
class ModelLimits:
    """What the model's configuration says about its inputs, read without building it; None where
    the source does not say (a GGUF file, a Python model)."""

    name: str
    vocab_size: int | None = None
    max_positions: int | None = None
    hidden: int | None = None
    intermediate: int | None = None
    heads: int | None = None
    layers: int | None = None
    position_key: str = "max_position_embeddings"

    def seq_len(self, preferred: int) -> int:
        """`preferred` tokens a row, or the model's positions if fewer: a default it can take."""
        return min(preferred, self.max_positions or preferred)


_KEYS = {
    "vocab_size": ("vocab_size", "n_vocab"),
    "max_positions": ("max_position_embeddings", "n_positions", "max_seq_len", "block_size", "max_position",
                      "n_ctx", "seq_length"),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim", "hidden"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size"),
    "heads": ("num_attention_heads", "n_head", "n_heads"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
}


def _limits_from_mapping(name: str, cfg) -> ModelLimits:
    if not isinstance(cfg, dict):
        return ModelLimits(name)
    text = cfg.get("text_config")
    if "vocab_size" not in cfg and isinstance(text, dict):
        cfg = text
    found, position_key = {}, "max_position_embeddings"
    for field, keys in _KEYS.items():
        for k in keys:
            v = cfg.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**40:
                found[field] = v
                if field == "max_positions":
                    position_key = k
                break
    return ModelLimits(name, position_key=position_key, **found)


def model_limits(source, name: str | None = None) -> ModelLimits:
    """`ModelLimits` of a model source (checkpoint dir, moeconv-format dir, `builtin:NAME`, a
    `ModelState` or module); fields the source does not state are None. Never raises: a source
    that cannot be read is left to its loader, which names the problem."""
    if not isinstance(source, (str, os.PathLike)):
        info = getattr(source, "source", None)  # a ModelState's SourceInfo
        name = name or str(getattr(info, "path", None) or getattr(info, "spec", None) or "the model")
        module = getattr(source, "module", source)
        cfg = getattr(source, "config", None) or getattr(module, "config", None)
        raw = cfg.to_dict() if hasattr(cfg, "to_dict") else (vars(cfg) if cfg is not None and hasattr(cfg, "__dict__") else {})
        limits = _limits_from_mapping(name, raw)
        if limits.vocab_size is None and isinstance(module, torch.nn.Module):
            emb = next((m for m in module.modules() if isinstance(m, torch.nn.Embedding)), None)
            if emb is not None:
                limits = ModelLimits(**{**limits.__dict__, "vocab_size": emb.num_embeddings})
        return limits
    text = str(source)
    name = name or text
    if text.startswith("builtin:"):
        return _builtin_limits(text.split(":", 1)[1], name)
    path = Path(text)
    raw = json_object_or_none(path / "config.json")
    for _ in range(4):  # a compressed checkpoint holds its dense config, which may be moeconv's
        if not isinstance(raw, dict):
            return ModelLimits(name)
        if isinstance(raw.get("moeconv_sparse"), dict) and isinstance(raw["moeconv_sparse"].get("dense_config"), dict):
            raw = raw["moeconv_sparse"]["dense_config"]
        elif isinstance(raw.get("moeconv"), dict):
            src = raw["moeconv"].get("source")
            if not isinstance(src, dict):
                return ModelLimits(name)
            if src.get("kind") == "spec" and isinstance(src.get("spec"), str) and src["spec"].startswith("builtin:"):
                return _builtin_limits(src["spec"].split(":", 1)[1], name)
            raw = src.get("config")
        else:
            break
    return _limits_from_mapping(name, raw)


def _builtin_limits(which: str, name: str) -> ModelLimits:
    import dataclasses
    import importlib
    from moeconv.io.specs import BUILTINS
    if which not in BUILTINS:
        return ModelLimits(name)
    module = importlib.import_module(f"models.{which}")
    for obj in vars(module).values():
        if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__name__.endswith("Config"):
            return _limits_from_mapping(name, dataclasses.asdict(obj()))
    return ModelLimits(name)


def memory_limit() -> int:
    """Bytes that activations may take: half of this machine's physical memory (or of the
    container's limit, when that is lower)."""
    return max(1, total_memory() // 2)


def activation_bytes(limits: ModelLimits, samples: int, seq_len: int, *, rows_per_forward: int = 16,
                     training: bool = False) -> int:
    """A lower-bound estimate (float32) of the activation memory of running `samples` sequences of
    `seq_len` tokens: layer-wise calibration caches two hidden states per token, each forward of
    `rows_per_forward` rows holds its attention scores, FFN activations and logits; training keeps
    every layer's for the backward pass. Unknown sizes count as 1 (attention) or 0."""
    b = min(samples, rows_per_forward)
    h, i, v = limits.hidden or 0, limits.intermediate or 0, limits.vocab_size or 0
    per_layer = b * ((limits.heads or 1) * seq_len * seq_len + seq_len * (2 * i + 4 * h))
    if training:
        return 4 * ((limits.layers or 1) * per_layer + 3 * b * seq_len * v)
    return 4 * (2 * samples * seq_len * h + per_layer + b * seq_len * v)


def check_sequences(limits: ModelLimits, samples: int, seq_len: int, *, seq_len_flag: str | None = None,
                    samples_flag: str | None = None, what: str = "calibration", rows_per_forward: int = 16,
                    training: bool = False) -> None:
    """Refuse (ConfigError, naming the flag and the limit) a sequence length beyond the model's
    position table, and `samples × seq_len` whose activations would not fit in memory. Without
    flags, the message lists the options that set them."""
    if seq_len_flag and samples_flag:
        seq_text, label = f"{seq_len_flag} {seq_len} is", f"{samples_flag} {samples} × {seq_len_flag} {seq_len}"
    else:
        seq_text = f"{what} sequences of {seq_len} tokens ({_SEQ_FLAGS}) are"
        label = f"{samples} {what} sequences of {seq_len} tokens ({_SEQ_FLAGS})"
    check_positions(limits, seq_len, seq_text)
    check_activations(limits, samples, seq_len, label, ConfigError, rows_per_forward=rows_per_forward,
                       training=training)


def check_positions(limits: ModelLimits, seq_len: int, seq_text: str) -> None:
    """Refuse (ConfigError) `seq_len` beyond the model's position table; `seq_text` names it
    ("--calib-seq-len 100000 is")."""
    if limits.max_positions is not None and seq_len > limits.max_positions:
        raise ConfigError(f"{seq_text} longer than the {limits.max_positions} positions {limits.name} accepts "
                          f"({limits.position_key} in its config); use at most {limits.max_positions}")


def check_token_rows(limits: ModelLimits, path, rows: int, width: int) -> None:
    """Refuse (InputError, naming the file) `rows` token-id rows of `width` ids the model cannot
    take: fewer than 2 ids, more than its positions, or activations over the machine's limit."""
    if width < 2:
        raise InputError(f"{path}: rows of {width} token id(s); calibration needs at least 2 per row")
    if limits.max_positions is not None and width > limits.max_positions:
        raise InputError(f"{path}: rows of {width} token ids are longer than the {limits.max_positions} positions "
                         f"{limits.name} accepts ({limits.position_key} in its config)")
    check_activations(limits, rows, width, f"{path}: {rows} rows of {width} token ids", InputError)


_SEQ_FLAGS = "--seq-len / --calib-seq-len / --eval-seq-len"


def check_activations(limits: ModelLimits, samples: int, seq_len: int, label: str, error: type, *,
                       rows_per_forward: int = 16, training: bool = False) -> None:
    need = activation_bytes(limits, samples, seq_len, rows_per_forward=rows_per_forward, training=training)
    limit = memory_limit()
    if need > limit:
        raise error(f"{label}: about {format_bytes(need)} of activations for {limits.name} (estimate), over the "
                    f"{format_bytes(limit)} limit (half of this machine's memory); use fewer or shorter sequences")
