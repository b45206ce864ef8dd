"""`ModelState`: the one thing that flows between passes.

It holds the user's own module (so `generate`, `save_pretrained`, … keep working), its HF config,
where it came from, and products of earlier passes. Facts about the model (is it MoE? quantized?)
are *derived from the module* every time they are asked for, never cached flags that can drift.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeconv.nn.moe import MoEBlock


@dataclass
class SourceInfo:
    """Where a model was loaded from: `kind` is hf | gguf | moeconv | module | builtin."""

    kind: str
    path: Path | None = None
    gguf_file: str | None = None
    tokenizer_dir: Path | None = None  # directory whose tokenizer/generation files are carried along
    spec: str | None = None  # "builtin:gpt" or "FILE.py:factory": how to rebuild the architecture


@dataclass
class ModelState:
    """What `moeconv.load` returns and every pass takes and returns.

    `module` is the model itself, unwrapped: a transformers model keeps `generate`,
    `save_pretrained`, … (`state.module.generate(ids)`), and calling the state calls it
    (`state(input_ids=ids).logits`). `config` is its transformers config (None for plain modules),
    `source` where it was loaded from (its tokenizer directory included), `artifacts` what earlier
    passes left (e.g. an ONNX export's files)."""

    module: nn.Module
    config: Any = None  # transformers.PretrainedConfig, or None for plain modules
    source: SourceInfo = field(default_factory=lambda: SourceInfo("module"))
    artifacts: dict[str, Any] = field(default_factory=dict)  # teacher snapshot, routing stats, …

    def __call__(self, *args, **kwargs):
        """The module's forward: a state is used like the model it holds."""
        return self.module(*args, **kwargs)

    # ---- derived facts -------------------------------------------------------------------
    def ffn_sites(self):
        """Dense FFN sites: FFNs inside MoE layers (the experts themselves) are not sites, and the
        search does not look inside MoE layers at all."""
        from moeconv.patterns import find_ffn_sites
        return find_ffn_sites(self.module, require=False, skip=[p for p, _ in self.moe_blocks()])

    def moe_blocks(self) -> list[tuple[str, nn.Module]]:
        """Every MoE layer: moeconv's `MoEBlock` and native HF sparse-MoE blocks (router + experts)."""
        out = []
        for name, m in self.module.named_modules():
            if isinstance(m, MoEBlock) or _is_native_moe(m):
                out.append((name, m))
        return out

    def facts(self) -> set[str]:
        facts = set()
        if self.moe_blocks():
            facts.add("moe")
        if self.ffn_sites():
            facts.add("dense-ffn")
        if _is_quantized(self.module):
            facts.add("quantized")
            if _all_int8(self.module):
                facts.add("int8-weights")  # bitsandbytes LLM.int8: exact int8 + row scales, exportable
        else:
            facts.add("float-weights")
        if self.config is not None:
            facts.add("hf-config")
        if "teacher" in self.artifacts:
            facts.add("teacher")
        return facts

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def active_parameter_count(self) -> int:
        """Parameters used per token: inactive experts (num_experts - top_k of them) left out."""
        total = self.parameter_count()
        for _, block in self.moe_blocks():
            n, k = native_moe_shape(block)
            per_expert = _expert_params(block) / max(n, 1)
            total -= int(per_expert * (n - k))
        return total


def _is_native_moe(m: nn.Module) -> bool:
    # Structural: a `gate`/router with an [E, H] weight next to `experts`, and a top-k setting.
    experts = getattr(m, "experts", None)
    gate = getattr(m, "gate", None) or getattr(m, "router", None)
    w = getattr(gate, "weight", None)
    return (isinstance(experts, nn.Module) and isinstance(w, torch.Tensor) and w.dim() == 2
            and (hasattr(m, "top_k") or hasattr(gate, "top_k")))


def native_moe_shape(block: nn.Module) -> tuple[int, int]:
    """(num_experts, top_k) of a MoE block of any supported kind."""
    if isinstance(block, MoEBlock):
        return block.num_experts, block.top_k
    gate = getattr(block, "gate", None) or getattr(block, "router", None)
    n = int(gate.weight.shape[0])
    k = int(getattr(block, "top_k", None) or getattr(gate, "top_k"))
    return n, k


def _expert_params(block: nn.Module) -> int:
    return sum(p.numel() for p in block.experts.parameters())


def _is_quantized(module: nn.Module) -> bool:
    for m in module.modules():
        if type(m).__module__.startswith("bitsandbytes"):
            return True
    return False


def _all_int8(module: nn.Module) -> bool:
    from moeconv.nn.quantized import method_of
    methods = {method_of(m) for m in module.modules() if type(m).__module__.startswith("bitsandbytes")}
    return methods == {"int8"}


def call_model(module: nn.Module, input_ids: torch.Tensor):
    """Call a model on token ids: HF models by keyword (no KV cache), plain modules positionally."""
    try:
        return module(input_ids=input_ids, use_cache=False)
    except TypeError:
        return module(input_ids)


def model_outputs(module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The tensor a model's promise is checked on: logits for LMs, last hidden state otherwise."""
    with torch.inference_mode():
        return output_tensor(call_model(module, input_ids))


def output_tensor(out) -> torch.Tensor:
    """The checked tensor of a model's output: itself, `logits`, `last_hidden_state` or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        val = getattr(out, key, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find an output tensor in {type(out).__name__}")


def vocab_size(module: nn.Module, config: Any = None) -> int | None:
    """The vocabulary size: `config.vocab_size` (or its `text_config`'s), else the first
    `nn.Embedding`'s rows; None for a model without either."""
    for obj in (config, getattr(config, "text_config", None) if config is not None else None):
        v = getattr(obj, "vocab_size", None)
        if isinstance(v, int):
            return v
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return None
