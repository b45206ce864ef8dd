"""Writing a checkpoint one part at a time, as each part becomes final (a streamed sweep).

A layer-by-layer sweep knows a decoder layer's output tensors only once the layer is done, and
must free them before the next layer is read; a safetensors file needs its header (every name and
size) before its data. So each part (a decoder layer, the parts outside the layers) is written as
its own shard the moment it is final, and `finish` names the shards `model-0000i-of-0000N`,
writes the index and config, and re-reads every tensor (names, shapes, dtypes, checksum) as
`write_checkpoint` does. Memory: one part's tensors, whatever the model's depth.

The tensors may be on any device (a sweep on a GPU hands over the GPU's tensors): each is copied
to CPU memory as its turn comes (`tensor_bytes`), so the CPU holds one tensor of the part at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from moeconv.errors import VerificationError
from moeconv.io.safetensors_io import SINGLE_NAME, TensorSpec, verify_written, write_index, write_shard


class PartWriter:
    """Shards written part by part under `out_dir`; see the module docstring."""

    def __init__(self, out_dir: Path, on_tensor=None):
        self.out_dir, self.on_tensor = Path(out_dir), on_tensor
        self.specs: list[TensorSpec] = []
        self.checksums: dict[str, str] = {}
        self.files: list[tuple[str, list[str]]] = []  # temporary file name, its tensor names
        self.bytes_written = 0  # tensor bytes in the shards written so far (for progress)

    def write(self, tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Write one part's tensors (in order, on any device) as one shard; returns its bytes."""
        if not tensors:
            return 0
        by_name = dict(tensors)
        if len(by_name) != len(tensors) or any(n in self.checksums for n in by_name):
            raise VerificationError(f"internal: tensor written twice ({sorted(by_name)[:2]})")
        specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors]
        fname = f"part-{len(self.files):05d}.safetensors.tmp"
        self.checksums.update(write_shard(self.out_dir / fname, specs, lambda s: by_name[s.name],
                                          on_tensor=self.on_tensor))
        self.specs.extend(specs)
        self.files.append((fname, [s.name for s in specs]))
        nbytes = sum(s.nbytes for s in specs)
        self.bytes_written += nbytes
        return nbytes

    def finish(self, config: dict) -> dict:
        """Name the shards, write the index and config.json, re-read and check every tensor;
        returns {tensors, bytes, shards}."""
        n = len(self.files)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, members), final in zip(self.files, names):
            (self.out_dir / tmp).rename(self.out_dir / final)
            weight_map.update({m: final for m in members})
        total = sum(s.nbytes for s in self.specs)
        if n > 1:
            write_index(self.out_dir, weight_map, total)
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        verify_written(self.out_dir, self.specs, self.checksums)
        return {"tensors": len(self.specs), "bytes": total, "shards": n}
