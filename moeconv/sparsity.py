"""Sparsity patterns, mask checks, and the compressed storage form of sparse weights.

Promises:
- `SparsityPattern.parse("2:4")` means *at most 2 non-zeros in every group of 4 consecutive
  weights along the input dimension* (the layout NVIDIA sparse tensor cores run);
  `check_pattern` verifies exactly that on a weight, as the `nn.Linear` convention (out, in).
- `compress` / `decompress` are lossless bit for bit (−0.0, NaN payloads included): the kept values
  are every element whose bytes are not all zero, in row-major order, plus a bitmask of their
  positions (1 bit per weight: for 2:4 that is 2.125 bytes per weight instead of 4 in fp32, 1.125
  instead of 2 in bf16).
- `write_compressed(dir)` writes `dir/compressed/`, a checkpoint that `moeconv.load` restores to
  exactly the tensors of `dir` (same names, dtypes, shapes and bytes). Its `model_type` is
  `moeconv_sparse`, unknown to transformers on purpose: `AutoModel` refuses it loudly rather than
  loading a model with missing weights.
- 2:4 is a *storage and accuracy* feature on CPU: PyTorch has no CPU kernel for semi-structured
  sparse matmul (FIELD.md). `speed_note()` says so; `semi_structured_speed()` measures the CUDA
  path where a GPU exists and returns None elsewhere.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from moeconv.errors import InputError, MoeconvError, VerificationError

COMPRESSED_DIR = "compressed"
COMPRESSED_TYPE = "moeconv_sparse"
FORMAT_VERSION = 1
VALUES, MASK = ".sparse_values", ".sparse_mask"
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityPattern:
    """`n`:`m` (keep n of every m along the input dim) or unstructured with `ratio` zeros per row."""

    n: int | None
    m: int | None
    ratio: float

    @classmethod
    def parse(cls, text: str, ratio: float | None = None) -> "SparsityPattern":
        text = str(text).strip().lower()
        if text == "unstructured":
            r = 0.5 if ratio is None else float(ratio)
            if not 0 < r < 1:
                raise ValueError(f"unstructured sparsity ratio must be in (0, 1), got {r}")
            return cls(None, None, r)
        match = _NM.match(text)
        if not match:
            raise ValueError(f"pattern must be N:M (e.g. 2:4) or 'unstructured', got {text!r}")
        n, m = int(match.group(1)), int(match.group(2))
        if not 1 <= n < m or m > 256:
            raise ValueError(f"pattern {n}:{m}: need 1 <= N < M <= 256")
        if ratio is not None:
            raise ValueError(f"pattern {n}:{m} fixes the sparsity at {1 - n / m:.3g}; a ratio is only for 'unstructured'")
        return cls(n, m, 1 - n / m)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"unstructured {self.ratio:.0%}"


def sparsity(w: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((w == 0).sum().item()) / max(1, w.numel())


def nm_violations(w_out_in: torch.Tensor, n: int, m: int) -> int:
    """Groups of `m` consecutive input weights (per output row) holding more than `n` non-zeros."""
    rows, cols = w_out_in.shape
    if cols % m:
        raise VerificationError(f"input dimension {cols} is not a multiple of {m}")
    nz = (w_out_in != 0).reshape(rows, cols // m, m).sum(-1)
    return int((nz > n).sum().item())


def check_pattern(w_out_in: torch.Tensor, pattern: SparsityPattern, name: str = "weight") -> float:
    """Raise `VerificationError` unless `w_out_in` (out, in) satisfies `pattern`; returns its sparsity.

    N:M is exact (every group); unstructured needs each row at or above the target ratio (pruning
    rounds the count per row down to whole weights)."""
    if not torch.isfinite(w_out_in).all():
        raise VerificationError(f"{name}: non-finite values after pruning")
    if pattern.is_nm:
        bad = nm_violations(w_out_in, pattern.n, pattern.m)
        if bad:
            raise VerificationError(f"{name}: {bad} groups of {pattern.m} input weights hold more than {pattern.n} non-zeros")
    else:
        cols = w_out_in.shape[1]
        need = int(cols * pattern.ratio)
        zeros = (w_out_in == 0).sum(1)
        if (zeros < need).any():
            raise VerificationError(f"{name}: a row has fewer than {need} of {cols} weights pruned")
    return sparsity(w_out_in)


def keep_top(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Boolean keep-mask (…, out, in): the `n` highest scores of every `m` consecutive inputs, or
    the highest `1 - ratio` of each row for unstructured. Works on batched scores."""
    *lead, cols = scores.shape
    if pattern.is_nm:
        grouped = scores.reshape(*lead, cols // pattern.m, pattern.m)
        idx = torch.topk(grouped, pattern.n, dim=-1).indices
        keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, idx, True)
        return keep.reshape(scores.shape)
    drop = int(cols * pattern.ratio)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        idx = torch.topk(scores, drop, dim=-1, largest=False).indices
        keep.scatter_(-1, idx, False)
    return keep


# ---- the compressed form: kept values + a positional bitmask -------------------------------------

def _nonzero_bytes(t: torch.Tensor) -> torch.Tensor:
    # Bytes, not values: -0.0 is kept (it is not bit-identical to the +0.0 we would restore).
    flat = t.detach().contiguous().reshape(-1)
    as_int = _SAME_WIDTH_INT.get(t.element_size())
    if as_int is not None:  # one integer compare per value instead of one per byte
        return flat.view(as_int).ne(0)
    return flat.view(torch.uint8).reshape(flat.numel(), t.element_size()).ne(0).any(-1)


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def compress(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, packed_mask): `values` 1-D in `t`'s dtype, `packed_mask` uint8, 8 positions a byte."""
    keep = _nonzero_bytes(t)
    values = t.detach().contiguous().reshape(-1)[keep].clone()
    pad = (-keep.numel()) % 8
    bits = torch.cat([keep, keep.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
    packed = (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return values, packed


def decompress(values: torch.Tensor, packed: torch.Tensor, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
    dtype = dtype or values.dtype
    numel = 1
    for d in shape:
        numel *= int(d)
    keep = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool().reshape(-1)[:numel]
    if int(keep.sum()) != values.numel() or values.dtype != dtype:
        raise InputError("compressed tensor: mask and values disagree (corrupt checkpoint)")
    out = torch.zeros(numel, dtype=dtype)
    out[keep] = values
    return out.reshape(tuple(int(d) for d in shape))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def compressed_nbytes(t: torch.Tensor) -> int:
    nnz = int(_nonzero_bytes(t).sum())
    return nnz * t.element_size() + (t.numel() + 7) // 8


def worth_compressing(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2 and compressed_nbytes(t) < t.numel() * t.element_size()


def write_compressed(out_dir: Path, *, pattern: str, shard_bytes: int = 5 * 10**9) -> dict:
    """Write `out_dir/compressed/` from the checkpoint already written (and verified) in `out_dir`.

    Every tensor that gets smaller is stored as `NAME.sparse_values` + `NAME.sparse_mask`; the rest
    verbatim. Streams one tensor at a time (each source tensor is read twice: sizes, then data)."""
    from moeconv.formats.writer import TensorSource, write_checkpoint
    from moeconv.io.safetensors_io import SourceCheckpoint, TensorSpec

    out_dir = Path(out_dir)
    src = SourceCheckpoint(out_dir)
    dense_config = json.loads((out_dir / "config.json").read_text())
    specs, compressed, dense_bytes = [], {}, 0
    for name in src.names():
        t = src.get(name)
        dense_bytes += t.numel() * t.element_size()
        if worth_compressing(t):
            nnz = int(_nonzero_bytes(t).sum())
            specs.append(TensorSpec(name + VALUES, t.dtype, (nnz,)))
            specs.append(TensorSpec(name + MASK, torch.uint8, ((t.numel() + 7) // 8,)))
            compressed[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            specs.append(TensorSpec(name, t.dtype, tuple(t.shape)))
    cache: dict = {}

    def produce(spec):
        for suffix, slot in ((VALUES, 0), (MASK, 1)):
            if spec.name.endswith(suffix) and spec.name[: -len(suffix)] in compressed:
                base = spec.name[: -len(suffix)]
                if cache.get("name") != base:
                    cache.clear()
                    cache.update(name=base, parts=compress(src.get(base)))
                return cache["parts"][slot]
        return src.get(spec.name)

    target = out_dir / COMPRESSED_DIR
    target.mkdir()
    config = {"model_type": COMPRESSED_TYPE, COMPRESSED_TYPE: {
        "format_version": FORMAT_VERSION, "pattern": pattern, "dense_config": dense_config,
        "compressed": compressed}}
    stats = write_checkpoint(target, TensorSource(specs, produce, []), config, shard_bytes=shard_bytes)
    # Re-read what was written and restore each tensor: it must equal the dense one byte for byte.
    back = SourceCheckpoint(target)
    for name, info in compressed.items():
        got = decompress(back.get(name + VALUES), back.get(name + MASK), info["shape"])
        if not _same_bytes(got, src.get(name)):
            raise VerificationError(f"compressed {name} does not restore to the written tensor")
    stats.update({"path": COMPRESSED_DIR, "dense_bytes": dense_bytes, "compressed_tensors": len(compressed),
                  "ratio": round(stats["bytes"] / max(1, dense_bytes), 4)})
    return stats


def load_compressed(path: Path, raw: dict, *, dtype=None):
    """`moeconv.load` of a `compressed/` directory: decompress into a private temporary checkpoint
    (streamed, one tensor at a time) and load that with the normal loader."""
    from moeconv.formats.writer import TensorSource, write_checkpoint
    from moeconv.io.load import load
    from moeconv.io.safetensors_io import SourceCheckpoint, TensorSpec

    path = Path(path)
    section = raw.get(COMPRESSED_TYPE)
    if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path / 'config.json'}: unsupported {COMPRESSED_TYPE} format version")
    compressed = section.get("compressed") or {}
    if not isinstance(compressed, dict) or not isinstance(section.get("dense_config"), dict):
        raise InputError(f"{path / 'config.json'}: {COMPRESSED_TYPE} needs `compressed` and `dense_config` objects")
    src = SourceCheckpoint(path)
    specs = []
    for name in src.names():
        if name.endswith(MASK):
            continue
        if name.endswith(VALUES):
            base = name[: -len(VALUES)]
            info = compressed.get(base)
            if info is None or base + MASK not in src.specs:
                raise InputError(f"{path}: {name} has no mask or no record in config.json")
            specs.append(TensorSpec(base, *_record(path, base, info)))
        else:
            specs.append(src.specs[name])

    def produce(spec):
        if spec.name in compressed:
            try:
                return decompress(src.get(spec.name + VALUES), src.get(spec.name + MASK), spec.shape, spec.dtype)
            except InputError as exc:
                raise InputError(f"{path}: {spec.name}: {exc}") from None
        return src.get(spec.name)

    tmp = Path(tempfile.mkdtemp(prefix="moeconv-sparse-"))
    try:
        write_checkpoint(tmp, TensorSource(specs, produce, []), section["dense_config"], shard_bytes=5 * 10**9)
        try:
            state = load(tmp, dtype=dtype)
        except MoeconvError as exc:  # name the user's directory, not the private temporary one
            raise InputError(str(exc).replace(str(tmp), str(path))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # loaded tensors own their memory (or a still-open mapping)
    state.source.path = path
    parent = path.parent
    state.source.tokenizer_dir = parent if any((parent / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None
    return state


def _record(path: Path, base: str, info) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of a compressed tensor's record in config.json, checked."""
    try:
        dtype = getattr(torch, info["dtype"], None)
        shape = tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError):
        dtype, shape = None, ()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or not shape or min(shape) < 0:
        raise InputError(f"{path / 'config.json'}: record of compressed tensor {base} needs a float dtype and a shape")
    return dtype, shape


# ---- speed: honest about where 2:4 is faster ------------------------------------------------------

def speed_note() -> str:
    if torch.cuda.is_available():
        return ("CUDA available: 2:4 weights can run through torch.sparse.to_sparse_semi_structured "
                "(sparse tensor cores); it pays off at larger batch sizes — measure with scripts/bench_sparsify.py")
    return ("CPU only: 2:4 saves storage (with --compressed), not time — PyTorch has no CPU kernel for "
            "semi-structured sparse matmul, so the zeros are multiplied like any other weight")


def semi_structured_speed(weight: torch.Tensor, tokens: int = 4096, repeats: int = 20) -> dict | None:
    """Time `x @ Wᵀ` dense vs `to_sparse_semi_structured(W)` on CUDA (fp16). None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.sparse import to_sparse_semi_structured
    w = weight.detach().to("cuda", torch.float16)
    x = torch.randn(tokens, w.shape[1], device="cuda", dtype=torch.float16)
    sw = to_sparse_semi_structured(w)

    def bench(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    dense_ms = bench(lambda: torch.nn.functional.linear(x, w))
    sparse_ms = bench(lambda: torch.nn.functional.linear(x, sw))
    err = (torch.nn.functional.linear(x, sw) - torch.nn.functional.linear(x, w)).abs().max().item()
    return {"tokens": tokens, "shape": list(w.shape), "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "max_abs_diff": err}


def to_semi_structured_(module: torch.nn.Module, names: list[str]) -> int:
    """Swap the named `nn.Linear` weights for CUDA semi-structured sparse tensors, for inference
    only (such a module is not saved; save the dense form). Returns how many were converted."""
    if not torch.cuda.is_available():
        return 0
    from torch.sparse import to_sparse_semi_structured
    done = 0
    for name in names:
        lin = module.get_submodule(name).to("cuda", torch.float16)  # the kernels take fp16/bf16 on CUDA
        lin.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
        done += 1
    return done
