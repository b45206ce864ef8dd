"""The compressed storage form of sparse weights (`sparsify --compressed`): a checkpoint format.

Promises:
- `compress` / `decompress` are lossless bit for bit (−0.0, NaN payloads included): the kept values
  are every element whose bytes are not all zero, in row-major order, plus a bitmask of their
  positions (1 bit per weight: for 2:4 that is 2.125 bytes per weight instead of 4 in fp32, 1.125
  instead of 2 in bf16).
- `write_compressed(dir)` writes `dir/compressed/`, a checkpoint that `moeconv.load` restores to
  exactly the tensors of `dir` (same names, dtypes, shapes and bytes). Its `model_type` is
  `moeconv_sparse`, unknown to transformers on purpose: `AutoModel` refuses it loudly rather than
  loading a model with missing weights.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from moeconv.errors import InputError, MoeconvError, VerificationError
from moeconv.formats.base import Format
from moeconv.formats.writer import TensorSource, write_checkpoint
from moeconv.io.safetensors_io import SourceCheckpoint, TensorSpec
from moeconv.state import ModelState

COMPRESSED_DIR = "compressed"
COMPRESSED_TYPE = "moeconv_sparse"
FORMAT_VERSION = 1
VALUES, MASK = ".sparse_values", ".sparse_mask"


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


def load_compressed(path: Path, raw: dict, *, dtype=None, read_dir):
    """`moeconv.load` of a `compressed/` directory: decompress into a private temporary checkpoint
    (streamed, one tensor at a time) and read that with `read_dir(dir, dtype=...)`, the loader
    that dispatches over every format (passed in, so that formats never import the dispatcher)."""
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
            state = read_dir(tmp, dtype=dtype)
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


class Compressed(Format):
    """Read-only here: written beside a verified checkpoint by `write_compressed` (its input is
    the directory just written, not a model state)."""

    name = "compressed"
    consumer = "moeconv"

    def detect(self, path: Path, raw: dict) -> bool:
        return COMPRESSED_TYPE in raw

    def read(self, path: Path, raw: dict, *, dtype=None, read_dir=None) -> ModelState:
        return load_compressed(path, raw, dtype=dtype, read_dir=read_dir)

    def why_not(self, state: ModelState) -> str | None:
        return "written from a saved checkpoint (`sparsify --compressed`), not from a model"
