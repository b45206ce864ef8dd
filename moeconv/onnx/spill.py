"""Parameters moved to disk while an export-time stand-in holds the same numbers, and restored
bit for bit afterwards.

A fused MoE export stacks every block's experts into one tensor (`moe_export.FusedMoE`); the
per-expert weights are not read again until the export is over, and keeping both doubles the
experts' memory (SmolLM2 upcycled to 4 experts: 1.3 GB more, which took the demo past 4 GB).
Written with `torch.save` and read back with `torch.load(weights_only=True)`: exact, and no
pickle beyond plain tensors.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn


class ParameterSpill:
    """`spill(module)` frees every parameter of `module` (kept in `directory`); `restore()` puts
    them back. Parameters are restored in place, so shared or tied references stay shared."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._saved: list[tuple[nn.Parameter, Path]] = []

    def spill(self, module: nn.Module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        seen: set[int] = set()
        for p in module.parameters():
            if id(p) in seen or p.numel() == 0:
                continue
            seen.add(id(p))
            path = self.directory / f"{len(self._saved)}.pt"
            # a clone: a view of a bigger storage would otherwise save all of that storage
            torch.save(p.detach().clone(), path)
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self._saved.append((p, path))

    def restore(self) -> None:
        for p, path in self._saved:
            p.data = torch.load(path, weights_only=True, map_location=p.device)
        self._saved.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
