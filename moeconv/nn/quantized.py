"""bitsandbytes layers: built from a float linear, serialized, and rebuilt from a checkpoint.

moeconv never implements a quantization kernel: every quantized layer is a stock
`bitsandbytes.nn.Linear8bitLt` (LLM.int8) or `bitsandbytes.nn.Linear4bit` (nf4 / fp4, optional
double quantization of the block scales), so transformers, PEFT and bitsandbytes itself see the
classes they know.

The CPU save trap (FIELD.md; checked with bitsandbytes 0.50.2 on an AVX512-BF16 CPU): the first
eval-mode forward of a `Linear4bit` repacks its weight *in place* for the CPU kernel (block
scales rounded to bf16 and transposed, double quantization undone). `state_dict()` afterwards
"unpacks" it again, but for layers without double quantization the unpacking keeps the scales
transposed: the checkpoint it writes is garbage, and the in-memory layer is corrupted too. So
each layer's serialized tensors are captured once, right after quantization and before any
forward (`serialized`); writers use that snapshot and never call `state_dict()` on a quantized
layer. A layer that was repacked and has no snapshot is refused instead of written wrong.

The CPU kernel also constrains shapes: it needs `out_features % 32 == 0` and
`in_features % blocksize == 0` (otherwise the first forward raises), so such layers are not
quantized to 4 bits and `kernel_problem` says why.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch
from torch import nn

from moeconv.errors import InputError, UnsupportedError
from moeconv.nn.linear_like import in_out_features, is_conv1d

METHODS = ("int8", "nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
CPU_KERNEL_ROWS = 32  # bitsandbytes' packed CPU 4-bit kernel works on blocks of 32 output rows

SNAPSHOT_ATTR = "moeconv_serialized"  # {name relative to the layer: tensor}, captured before any forward
RECORD_ATTR = "moeconv_record"        # what the layer was built from (see `QuantSpec.record`)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one linear layer."""

    method: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None  # 4-bit only; None: the weight's dtype
    int8_threshold: float = 6.0               # LLM.int8 outlier threshold (transformers' default)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")

    @property
    def four_bit(self) -> bool:
        return self.method in ("nf4", "fp4")


def _bnb():
    import logging
    # bitsandbytes warns on import that an optional CPU kernel package is missing; it falls back
    # to its own kernel, so the message is noise for users. LLM.int8 casts activations to fp16 by
    # design; bitsandbytes logs that on every call. Both loggers are set only when their level
    # differs: `setLevel` clears every logger's cache, and this runs once per quantized layer
    # (1.3 s of a 32-layer Mixtral quantize when it was unconditional).
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logger = logging.getLogger(name)
        if logger.level != logging.ERROR:
            logger.setLevel(logging.ERROR)
    if "bitsandbytes" not in sys.modules:
        refuse_hub_kernels()
    import bitsandbytes
    return bitsandbytes


def refuse_hub_kernels() -> None:
    """On a CPU with AVX512-BF16, importing bitsandbytes calls `kernels.get_kernel(
    "kernels-community/quantization-bitsandbytes")`: code fetched from the Hugging Face Hub and
    run in this process (offline mode only stops the download, not a cached copy). moeconv never
    runs code it did not ship, so the lookup fails here and bitsandbytes falls back to its own
    kernel (it catches the error). `kernels` is a transformers dependency; without it there is
    nothing to refuse."""
    try:
        import kernels
    except ImportError:
        return

    def refuse(repo_id, *args, **kwargs):
        raise RuntimeError(f"moeconv does not run code from the Hugging Face Hub ({repo_id})")
    kernels.get_kernel = refuse


def is_quantized_layer(m: nn.Module) -> bool:
    if "bitsandbytes" not in sys.modules:  # no layer can exist before the library is imported
        return False
    bnb = _bnb()
    return isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def method_of(m: nn.Module) -> str | None:
    """"int8" | "nf4" | "fp4" for a bitsandbytes linear, None otherwise."""
    if "bitsandbytes" not in sys.modules:
        return None
    bnb = _bnb()
    if isinstance(m, bnb.nn.Linear8bitLt):
        return "int8"
    if isinstance(m, bnb.nn.Linear4bit):
        return getattr(m.weight, "quant_type", None)
    return None


def kernel_problem(in_features: int, out_features: int, spec: QuantSpec) -> str | None:
    """Why bitsandbytes cannot run this shape everywhere (its CPU 4-bit kernel), or None."""
    if not spec.four_bit:
        return None
    if in_features % spec.blocksize:
        return (f"in_features {in_features} is not a multiple of blocksize {spec.blocksize} "
                "(bitsandbytes' CPU 4-bit kernel needs whole blocks per row; try a smaller --blocksize)")
    if out_features % CPU_KERNEL_ROWS:
        return (f"out_features {out_features} is not a multiple of {CPU_KERNEL_ROWS} "
                "(bitsandbytes' CPU 4-bit kernel works on blocks of 32 rows)")
    return None


def quantize_linear(m: nn.Module, spec: QuantSpec) -> nn.Module:
    """A bitsandbytes layer computing `m` (an `nn.Linear` or GPT-2 `Conv1D`) quantized per `spec`.

    The float weight is read, never modified. The returned layer carries its serialized tensors
    (captured before any forward) and a record of how it was built.
    """
    bnb = _bnb()
    in_f, out_f = in_out_features(m)
    weight = (m.weight.t() if is_conv1d(m) else m.weight).detach().contiguous()
    bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
    device = weight.device
    if spec.four_bit:
        compute = spec.compute_dtype or weight.dtype
        with torch.device("meta"):
            q = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute,
                                  compress_statistics=spec.double_quant, quant_type=spec.method)
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=spec.blocksize,
                                     compress_statistics=spec.double_quant, quant_type=spec.method,
                                     module=q).to(device)
    else:
        compute = None
        with torch.device("meta"):
            q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                    threshold=spec.int8_threshold)
        # Int8Params quantizes only when moved *from* the CPU.
        q.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    if bias is not None:
        q.bias = nn.Parameter(bias, requires_grad=False)
    record = {"method": spec.method, "in_features": in_f, "out_features": out_f, "bias": bias is not None,
              "source_class": "Conv1D" if is_conv1d(m) else "Linear", "weight_dtype": _dtype_name(weight.dtype),
              "compute_dtype": _dtype_name(compute) if compute is not None else None,
              "blocksize": spec.blocksize if spec.four_bit else None,
              "double_quant": spec.double_quant if spec.four_bit else None,
              "int8_threshold": None if spec.four_bit else spec.int8_threshold}
    _remember(q, record, {k: v.detach() for k, v in q.state_dict().items()})  # before any forward: safe
    return q.train(m.training)


def serialized(m: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that represent quantized layer `m` in a checkpoint, names relative to `m`
    (bitsandbytes' own names: `weight`, `weight.absmax`, …, `SCB`, `weight_format`, `bias`)."""
    snap = getattr(m, SNAPSHOT_ATTR, None)
    if snap is not None:
        return dict(snap)
    qs = getattr(m.weight, "quant_state", None)
    if getattr(qs, "packing_format_for_cpu", False):
        raise UnsupportedError("a 4-bit layer was repacked in place by its first CPU forward and its packed "
                               "state was not captured; saving it would write a corrupted checkpoint "
                               "(save before running the model, or quantize with moeconv)")
    snap = {k: v.detach() for k, v in m.state_dict().items()}
    setattr(m, SNAPSHOT_ATTR, snap)
    return dict(snap)


def layer_record(m: nn.Module) -> dict:
    """How `m` was built (method, shape, bias, source class, dtypes, block size, threshold)."""
    rec = getattr(m, RECORD_ATTR, None)
    if rec is not None:
        return dict(rec)
    method = method_of(m)
    four = method in ("nf4", "fp4")
    qs = getattr(m.weight, "quant_state", None) if four else None
    # A repacked state keeps the pre-packing values in `original_*` attributes.
    return {"method": method, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "source_class": "Linear",
            "weight_dtype": _dtype_name(getattr(qs, "original_dtype", qs.dtype)) if qs is not None else None,
            "compute_dtype": _dtype_name(m.compute_dtype) if four and m.compute_dtype is not None else None,
            "blocksize": qs.blocksize if qs is not None else None,
            "double_quant": bool(getattr(qs, "original_nested", qs.nested)) if qs is not None else None,
            "int8_threshold": None if four else float(m.state.threshold)}


def rebuild(record: dict, tensors: dict[str, torch.Tensor], *, where: str = "") -> nn.Module:
    """A bitsandbytes layer from a checkpoint: `tensors` are `serialized` names → tensors."""
    bnb = _bnb()
    method = record.get("method")
    try:
        in_f, out_f, has_bias = int(record["in_features"]), int(record["out_features"]), bool(record["bias"])
        weight = tensors["weight"]
        if method in ("nf4", "fp4"):
            compute = _dtype(record.get("compute_dtype"))
            quant = {k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")}
            with torch.device("meta"):
                q = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=compute,
                                      compress_statistics=bool(record.get("double_quant")), quant_type=method,
                                      quant_storage=weight.dtype)
            q.weight = bnb.nn.Params4bit.from_prequantized(weight, dict(quant), requires_grad=False,
                                                           device=weight.device, module=q)
            if q.weight.quant_type != method or tuple(q.weight.quant_state.shape) != (out_f, in_f):
                raise ValueError(f"quantization state says {q.weight.quant_type} {tuple(q.weight.quant_state.shape)}")
        elif method == "int8":
            with torch.device("meta"):
                q = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False,
                                        threshold=float(record.get("int8_threshold") or 0.0))
            if weight.dtype != torch.int8 or tuple(weight.shape) != (out_f, in_f):
                raise ValueError(f"int8 weight is {weight.dtype}{tuple(weight.shape)}")
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False,
                                         SCB=tensors["SCB"]).to(weight.device)
        else:
            raise ValueError(f"unknown method {method!r}")
        if has_bias:
            q.bias = nn.Parameter(tensors["bias"], requires_grad=False)
    except (KeyError, ValueError, TypeError, AssertionError, RuntimeError) as exc:
        raise InputError(f"{where}: cannot rebuild the {method} layer ({exc.__class__.__name__}: {exc})") from None
    _remember(q, dict(record), dict(tensors))
    return q.eval()


def serialized_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in serialized(m).values())


def _remember(q: nn.Module, record: dict, snapshot: dict[str, torch.Tensor]) -> None:
    # Plain attributes (not buffers): they follow the layer through deepcopy and submodule swaps,
    # and stay out of state_dict().
    object.__setattr__(q, RECORD_ATTR, record)
    object.__setattr__(q, SNAPSHOT_ATTR, snapshot)
    if record.get("method") in ("nf4", "fp4"):
        # bitsandbytes 0.50.2's packed CPU 4-bit kernel kills the process (SIGFPE) on an empty
        # batch, which MoE dispatch produces whenever an expert receives no token. The layer's own
        # forward is kept; only the empty case is answered here (bitsandbytes layers never go
        # through torch.export, so this shape test costs no exportability).
        object.__setattr__(q, "forward", types.MethodType(_forward_nonempty, q))


def _forward_nonempty(self, x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return x.new_zeros((*x.shape[:-1], self.out_features))
    return type(self).forward(self, x)


def _dtype_name(dt: torch.dtype | None) -> str | None:
    return None if dt is None else str(dt).replace("torch.", "")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt
