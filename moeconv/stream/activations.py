"""Calibration hidden states of a layer-wise sweep, bounded in memory: kept in RAM up to a budget,
written to files beyond it (`--offload-dir`, by default inside the job's hidden temporary output
directory) and read back one batch at a time when a forward needs them.

A sweep holds every calibration token's hidden state several times over (a layer's inputs, its
outputs, the passes' own copies): 512 samples of 2048 tokens of a hidden-4096 model are 8.6 GB in
bf16 per copy. Spilled, only the batch being run is in memory, whatever the number of tokens.

Promise: `states[i]` is bit for bit the tensor appended as batch `i` (dtype, shape, device kept);
`release()` frees the memory and deletes every file, and so does a crash, when the files lie in
the job's temporary directory (removed unpublished).
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch

_IDS = itertools.count()  # distinguishes the files of several stores in one directory


class ActivationBudget:
    """One memory budget shared by every `HiddenStates` of a sweep (a layer's inputs, its outputs,
    a pass's own copies): batches stay in memory while the stores' total is within `budget_bytes`,
    the rest go to files in `spill_dir` (which may be set later, before the first spill: the
    default lies inside the job's temporary directory). `spilled_bytes`: the most ever on disk at
    once, for the report."""

    def __init__(self, budget_bytes: int, spill_dir: Path | None = None):
        self.budget_bytes, self.spill_dir = int(budget_bytes), Path(spill_dir) if spill_dir is not None else None
        self.resident_bytes = 0
        self._on_disk = 0
        self.spilled_bytes = 0

    def store(self) -> HiddenStates:
        return HiddenStates(budget=self)

    def _spilled(self, nbytes: int) -> None:
        self._on_disk += nbytes
        self.spilled_bytes = max(self.spilled_bytes, self._on_disk)


class HiddenStates:
    """Per-batch tensors, in memory within a budget (`ActivationBudget`, shared; or
    `budget_bytes` of its own; None for both: no bound), in files under `spill_dir` beyond it.
    Batches are appended in order and read by index; a store can stand where a list of tensors is
    iterated or indexed."""

    def __init__(self, budget_bytes: int | None = None, spill_dir: Path | None = None, *,
                 budget: ActivationBudget | None = None):
        if budget is None and budget_bytes is not None:
            if spill_dir is None:
                raise ValueError("a memory budget for hidden states needs a directory to spill to")
            budget = ActivationBudget(budget_bytes, spill_dir)
        self.budget = budget
        self._id = next(_IDS)
        self._items: list[torch.Tensor | _Spilled] = []
        self.resident_bytes = 0
        self.spilled_bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        return item.read() if isinstance(item, _Spilled) else item

    def shape(self, i: int) -> tuple[int, ...]:
        """Batch `i`'s shape, read from memory or the spill record (never from the file)."""
        item = self._items[i]
        return tuple(item.shape)

    def append(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        b = self.budget
        if b is None or b.resident_bytes + nbytes <= b.budget_bytes:
            self._items.append(t)
            self.resident_bytes += nbytes
            if b is not None:
                b.resident_bytes += nbytes
            return
        if b.spill_dir is None:
            raise RuntimeError("internal: hidden states over budget with no directory to spill to")
        b.spill_dir.mkdir(parents=True, exist_ok=True)
        path = b.spill_dir / f"hidden-{os.getpid()}-{self._id}-{len(self._items)}.bin"
        self._items.append(_Spilled.write(path, t))
        self.spilled_bytes += nbytes
        b._spilled(nbytes)

    def release(self) -> None:
        """Every batch freed and every file deleted; the store is empty afterwards."""
        for item in self._items:
            if isinstance(item, _Spilled):
                item.delete()
        self._items.clear()
        if self.budget is not None:
            self.budget.resident_bytes -= self.resident_bytes
            self.budget._on_disk -= self.spilled_bytes
        self.resident_bytes = self.spilled_bytes = 0

    def __del__(self):
        if hasattr(self, "_items"):  # not when __init__ refused its arguments
            self.release()


class _Spilled:
    """One batch in a file: its raw bytes, read back as a tensor of the same dtype, shape, device."""

    def __init__(self, path: Path, dtype: torch.dtype, shape: tuple, device: torch.device):
        self.path, self.dtype, self.shape, self.device = path, dtype, shape, device

    @classmethod
    def write(cls, path: Path, t: torch.Tensor) -> _Spilled:
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        # O_EXCL: never write into a file something else made (or an earlier store left)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(raw))
        return cls(path, t.dtype, tuple(t.shape), t.device)

    def read(self) -> torch.Tensor:
        numel = 1
        for n in self.shape:
            numel *= n
        if numel == 0:
            return torch.empty(self.shape, dtype=self.dtype, device=self.device)
        # a private mapping of the file: its pages are this batch's memory, freed with the tensor
        t = torch.from_file(str(self.path), shared=False, size=numel, dtype=self.dtype).view(self.shape)
        return t if self.device.type == "cpu" else t.to(self.device)

    def delete(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
