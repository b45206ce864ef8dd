"""`load()`: any supported source → `ModelState`. Never contacts a hub.

Sources: a Hugging Face checkpoint directory (`config.json` + `model.safetensors`, sharded with
`model.safetensors.index.json`, or `pytorch_model.bin` read with `torch.load(weights_only=True)`),
a moeconv-format directory (`config.json` with a `moeconv` section), a GGUF file (via
transformers' `gguf_file=`, dequantized to float), `builtin:gpt|llama|bert`, a `FILE.py:factory`
that returns a module, or an in-memory `nn.Module`.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch
from torch import nn

from moeconv.errors import InputError, MoeconvError, UnsupportedError
from moeconv.io.json_files import read_json_object
from moeconv.io.config_checks import check_config_values, check_fits_memory, check_layers_present, estimate_parameters
from moeconv.io.safetensors_io import TensorSpec
from moeconv.io.transformers_io import load_causal_lm, load_model, model_class, read_config, refuse_custom_code
from moeconv.state import ModelState, SourceInfo

BUILTINS = ("gpt", "llama", "bert")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "generation_config.json", "chat_template.jinja", "added_tokens.json")


# `FILE.py:factory` specs the user named in this process (trusted: they chose to run that file).
# A moeconv-format checkpoint built from one records the spec; loading it in another process runs
# the file only with MOECONV_TRUST_CODE=1, since a checkpoint must never make moeconv run code.
TRUSTED_SPECS: set[str] = set()


def trust_code_default() -> bool:
    return os.environ.get("MOECONV_TRUST_CODE", "") == "1"


def may_run_spec(spec: str) -> bool:
    """Whether loading `spec` recorded in a checkpoint may run code: built-in models always; a
    `FILE.py:factory` only when the user named it in this process or set MOECONV_TRUST_CODE=1."""
    return spec.startswith("builtin:") or spec in TRUSTED_SPECS or trust_code_default()


def allow_nonfinite_default() -> bool:
    return os.environ.get("MOECONV_ALLOW_NONFINITE", "") == "1"


def check_finite(state: ModelState, allow: bool | None = None) -> ModelState:
    """Refuse (or, when allowed, warn about) NaN/Inf weights: converting them only spreads them."""
    allow = allow_nonfinite_default() if allow is None else allow
    where = f"{state.source.path}: " if state.source.path is not None else ""
    for name, t in list(state.module.named_parameters()) + list(state.module.named_buffers()):
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            if not allow:
                raise InputError(f"{where}weight {name} contains NaN or Inf (pass --allow-nonfinite to convert anyway)")
            state.artifacts.setdefault("warnings", []).append(f"weight {name} contains NaN or Inf")
    return state


def load(source, *, dtype: torch.dtype | None = None, allow_nonfinite: bool | None = None) -> ModelState:
    """Load `source` (see module docstring) and check its weights are finite."""
    return check_finite(_load(source, dtype=dtype), allow_nonfinite)


def _load(source, *, dtype: torch.dtype | None = None) -> ModelState:
    if isinstance(source, nn.Module):
        from moeconv.nn.native_moe import linearise_native_moe
        linearise_native_moe(source)  # documented: native HF MoE blocks become equivalent MoEBlocks in place
        return ModelState(source.eval(), getattr(source, "config", None), SourceInfo("module"))
    if isinstance(source, ModelState):
        return source
    text = str(source)
    if text.startswith("builtin:"):
        return _load_builtin(text.split(":", 1)[1])
    file_part, sep, factory = text.partition(".py:")
    if text.endswith(".py") or sep:
        return _load_python(Path((file_part if sep else text[:-3]) + ".py"), factory or "build_model")
    path = Path(text)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_file():
        raise InputError(f"{path}: not a checkpoint directory, .gguf file, or .py model file")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    raw = read_json_object(config_path)
    if "moeconv" in raw:
        from moeconv.formats.native import load_moeconv
        return load_moeconv(path, raw, dtype=dtype)
    if "moeconv_sparse" in raw:  # `sparsify --compressed`: kept values + bitmask, restored exactly
        from moeconv.sparsity import load_compressed
        return load_compressed(path, raw, dtype=dtype)
    return _load_hf(path, raw, dtype)


def _load_builtin(name: str) -> ModelState:
    if name not in BUILTINS:
        raise InputError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTINS)}")
    module = importlib.import_module(f"models.{name}")
    torch.manual_seed(0)  # built-in weights are random but reproducible
    return ModelState(module.build_model(), None, SourceInfo("builtin", spec=f"builtin:{name}"))


def _load_python(path: Path, factory: str) -> ModelState:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        raise InputError(f"{path}: failed to import ({exc.__class__.__name__}: {exc})") from None
    fn = getattr(mod, factory, None)
    if not callable(fn):
        raise InputError(f"{path}: no function {factory}() returning a model")
    torch.manual_seed(0)
    model = fn()
    if not isinstance(model, nn.Module):
        raise InputError(f"{path}:{factory}() returned {type(model).__name__}, not an nn.Module")
    spec = f"{path.resolve()}:{factory}"
    TRUSTED_SPECS.add(spec)
    return ModelState(model.eval(), getattr(model, "config", None), SourceInfo("module", path, spec=spec))


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


def _load_hf(path: Path, raw: dict, dtype) -> ModelState:
    config = hf_config(path, raw)
    try:
        cls = model_class(config)
    except KeyError:
        raise UnsupportedError(f"{path}: no model class for model_type {config.model_type!r}") from None
    has_st = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if has_st:
        from moeconv.io.safetensors_io import validate_checkpoint
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
    from moeconv.nn.native_moe import linearise_native_moe
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
    import warnings
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
    import re
    text = " ".join(str(exc).split())
    m = re.search(r"trusted source\.\s*(.+?)\s*(?:Check the documentation|$)", text)
    if not m:
        return f"{exc.__class__.__name__}: {text}"[:160]
    return re.sub(r"^Please file an issue.*?WeightsUnpickler error:\s*", "", m.group(1))[:160]


def _load_gguf(path: Path, dtype) -> ModelState:
    try:
        model = load_causal_lm(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    except ImportError as exc:
        raise InputError(f"{path}: reading GGUF needs the `gguf` package ({exc})") from None
    except Exception as exc:
        raise InputError(f"{path}: failed to read GGUF ({exc.__class__.__name__}: {' '.join(str(exc).split())[:200]})") from None
    # A GGUF-loaded model carries a quantizer marker that blocks save_pretrained; the weights are
    # already dequantized floats, so the marker is dropped (FIELD.md, "GGUF input").
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return ModelState(model.eval(), model.config, SourceInfo("gguf", path, gguf_file=path.name, tokenizer_dir=None))
