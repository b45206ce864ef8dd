"""Hugging Face checkpoint directories, read and written the way transformers does.

Read (`read_hf`, shared by the three HF formats): `config.json` + safetensors (sharded or not) or
a `pytorch_model.bin` read with `torch.load(weights_only=True)`, through transformers with
`trust_remote_code=False` (`moeconv.io.transformers_io`); shapes, dtypes, layer counts and memory
are checked from the headers before any weight is read, and every tensor must be used.

Written:
- `HfDense`: a dense HF model, `save_pretrained` (consumer: transformers, the same class).
- `HfMoe`: a model with `MoEBlock`s as its HF MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE; native
  or upcycled from Llama/Mistral/Qwen2/Qwen3), streamed tensor by tensor with the per-expert names
  `save_pretrained` writes (`moeconv.formats.hf_moe`); refused with the reason when the family
  cannot represent the model exactly.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from moeconv.calibrate import decoder_layers
from moeconv.errors import InputError, MoeconvError, UnsupportedError
from moeconv.formats.base import Format
from moeconv.formats.hf_moe import (FAMILIES, check_representable, family_for_config, hf_moe_source, moe_config_dict,
                                    native_config_dict)
from moeconv.formats.writer import write_checkpoint
from moeconv.io.config_checks import check_config_values, check_fits_memory, check_layers_present, estimate_parameters
from moeconv.io.safetensors_io import TensorSpec, validate_checkpoint
from moeconv.io.transformers_io import load_model, model_class, read_config, refuse_custom_code
from moeconv.nn.moe import MoEBlock
from moeconv.nn.native_moe import linearise_native_moe
from moeconv.state import ModelState, SourceInfo


def is_bitsandbytes_config(raw: dict) -> bool:
    qc = raw.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes"


def plain_hf_config(raw: dict) -> bool:
    """A config.json transformers reads as it is: no moeconv section, not bitsandbytes."""
    return not ({"moeconv", "moeconv_sparse"} & set(raw)) and not is_bitsandbytes_config(raw)


def has_moe_blocks(state: ModelState) -> bool:
    return any(isinstance(m, MoEBlock) for m in state.module.modules())


class HfMoe(Format):
    name = "hf-moe"
    consumer = "transformers"
    hf = True

    def detect(self, path: Path, raw: dict) -> bool:
        return plain_hf_config(raw) and raw.get("model_type") in {f.target_type for f in FAMILIES.values()}

    def read(self, path: Path, raw: dict, *, dtype=None, read_dir=None) -> ModelState:
        return read_hf(path, raw, dtype)

    def why_not(self, state: ModelState) -> str | None:
        if "quantized" in state.facts():
            return "quantized models are written by the quantized formats"
        if not has_moe_blocks(state):
            return "no MoE layers"
        if family_for_config(getattr(state.config, "model_type", None)) is None:
            return f"no Hugging Face MoE family for {getattr(state.config, 'model_type', None) or type(state.module).__name__}"
        try:
            hf_moe_config(state)
        except UnsupportedError as exc:
            return str(exc)
        return None

    def write(self, state: ModelState, out_dir: Path, *, shard_bytes: int, on_tensor=None) -> dict:
        config = hf_moe_config(state)
        family = family_for_config(config.get("model_type"))
        blocks = [p for p, m in state.module.named_modules() if isinstance(m, MoEBlock)]
        floats = [p.dtype for p in state.module.parameters() if p.is_floating_point() and p.dtype != torch.float32]
        source = hf_moe_source(state.module, family, blocks, floats[0] if floats else torch.float32)
        stats = write_checkpoint(out_dir, source, config, shard_bytes=shard_bytes, on_tensor=on_tensor)
        stats.update({"format": family.name, "consumer": "transformers", "expected_class": family.architecture,
                      "notes": source.notes})
        return stats


class HfDense(Format):
    name = "hf"
    consumer = "transformers"
    hf = True

    def detect(self, path: Path, raw: dict) -> bool:
        # Every config no other format claims (an unknown model_type is refused by `hf_config`).
        return plain_hf_config(raw) and not HfMoe().detect(path, raw)

    def read(self, path: Path, raw: dict, *, dtype=None, read_dir=None) -> ModelState:
        return read_hf(path, raw, dtype)

    def why_not(self, state: ModelState) -> str | None:
        if "quantized" in state.facts():
            return "quantized models are written by the quantized formats"
        if has_moe_blocks(state):
            return "has MoE layers"
        if state.config is None or not hasattr(state.module, "save_pretrained"):
            return f"no Hugging Face layout for this model ({type(state.module).__name__})"
        return None

    def write(self, state: ModelState, out_dir: Path, *, shard_bytes: int, on_tensor=None) -> dict:
        state.module.save_pretrained(out_dir, max_shard_size=shard_bytes)
        return {"format": "hf", "consumer": "transformers", "expected_class": type(state.module).__name__}


def hf_moe_config(state: ModelState) -> dict:
    """The family config for a model with `MoEBlock`s: a native family (after pruning, say) or an
    upcycled dense source (Llama → Mixtral …). Raises `UnsupportedError` with the reason when the
    family cannot represent the model exactly."""
    config = state.config.to_dict()
    family = family_for_config(config.get("model_type"))
    blocks = [(p, m) for p, m in state.module.named_modules() if isinstance(m, MoEBlock)]
    counts = {(m.num_experts, m.top_k) for _, m in blocks}
    if len(counts) != 1:
        raise UnsupportedError(f"{family.architecture} needs the same number of experts and top-k in every layer; "
                               f"found {sorted(counts)} (use --format moeconv)")
    (n, k), = counts
    if config.get("model_type") == family.target_type:
        return native_config_dict(family, config, n, k)
    sites = [m.source_site for _, m in blocks if getattr(m, "source_site", None) is not None]
    if len(sites) != len(blocks):
        raise UnsupportedError("MoE layers without a recorded source FFN cannot be written as an HF family")
    prefix, layers = decoder_layers(state.module)
    converted = {int(p[len(prefix) + 1:].split(".")[0]) for p, _ in blocks}
    first = blocks[0][1]
    shared = first.shared_expert is not None
    renorm = all(m.renormalize for _, m in blocks)
    check_representable(family, config, layers_selected=len(converted), layers_total=len(layers),
                        renormalize=renorm, top_k=k, num_experts=n,
                        router_bias=any(m.router.bias is not None for _, m in blocks),
                        shared_experts=shared, kinds={s.kind for s in sites})
    if shared and not all(m.shared_expert_gate is not None for _, m in blocks):
        raise UnsupportedError(f"{family.architecture} shared experts are sigmoid-gated")
    expert_inter = int(first.experts[0].down_proj.in_features)
    shared_inter = int(first.shared_expert.down_proj.in_features) if shared else None
    return moe_config_dict(family, config, num_experts=n, top_k=k, expert_intermediate=expert_inter,
                           dense_layers=[i for i in range(len(layers)) if i not in converted],
                           renormalize=renorm, shared_intermediate=shared_inter)


def hf_config(path: Path, raw: dict):
    if "model_type" not in raw:
        raise InputError(f"{path / 'config.json'}: no model_type")
    if not isinstance(raw["model_type"], str):
        raise InputError(f"{path / 'config.json'}: model_type must be a string")
    from transformers import CONFIG_MAPPING
    if raw["model_type"] not in CONFIG_MAPPING:
        refuse_custom_code(path)  # says "custom code" where that is why the type is unknown
        raise UnsupportedError(f"{path / 'config.json'}: unsupported model_type {raw['model_type']!r}")
    check_config_values(path / "config.json", raw)
    try:
        return read_config(path)
    except MoeconvError:
        raise
    except Exception as exc:  # transformers validates fields with several exception types
        raise InputError(f"{path / 'config.json'}: invalid {raw['model_type']} config "
                         f"({' '.join(str(exc).split())[:160]})") from None


def read_hf(path: Path, raw: dict, dtype) -> ModelState:
    """A Hugging Face checkpoint directory through transformers (safetensors or a weights-only
    `pytorch_model.bin`); native fused MoE experts become per-expert `nn.Linear` (exact)."""
    config = hf_config(path, raw)
    try:
        cls = model_class(config)
    except KeyError:
        raise UnsupportedError(f"{path}: no model class for model_type {config.model_type!r}") from None
    has_st = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if has_st:
        ckpt = validate_checkpoint(path)
        check_layers_present(path / "config.json", raw, ckpt.specs)
        check_fits_memory(path, sum(s.nbytes for s in ckpt.specs.values()))
        quantized = "quantization_config" in raw  # bitsandbytes checkpoints store int8 / uint8 weights
        for spec in ckpt.specs.values():
            if spec.name.endswith((".weight", ".bias")) and not spec.dtype.is_floating_point and not quantized:
                raise InputError(f"{path}: tensor {spec.name} is {spec.dtype}, expected a floating-point weight")
        if not quantized:  # bitsandbytes stores packed shapes
            _check_shapes(path, cls, config, ckpt.specs)
        try:
            model, info = load_model(cls, path, dtype=dtype or "auto", output_loading_info=True)
        except MoeconvError:
            raise
        except Exception as exc:
            text = " ".join(str(exc).split())
            if "ignore_mismatched_sizes" in text or "CONVERSION" in text:  # its details went to a log report
                raise InputError(f"{path}: tensor shapes do not match config.json (transformers could not load "
                                 "them; check hidden_size, intermediate_size and the expert counts)") from None
            raise InputError(f"{path}: failed to load ({exc.__class__.__name__}: {text[:200]})") from None
        _check_loading_info(path, info)
        if not quantized:
            _own_memory(model)
    elif (path / "pytorch_model.bin").is_file():
        model = _load_bin(path, cls, config, raw, dtype)
    else:
        raise InputError(f"{path}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
    linearised = linearise_native_moe(model)  # fused 3-D experts → per-expert nn.Linear (exact)
    state = ModelState(model.eval(), model.config, SourceInfo("hf", path, tokenizer_dir=path))
    if linearised:
        state.artifacts["linearised_moe"] = linearised
    return state


def _check_shapes(path: Path, cls, config, specs: dict) -> None:
    """Name the first tensor whose shape disagrees with the config, before any weight is read
    (transformers would only say "ignore_mismatched_sizes is False"). Compared on a meta-device
    instance, so it costs no memory; names the class renames on load are left to its own check."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    except Exception:  # a class that cannot be built on meta: from_pretrained still checks
        return
    hidden = getattr(config, "hidden_size", None)
    width = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", None)
    for name in sorted(specs):
        want = expected.get(name)
        if want is None and isinstance(hidden, int) and isinstance(width, int):
            want = _expert_shape(name, hidden, width)  # per-expert names transformers fuses on load
        if want is not None and want != tuple(specs[name].shape):
            raise InputError(f"{path}: tensor {name} has shape {list(specs[name].shape)}, the config implies "
                             f"{list(want)}")


_EXPERT_IN = re.compile(r"\.experts\.\d+\.(w1|w3|gate_proj|up_proj)\.weight$")
_EXPERT_OUT = re.compile(r"\.experts\.\d+\.(w2|down_proj)\.weight$")


def _expert_shape(name: str, hidden: int, width: int) -> tuple[int, int] | None:
    """Shape of a routed expert's projection stored one expert at a time (Mixtral w1/w2/w3,
    Qwen-MoE gate/up/down_proj): [expert width, hidden] in, [hidden, expert width] out."""
    if _EXPERT_IN.search(name):
        return (width, hidden)
    if _EXPERT_OUT.search(name):
        return (hidden, width)
    return None


@torch.no_grad()
def _own_memory(model: torch.nn.Module) -> None:
    """transformers leaves some parameters as views of the memory-mapped safetensors file; one
    such view keeps the whole mapping, and every page read so far counts as this process's RSS
    (SmolLM2 as a 4-expert MoE: 1.5 GB of file pages next to 1.5 GB of weights). Copy each
    parameter once, one at a time, so the mapping is released."""
    for p in model.parameters():
        p.data = p.data.clone()


def _check_loading_info(path: Path, info: dict) -> None:
    # No weight is lost silently: a key the class does not expect, or one it had to invent, is fatal.
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise InputError(f"{path}: weights do not match the config: " + ", ".join(parts))


def _load_bin(path: Path, cls, config, raw: dict, dtype):
    bin_path = path / "pytorch_model.bin"
    check_fits_memory(bin_path, bin_path.stat().st_size, "its contents")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing: one line only
            warnings.simplefilter("ignore")
            state_dict = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path / 'pytorch_model.bin'}: refused or unreadable: only plain tensors are loaded, "
                         f"never code ({_unpickler_reason(exc)})") from None
    state_dict = _plain_state_dict(bin_path, state_dict)
    check_layers_present(path / "config.json", raw, state_dict)
    specs = {k: TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state_dict.items()}
    _check_shapes(path, cls, config, specs)  # on meta: a config that disagrees costs nothing to refuse
    held = sum(s.nbytes for s in specs.values())
    check_fits_memory(path, held + 4 * estimate_parameters(raw), "its tensors and the model the config describes")
    state_dict = _own_contiguous(state_dict)
    # Built on CPU, not meta: non-persistent buffers (rotary inv_freq, position ids) are not in
    # the state dict and must come from the constructor.
    model = cls(config)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    _check_loading_info(path, {"missing_keys": missing, "unexpected_keys": result.unexpected_keys})
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model


def _plain_state_dict(path: Path, state_dict) -> dict:
    """`state_dict` if it is a `{str: dense tensor}` mapping with floating-point weights, else
    `InputError` naming the first entry that is not (weights_only admits any container of plain
    values: lists, ints, strings, sparse tensors)."""
    if not isinstance(state_dict, dict):
        raise InputError(f"{path}: not a state dict (a {type(state_dict).__name__})")
    plain = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise InputError(f"{path}: key {str(name)[:40]!r} is not a tensor name")
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: {name[:80]} is a {type(value).__name__}, not a tensor")
        if name.endswith((".weight", ".bias")) and not value.is_floating_point():
            raise InputError(f"{path}: tensor {name} is {value.dtype}, expected a floating-point weight")
        if value.is_sparse or value.layout != torch.strided:
            raise InputError(f"{path}: tensor {name} is not a dense tensor ({value.layout})")
        plain[name] = value
    return plain


def _own_contiguous(state_dict: dict) -> dict:
    """Each tensor in memory of its own (an expanded stride-0 view would fail in-place writes);
    called after the shapes were checked, so a huge expanded view is never materialised."""
    return {k: v if v.is_contiguous() and 0 not in v.stride() else v.clone(memory_format=torch.contiguous_format)
            for k, v in state_dict.items()}


def _unpickler_reason(exc: Exception) -> str:
    """The useful part of torch's weights-only refusal (its message is a paragraph of advice)."""
    text = " ".join(str(exc).split())
    m = re.search(r"trusted source\.\s*(.+?)\s*(?:Check the documentation|$)", text)
    if not m:
        return f"{exc.__class__.__name__}: {text}"[:160]
    return re.sub(r"^Please file an issue.*?WeightsUnpickler error:\s*", "", m.group(1))[:160]


