"""What an exported graph takes and returns, as export wrappers around the user's model.

Kinds (`model_kind`):
- `causal-lm`: a transformers model that can generate: `input_ids, attention_mask → logits`.
  Position ids are computed from the mask (`cumsum - 1`, as `generate` does), so left-padded
  batches get the positions they get in PyTorch generation.
- `causal-lm` with past (`with_past=True`): the KV-cache decode graph, `input_ids,
  attention_mask (past + new), past_key_values.{i}.key|value → logits, present.{i}.key|value`.
  One graph serves both prefill (past length 0) and decoding (any past length).
- `encoder`: any other transformers model: `input_ids, attention_mask → last_hidden_state`
  (or `logits` when the model has a head).
- `module`: a plain `nn.Module` mapping token ids to one tensor (moeconv's built-in models).

Every axis that can vary at run time is dynamic: batch, sequence, past and total length.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moeconv.errors import UnsupportedError
from moeconv.state import vocab_size as model_vocab_size

EXAMPLE_BATCH = 2
EXAMPLE_SEQ = 8          # >= 2 on every dynamic axis: the exporter specialises size-1 axes
EXAMPLE_PAST = 5
EXAMPLE_NEW = 3


def _hf_pretrained(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def model_kind(module: nn.Module) -> str:
    """`causal-lm` | `encoder` | `module`."""
    if _hf_pretrained(module):
        can_generate = getattr(module, "can_generate", None)
        if callable(can_generate) and can_generate():
            return "causal-lm"
        return "encoder"
    return "module"


def vocab_size(module: nn.Module) -> int:
    v = model_vocab_size(module, getattr(module, "config", None))
    if v is not None:
        return v
    raise UnsupportedError(f"{type(module).__name__}: no vocabulary size (no config.vocab_size, no nn.Embedding); "
                           "only token-id models are exported")


def max_length(module: nn.Module, default: int = 128) -> int:
    """The longest sequence the model accepts (position table size), capped at `default`."""
    cfg = getattr(module, "config", None)
    for key in ("max_position_embeddings", "n_positions", "block_size", "max_position"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return min(v, default)
    return default


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def positions_from_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Position ids of the last `new_tokens` tokens: `cumsum(mask) - 1`, padding clamped to 0."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos[:, pos.shape[1] - new_tokens:]


class CausalLM(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.use_positions = _accepts(model, "position_ids")

    def forward(self, input_ids, attention_mask):
        kw = {"position_ids": positions_from_mask(attention_mask, input_ids.shape[1])} if self.use_positions else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits


class CausalLMWithPast(nn.Module):
    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.use_positions = _accepts(model, "position_ids")

    def forward(self, input_ids, attention_mask, past):
        from transformers import DynamicCache
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)],
                             config=self.model.config)
        kw = {"position_ids": positions_from_mask(attention_mask, input_ids.shape[1])} if self.use_positions else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True, **kw)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class Encoder(nn.Module):
    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids, attention_mask):
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), self.output)


class PlainModule(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids)
        if not isinstance(out, torch.Tensor):
            raise UnsupportedError(f"{type(self.model).__name__} returns {type(out).__name__}; a plain module is "
                                   "exported only when it maps token ids to one tensor")
        return out


@dataclass
class Signature:
    """An export wrapper and everything needed to call it in PyTorch and in onnxruntime."""

    kind: str                      # causal-lm | encoder | module
    with_past: bool
    wrapper: nn.Module
    input_names: list[str]
    output_names: list[str]
    example: tuple
    dynamic_axes: dict[str, dict[int, str]]   # graph input → axis → readable name
    vocab: int
    max_len: int
    num_layers: int = 0
    kv_shape: tuple[int, int] = (0, 0)        # (kv heads, head dim) of the cache
    kv_dtype: torch.dtype = torch.float32
    output_is_logits: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def uses_mask(self) -> bool:
        return "attention_mask" in self.input_names

    def torch_args(self, ids: torch.Tensor, mask: torch.Tensor | None, past: list[torch.Tensor] | None = None) -> tuple:
        if self.with_past:
            return (ids, mask, list(past if past is not None else self.empty_past(ids.shape[0])))
        return (ids, mask) if self.uses_mask else (ids,)

    def feeds(self, ids: torch.Tensor, mask: torch.Tensor | None, past=None) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids.numpy()}
        if self.uses_mask:
            feed["attention_mask"] = mask.numpy()
        if self.with_past:
            past = past if past is not None else self.empty_past(ids.shape[0])
            for name, t in zip(self.input_names[2:], past):
                feed[name] = t.numpy() if isinstance(t, torch.Tensor) else t
        return feed

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        heads, dim = self.kv_shape
        return [torch.zeros(batch, heads, 0, dim, dtype=self.kv_dtype) for _ in range(2 * self.num_layers)]

    def dynamic_shapes(self):
        d = torch.export.Dim.DYNAMIC
        tok = {0: d, 1: d}
        if self.with_past:
            return (tok, tok, [{0: d, 2: d} for _ in range(2 * self.num_layers)])
        return (tok, tok) if self.uses_mask else (tok,)


def build_signature(module: nn.Module, *, with_past: bool, seed: int = 0,
                    example_ids: torch.Tensor | None = None) -> Signature:
    """`example_ids` (B, S), both ≥ 2, replaces the random example input of graphs without past."""
    kind = model_kind(module)
    vocab = vocab_size(module)
    max_len = max_length(module)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=g)
    if example_ids is not None and example_ids.dim() == 2 and min(example_ids.shape) >= 2:
        ids = example_ids.long()
    mask = torch.ones_like(ids)
    tok_axes = {0: "batch", 1: "sequence"}
    if with_past and kind != "causal-lm":
        raise UnsupportedError(f"{type(module).__name__}: --with-past needs a transformers causal LM "
                               f"(this is exported as `{kind}`)")
    if kind == "causal-lm" and not with_past:
        return Signature(kind, False, CausalLM(module).eval(), ["input_ids", "attention_mask"], ["logits"],
                         (ids, mask), {"input_ids": tok_axes, "attention_mask": tok_axes}, vocab, max_len)
    if kind == "causal-lm":
        return _past_signature(module, vocab, max_len, g)
    if kind == "encoder":
        with torch.inference_mode():
            out = module(input_ids=ids, attention_mask=mask)
        name = "logits" if isinstance(getattr(out, "logits", None), torch.Tensor) else "last_hidden_state"
        if not isinstance(getattr(out, name, None), torch.Tensor):
            raise UnsupportedError(f"{type(module).__name__}: returns neither logits nor last_hidden_state")
        return Signature(kind, False, Encoder(module, name).eval(), ["input_ids", "attention_mask"], [name],
                         (ids, mask), {"input_ids": tok_axes, "attention_mask": tok_axes}, vocab, max_len,
                         output_is_logits=name == "logits")
    return Signature(kind, False, PlainModule(module).eval(), ["input_ids"], ["output"], (ids,),
                     {"input_ids": tok_axes}, vocab, max_len, output_is_logits=False)


def _past_signature(module: nn.Module, vocab: int, max_len: int, g: torch.Generator) -> Signature:
    prefix = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_PAST), generator=g)
    try:
        with torch.inference_mode():
            out = module(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True)
        layers = out.past_key_values.layers
        past = []
        for layer in layers:
            past += [layer.keys.clone(), layer.values.clone()]
    except Exception as exc:
        raise UnsupportedError(f"{type(module).__name__}: --with-past needs a model that returns a "
                               f"transformers DynamicCache ({exc.__class__.__name__}: {exc})") from None
    num_layers = len(layers)
    _, heads, _, dim = past[0].shape
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_NEW), generator=g)
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_PAST + EXAMPLE_NEW, dtype=torch.long)
    names = ["input_ids", "attention_mask"]
    outs = ["logits"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"}}
    for i in range(num_layers):
        for kv in ("key", "value"):
            names.append(f"past_key_values.{i}.{kv}")
            outs.append(f"present.{i}.{kv}")
            axes[names[-1]] = {0: "batch", 2: "past_sequence"}
    return Signature("causal-lm", True, CausalLMWithPast(module, num_layers).eval(), names, outs,
                     (ids, mask, past), axes, vocab, max_len, num_layers=num_layers, kv_shape=(heads, dim),
                     kv_dtype=past[0].dtype)
