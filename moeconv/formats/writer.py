"""Writing a checkpoint directory: sharded safetensors streamed tensor by tensor, then re-read
and checked (names, shapes, dtypes, checksum)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moeconv.io.safetensors_io import TensorSpec, verify_written, write_sharded


@dataclass
class TensorSource:
    """Ordered output specs and a function producing each tensor on demand (one at a time)."""

    specs: list[TensorSpec]
    produce: Callable[[TensorSpec], torch.Tensor]
    notes: list[str]  # e.g. tied tensors written once


def module_source(module: torch.nn.Module, rename: Callable[[str], str] = lambda n: n,
                  cast: Callable[[str, torch.Tensor], torch.Tensor] = lambda n, t: t) -> TensorSource:
    """An in-memory module's state dict as a source. Tied tensors (same storage) are written once."""
    seen: dict[tuple, str] = {}
    specs, tensors, notes = [], {}, []
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            notes.append(f"{name} is tied to {seen[key]}: written once")
            continue
        seen[key] = name
        out_name = rename(name)
        t = cast(out_name, t)
        tensors[out_name] = t
        specs.append(TensorSpec(out_name, t.dtype, tuple(t.shape)))
    return TensorSource(specs, lambda s: tensors[s.name], notes)


def write_checkpoint(out_dir: Path, source: TensorSource, config: dict, *, shard_bytes: int,
                     on_tensor=None, metadata: dict[str, str] | None = None) -> dict:
    """Write config.json + shards; verify on reload. Returns {tensors, bytes, shards}."""
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    checksums = write_sharded(out_dir, source.specs, source.produce, max_shard_bytes=shard_bytes,
                              metadata=metadata, on_tensor=on_tensor)
    verify_written(out_dir, source.specs, checksums)
    total = sum(s.nbytes for s in source.specs)
    return {"tensors": len(source.specs), "bytes": total,
            "shards": len(list(out_dir.glob("*.safetensors")))}
