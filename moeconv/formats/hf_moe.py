"""Dense Hugging Face family → its MoE family: config keys, tensor names, routing semantics.

Written layout (checked against transformers 5.x, which converts it to its fused in-memory
experts on load):
- Mixtral:       `model.layers.{i}.block_sparse_moe.gate.weight`,
                 `….block_sparse_moe.experts.{j}.w1|w3|w2.weight` (gate | up | down) — the legacy
                 per-expert names `save_pretrained` itself writes.
- Qwen2-MoE:     `model.layers.{i}.mlp.gate.weight`, `mlp.experts.{j}.gate_proj|up_proj|down_proj`,
                 `mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`.
- Qwen3-MoE:     as Qwen2-MoE without the shared expert.
Per-expert tensors are what streaming wants (each is one source tensor, transformed) and what
every consumer of these families reads.

A source setting the target cannot represent is refused with its name, never dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from moeconv.errors import UnsupportedError

# Keys that describe the dense MLP or bookkeeping, not behaviour the MoE target must keep.
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "intermediate_size",
    "id2label", "label2id", "problem_type", "return_dict", "output_hidden_states", "output_attentions",
    "chunk_size_feed_forward", "is_encoder_decoder", "dtype", "torch_dtype", "initializer_range",
    "use_cache", "pretraining_tp", "quantization_config",
}


@dataclass(frozen=True)
class MoeFormat:
    name: str
    source_types: tuple[str, ...]
    target_type: str
    architecture: str
    moe_module: str                 # name of the MoE module inside a decoder layer
    router: str                     # router name inside the MoE module
    experts: dict[str, str]         # role → per-expert projection name
    shared_expert: bool             # the family always has a gated shared expert
    layer_subsets: bool             # dense layers allowed (mlp_only_layers)
    must_be: dict[str, object] = field(default_factory=dict)  # source keys the target cannot vary
    config: Callable[..., dict] | None = None


def _mixtral_config(dense: dict, *, num_experts, top_k, expert_intermediate, dense_layers, renormalize, **_) -> dict:
    return {"num_local_experts": num_experts, "num_experts_per_tok": top_k,
            "intermediate_size": expert_intermediate, "router_aux_loss_coef": 0.02,
            "output_router_logits": False, "router_jitter_noise": 0.0}


def _qwen_moe_config(dense: dict, *, num_experts, top_k, expert_intermediate, dense_layers, renormalize,
                     shared_intermediate=None, **_) -> dict:
    cfg = {"num_experts": num_experts, "num_experts_per_tok": top_k, "moe_intermediate_size": expert_intermediate,
           "intermediate_size": dense["intermediate_size"], "norm_topk_prob": renormalize,
           "decoder_sparse_step": 1, "mlp_only_layers": list(dense_layers), "router_aux_loss_coef": 0.001,
           "output_router_logits": False}
    if shared_intermediate is not None:
        cfg["shared_expert_intermediate_size"] = shared_intermediate
    return cfg


_GATED = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

FAMILIES = {
    "mixtral": MoeFormat("mixtral", ("llama", "mistral"), "mixtral", "MixtralForCausalLM", "block_sparse_moe",
                         "gate", {"gate": "w1", "up": "w3", "down": "w2"}, False, False,
                         {"attention_bias": False, "mlp_bias": False}, _mixtral_config),
    "qwen2_moe": MoeFormat("qwen2_moe", ("qwen2",), "qwen2_moe", "Qwen2MoeForCausalLM", "mlp", "gate",
                           _GATED, True, True, {}, _qwen_moe_config),
    "qwen3_moe": MoeFormat("qwen3_moe", ("qwen3",), "qwen3_moe", "Qwen3MoeForCausalLM", "mlp", "gate",
                           _GATED, False, True, {}, _qwen_moe_config),
}


def format_for(model_type: str | None) -> MoeFormat | None:
    for fmt in FAMILIES.values():
        if model_type in fmt.source_types:
            return fmt
    return None


def check_representable(fmt: MoeFormat, dense: dict, *, layers_selected: int, layers_total: int,
                        renormalize: bool, top_k: int, num_experts: int, router_bias: bool,
                        shared_experts: bool, kinds: set[str]) -> None:
    """Refuse (with the reason) anything the target family cannot represent exactly."""
    src = dense.get("model_type")
    if kinds != {"gated"}:
        raise UnsupportedError(f"{fmt.architecture} needs gated FFNs; found {sorted(kinds)} (use --format moeconv)")
    for key, want in fmt.must_be.items():
        if dense.get(key, want) != want:
            raise UnsupportedError(f"{fmt.architecture} cannot represent {src} `{key}={dense[key]}` (use --format moeconv)")
    if layers_selected != layers_total and not fmt.layer_subsets:
        raise UnsupportedError(f"{fmt.architecture} has no dense layers: upcycle every layer or use --format moeconv")
    if not renormalize and top_k != num_experts and fmt.name == "mixtral":
        raise UnsupportedError("Mixtral always renormalises top-k weights: drop --no-renormalize or use --format moeconv")
    if router_bias:
        raise UnsupportedError(f"{fmt.architecture} routers have no bias (use --format moeconv)")
    if shared_experts and not fmt.shared_expert:
        raise UnsupportedError(f"{fmt.architecture} has no shared expert (use --format moeconv, or qwen2 sources)")
    if fmt.shared_expert and not shared_experts:
        raise UnsupportedError(f"{fmt.architecture} always has a shared expert: add --shared-experts or use --format moeconv")


def moe_config_dict(fmt: MoeFormat, dense: dict, **moe) -> dict:
    """The target config as a dict: every behavioural key of the dense config carried over, checked."""
    from moeconv.io.transformers_io import config_for
    base = {k: v for k, v in dense.items() if k not in _IGNORED_KEYS}
    base.update(fmt.config(dense, **moe))
    if fmt.name == "qwen2_moe":
        base["qkv_bias"] = True  # Qwen2 attention always has q/k/v biases
    base["architectures"] = [fmt.architecture]
    if "dtype" in dense:
        base["dtype"] = dense["dtype"]
    try:
        cfg = config_for(fmt.target_type, **base)
    except Exception as exc:
        raise UnsupportedError(f"cannot build a {fmt.architecture} config: {exc}") from None
    out = cfg.to_dict()
    # Safety net: every behavioural dense key must survive with the same value.
    for key, val in dense.items():
        if key in _IGNORED_KEYS or key in fmt.must_be:
            continue
        if key not in out:
            if val in (None, False, 0, [], {}):
                continue
            raise UnsupportedError(f"{fmt.architecture} cannot represent {dense.get('model_type')} `{key}={val}` "
                                   "(use --format moeconv)")
        if out[key] != val and (val or out[key]):  # None / 0 / False all mean "off"
            raise UnsupportedError(f"{fmt.architecture} would change `{key}` from {val!r} to {out[key]!r} "
                                   "(use --format moeconv)")
    return out


def rename(fmt: MoeFormat, site_paths: list[str], roles: dict[str, str], name: str) -> str:
    """Name in an upcycled moeconv module (`P.router.weight`, `P.experts.{j}.{rel}.weight`, …) → HF name."""
    for p in site_paths:
        if not name.startswith(p + "."):
            continue
        rest = name[len(p) + 1:]
        target = p.rsplit(".", 1)[0] + "." + fmt.moe_module
        if rest.startswith("router."):
            return f"{target}.{fmt.router}.{rest[len('router.'):]}"
        if rest.startswith("shared_expert_gate."):
            return f"{target}.{rest}"
        for prefix in ("experts.", "shared_expert."):
            if rest.startswith(prefix):
                head = prefix + (rest[len(prefix):].split(".", 1)[0] + "." if prefix == "experts." else "")
                tail = rest[len(head):]
                for role, rel in roles.items():
                    if tail.startswith(rel + "."):
                        new_rel = fmt.experts[role] if prefix == "experts." else _GATED[role]
                        return f"{target}.{head}{new_rel}{tail[len(rel):]}"
        raise UnsupportedError(f"internal: no {fmt.architecture} name for {name}")
    return name


def gated_rename(fmt: MoeFormat, moe_paths: list[str], name: str) -> str:
    """`rename` for the gated experts of linearised native blocks (`gate_proj|up_proj|down_proj`)."""
    return rename(fmt, moe_paths, _GATED, name)


def family_for_config(model_type: str | None) -> MoeFormat | None:
    """The MoE family a model belongs to: native (`mixtral`) or as an upcycling source (`llama`)."""
    for fmt in FAMILIES.values():
        if model_type == fmt.target_type:
            return fmt
    return format_for(model_type)


def native_config_dict(fmt: MoeFormat, config: dict, num_experts: int, top_k: int) -> dict:
    """A native family config with its expert count / top-k updated (after pruning, say)."""
    out = dict(config)
    out["num_local_experts" if fmt.name == "mixtral" else "num_experts"] = num_experts
    out["num_experts_per_tok"] = top_k
    return out


def hf_moe_source(module, fmt: MoeFormat, moe_paths: list[str], target_dtype):
    """The state dict of a model with `MoEBlock`s under the family's names; routers cast to the
    model dtype as the family stores them."""
    from moeconv.formats.writer import module_source

    def cast(name, t):
        return t.to(target_dtype) if t.is_floating_point() and t.dtype != target_dtype else t
    return module_source(module, lambda n: gated_rename(fmt, moe_paths, n), cast)
