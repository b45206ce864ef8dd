"""A model written as GGUF for llama.cpp / Ollama, with the `gguf` package's writer and quantizers.

Promises:
- The names, layouts and metadata keys are the ones llama.cpp's own converter
  (`convert_hf_to_gguf.py`) writes for the architecture: `blk.N.*` tensor names from
  `gguf.TENSOR_NAMES`; experts stacked into 3-D `ffn_{gate,up,down}_exps` (experts outermost);
  the router as `ffn_gate_inp`; a shared expert as `*_shexp` with its gate `ffn_gate_inp_shexp`;
  for the `llama` architecture (Llama, Mistral, Mixtral) the q/k rows permuted from the Hugging
  Face rotary layout to llama.cpp's, exactly as the converter's `LlamaModel.permute` does.
- Every 1-D tensor (norms, biases) and every router is written in F32, whatever the type asked;
  a matrix whose rows a block quantizer cannot cut (width not a multiple of its block) is
  written in F16 and named in the notes.
- `check_exportable` refuses, naming the setting, what llama.cpp would compute differently:
  another activation than SiLU, routing renormalisation that disagrees with the one llama.cpp
  hard-codes for the architecture (on for Mixtral and qwen3moe, off for qwen2moe), a shared
  expert in an architecture without one, rotary scaling, a sliding window shorter than the context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moeconv.errors import UnsupportedError

ARCHITECTURES = {  # transformers architecture → llama.cpp architecture
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe",
}
RENORMALISES = {"llama": True, "qwen2moe": False, "qwen3moe": True}  # llama.cpp's fixed top-k renormalisation
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# general.file_type (llama.cpp's LLAMA_FTYPE) for each --type
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}


def qtype(name: str):
    import gguf
    return getattr(gguf.GGMLQuantizationType, name.upper())


@dataclass
class GgufModel:
    """What is written: the llama.cpp architecture and the tensors, in llama.cpp's names and layouts."""

    arch: str
    config: object
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    routers: set[str] = field(default_factory=set)


def architecture(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    raise UnsupportedError(f"export gguf: {archs[0] if archs else 'this model'} is not one of "
                           f"{', '.join(sorted(ARCHITECTURES))}")


def check_exportable(config, arch: str) -> None:
    """Refuse, naming the setting, what llama.cpp would compute differently from PyTorch."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedError(f"export gguf: hidden_act={act!r}; llama.cpp's {arch} computes SiLU")
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UnsupportedError(f"export gguf: rope_scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                               "exported (llama.cpp would compute plain RoPE)")
    window = getattr(config, "sliding_window", None)
    use_window = getattr(config, "use_sliding_window", True)
    if window and use_window and window < getattr(config, "max_position_embeddings", 0):
        raise UnsupportedError(f"export gguf: sliding_window={window}; llama.cpp's {arch} attends to the whole context")
    if arch in RENORMALISES:
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        if experts:
            renorm = True if arch == "llama" else bool(getattr(config, "norm_topk_prob", False))
            if renorm != RENORMALISES[arch]:
                hint = (" (moeconv's exact upcycling to Qwen2-MoE renormalises; Qwen3-MoE is the family llama.cpp "
                        "runs with renormalisation)" if arch == "qwen2moe" else "")
                raise UnsupportedError(f"export gguf: norm_topk_prob={renorm}; llama.cpp's {arch} "
                                       f"{'renormalises' if RENORMALISES[arch] else 'does not renormalise'} "
                                       f"the top-k routing weights{hint}")


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp converter's `LlamaModel.permute`: HF rotary halves → interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def collect(model: torch.nn.Module, config) -> GgufModel:
    """The model's tensors under llama.cpp's names, in its layouts (float32, on the CPU)."""
    import gguf
    arch = architecture(config)
    check_exportable(config, arch)
    from moeconv.nn.moe import MoEBlock
    for path, block in model.named_modules():
        if isinstance(block, MoEBlock) and arch in RENORMALISES and bool(block.renormalize) != RENORMALISES[arch]:
            raise UnsupportedError(f"export gguf: {path} {'renormalises' if block.renormalize else 'does not renormalise'}"
                                   f" its top-k routing weights; llama.cpp's {arch} "
                                   f"{'always does' if RENORMALISES[arch] else 'never does'}")
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    out = GgufModel(arch, config)

    def put(kind, tensor, bid=None):
        name = names[kind].format(bid=bid) + ".weight"
        out.tensors.append((name, tensor))
        return name

    def put_bias(kind, tensor, bid):
        out.tensors.append((names[kind].format(bid=bid) + ".bias", tensor))

    put(T.TOKEN_EMBD, sd.pop("model.embed_tokens.weight"))
    put(T.OUTPUT_NORM, sd.pop("model.norm.weight"))
    head = sd.pop("lm_head.weight", None)
    if head is not None and not getattr(config, "tie_word_embeddings", False):
        put(T.OUTPUT, head)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = {r: sd.pop(f"{p}self_attn.{r}_proj.weight") for r in ("q", "k", "v", "o")}
        if arch == "llama":
            attn["q"], attn["k"] = permute(attn["q"], heads), permute(attn["k"], kv)
        for r, kind in (("q", T.ATTN_Q), ("k", T.ATTN_K), ("v", T.ATTN_V), ("o", T.ATTN_OUT)):
            put(kind, attn[r], i)
            bias = sd.pop(f"{p}self_attn.{r}_proj.bias", None)
            if bias is not None:
                put_bias(kind, permute(bias, heads if r == "q" else kv) if arch == "llama" and r in "qk" else bias, i)
        for norm, kind in (("q_norm", T.ATTN_Q_NORM), ("k_norm", T.ATTN_K_NORM)):
            if f"{p}self_attn.{norm}.weight" in sd:
                put(kind, sd.pop(f"{p}self_attn.{norm}.weight"), i)
        put(T.ATTN_NORM, sd.pop(f"{p}input_layernorm.weight"), i)
        put(T.FFN_NORM, sd.pop(f"{p}post_attention_layernorm.weight"), i)
        _ffn(sd, p, i, put, out)
    left = sorted(k for k in sd if not k.endswith("rotary_emb.inv_freq"))
    if left:
        raise UnsupportedError(f"export gguf: {len(left)} tensor(s) llama.cpp's {arch} has no place for "
                               f"(first: {left[0]})")
    return out


def _ffn(sd: dict, p: str, i: int, put, out: GgufModel) -> None:
    """One layer's dense FFN, or its experts (stacked), router and shared expert."""
    import gguf
    T = gguf.MODEL_TENSOR
    if f"{p}mlp.gate_proj.weight" in sd:  # dense
        for role, kind in (("gate", T.FFN_GATE), ("up", T.FFN_UP), ("down", T.FFN_DOWN)):
            put(kind, sd.pop(f"{p}mlp.{role}_proj.weight"), i)
        return
    router = sd.pop(f"{p}mlp.gate.weight", None)
    if router is None:  # moeconv's MoEBlock (native experts linearised on load)
        router = sd.pop(f"{p}mlp.router.weight", None)
    if router is None:
        raise UnsupportedError(f"export gguf: layer {i} has neither a dense FFN nor a router llama.cpp reads")
    out.routers.add(put(T.FFN_GATE_INP, router, i))
    gate_up, down = _experts(sd, f"{p}mlp.experts.")
    inter = down.shape[-1]
    put(T.FFN_GATE_EXP, gate_up[:, :inter].contiguous(), i)
    put(T.FFN_UP_EXP, gate_up[:, inter:].contiguous(), i)
    put(T.FFN_DOWN_EXP, down, i)
    shared = f"{p}mlp.shared_expert."
    if f"{shared}gate_proj.weight" in sd:
        if out.arch != "qwen2moe":
            raise UnsupportedError(f"export gguf: layer {i} has a shared expert; llama.cpp's {out.arch} has none")
        for role, kind in (("gate", T.FFN_GATE_SHEXP), ("up", T.FFN_UP_SHEXP), ("down", T.FFN_DOWN_SHEXP)):
            put(kind, sd.pop(f"{shared}{role}_proj.weight"), i)
        gate = sd.pop(f"{p}mlp.shared_expert_gate.weight", None)
        if gate is None:
            raise UnsupportedError(f"export gguf: layer {i}'s shared expert has no gate; llama.cpp's qwen2moe "
                                   "always applies one (shared_expert_gate)")
        out.routers.add(put(T.FFN_GATE_INP_SHEXP, gate, i))


def _experts(sd: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up (E, 2I, H), down (E, H, I)): transformers' fused expert tensors, or per-expert
    projections (moeconv's linearised experts) stacked the same way."""
    if f"{prefix}gate_up_proj" in sd:
        return sd.pop(f"{prefix}gate_up_proj"), sd.pop(f"{prefix}down_proj")
    gate_up, down, e = [], [], 0
    while f"{prefix}{e}.gate_proj.weight" in sd:
        gate_up.append(torch.cat([sd.pop(f"{prefix}{e}.gate_proj.weight"), sd.pop(f"{prefix}{e}.up_proj.weight")]))
        down.append(sd.pop(f"{prefix}{e}.down_proj.weight"))
        e += 1
    if not e:
        raise UnsupportedError(f"export gguf: no experts llama.cpp reads under {prefix}")
    return torch.stack(gate_up), torch.stack(down)


def tensor_type(name: str, tensor: torch.Tensor, requested: str, routers: set[str]) -> tuple[str, str | None]:
    """(type written, note or None): F32 for 1-D tensors and routers; F16 for a matrix whose rows
    the requested block quantizer cannot cut."""
    import gguf
    if tensor.dim() < 2 or name in routers:
        return "f32", None
    kind = qtype(requested)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if tensor.shape[-1] % block:
        return "f16", f"{name}: rows of {tensor.shape[-1]} are not a multiple of {requested}'s block of {block}: F16"
    return requested, None


def write_gguf(path: Path, model: GgufModel, requested: str, vocab, name: str) -> dict:
    """Write `model` to `path` (one file); returns {tensors, bytes, types: {type: count}, notes}."""
    import gguf
    cfg, arch = model.config, model.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(getattr(cfg, "intermediate_size", 0) or 0))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(_rope_theta(cfg)))
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_dimension_count(head_dim)
    if arch.startswith("qwen3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(int(cfg.vocab_size))
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts and any(n.endswith("ffn_gate_inp.weight") for n in model.routers):
        w.add_expert_count(int(experts))
        w.add_expert_used_count(int(cfg.num_experts_per_tok))
        if arch in ("qwen2moe", "qwen3moe"):
            w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(int(cfg.shared_expert_intermediate_size))
    w.add_file_type(FILE_TYPES[requested])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(w)
    types, notes = {}, []
    for tname, t in model.tensors:
        kind, note = tensor_type(tname, t, requested, model.routers)
        if note:
            notes.append(note)
        data = gguf.quants.quantize(t.numpy().astype(np.float32), qtype(kind))
        w.add_tensor(tname, data, raw_dtype=qtype(kind))
        types[kind] = types.get(kind, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensors": len(model.tensors), "bytes": Path(path).stat().st_size, "types": types, "notes": notes}


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    return theta if theta is not None else params.get("rope_theta", 10000.0)
