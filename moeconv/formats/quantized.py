"""Quantized checkpoints (bitsandbytes layers): written in the format their consumer loads.

- **Dense Hugging Face causal LMs** → the layout transformers itself writes for bitsandbytes
  (`weight`, `weight.absmax`, `weight.quant_map`, [`weight.nested_*`],
  `weight.quant_state.bitsandbytes__nf4|fp4` for 4-bit; `weight`, `SCB`, `weight_format` for int8)
  plus `quantization_config` in config.json, with every linear layer left in float named in
  `llm_int8_skip_modules`. Consumer: `transformers.AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=False)`,
  on any device bitsandbytes runs on (CPU included).
- **Everything else, MoE models in particular** → moeconv's format (`moeconv.formats.native`)
  with a `quantization` section: one record per quantized layer (method, float shape, bias,
  source class, dtypes, block size / threshold) and the same bitsandbytes tensors under the
  layer's own name. Consumer: `moeconv.load(OUT)`. transformers 5.x keeps Mixtral / Qwen-MoE
  experts as fused 3-D parameters that its bitsandbytes integration leaves in float (checked with
  5.23), so no file is written that it would load with float or random experts; `model_type` is
  `moeconv`, which transformers refuses loudly.

Tensors come from each layer's snapshot captured before any forward (`moeconv.nn.quantized`),
never from `state_dict()` of a layer bitsandbytes may have repacked in place.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moeconv.errors import InputError, UnsupportedError
from moeconv.formats.base import Format
from moeconv.formats.hf import is_bitsandbytes_config, read_hf
from moeconv.formats.hf_moe import family_for_config, native_config_dict
from moeconv.formats.native import FORMAT_VERSION, load_moeconv, rebuild_source, site_record
from moeconv.formats.writer import TensorSource, write_checkpoint
from moeconv.io.safetensors_io import TensorSpec
from moeconv.io.transformers_io import causal_lm_class
from moeconv.module_groups import module_tensors
from moeconv.nn.linear_like import in_out_features, is_conv1d, is_linear_like
from moeconv.nn.moe import MoEBlock
from moeconv.nn.quantized import is_quantized_layer, layer_record, method_of, rebuild, serialized_bytes
from moeconv.state import ModelState


def _records(state: ModelState) -> dict[str, dict]:
    return {p: layer_record(m) for p, m in state.module.named_modules() if is_quantized_layer(m)}


class HfBitsandbytes(Format):
    """Dense HF causal LMs in the layout transformers writes for bitsandbytes."""

    name = "hf-bitsandbytes"
    consumer = "transformers"
    hf = True

    def detect(self, path: Path, raw: dict) -> bool:
        return is_bitsandbytes_config(raw) and "moeconv" not in raw

    def read(self, path: Path, raw: dict, *, dtype=None, read_dir=None) -> ModelState:
        return read_hf(path, raw, dtype)

    def why_not(self, state: ModelState) -> str | None:
        records = _records(state)
        return "not quantized" if not records else bnb_hf_obstacle(state, records)

    def write(self, state: ModelState, out_dir: Path, *, shard_bytes: int, on_tensor=None) -> dict:
        source = _tensor_source(state.module)
        stats = write_checkpoint(out_dir, source, bnb_hf_config(state, _records(state)), shard_bytes=shard_bytes,
                                 on_tensor=on_tensor)
        write_generation_config(state.module, out_dir)
        stats.update({"format": "hf-bitsandbytes", "consumer": "transformers",
                      "expected_class": type(state.module).__name__, "notes": source.notes})
        return stats


class MoeconvQuantized(Format):
    """Every other quantized model (MoE models in particular): moeconv's format + bitsandbytes layers."""

    name = "moeconv-quantized"
    consumer = "moeconv"

    def detect(self, path: Path, raw: dict) -> bool:
        return isinstance(raw.get("moeconv"), dict) and "quantization" in raw["moeconv"]

    def read(self, path: Path, raw: dict, *, dtype=None, read_dir=None) -> ModelState:
        return load_quantized(path, raw, dtype=dtype)

    def why_not(self, state: ModelState) -> str | None:
        return None if _records(state) else "not quantized"

    def write(self, state: ModelState, out_dir: Path, *, shard_bytes: int, on_tensor=None) -> dict:
        records = _records(state)
        source = _tensor_source(state.module)
        stats = write_checkpoint(out_dir, source, moeconv_quantized_config(state, records), shard_bytes=shard_bytes,
                                 on_tensor=on_tensor)
        why_not_hf = bnb_hf_obstacle(state, records)
        stats.update({"format": "moeconv-quantized", "consumer": "moeconv", "notes": source.notes + [
            f"moeconv format, loaded with moeconv.load: {why_not_hf}"]})
        return stats


# ---------------------------------------------------------------------------------- writing

def _tensor_source(model: nn.Module) -> TensorSource:
    """Every tensor of the model under its state-dict name, quantized layers from their
    snapshots; a tensor shared by two modules (tied embeddings) is written once."""
    seen: dict[tuple, str] = {}
    tensors, specs, notes = {}, [], []
    for path, m in model.named_modules(remove_duplicate=False):
        for rel, t in module_tensors(m).items():
            name = f"{path}.{rel}" if path else rel
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if t.numel() and key in seen:
                if seen[key] != name:
                    notes.append(f"{name} is tied to {seen[key]}: written once")
                continue
            seen[key] = name
            tensors[name] = t
            specs.append(TensorSpec(name, t.dtype, tuple(t.shape)))
    return TensorSource(specs, lambda s: tensors[s.name], notes)


def bnb_hf_obstacle(state: ModelState, records: dict[str, dict]) -> str | None:
    """Why stock transformers cannot load this quantized model as it is, or None if it can."""
    model, config = state.module, state.config
    if state.moe_blocks() or any(isinstance(m, MoEBlock) for m in model.modules()):
        return ("transformers 5.x keeps MoE experts as fused 3-D tensors that its bitsandbytes "
                "integration leaves in float")
    if config is None or not hasattr(model, "save_pretrained"):
        return "not a Hugging Face model"
    try:
        cls = causal_lm_class(config)
    except (KeyError, ImportError):
        cls = None
    if cls is not type(model):
        return f"{type(model).__name__} is not what AutoModelForCausalLM builds for {config.model_type!r}"
    settings = {(r["method"], r.get("compute_dtype"), r.get("int8_threshold")) for r in records.values()}
    if len(settings) != 1:
        return "layers use different quantization settings; one quantization_config cannot describe them"
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if keep_fp32:
        from transformers.quantizers.quantizers_utils import should_convert_module
        clash = [p for p in records if not should_convert_module(p, keep_fp32)]
        if clash:
            return f"{clash[0]} is kept in fp32 by {type(model).__name__}"
    return None


def bnb_hf_config(state: ModelState, records: dict[str, dict]) -> dict:
    from transformers import BitsAndBytesConfig
    model = state.module
    rec = next(iter(records.values()))
    skip = [p for p, m in model.named_modules() if (type(m) is nn.Linear or is_conv1d(m)) and p not in records]
    if rec["method"] == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=rec["int8_threshold"],
                                 llm_int8_skip_modules=skip)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=rec["method"],
                                 bnb_4bit_use_double_quant=bool(rec.get("double_quant")),
                                 bnb_4bit_compute_dtype=getattr(torch, rec.get("compute_dtype") or "float32"),
                                 llm_int8_skip_modules=skip)
    qc = bnb.to_dict()
    qc["quant_method"] = "bitsandbytes"
    config = state.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = qc
    config["dtype"] = _float_dtype(model)
    return config


def moeconv_quantized_config(state: ModelState, records: dict[str, dict]) -> dict:
    from moeconv.nn.quantized import _bnb
    from moeconv.version import __version__
    bitsandbytes = _bnb()
    sites = []
    native_counts = set()
    for path, m in state.module.named_modules():
        if not isinstance(m, MoEBlock):
            continue
        if getattr(m, "source_site", None) is not None:  # upcycled by moeconv: rebuilt at its FFN site
            sites.append(site_record(path, m))
        elif getattr(m, "native_class", None):  # a family's own block: rebuilt by linearising it
            native_counts.add((m.num_experts, m.top_k))
        else:
            raise UnsupportedError(f"{path}: MoE block of unknown origin cannot be saved")
    cfg = None
    if state.config is not None and hasattr(state.config, "to_dict"):
        cfg = state.config.to_dict()
        cfg.pop("quantization_config", None)
        if native_counts:
            family = family_for_config(cfg.get("model_type"))
            if family is None or len(native_counts) != 1:
                raise UnsupportedError(f"cannot describe MoE layers {sorted(native_counts)} in a "
                                       f"{cfg.get('model_type')} config")
            (n, k), = native_counts
            cfg = native_config_dict(family, cfg, n, k)
    quant = {"library": "bitsandbytes", "bitsandbytes_version": bitsandbytes.__version__,
             "moeconv_version": __version__, "methods": sorted({r["method"] for r in records.values()}),
             "layers": records}
    return {"model_type": "moeconv", "architectures": ["MoeconvModel"],
            "moeconv": {"format_version": FORMAT_VERSION, "source": rebuild_source(state, cfg), "sites": sites,
                        "quantization": quant}}


def _float_dtype(model: nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).replace("torch.", "")
    return "float32"


def write_generation_config(model: nn.Module, out_dir: Path) -> None:
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        try:
            gen.save_pretrained(out_dir)
        except Exception:  # optional file: the model loads without it
            pass


# ---------------------------------------------------------------------------------- reading

def load_quantized(path: Path, raw: dict, *, dtype=None) -> ModelState:
    """Rebuild a quantized moeconv-format directory: the float architecture (MoE blocks included),
    then each recorded layer as the bitsandbytes layer it was; every tensor is used exactly once."""
    quantization = raw["moeconv"].get("quantization")
    layers = quantization.get("layers") if isinstance(quantization, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise InputError(f"{path / 'config.json'}: quantization section without layers")
    for lp, rec in layers.items():
        try:
            int(rec["in_features"]), int(rec["out_features"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path / 'config.json'}: quantized layer {lp} needs integer in_features and "
                             "out_features") from None

    def rebuild_layer(model: nn.Module, lp: str, rec: dict, tensors: dict) -> nn.Module:
        try:
            old = model.get_submodule(lp)
        except AttributeError:
            raise InputError(f"{path}: quantized layer {lp} does not exist in the rebuilt model") from None
        want = (int(rec["in_features"]), int(rec["out_features"]))
        if not is_linear_like(old) or in_out_features(old) != want:
            raise InputError(f"{path}: quantized layer {lp} does not match the rebuilt model's {type(old).__name__}")
        return rebuild(rec, tensors, where=f"{path}: {lp}")
    return load_moeconv(path, raw, dtype=dtype, quantized=layers, rebuild_layer=rebuild_layer)


def quantized_summary(module: nn.Module, groups: dict[str, str] | None = None) -> list[dict]:
    """Per quantized layer: path, module group, method, float shape (out, in), stored bytes
    (for `moeconv inspect`)."""
    out = []
    for p, m in module.named_modules():
        if is_quantized_layer(m):
            out.append({"path": p, "group": (groups or {}).get(p), "method": method_of(m),
                        "shape": [m.out_features, m.in_features], "bytes": serialized_bytes(m)})
    return out
