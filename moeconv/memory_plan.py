"""Memory is planned, not discovered: the peak memory of a run, estimated from the checkpoint's
headers and the pass list before any tensor is read, and a refusal in one line when it exceeds
what the machine (or `--max-memory`) allows.

Promises:
- `source_size(source)` reads headers only: safetensors headers (`SourceCheckpoint`, never a
  tensor), `config.json`, a GGUF file's tensor table (through the `gguf` reader: types and
  element counts, nothing dequantized), a built-in model's config dataclass. A `FILE.py` model is
  not run: its size is unknown (0) and the plan says so.
- `plan_memory(source, passes, …)` is an estimate of the peak resident memory (RSS) of running
  `passes` on `source` the way the CLI's jobs do it (load, passes, write, reload and compare). Its
  coefficients were calibrated against measured peaks (`scripts/measure_memory.py`, figures next
  to each coefficient) to be an upper bound within about 1.5× for quantize, sparsify and
  prune-experts; the whole-model passes (export onnx, distill) are estimated from what they hold
  and say so (`MemoryPlan.whole_model`).
- `check_plan(plan, max_memory)` raises `MemoryPlanError` (exit code 2, one line: the estimate, its
  largest parts, the limit and the fixes that apply) when the estimate exceeds the limit, or when
  what the plan puts on the GPU (`MemoryPlan.on_device`, `device="cuda"`) exceeds the GPU's free
  memory. `--max-memory` is host memory: `total` never counts what sits on the GPU.
- `plan_streaming(source, passes, device=…)`: the streamed route; with "cuda" the layer at work,
  the embeddings and head and the per-layer working set are on the GPU (`on_device`), and the host
  holds the runtime, the CUDA runtime and each tensor on its way between disk and GPU.

Only the in-memory route exists today (`MemoryPlan.route == "in-memory"`: every command loads the
whole model). `MemoryPlan.streaming` is the extension point: a later change that streams a pass
layer by layer fills in its estimate there and picks the route whose estimate fits.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from moeconv.errors import MemoryPlanError
from moeconv.io.config_checks import available_memory, format_bytes

# ---- coefficients ----------------------------------------------------------------------------------
# Calibrated against the peak RSS (os.wait4) of `python -m moeconv.cli COMMAND` in a child process,
# measured by scripts/measure_memory.py (2 CPU cores, torch 2.13 CPU, transformers 5.25, bitsandbytes
# on CPU), and split by phase with an in-process probe (ru_maxrss and RSS after load, passes, save,
# reload, compare). Random bf16 checkpoints; Mixtral: hidden 512, expert intermediate 1792, 8 experts,
# vocab 8192; calibration 16 × 128 token ids. Peak RSS measured → estimated (MiB):
#   python scripts/measure_memory.py --layers 2 8          Mixtral, 103 MiB on disk → 364 MiB
#     quantize --method int8              1062 → 1236 (1.16)   2497 → 2880 (1.15)
#     quantize --method nf4                965 → 1092 (1.13)   1848 → 2306 (1.25)
#     sparsify --method magnitude         1160 → 1429 (1.23)   2859 → 3492 (1.22)
#     sparsify --method wanda             1486 → 1793 (1.21)   3508 → 4300 (1.23)
#     sparsify --method sparsegpt         1678 → 2200 (1.31)   3611 → 4246 (1.18)
#     prune-experts --keep 6              1163 → 1368 (1.18)   2674 → 3040 (1.14)
#   --commands quantize-int8-dense (Llama, 30 / 70 MiB; --hidden 1024 --inter 3584: 248 MiB)
#     quantize --method int8               577 →  705 (1.22)    707 →  853 (1.21)   1067 → 1484 (1.39)
#   --source SmolLM2-135M-Instruct.Q4_1.gguf (94 MiB, 513 MiB as float32)
#     quantize --method int8 / nf4        1595 → 2085 (1.31)   1387 → 1953 (1.41)
#   --hidden 32 --inter 64 --vocab 128 --layers 1: every command above peaks at 499–563 MiB, the
#     interpreter, torch, transformers and bitsandbytes whatever the model (estimates 600–736).
# In-process, per phase, for the 8-layer Mixtral (W = its 347 MiB): load holds 1.7 W (mapped file
# pages and owned copies); transformers' fp32 reload adds 2.1 × the fp32 weights and the fp32
# reference 0.75 ×; moeconv's reload of a quantized MoE 2.3 W, its compare 0.5 W; int8 layers add
# 1.7 W (nf4 0.13 W) beside the float ones. SparseGPT's working set, measured on one or two layers of
# widths 256 / 512 / 1024: 351 / 1102 / 2466 MiB for 29 / 114 / 456 MiB of per-layer Hessians.
RUNTIME_BYTES = 600 * 2**20
LOAD_EXTRA = {"safetensors": 0.7, "bin": 1.0, "gguf": 0.4}  # × the weights: mapped file pages, copies
CHECK_FLOAT_RELOAD = 2.1     # × float32 weights: transformers' reload in fp32 (and its mapped pages)
CHECK_FLOAT_REFERENCE = 1.0  # × float32 weights: the fp32 copy a half-precision result is compared through
CHECK_MOECONV_RELOAD = 2.2   # × the weights: moeconv.load of the written float result
# quantize, bytes per parameter: what the quantized layers add on CPU (the float ones are not all
# given back), by method and float width as loaded; the reload and compare of the result, by consumer
QUANT_GROWTH = {("int8", 2, "dense"): 2.3, ("int8", 2, "moe"): 3.6, ("int8", 4, "dense"): 4.6,
                ("nf4", 2, "dense"): 0.3, ("nf4", 2, "moe"): 0.3, ("nf4", 4, "dense"): 3.3}
CHECK_QUANT = {"moeconv": 5.6, "transformers": 1.6}
SPARSEGPT_HESSIAN_COPIES = 2.0  # × one layer's Hessians: Σxxᵀ per matrix and the solver's factor
SPARSEGPT_BATCH_COPIES = 4.0    # × one batched solve (its stacked weights and Hessians, the inverse, …)
SPARSEGPT_BATCH_BYTES = 256 * 2**20  # passes.sparsify.MAX_BATCH_BYTES
WANDA_HESSIAN_COPIES = 2.0      # × one layer's Hessians (Wanda reads their diagonal)
SPARSIFY_WEIGHT_COPIES = 2.0    # × one layer's target matrices in fp32 (their stack and the result)
SPARSIFY_FIXED = 128 * 2**20    # calibration machinery, whatever the size
RETAINED = 0.3              # of a pass's working memory, still resident when the check runs (measured 0.25–0.33)
# Wanda / SparseGPT: resident memory grows with each calibrated layer by this share of the layer's
# Hessians that are smaller than HEAP_LIMIT (measured +74 / +37 MiB per layer for 114 MiB of 1–12.5 MiB
# Hessians; likely the heap, where glibc keeps allocations under its 32 MiB mmap threshold)
FRAGMENTATION = {"wanda": 0.65, "sparsegpt": 0.33}
HEAP_LIMIT = 32 * 2**20
HIDDEN_COPIES = 4           # layer-wise calibration: inputs, outputs, the next inputs, the MoE block's inputs
ROWS_PER_FORWARD = 8        # calibration rows in one forward (the passes' batch_size default)
PRUNE_OUTPUT_BYTES = 2 * 2**30  # passes.prune_experts.OUTPUT_BYTES: expert outputs kept for scoring
ONNX_COPIES = 3.0           # export onnx (not measured): fp32 module, the serialized graph, the onnxruntime session
OPTIMIZER_COPIES = 3.0      # distill (not measured): gradients and Adam's two moments, fp32, per parameter

MAX_MEMORY_HELP = ("Refuse, before reading any weight, a run whose estimated peak memory exceeds this size "
                   "(e.g. 16GB; default or 0: the memory available).")

WEIGHTS = "model weights (as loaded)"
RUNTIME = "runtime (Python, torch, transformers)"
LOADING = "loading (transient copies)"
CHECK = "working copy / reference for the numeric check"
ACTIVATIONS = "calibration activations"
HESSIANS = "per-layer Hessians"
ONNX = "ONNX export graph"
TEACHER = "teacher + optimizer state"
PRUNING = "pruning working copies (one layer, fp32)"
FRAGMENTED = "heap left by per-layer Hessians"
# the streamed route's (`plan_streaming`)
STREAM_LAYER = "one decoder layer at a time (fp32 working copies)"
STREAM_OUTER = "embeddings, final norm and head"
STREAM_TRANSIT = "tensors between disk and GPU (one layer, read then written)"
CUDA_RUNTIME = "CUDA runtime (host side)"


@dataclass
class MemoryPlan:
    """The estimated peak memory of one run.

    `total`: estimated peak bytes on the host. `parts`: what holds memory, by name — the runtime,
    the weights and what passes add stay to the end; the largest pass's working memory and the
    check of the written result come one after the other, so `total` counts the larger of the two
    (with what the allocator keeps of the first) and `peak` says which. `route`: "in-memory" (the
    only route today); `streaming`: the estimate of a streaming route, None until one exists (the
    extension point); `fixes`: what would make the run fit, as flags and actions;
    `whole_model`: passes that need the whole model in memory (ONNX export, distillation) with their
    estimate; `notes`: what the estimate could not see (a Python model's size); `on_device`: parts
    held on the accelerator with `device="cuda"`, not counted in `total`."""

    total: int
    parts: dict[str, int]
    route: str = "in-memory"
    fixes: list[str] = field(default_factory=list)
    whole_model: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    source: str = ""
    device: str = "cpu"
    peak: str = ""  # when the peak comes: "during sparsify", "during the numeric check"
    on_device: dict[str, int] = field(default_factory=dict)  # parts held on the accelerator, not in `total`
    streaming: int | None = None  # extension point: a streaming route's estimate (a later change)
    training: dict | None = None  # distill: per-process memory of ddp and fsdp (`moeconv.train.memory.both`)
    # bytes of `total` a streamed sweep writes to its offload directory when they do not fit: the
    # cached calibration hidden states (`moeconv.stream.activations`); see `activation_budget`
    spillable: int = 0

    def breakdown(self, limit: int | None = None) -> str:
        """'weights 1.2 GiB, …': the weights, then the largest other parts (`limit` parts in all)."""
        others = sorted(((v, k) for k, v in self.parts.items() if v > 0 and k != WEIGHTS), reverse=True)
        items = ([(self.parts[WEIGHTS], WEIGHTS)] if WEIGHTS in self.parts else []) + others
        return ", ".join(f"{_short(k)} {format_bytes(v)}" for v, k in items[:limit])

    def to_dict(self) -> dict:
        """JSON-ready, for report.json (`report["memory_plan"]`)."""
        return {"estimate_bytes": self.total, "estimate": format_bytes(self.total), "peak": self.peak,
                "route": self.route,
                "parts": dict(self.parts), "whole_model": dict(self.whole_model), "fixes": list(self.fixes),
                "notes": list(self.notes), "device": self.device, "on_device": dict(self.on_device),
                "streaming": self.streaming, "training": self.training, "spillable_bytes": self.spillable}


_SHORT = {WEIGHTS: "weights", RUNTIME: "runtime", LOADING: "loading", CHECK: "numeric check",
          ACTIVATIONS: "activations", HESSIANS: "Hessians", ONNX: "ONNX export", TEACHER: "teacher + optimizer",
          PRUNING: "pruning copies", FRAGMENTED: "heap left by Hessians"}


def _short(part: str) -> str:
    return _SHORT.get(part, part)


# ---- what the headers say --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSize:
    """A model's memory as a pass sees it, tracked through the pass list (bytes in memory)."""

    params: int = 0
    bytes: int = 0               # as loaded (GGUF: float32)
    elem: int = 4                # bytes per float weight as loaded
    expert_bytes: int = 0        # of `bytes`: expert tensors
    ffn_bytes: int = 0           # of `bytes`: dense FFN tensors (what upcycle copies)
    linear_bytes: int = 0        # of `bytes`: 2-D weights inside the layers (what quantize replaces)
    experts: int = 0             # experts per MoE layer (0: dense)
    layer_expert_hessian: int = 0  # largest decoder layer: Σ in² · 4 over its expert matrices
    layer_all_hessian: int = 0   # … over all its 2-D weights (sparsify with other targets)
    layer_ffn_hessian: int = 0   # … over its dense FFN matrices (what upcycle multiplies)
    layer_expert_bytes: int = 0  # largest decoder layer: bytes of its expert matrices
    layer_linear_bytes: int = 0  # … of all its 2-D weights
    layer_ffn_bytes: int = 0     # … of its dense FFN matrices
    small_hessian_share: float = 1.0  # of the Hessians: those under HEAP_LIMIT (kept on the heap)
    quantized: str | None = None  # the quantization method, once quantized
    consumer: str = "transformers"  # who reloads the written result: transformers (fp32) or moeconv
    family: bool = False         # an upcycled model is written in an HF MoE family (transformers reloads it)

    @property
    def float32_bytes(self) -> int:
        return 4 * self.params


@dataclass(frozen=True)
class SourceSize:
    """What a model source's headers say about its size (`source_size`)."""

    name: str
    kind: str                    # safetensors | bin | gguf | builtin | python | module | missing
    disk_bytes: int
    model: ModelSize
    hidden: int = 0
    inter: int = 0
    vocab: int = 0
    heads: int = 1
    layers: int = 0
    known: bool = True           # False: a Python model, not run to be measured
    note: str = ""               # e.g. a GGUF file's float32 expansion


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
_FFN = re.compile(r"\.(mlp|feed_forward|ffn|intermediate|output\.dense)\.|\.experts\.")


def source_size(source) -> SourceSize:
    """The size of `source` (checkpoint dir, .gguf, builtin:NAME, FILE.py, ModelState or module)
    from its headers only; a broken checkpoint raises the `InputError` its loader would."""
    if not isinstance(source, (str, os.PathLike)):
        return _module_size(source)
    text = str(source)
    if text.startswith("builtin:"):
        return _builtin_size(text)
    if text.endswith(".py") or ".py:" in text:
        return SourceSize(text, "python", 0, ModelSize(consumer="moeconv"), known=False)
    path = Path(text)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_size(path)
    if path.is_dir():
        return _dir_size(path)
    return SourceSize(text, "missing", 0, ModelSize(), known=False)  # the loader names the problem


def _dir_size(path: Path) -> SourceSize:
    """A checkpoint directory: config.json and the safetensors headers (or the .bin file's size)."""
    from moeconv.io.json_files import json_object_or_none
    raw = json_object_or_none(path / "config.json") or {}
    consumer = "moeconv" if "moeconv" in raw or "moeconv_sparse" in raw else "transformers"
    quantized = "quantization_config" in raw or (isinstance(raw.get("moeconv"), dict) and "quantization" in raw["moeconv"])
    has_st = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if has_st:
        from moeconv.io.safetensors_io import SourceCheckpoint
        ckpt = SourceCheckpoint(path)  # headers only; a broken file is named here as by the loader
        specs = [(s.name, s.dtype, s.shape) for s in ckpt.specs.values()]
        if "moeconv_sparse" in raw:
            specs = _dense_specs(specs, raw["moeconv_sparse"])
        disk = sum(f.stat().st_size for f in set(ckpt.files.values()))
    else:
        specs, disk = [], sum(f.stat().st_size for f in path.glob("*.bin"))
    return _from_specs(str(path), "safetensors" if has_st else "bin", disk, specs, _config_of(raw),
                       consumer=consumer, quantized=quantized)


def _config_of(raw: dict) -> dict:
    """The dense model's config inside moeconv's wrappers (compressed, moeconv-format), else `raw`."""
    for _ in range(4):
        if isinstance(raw.get("moeconv_sparse"), dict) and isinstance(raw["moeconv_sparse"].get("dense_config"), dict):
            raw = raw["moeconv_sparse"]["dense_config"]
        elif isinstance(raw.get("moeconv"), dict) and isinstance(raw["moeconv"].get("source"), dict) \
                and isinstance(raw["moeconv"]["source"].get("config"), dict):
            raw = raw["moeconv"]["source"]["config"]
        else:
            break
    text = raw.get("text_config")
    return text if "vocab_size" not in raw and isinstance(text, dict) else raw


def _dense_specs(specs: list, section) -> list:
    """A compressed checkpoint's tensors as `moeconv.load` restores them (values + mask → dense)."""
    import torch
    records = section.get("compressed") if isinstance(section, dict) else None
    records = records if isinstance(records, dict) else {}
    out = []
    for name, dtype, shape in specs:
        if name.endswith(".sparse_mask"):
            continue
        base = name.removesuffix(".sparse_values")
        info = records.get(base) if base != name else None
        if isinstance(info, dict):
            dt = getattr(torch, str(info.get("dtype")), None)
            try:
                shape = tuple(int(d) for d in info.get("shape", ()))
            except (TypeError, ValueError):
                pass
            dtype = dt if isinstance(dt, torch.dtype) else dtype
        out.append((base, dtype, shape))
    return out


def _from_specs(name: str, kind: str, disk: int, specs: list, cfg: dict, *, consumer: str,
                quantized: bool) -> SourceSize:
    """Totals and per-layer maxima of (name, dtype, shape) triples; `cfg` gives the widths."""
    from moeconv.model_limits import _limits_from_mapping
    sums = {"bytes": 0, "params": 0, "expert": 0, "ffn": 0, "linear": 0}
    by_elem: dict[int, int] = {}
    layers: dict[int, dict[str, int]] = {}
    for tname, dtype, shape in specs:
        numel = math.prod(shape)
        size = numel * dtype.itemsize
        sums["bytes"] += size
        sums["params"] += numel
        if dtype.is_floating_point:
            by_elem[dtype.itemsize] = by_elem.get(dtype.itemsize, 0) + size
        group = "expert" if ".experts." in tname else "ffn" if _FFN.search(tname) else "other"
        sums[group] = sums.get(group, 0) + size
        m = _LAYER.search(tname)
        if m and len(shape) >= 2:
            sums["linear"] += size
            hessian = 4 * shape[-1] ** 2 * math.prod(shape[:-2]) * (2 if "gate_up" in tname else 1)
            sums["hessians"] = sums.get("hessians", 0) + hessian
            sums["small"] = sums.get("small", 0) + (hessian if 4 * shape[-1] ** 2 < HEAP_LIMIT else 0)
            row = layers.setdefault(int(m.group(1)), {})
            for key, value in (("all_h", hessian), ("linear", size), (f"{group}_h", hessian), (group, size)):
                row[key] = row.get(key, 0) + value
    elem = max(by_elem, key=by_elem.get) if by_elem else _config_elem(cfg)
    if not specs:  # a pytorch_model.bin: its size is what it holds
        sums["bytes"], sums["params"] = disk, disk // elem
    top = {k: max((row.get(k, 0) for row in layers.values()), default=0)
           for k in ("expert_h", "all_h", "ffn_h", "expert", "linear", "ffn")}
    lim = _limits_from_mapping(name, cfg)
    experts = next((v for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if isinstance(v := cfg.get(k), int) and v > 1), 0)
    model = ModelSize(params=sums["params"], bytes=sums["bytes"], elem=elem, expert_bytes=sums["expert"],
                      ffn_bytes=sums["ffn"], linear_bytes=sums["linear"], experts=experts,
                      layer_expert_hessian=top["expert_h"], layer_all_hessian=top["all_h"],
                      layer_ffn_hessian=top["ffn_h"], layer_expert_bytes=top["expert"],
                      layer_linear_bytes=top["linear"], layer_ffn_bytes=top["ffn"],
                      small_hessian_share=sums.get("small", 0) / sums["hessians"] if sums.get("hessians") else 1.0,
                      quantized="bitsandbytes" if quantized else None, consumer=consumer,
                      family=_upcycles_to_family(cfg.get("model_type")) and consumer == "transformers")
    return SourceSize(name, kind, disk, model, hidden=lim.hidden or 0, inter=lim.intermediate or 0,
                      vocab=lim.vocab_size or 0, heads=lim.heads or 1, layers=lim.layers or len(layers))


def _upcycles_to_family(model_type) -> bool:
    """Whether an upcycled `model_type` is written in a Hugging Face MoE family."""
    from moeconv.formats.hf_moe import format_for
    return isinstance(model_type, str) and format_for(model_type) is not None


def _config_elem(cfg: dict) -> int:
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return 2 if dtype in ("bfloat16", "float16") else 4


def _gguf_size(path: Path) -> SourceSize:
    """A GGUF file, loaded as float32: its tensor table (types, element counts) read with the
    `gguf` reader, nothing dequantized; the widths from its metadata."""
    import torch
    from moeconv.errors import InputError
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(path))
    except ImportError:
        return SourceSize(str(path), "gguf", path.stat().st_size, ModelSize(), known=False,
                          note="the gguf package is missing: the GGUF file was not sized")
    except Exception as exc:
        raise InputError(f"{path}: failed to read GGUF ({exc.__class__.__name__}: {' '.join(str(exc).split())[:160]})") from None
    specs, stored = [], 0
    for t in reader.tensors:
        name = re.sub(r"^blk\.(\d+)\.", r"layers.\1.", t.name)
        name = re.sub(r"\.(ffn_\w+)_exps\.", r".experts.\1.", name) if "_exps." in name else \
            re.sub(r"\.(ffn_\w+)\.", r".mlp.\1.", name)
        specs.append((name, torch.float32, tuple(int(d) for d in reversed(t.shape.tolist()))))
        stored += int(t.n_bytes)
    arch = _gguf_text(reader, "general.architecture") or "llama"
    cfg = {k: _gguf_int(reader, f"{arch}.{g}") for k, g in (
        ("hidden_size", "embedding_length"), ("intermediate_size", "feed_forward_length"),
        ("num_hidden_layers", "block_count"), ("num_attention_heads", "attention.head_count"),
        ("vocab_size", "vocab_size"), ("max_position_embeddings", "context_length"),
        ("num_local_experts", "expert_count"))}
    cfg = {"model_type": arch, **{k: v for k, v in cfg.items() if v}}
    size = _from_specs(str(path), "gguf", path.stat().st_size, specs, cfg,
                       consumer="transformers", quantized=False)
    expansion = size.model.bytes / max(1, stored)
    return replace(size, note=f"GGUF loads in float32: {expansion:.1f}× its {format_bytes(stored)} of tensors")


def _gguf_field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None or len(f.data) != 1 else f.parts[f.data[0]]


def _gguf_int(reader, key: str) -> int | None:
    v = _gguf_field(reader, key)
    try:
        return int(v[0]) if v is not None and len(v) == 1 else None
    except (TypeError, ValueError):
        return None


def _gguf_text(reader, key: str) -> str | None:
    v = _gguf_field(reader, key)
    try:
        return bytes(v).decode() if v is not None else None
    except (TypeError, ValueError):
        return None


def _builtin_size(spec: str) -> SourceSize:
    """A built-in model (random weights, float32): sized from its config dataclass."""
    from moeconv.model_limits import model_limits
    lim = model_limits(spec)
    h, v, n = lim.hidden or 0, lim.vocab_size or 0, lim.layers or 0
    i = lim.intermediate or 4 * h
    layer_linear, layer_ffn = 4 * (4 * h * h + 3 * h * i), 4 * 3 * h * i
    params = 2 * v * h + n * (4 * h * h + 3 * h * i)
    model = ModelSize(params=params, bytes=4 * params, elem=4, ffn_bytes=n * layer_ffn,
                      linear_bytes=n * layer_linear, layer_all_hessian=4 * (6 * h * h + i * i),
                      layer_ffn_hessian=4 * (2 * h * h + i * i), layer_linear_bytes=layer_linear,
                      layer_ffn_bytes=layer_ffn, consumer="moeconv")
    return SourceSize(spec, "builtin", 0, model, hidden=h, inter=i, vocab=v, heads=lim.heads or 1, layers=n)


def _module_size(source) -> SourceSize:
    """A model already in memory (a `ModelState` or module): its own parameters."""
    module = getattr(source, "module", source)
    specs = [(n, p.dtype, tuple(p.shape)) for n, p in getattr(module, "named_parameters", lambda: [])()]
    cfg = getattr(source, "config", None) or getattr(module, "config", None)
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    return _from_specs(type(module).__name__, "module", 0, specs, raw, consumer="transformers", quantized=False)


# ---- the passes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Calibration data as the plan sees it: token count and sequence length."""

    tokens: int
    seq_len: int


@dataclass
class _Step:
    """One pass's effect: `work` (its transient working memory, by part), `kept` (memory it adds
    that stays to the end of the run), the model after it, and `whole` (set for passes that need
    the whole model in memory: their own estimate)."""

    model: ModelSize
    work: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    whole: int | None = None
    training: tuple | None = None  # distill: (TrainingSizes, rows per process per micro-batch, config)


def _activations(src: SourceSize, calib: Calibration | None, elem: int) -> int:
    """Layer-wise calibration: the cached hidden states of every token (HIDDEN_COPIES: inputs,
    outputs, the next inputs, an MoE block's inputs) and one forward's attention scores and FFN
    activations (float32)."""
    if calib is None or calib.tokens <= 0:
        return 0
    seq = max(1, calib.seq_len)
    rows = min(ROWS_PER_FORWARD, max(1, calib.tokens // seq))
    inter = src.inter or 4 * src.hidden
    forward = 4 * rows * (src.heads * seq * seq + seq * (2 * inter + 4 * src.hidden))
    return HIDDEN_COPIES * calib.tokens * src.hidden * elem + forward


def _upcycle(cfg, src: SourceSize, m: ModelSize, calib: Calibration | None) -> _Step:
    """Each selected FFN becomes `num_experts` copies (one, split, for expert_init split) plus a
    shared expert: the model grows by the copies; the router init `hidden` calibrates first."""
    copies = (1 if cfg.expert_init == "split" else cfg.num_experts) + int(cfg.shared_experts)
    ffn = m.ffn_bytes or (2 * m.linear_bytes) // 3
    growth = ffn * (copies - 1)
    grown = replace(m, bytes=m.bytes + growth, params=m.params + growth // m.elem, expert_bytes=m.expert_bytes + ffn * copies,
                    ffn_bytes=0, experts=cfg.num_experts, layer_expert_hessian=m.layer_ffn_hessian * copies,
                    layer_expert_bytes=m.layer_ffn_bytes * copies, consumer="transformers" if m.family else "moeconv",
                    layer_all_hessian=m.layer_all_hessian + m.layer_ffn_hessian * (copies - 1),
                    layer_linear_bytes=m.layer_linear_bytes + m.layer_ffn_bytes * (copies - 1),
                    linear_bytes=m.linear_bytes + growth)
    work = {ACTIVATIONS: _activations(src, calib, m.elem)} if cfg.router_init == "hidden" else {}
    return _Step(grown, work, {"upcycled experts": growth})


def _prune_experts(cfg, src: SourceSize, m: ModelSize, calib: Calibration | None) -> _Step:
    """Layer-wise scoring holds every calibration token's hidden state, the scored tokens in fp32
    and every expert's output on at most `OUTPUT_BYTES` of them; the experts dropped leave."""
    experts = max(1, m.experts)
    if cfg.keep is not None:
        keep = cfg.keep / experts
    elif cfg.ratio is not None:
        keep = 1 - cfg.ratio
    elif isinstance(cfg.per_layer, list) and cfg.per_layer:
        keep = sum(cfg.per_layer) / len(cfg.per_layer) / experts
    else:
        keep = 1.0
    keep = min(1.0, max(0.0, keep))
    tokens = min(calib.tokens, cfg.max_tokens) if calib else 0
    budget = max(64, PRUNE_OUTPUT_BYTES // (4 * experts * max(1, src.hidden)))
    scoring = 4 * tokens * src.hidden + 4 * experts * min(tokens, budget) * src.hidden
    dropped = int(m.expert_bytes * (1 - keep))
    pruned = replace(m, bytes=m.bytes - dropped, params=m.params - dropped // m.elem,
                     expert_bytes=m.expert_bytes - dropped, linear_bytes=m.linear_bytes - dropped,
                     experts=max(1, round(experts * keep)),
                     layer_expert_hessian=int(m.layer_expert_hessian * keep),
                     layer_expert_bytes=int(m.layer_expert_bytes * keep))
    return _Step(pruned, {ACTIVATIONS: _activations(src, calib, m.elem) + scoring})


def _sparsify(cfg, src: SourceSize, m: ModelSize, calib: Calibration | None) -> _Step:
    """Magnitude pruning copies one matrix at a time; Wanda and SparseGPT calibrate layer by layer:
    every token's hidden state, Σxxᵀ of each target matrix of one layer, that layer's targets in
    fp32, and SparseGPT's batched solve (at most `SPARSEGPT_BATCH_BYTES` of weights and Hessians)."""
    if cfg.method == "magnitude":
        return _Step(m)
    experts_only = list(cfg.targets) == ["experts"]
    hessians = m.layer_expert_hessian if experts_only else m.layer_all_hessian
    weights = 4 * (m.layer_expert_bytes if experts_only else m.layer_linear_bytes) // m.elem
    if cfg.method == "sparsegpt":
        solve = SPARSEGPT_HESSIAN_COPIES * hessians + SPARSEGPT_BATCH_COPIES * min(hessians + weights,
                                                                                 SPARSEGPT_BATCH_BYTES)
    else:
        solve = WANDA_HESSIAN_COPIES * hessians
    work = {ACTIVATIONS: _activations(src, calib, m.elem), HESSIANS: int(solve) + SPARSIFY_FIXED,
            PRUNING: int(SPARSIFY_WEIGHT_COPIES * weights)}
    heap = FRAGMENTATION[cfg.method] * hessians * m.small_hessian_share * max(1, src.layers)
    return _Step(m, work, {FRAGMENTED: int(heap)})


def _quantize(cfg, src: SourceSize, m: ModelSize, calib: Calibration | None) -> _Step:
    """bitsandbytes layers replace the float ones; on CPU the quantized model is larger than the
    float one was (measured, `QUANT_GROWTH`). MoE models are written in moeconv's format, dense ones
    for transformers."""
    method = "nf4" if cfg.method == "fp4" else cfg.method  # the same code path as nf4
    key = (method, 4 if m.elem >= 4 else 2, "moe" if m.experts else "dense")
    per_param = QUANT_GROWTH.get(key, max(v for k, v in QUANT_GROWTH.items() if k[0] == method))
    growth = int(per_param * m.linear_bytes // m.elem)
    quantized = replace(m, bytes=m.bytes + growth, quantized=cfg.method,
                        consumer="moeconv" if m.experts else "transformers")
    return _Step(quantized, {}, {f"{cfg.method} layers beside the float model": growth})


def _keep_teacher(cfg, src: SourceSize, m: ModelSize, calib: Calibration | None) -> _Step:
    """A deep copy of the model, kept to the end of the run."""
    return _Step(m, {}, {TEACHER: m.bytes})


def _distill(cfg, src: SourceSize, m: ModelSize, calib: Calibration | None) -> _Step:
    """Training: gradients and Adam's moments in fp32 for every parameter, and every layer's
    activations for the backward pass; the teacher is the snapshot `keep-teacher` kept."""
    from moeconv.model_limits import ModelLimits, activation_bytes
    limits = ModelLimits(src.name, vocab_size=src.vocab or None, hidden=src.hidden or None,
                         intermediate=src.inter or None, heads=src.heads, layers=src.layers or None)
    seq = calib.seq_len if calib else 128
    rows = cfg.micro_batch_size or cfg.batch_size
    work = {TEACHER: int(OPTIMIZER_COPIES * m.float32_bytes),
            ACTIVATIONS: activation_bytes(limits, rows, seq, rows_per_forward=rows, training=True)}
    from moeconv.train.memory import TrainingSizes
    # per process under torchrun: the teacher is the keep-teacher snapshot, as large as the model;
    # every float weight is trained (the mode's own choice is not known from headers)
    sizes = TrainingSizes(student=m.bytes, teacher=m.bytes, trained=m.bytes,
                          largest_layer=m.layer_linear_bytes, activations=work[ACTIVATIONS])
    return _Step(m, work, whole=m.bytes + sum(work.values()), training=(sizes, cfg))


def _export_onnx(cfg, src: SourceSize, m: ModelSize, calib: Calibration | None) -> _Step:
    """The model in fp32, its serialized graph and an onnxruntime session on it (`ONNX_COPIES`)."""
    work = {ONNX: int(ONNX_COPIES * m.float32_bytes)}
    return _Step(m, work, whole=m.bytes + work[ONNX])


PASSES = {"upcycle": _upcycle, "prune-experts": _prune_experts, "sparsify": _sparsify, "quantize": _quantize,
          "keep-teacher": _keep_teacher, "distill": _distill, "export-onnx": _export_onnx}


# ---- the plan --------------------------------------------------------------------------------------

def plan_memory(source, passes, *, calib_tokens: int | None = None, calib_seq_len: int | None = None,
                device: str = "cpu", reload_check: bool = True, flags: dict[str, str] | None = None,
                processes: int = 2) -> MemoryPlan:
    """The estimated peak memory of running `passes` (pass objects, with their `name` and `config`)
    on `source`, from headers only (`source_size`); passes it does not know hold nothing extra.

    `calib_tokens` / `calib_seq_len`: the calibration data (None: none). `device`: where the passes
    compute; with "cuda" the calibration activations, Hessians and optimizer state are counted on
    the device, not in `total`. `reload_check`: the job writes the result and reloads it to compare
    (every `run_to_dir` job; `export onnx` does not). `flags`: the command's options behind the
    fixes — "calib" (the options that set the calibration tokens), "method" (how to ask for
    magnitude pruning), "device" (the option that picks the device). `processes`: the torchrun
    processes a `distill` step would run on (`MemoryPlan.training`: each one's memory under ddp
    and fsdp)."""
    src = source_size(source)
    calib = _calibration(calib_tokens, calib_seq_len)
    m, kept, work, whole, work_name, training = src.model, {}, {}, {}, "", None
    for p in passes:
        name, cfg = _name_config(p)
        if name not in PASSES:
            continue
        step = PASSES[name](cfg, src, m, calib)
        for k, v in step.kept.items():
            kept[k] = kept.get(k, 0) + v
        if sum(step.work.values()) > sum(work.values()):
            work, work_name = step.work, name  # passes run one after another: the largest working set counts
        if step.whole is not None:
            whole[name] = int(step.whole)
        if step.training is not None:
            training = _training(*step.training, processes)
        m = step.model
    host, on_device = _by_device(work, device)
    held = {RUNTIME: RUNTIME_BYTES, WEIGHTS: src.model.bytes,
            LOADING: int(LOAD_EXTRA.get(src.kind, 0.0) * src.model.bytes), **kept}
    check = {CHECK: _check_phase(m, src, calib)} if reload_check else {}
    total, peak = _peak(sum(held.values()), host, check, work_name)
    parts = {k: int(v) for k, v in {**held, **host, **check}.items() if v > 0 or k == WEIGHTS}
    notes = [n for n in (src.note,) if n]
    if not src.known:
        notes.append(f"{src.name}: its size is not known before it runs; the estimate counts the runtime only")
    plan = MemoryPlan(total=total, parts=parts, whole_model=whole, notes=notes, source=src.name,
                      device=device, on_device=on_device, peak=peak, training=training)
    plan.fixes = _fixes(plan, flags or {})
    return plan


def _training(sizes, cfg, processes: int) -> dict:
    """Per-process memory of a distill step under ddp and fsdp with `processes` processes."""
    from moeconv.train.memory import both
    per_rank_rows = max(1, cfg.batch_size // max(1, processes))
    micro = cfg.micro_batch_size or per_rank_rows
    return both(sizes, processes, micro_batches=max(1, per_rank_rows // micro))


def _peak(held: int, work: dict[str, int], check: dict[str, int], work_name: str) -> tuple[int, str]:
    """(peak bytes, when): what is held all along, plus the larger of the largest pass's working
    memory and the check; the check comes on top of the `RETAINED` share of that working memory
    that the allocator keeps after the pass (measured, see RETAINED)."""
    w, c = sum(work.values()), sum(check.values())
    if w >= c + RETAINED * w:
        return held + w, f"during {work_name}" if work_name else "loading"
    return held + c + int(RETAINED * w), "during the numeric check" if c else "loading"


def _name_config(p):
    """(name, config) of a pass object (a `moeconv.pass_base.Pass`)."""
    return getattr(p, "name", type(p).__name__), getattr(p, "config", None)


def _calibration(tokens: int | None, seq_len: int | None) -> Calibration | None:
    if not tokens or tokens <= 0:
        return None
    from moeconv.data import DEFAULT_SEQ_LEN
    return Calibration(int(tokens), int(min(tokens, seq_len or DEFAULT_SEQ_LEN)))


_DEVICE_PARTS = (ACTIVATIONS, HESSIANS, TEACHER, PRUNING)


def _by_device(work: dict[str, int], device: str) -> tuple[dict[str, int], dict[str, int]]:
    """(host parts, device parts) of a pass's working memory."""
    if not str(device).startswith("cuda"):
        return dict(work), {}
    return ({k: v for k, v in work.items() if k not in _DEVICE_PARTS},
            {k: v for k, v in work.items() if k in _DEVICE_PARTS})


def _check_phase(m: ModelSize, src: SourceSize, calib: Calibration | None) -> int:
    """The written result reloaded by its consumer and compared with the in-memory model, and the
    report's forward on up to 16 calibration rows (their logits)."""
    if m.quantized:
        reload = CHECK_QUANT.get(m.consumer, max(CHECK_QUANT.values())) * m.params
    elif m.consumer == "transformers":
        reload = CHECK_FLOAT_RELOAD * m.float32_bytes + (CHECK_FLOAT_REFERENCE * m.float32_bytes if m.elem < 4 else 0)
    else:
        reload = CHECK_MOECONV_RELOAD * m.bytes
    seq = calib.seq_len if calib else 32
    return int(reload) + 4 * 16 * seq * src.vocab


def _fixes(plan: MemoryPlan, flags: dict[str, str]) -> list[str]:
    """What would make the run fit, most specific first; only options the command has."""
    fixes, big = [], plan.total // 5
    if plan.parts.get(ACTIVATIONS, 0) >= big and flags.get("calib"):
        fixes.append(f"fewer calibration tokens ({flags['calib']})")
    if plan.parts.get(HESSIANS, 0) >= big and flags.get("method"):
        fixes.append(f"{flags['method']} (no per-layer Hessians)")
    if flags.get("device") and not plan.device.startswith("cuda") and \
            sum(plan.parts.get(k, 0) for k in _DEVICE_PARTS) >= big:
        fixes.append(f"{flags['device']} cuda")
    for name, need in plan.whole_model.items():
        fixes.append(f"{name} needs the whole model in memory (about {format_bytes(need)} for it alone): "
                     "run it where that fits")
    fixes.append("a machine with more memory")
    fixes.append("--max-memory SIZE if more memory is free than this machine reports")
    return fixes


def memory_available() -> int:
    """What this run may use by default: the memory available (MemAvailable, the container's
    limit) plus what this process already holds (the runtime the estimate counts)."""
    return available_memory() + _own_rss()


def _own_rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def parse_max_memory(text: str | int | None) -> int | None:
    """`--max-memory SIZE` in bytes; None for absent or 0 (the memory available)."""
    if text is None or str(text).strip() in ("", "0"):
        return None
    from moeconv.errors import InputError
    from moeconv.units import parse_size
    try:
        return parse_size(text)
    except InputError as exc:
        raise InputError(f"--max-memory: {exc}") from None


def check_plan(plan: MemoryPlan, max_memory: int | None = None, *, given: str | None = None) -> None:
    """Raise `MemoryPlanError` (one line: the estimate, its largest parts, the limit, the fixes)
    when `plan.total` exceeds `max_memory` (None: `memory_available()`). `given`: the limit as the
    user wrote it, quoted in the message. A plan on a GPU is checked against its free memory
    first (`check_device_plan`)."""
    check_device_plan(plan)
    limit = max_memory if max_memory else memory_available()
    if plan.total - plan.spillable <= limit:  # the hidden states that do not fit go to disk
        return
    where = f"--max-memory {given or format_bytes(limit)}" if max_memory else "--max-memory"
    raise MemoryPlanError(f"needs about {format_bytes(plan.total)} of memory ({plan.breakdown(4)}), more than the "
                          f"{format_bytes(limit)} available ({where}); no weight was read, nothing written; "
                          f"fix: {'; or '.join(plan.fixes)}")


def check_device_plan(plan: MemoryPlan, capacity: int | None = None) -> None:
    """Raise `MemoryPlanError` (one line) when what `plan` holds on the GPU (`on_device`) exceeds
    `capacity` (None: the GPU's free memory now, `gpu_memory_free`); a CPU plan passes."""
    need = sum(plan.on_device.values())
    if not need or not plan.device.startswith("cuda"):
        return
    capacity = gpu_memory_free() if capacity is None else capacity
    if capacity is None or need <= capacity:
        return
    largest = sorted(((v, k) for k, v in plan.on_device.items() if v > 0), reverse=True)[:3]
    fixes = ["fewer calibration tokens (--calib-samples / --calib-seq-len)"] if plan.on_device.get(ACTIVATIONS) else []
    fixes += ["--device cpu", "a GPU with more memory"]
    raise MemoryPlanError(f"needs about {format_bytes(need)} of GPU memory ("
                          + ", ".join(f"{_short(k)} {format_bytes(v)}" for v, k in largest)
                          + f"), more than the {format_bytes(capacity)} free on the GPU; no weight was read, nothing "
                          f"written; fix: {'; or '.join(fixes)}")


MIN_ACTIVATION_BUDGET = 64 * 2**20


def activation_budget(plan: MemoryPlan, max_memory: str | None) -> int | None:
    """The memory a streamed sweep may keep calibration hidden states in (beyond it they are
    written to the offload directory): what `--max-memory` (default: the memory available) leaves
    after the rest of `plan`, at least `MIN_ACTIVATION_BUDGET`; None when nothing can spill (no
    calibration, or the hidden states are on the GPU)."""
    if not plan.spillable:
        return None
    limit = parse_max_memory(max_memory) or memory_available()
    return max(MIN_ACTIVATION_BUDGET, limit - (plan.total - plan.spillable))


def gpu_memory_free() -> int | None:
    """Free memory of the current CUDA GPU in bytes (None without one)."""
    import torch
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def calibration_size(path, num_samples: int | None, seq_len: int | None, model=None) -> tuple[int, int]:
    """(tokens, sequence length) that `moeconv.data.calibration_tokens(path, model, …, num_samples,
    seq_len)` will give at most: a safetensors token-id file's shape is read from its header
    (rows up to `num_samples`), anything else is `num_samples × seq_len`. Given the `model`, the
    checks `calibration_tokens` makes of that shape are made here, from headers alone, so that a
    plan never prices what the model cannot take: a sequence longer than its positions, or
    activations over the machine's limit, named by --calib-samples / --calib-seq-len (or the
    token-id file)."""
    from moeconv.data import DEFAULT_SEQ_LEN
    from moeconv.model_limits import check_sequences, check_token_rows, model_limits
    limits = model_limits(model) if model is not None else None
    samples = num_samples or 32
    if seq_len is None:  # calibration_tokens' default: DEFAULT_SEQ_LEN, or the model's positions if fewer
        seq_len = limits.seq_len(DEFAULT_SEQ_LEN) if limits is not None else DEFAULT_SEQ_LEN
    suffix = Path(path).suffix
    shape = _safetensors_shape(Path(path)) if suffix == ".safetensors" else None
    if shape is not None and len(shape) == 2:
        rows, width = min(samples, shape[0]), shape[1]
        if limits is not None:
            check_token_rows(limits, path, rows, width)
        return rows * width, width
    if limits is not None and suffix not in (".safetensors", ".pt"):  # text: token-id files keep their own rows
        check_sequences(limits, samples, seq_len, seq_len_flag="--calib-seq-len", samples_flag="--calib-samples")
    return samples * seq_len, seq_len


def _safetensors_shape(path: Path) -> list[int] | None:
    """The shape of the first tensor in a safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= 2**24 else {}
        spec = next(v for k, v in header.items() if k != "__metadata__")
        return [int(d) for d in spec["shape"]]
    except (OSError, ValueError, StopIteration, KeyError, TypeError, AttributeError):
        return None


# The streamed route (moeconv.jobs.stream_*): what it holds at once is one decoder layer (read,
# its fp32 working copy and the changed result, then one layer of each model in the comparison)
# and the embeddings and head. Measured (synthetic bf16 Mixtral, hidden 512, 8 experts, 35 MB per
# layer, 65 MB embeddings + head; int8 quantize / magnitude sparsify, peak RSS): 550 / 506 MiB at 2
# layers, 570 / 526 MiB at 8; this estimate says 1.0 GiB for both depths.
STREAM_LAYER_COPIES = 4   # one layer in fp32 units: read, fp32 working copy, result, comparison
STREAM_OUTER_COPIES = 2   # embeddings + head: the source's, then the output's (and a cast)
# With --device cuda (not measured: no GPU where these were calibrated), the copies above are on the
# GPU; the host holds what passes through it (each tensor read from disk before it is copied to
# the GPU, each output tensor copied back before it is written: one layer in half precision is
# half of its fp32 units) and the CUDA runtime (context, cuBLAS, bitsandbytes' kernels: a
# typical host-side figure).
STREAM_HOST_LAYER_COPIES = 1
CUDA_RUNTIME_BYTES = 2**30


def plan_streaming(source, passes=(), *, calib_tokens: int | None = None, calib_seq_len: int | None = None,
                   flags: dict[str, str] | None = None, device: str = "cpu") -> MemoryPlan:
    """The streamed route's peak from the safetensors headers: the runtime, the largest decoder
    layer (parameters grouped by the layer number in their names) and everything outside layers;
    with calibrated `passes` (one sweep, `moeconv.jobs.stream_layerwise`), the largest working set
    of one pass on one layer (its statistics, the calibration hidden states) on top. `flags`: as
    for `plan_memory` (the options behind the fixes). `device` "cuda": the layer, the parts outside
    the layers and the working set are counted in `on_device`, not in `total` (see
    `_streamed_on_gpu`)."""
    from moeconv.io.safetensors_io import SourceCheckpoint
    ckpt = SourceCheckpoint(Path(str(source)))
    layers: dict[str, int] = {}
    outer = 0
    for spec in ckpt.specs.values():
        m = re.search(r"(^|\.)(\d+)\.", spec.name)
        elements = math.prod(spec.shape)
        if m is None:
            outer += spec.nbytes
        else:
            key = spec.name[: m.end()]
            layers[key] = layers.get(key, 0) + 4 * elements
    largest = max(layers.values(), default=0)
    parts = {RUNTIME: RUNTIME_BYTES, STREAM_LAYER: STREAM_LAYER_COPIES * largest,
             STREAM_OUTER: STREAM_OUTER_COPIES * outer}
    work, work_name = _streamed_work(source, passes, calib_tokens, calib_seq_len)
    parts.update(work)
    on_device: dict[str, int] = {}
    if str(device).startswith("cuda"):
        parts, on_device = _streamed_on_gpu(parts, largest, outer)
    total = sum(parts.values())
    plan = MemoryPlan(total=total, parts=parts, route="streaming", source=str(source), device=str(device),
                      on_device=on_device, peak=f"per layer, during {work_name}" if work_name else "per layer",
                      streaming=total)
    if ACTIVATIONS in parts:  # on the host: the hidden-state copies beyond the budget spill to disk
        plan.spillable = min(parts[ACTIVATIONS], _hidden_cache_bytes(source, calib_tokens))
    plan.fixes = _fixes(plan, flags or {})
    return plan


def _streamed_on_gpu(parts: dict[str, int], largest: int, outer: int) -> tuple[dict[str, int], dict[str, int]]:
    """(host parts, GPU parts) of a streamed plan on one GPU: the layer's working copies, the parts
    outside the layers and the passes' per-layer working set (`_DEVICE_PARTS`) are on the GPU; the
    host keeps the runtime and adds the CUDA runtime and the tensors in transit."""
    gpu = {k: v for k, v in parts.items() if k in (STREAM_LAYER, STREAM_OUTER, *_DEVICE_PARTS)}
    host = {k: v for k, v in parts.items() if k not in gpu}
    host.update({CUDA_RUNTIME: CUDA_RUNTIME_BYTES, STREAM_TRANSIT: STREAM_HOST_LAYER_COPIES * largest + outer})
    return host, gpu


def _hidden_cache_bytes(source, calib_tokens: int | None) -> int:
    """The calibration hidden states a sweep caches (`HIDDEN_COPIES` of every token's), the part
    of `_activations` that can be written to disk (the rest is one forward's temporaries)."""
    if not calib_tokens:
        return 0
    src = source_size(source)
    return HIDDEN_COPIES * int(calib_tokens) * src.hidden * src.model.elem


def _streamed_work(source, passes, calib_tokens, calib_seq_len) -> tuple[dict[str, int], str]:
    """The largest per-layer working set among `passes` (they run one after another on a layer),
    as `plan_memory` counts it, without what the in-memory route keeps across layers."""
    if not passes:
        return {}, ""
    src = source_size(source)
    calib = _calibration(calib_tokens, calib_seq_len)
    m, work, work_name = src.model, {}, ""
    for p in passes:
        name, cfg = _name_config(p)
        if name not in PASSES:
            continue
        step = PASSES[name](cfg, src, m, calib)
        if sum(step.work.values()) > sum(work.values()):
            work, work_name = step.work, name
        m = step.model
    return {k: int(v) for k, v in work.items() if v > 0}, work_name


def plan_and_check(source, passes, *, max_memory: str | None, route: str = "in-memory", **kwargs) -> MemoryPlan:
    """`plan_memory(source, passes, **kwargs)` (or `plan_streaming(source)` for the streamed route),
    refused by `check_plan` against `--max-memory` (`parse_max_memory`); the commands call it
    before loading anything."""
    if route == "streaming":
        plan = plan_streaming(source, passes, calib_tokens=kwargs.get("calib_tokens"),
                              calib_seq_len=kwargs.get("calib_seq_len"), flags=kwargs.get("flags"),
                              device=kwargs.get("device", "cpu"))
    else:
        plan = plan_memory(source, passes, **kwargs)
    return refuse_over(plan, max_memory)


def refuse_over(plan: MemoryPlan, max_memory: str | None) -> MemoryPlan:
    """`plan`, or `MemoryPlanError` (one line) when it exceeds `--max-memory` (`parse_max_memory`)."""
    limit = parse_max_memory(max_memory)
    check_plan(plan, limit, given=str(max_memory).strip() if limit else None)
    return plan
