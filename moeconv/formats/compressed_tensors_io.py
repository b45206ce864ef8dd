"""Weight quantization in the compressed-tensors format (what vLLM, SGLang and transformers load),
with the compressed-tensors package's own schemes, parameter math and compressors.

Methods (the package's presets, `--group-size` overrides their group of 128; asymmetric int
schemes are refused: transformers 5.25 cannot load their packed zero points):
- `w4a16`: int4 weights, one scale per group of `group_size` inputs (preset W4A16, symmetric);
  written `pack-quantized`;
- `w8a16`: int8 weights, same layout (preset W8A16);
- `fp8`: float8_e4m3 weights with one scale per output channel, activations in the model's dtype
  (the weights of preset FP8_DYNAMIC, without its run-time activation quantization); written
  `float-quantized`.

Promises:
- Round-to-nearest (`quantize_rtn`): every targeted `nn.Linear`'s weight is replaced in memory by
  exactly what a consumer dequantizes from the file (compressed-tensors' `fake_quantize` with the
  scales `calculate_qparams` gives), so the in-memory model *is* the quantized function and the
  reload is compared with it exactly.
- Targets: every `nn.Linear` but the MoE routers, shared-expert gates and `lm_head`, which stay
  in float and in the config's `ignore`; every expert gets the same scheme (no calibration here:
  no expert is left out for lack of tokens).
- A matrix whose input width the group does not divide is refused with its name and width
  (never skipped).
- Symmetric schemes map 0 to 0: a 2:4 (or any) zero stays exactly zero (`zeros_kept`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from moeconv.errors import UnsupportedError

METHODS = ("w4a16", "w8a16", "fp8")
PRESETS = {"w4a16": "W4A16", "w8a16": "W8A16", "fp8": "FP8_DYNAMIC"}
DEFAULT_GROUP = 128


@dataclass
class QuantizedModel:
    """What `quantize_rtn` did: the scheme, the quantized modules' qparams, what stayed float."""

    method: str
    args: object  # compressed_tensors QuantizationArgs of the weights
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    zeros_before: int = 0
    zeros_after_of_those: int = 0  # of the weights that were exactly 0 before, how many still are
    fallback: list[str] = field(default_factory=list)  # gptq: expert matrices calibrated on their block's inputs
    outside: list[str] = field(default_factory=list)   # gptq: targets outside the decoder layers (rounded)
    seconds: float = 0.0


def weight_args(method: str, group_size: int | None, symmetric: bool | None):
    """The compressed-tensors `QuantizationArgs` of `method`'s weights."""
    from compressed_tensors.quantization import preset_name_to_scheme
    if method not in METHODS:
        raise UnsupportedError(f"quantize: --method must be one of {', '.join(METHODS)}, not {method!r}")
    args = preset_name_to_scheme(PRESETS[method], ["Linear"]).weights.model_copy()
    if method == "fp8":
        if not hasattr(torch, "float8_e4m3fn"):
            raise UnsupportedError("quantize --method fp8: this torch has no float8_e4m3fn dtype")
        if group_size is not None:
            raise UnsupportedError("quantize --method fp8: one scale per output channel; --group-size does not apply")
        if symmetric is False:
            raise UnsupportedError("quantize --method fp8: float8 scales are symmetric; --asymmetric does not apply")
        return args
    if symmetric is False:
        # measured with transformers 5.25 and compressed-tensors 0.20.1: the packed zero points are
        # refused at load (size mismatch on weight_zero_point), dense or MoE
        raise UnsupportedError(f"quantize --method {method} --asymmetric: stock transformers (5.25) cannot load "
                               "compressed-tensors' packed zero points; use --symmetric")
    return args.model_copy(update={"group_size": group_size or DEFAULT_GROUP})


def _excluded(model: nn.Module) -> set[str]:
    """Module names that stay float: MoE routers, shared-expert gates, lm_head."""
    from moeconv.nn.moe import MoEBlock
    out = {"lm_head"}
    for path, m in model.named_modules():
        if isinstance(m, MoEBlock):
            out.add(f"{path}.router")
            if getattr(m, "shared_expert_gate", None) is not None:
                out.add(f"{path}.shared_expert_gate")
        if path.endswith("shared_expert_gate"):
            out.add(path)
    return out


def targets(model: nn.Module) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """(quantized Linear modules, names left in float)."""
    excluded = _excluded(model)
    chosen, ignored = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            (ignored.append(name) if name in excluded else chosen.append((name, m)))
    return chosen, sorted(ignored)


def check_group_widths(chosen: list[tuple[str, nn.Linear]], method: str, args) -> None:
    """Refuse (naming it) a matrix whose input width the group does not divide: never skipped."""
    if getattr(args, "strategy", None) == "group":
        for name, m in chosen:
            if m.in_features % args.group_size:
                raise UnsupportedError(f"quantize {method}: {name} has {m.in_features} inputs, not a multiple of "
                                       f"--group-size {args.group_size}; choose a group size that divides it")


def _qparams(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of `w` (out, in) for `args`: per group of inputs or per output channel."""
    from compressed_tensors.quantization.utils import calculate_qparams
    if args.strategy == "group":
        g = w.reshape(w.shape[0], -1, args.group_size)
        return calculate_qparams(g.amin(-1), g.amax(-1), args)
    return calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)


def quantize_rtn(model: nn.Module, method: str, args) -> QuantizedModel:
    """Quantize every target of `model` in place (see module docstring)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    chosen, ignored = targets(model)
    check_group_widths(chosen, method, args)
    result = QuantizedModel(method, args, ignored=ignored)
    with torch.no_grad():
        for name, m in chosen:
            w = m.weight.detach().float()
            scale, zp = _qparams(w, args)
            q = fake_quantize(w, scale, zp, args)
            zero = w == 0
            result.zeros_before += int(zero.sum())
            result.zeros_after_of_those += int((q[zero] == 0).sum())
            m.weight.copy_(q.to(m.weight.dtype))
            result.qparams[name] = (scale, zp)
    return result


def compressed_state_dict(model: nn.Module, q: QuantizedModel) -> tuple[dict[str, torch.Tensor], dict]:
    """(the compressed state dict, in module names; the `quantization_config` for config.json),
    made by compressed-tensors' `ModelCompressor` on a copy of `model` (the model is left as is)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)
    work = copy.deepcopy(model)
    names = sorted(q.qparams)
    scheme = QuantizationScheme(targets=names, weights=q.args)
    apply_quantization_config(work, QuantizationConfig(config_groups={"group_0": scheme},
                                                       quantization_status=QuantizationStatus.INITIALIZED))
    modules = dict(work.named_modules())
    with torch.no_grad():
        for name, (scale, zp) in q.qparams.items():
            m = modules[name]
            m.weight_scale.copy_(scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype))
            if zp is not None and hasattr(m, "weight_zero_point"):
                m.weight_zero_point.copy_(zp.reshape(m.weight_zero_point.shape).to(m.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(work)
    compressor.compress_model(work)
    config = compressor.quantization_config.model_dump(exclude_none=True, mode="json")
    # targets: every Linear of the loaded model but the ignored ones (module names as the consumer
    # builds them: routers are `…mlp.gate` / `…shared_expert_gate` in transformers' families)
    config["config_groups"]["group_0"]["targets"] = ["Linear"]
    config["ignore"] = ["lm_head", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$", "re:.*block_sparse_moe\\.gate$"]
    return {k: v.detach().contiguous() for k, v in work.state_dict().items()}, config
