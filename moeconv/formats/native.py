"""moeconv's own checkpoint format, for every model no HF MoE family can represent.

Layout: an HF-style directory, so the usual tools can read the weights:
- `config.json`: `{"model_type": "moeconv", "architectures": ["MoeconvModel"], "moeconv": {...}}`.
  `model_type` is deliberately unknown to transformers: `AutoModel` refuses the directory loudly
  instead of loading the dense source class with randomly initialised FFNs.
  The `moeconv` section holds `format_version`, `source` (how to rebuild the source
  architecture: `{"kind": "hf", "config": {...}}`, `{"kind": "spec", "spec": "builtin:gpt"}` or a
  `FILE.py:factory` spec) and `sites` (each MoE layer: the `FfnSite` it replaced, experts, top-k,
  renormalisation, router bias, shared expert).
- `model.safetensors` or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`:
  the upcycled module's state dict under its own names (routers in fp32).

`load_moeconv` rebuilds the source architecture, swaps in `MoEBlock`s at the recorded sites and
loads every tensor strictly: a tensor missing or left over is an error, never a random init. The
quantized variant (`moeconv.formats.quantized`) is read by the same function, given its layers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moeconv.errors import InputError, UnsupportedError
from moeconv.formats.base import Format
from moeconv.formats.writer import module_source, write_checkpoint
from moeconv.io.config_checks import check_config_values, check_fits_memory, check_layers_present, estimate_parameters
from moeconv.io.safetensors_io import SourceCheckpoint, TensorSpec
from moeconv.io.specs import load_spec, may_run_spec
from moeconv.io.transformers_io import config_for, model_class
from moeconv.nn.linear_like import is_conv1d
from moeconv.nn.moe import MoEBlock, RoutingConfig
from moeconv.nn.native_moe import linearise_native_moe
from moeconv.patterns import FfnSite
from moeconv.sites import build_expert, expert_rel_names, replace_site, role_paths
from moeconv.state import ModelState, SourceInfo

FORMAT_VERSION = 1


class Moeconv(Format):
    name = "moeconv"
    consumer = "moeconv"

    def detect(self, path: Path, raw: dict) -> bool:
        return "moeconv" in raw and not (isinstance(raw["moeconv"], dict) and "quantization" in raw["moeconv"])

    def read(self, path: Path, raw: dict, *, dtype=None, read_dir=None) -> ModelState:
        return load_moeconv(path, raw, dtype=dtype)

    def why_not(self, state: ModelState) -> str | None:
        if "quantized" in state.facts():
            return "quantized models are written by the quantized formats"
        return None

    def write(self, state: ModelState, out_dir: Path, *, shard_bytes: int, on_tensor=None) -> dict:
        stats = save_moeconv(state, out_dir, shard_bytes=shard_bytes, on_tensor=on_tensor)
        stats.update({"format": "moeconv", "consumer": "moeconv"})
        return stats


def site_record(path: str, m: MoEBlock) -> dict:
    """One MoE layer of the `sites` section: the FFN site it replaced and its routing."""
    site = getattr(m, "source_site", None)
    if site is None:
        raise UnsupportedError(f"{path}: MoE block without a recorded source site cannot be saved")
    return {"site": site.to_dict(), "num_experts": m.num_experts, "top_k": m.top_k,
            "renormalize": m.renormalize, "router_bias": m.router.bias is not None,
            "shared_expert": m.shared_expert is not None,
            "shared_expert_gate": m.shared_expert_gate is not None}


def site_records(module: torch.nn.Module) -> list[dict]:
    """The `sites` section for every `MoEBlock` of `module` that came from an FFN site."""
    return [site_record(path, m) for path, m in module.named_modules() if isinstance(m, MoEBlock)]


def rebuild_source(state: ModelState, config: dict | None = None) -> dict:
    """How `load_moeconv` rebuilds the source architecture: its HF config (`config`, when given,
    replaces the state's) or the spec it was built from."""
    if config is not None or (state.config is not None and hasattr(state.config, "to_dict")):
        return {"kind": "hf", "config": config if config is not None else state.config.to_dict()}
    if state.source.spec:
        return {"kind": "spec", "spec": state.source.spec}
    raise UnsupportedError("this model was built in memory; moeconv format needs a rebuildable source "
                           "(a checkpoint, builtin:NAME or FILE.py:factory)")


def native_config(state: ModelState) -> dict:
    return {"model_type": "moeconv", "architectures": ["MoeconvModel"],
            "moeconv": {"format_version": FORMAT_VERSION, "source": rebuild_source(state),
                        "sites": site_records(state.module)}}


def _base_model(path: Path, source: dict):
    if not isinstance(source, dict):
        raise InputError(f"{path / 'config.json'}: moeconv.source must be an object")
    kind = source.get("kind")
    if kind == "hf":
        if not isinstance(source.get("config"), dict):
            raise InputError(f"{path / 'config.json'}: moeconv.source.config must be an object")
        cfg_dict = dict(source["config"])
        model_type = cfg_dict.pop("model_type", None)
        from transformers import CONFIG_MAPPING
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise UnsupportedError(f"{path / 'config.json'}: unsupported source model_type {model_type!r}")
        try:
            config = config_for(model_type, **cfg_dict)
            model = model_class(config)(config)
        except Exception as exc:
            raise InputError(f"{path}: cannot rebuild source model {model_type!r} "
                             f"({' '.join(str(exc).split())[:200]})") from None
        return model, config, SourceInfo("moeconv", path, tokenizer_dir=path)
    if kind == "spec":
        spec = source.get("spec")
        if not isinstance(spec, str):
            raise InputError(f"{path / 'config.json'}: moeconv.source.spec must be a string")
        if not may_run_spec(spec):
            raise UnsupportedError(f"{path / 'config.json'}: rebuilding this model would run the Python file "
                                   f"{spec.rsplit(':', 1)[0]}; a checkpoint never makes moeconv run code",
                                   hint="if you trust that file, set MOECONV_TRUST_CODE=1")
        state = load_spec(spec)
        return state.module, None, SourceInfo("moeconv", path, tokenizer_dir=path, spec=source["spec"])
    raise InputError(f"{path / 'config.json'}: unknown moeconv source kind {kind!r}")


def load_moeconv(path: Path, raw: dict, *, dtype=None, quantized: dict[str, dict] | None = None,
                 rebuild_layer=None) -> ModelState:
    """Rebuild a moeconv-format directory. With `quantized` (layer path → record) and
    `rebuild_layer(model, path, record, tensors) -> nn.Module`, those layers are rebuilt from their
    own tensors after the float model is loaded (the quantized variant); every tensor is used
    exactly once."""
    section = raw["moeconv"]
    if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path / 'config.json'}: unsupported moeconv format version")
    ckpt = SourceCheckpoint(path)  # headers only: the checks below come before anything is built
    _check_source_size(path, section.get("source"), ckpt)
    model, config, info = _base_model(path, section.get("source") or {})
    layers = quantized or {}
    if layers:
        linearise_native_moe(model)  # a family's own MoE blocks: their expert layers get paths
    specs = _float_specs(ckpt, layers)
    check_float_weights(path, specs)  # quantized weights appear at their float dtype here
    for rec in site_list(path, section):
        try:
            _install_block(model, FfnSite(**rec["site"]), rec, ckpt.path, specs)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{path / 'config.json'}: bad site record ({exc.__class__.__name__}: {exc})") from None
    owned = _owned_tensors(ckpt.names(), layers)
    quantized_names = {n for d in owned.values() for n in d.values()}
    check_shapes(path, model, {n: spec for n, spec in ckpt.specs.items() if n not in quantized_names})
    floats = {n: ckpt.get(n) for n in ckpt.names() if n not in quantized_names}
    # The float format copies into the built model (its dtype); the quantized one keeps the stored dtypes.
    result = model.load_state_dict(floats, strict=False, assign=bool(layers))
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied and not any(k.startswith(lp + ".") for lp in layers)]
    if missing or result.unexpected_keys:
        raise InputError(f"{path}: weights do not match the recorded model "
                         f"(missing {missing[:2]}, unexpected {result.unexpected_keys[:2]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for lp, rec in layers.items():
        tensors = {rel: ckpt.get(name) for rel, name in owned.get(lp, {}).items()}
        model.set_submodule(lp, rebuild_layer(model, lp, rec, tensors))
    if dtype is not None:
        model = model.to(dtype)
    return ModelState(model.eval(), config, info)


def _float_specs(ckpt: SourceCheckpoint, layers: dict[str, dict]) -> dict[str, TensorSpec]:
    """The checkpoint's specs with quantized weights shown at their float shape and dtype, so the
    MoE blocks of an upcycled model are rebuilt exactly as for an unquantized checkpoint."""
    specs = dict(ckpt.specs)
    for path, rec in layers.items():
        shape = (int(rec["out_features"]), int(rec["in_features"]))
        if rec.get("source_class") == "Conv1D":
            shape = shape[::-1]
        dtype = getattr(torch, rec.get("weight_dtype") or "float32")
        specs[f"{path}.weight"] = TensorSpec(f"{path}.weight", dtype, shape)
    return specs


def _owned_tensors(names, layers: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Quantized layer path → {name relative to the layer: stored name} of the tensors it owns."""
    owned: dict[str, dict[str, str]] = {}
    for name in names:
        parts = name.split(".")
        owner = next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if p in layers), None)
        if owner is not None:
            owned.setdefault(owner, {})[name[len(owner) + 1:]] = name
    return owned


def _check_source_size(path: Path, source, ckpt: SourceCheckpoint) -> None:
    """The recorded source config's sizes, its layer count against the weights, and the weights'
    bytes against free memory: refused before the source model is built."""
    config = source.get("config") if isinstance(source, dict) else None
    built = 0
    if isinstance(config, dict):
        check_config_values(path / "config.json", config)
        check_layers_present(path / "config.json", config, ckpt.specs)
        built = 4 * estimate_parameters(config)  # the source architecture is built in float32 first
    check_fits_memory(path, built + sum(s.nbytes for s in ckpt.specs.values()),
                      "its weights and the model they are loaded into")


def site_list(path: Path, section: dict) -> list[dict]:
    sites = section.get("sites", [])
    if not isinstance(sites, list) or not all(isinstance(r, dict) for r in sites):
        raise InputError(f"{path / 'config.json'}: moeconv.sites must be a list of objects")
    return sites


def check_float_weights(path: Path, specs: dict) -> None:
    """Before any tensor is built from the specs: weights and biases are floating point."""
    for spec in specs.values():
        if spec.name.endswith((".weight", ".bias")) and not spec.dtype.is_floating_point:
            raise InputError(f"{path}: tensor {spec.name} is {spec.dtype}, expected a floating-point weight")


def check_shapes(path: Path, model, specs: dict) -> None:
    """Every stored tensor the rebuilt model holds has the model's shape (load_state_dict would
    raise a multi-line RuntimeError)."""
    expected = model.state_dict()
    for name, spec in sorted(specs.items()):
        if name in expected and tuple(expected[name].shape) != tuple(spec.shape):
            raise InputError(f"{path}: tensor {name} has shape {list(spec.shape)}, the recorded model implies "
                             f"{list(expected[name].shape)}")


def _tied_names(model) -> set[str]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = set()
    for group in names.values():
        tied.update(group[1:])
    tied_keys = getattr(model, "_tied_weights_keys", None) or []
    tied.update(tied_keys if isinstance(tied_keys, (list, set, tuple)) else tied_keys.keys())
    return tied


def _install_block(model, site: FfnSite, rec: dict, where: Path, specs: dict[str, TensorSpec]) -> None:
    rel = expert_rel_names(site)
    paths = role_paths(site)

    # An expert may be narrower than the FFN it came from (fine-grained split): only the hidden side
    # of each projection must match the recorded site's.
    widths = {site.intermediate_size, 2 * site.intermediate_size}

    def tensors(prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for role, r in rel.items():
            spec = specs[f"{site.path}.{prefix}.{r}.weight"]
            dense = model.get_submodule(paths[role])
            shape = spec.shape[::-1] if is_conv1d(dense) else spec.shape
            got, want = tuple(spec.shape), tuple(dense.weight.shape)  # both in the module's own layout
            if len(got) != len(want) or any(g != w and w not in widths for g, w in zip(got, want)):
                raise InputError(f"{where}: tensor {spec.name} has shape {list(got)}, the recorded FFN "
                                 f"{site.path} implies {list(want)} (up to the expert width)")
            out[role] = torch.empty(shape, dtype=spec.dtype)
            b = specs.get(f"{site.path}.{prefix}.{r}.bias")
            if b is not None:
                out[f"{role}.bias"] = torch.empty(b.shape, dtype=b.dtype)
        return out

    n = int(rec["num_experts"])
    experts = [build_expert(model, site, tensors(f"experts.{e}")) for e in range(n)]
    shared = build_expert(model, site, tensors("shared_expert")) if rec.get("shared_expert") else None
    block = MoEBlock(experts, site.hidden_size, RoutingConfig(int(rec["top_k"]), bool(rec["renormalize"])),
                     router_bias=bool(rec.get("router_bias")), shared_expert=shared,
                     shared_expert_gate=bool(rec.get("shared_expert_gate")))
    block.source_site = site
    replace_site(model, site, block)


def save_moeconv(state: ModelState, out_dir: Path, *, shard_bytes: int, on_tensor=None) -> dict:
    config = native_config(state)
    source = module_source(state.module)
    stats = write_checkpoint(out_dir, source, config, shard_bytes=shard_bytes, on_tensor=on_tensor)
    stats["notes"] = source.notes
    return stats
