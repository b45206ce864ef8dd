"""The interface every checkpoint format implements (`moeconv.formats.FORMATS` lists them).

A format knows how to recognise a directory it wrote (`detect`), rebuild a `ModelState` from it
(`read`), say what stops it representing a state exactly (`why_not`: None when it can), write a
state into an empty directory (`write`), and who loads its output (`consumer`: "transformers" for
stock `AutoModelForCausalLM.from_pretrained`, "moeconv" for `moeconv.load`).

Reading and writing go through tensors one at a time: `write` builds a `TensorSource` (ordered
specs + a function producing each tensor on demand) for the sharded writer, and `read` takes its
tensors from a `SourceCheckpoint` (safetensors headers first, each tensor read lazily), so the
same classes can serve a streamed executor that reads and writes one layer at a time.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar

from moeconv.state import ModelState

# `read_dir(path, dtype=...) -> ModelState`: the dispatcher over every format, handed to a format
# whose files wrap another format's (the compressed form), so formats never import the dispatcher.
ReadDir = Callable[..., ModelState]


class Format(ABC):
    name: ClassVar[str]
    consumer: ClassVar[str]  # "transformers" | "moeconv"
    hf: ClassVar[bool] = False  # a Hugging Face layout (what `--format hf` asks for)

    @abstractmethod
    def detect(self, path: Path, raw: dict) -> bool:
        """Whether the directory `path` with config `raw` is in this format."""

    @abstractmethod
    def read(self, path: Path, raw: dict, *, dtype=None, read_dir: ReadDir) -> ModelState:
        """Rebuild the model; every stored tensor used exactly once, or `InputError`."""

    def why_not(self, state: ModelState) -> str | None:
        """What stops this format representing `state` exactly; None when it can."""
        return f"{self.name} is read-only"

    def write(self, state: ModelState, out_dir: Path, *, shard_bytes: int, on_tensor=None) -> dict:
        """Write `state` into the empty directory `out_dir`, re-read and checksummed; returns what
        was written (`tensors`, `bytes`, `shards`, `format`, `consumer`, `notes`, and for
        transformers the `expected_class`)."""
        raise NotImplementedError(f"{self.name} is read-only")
