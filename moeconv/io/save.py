"""Saving a `ModelState` in the format its consumers load, streamed and verified: a dispatcher
over `moeconv.formats.FORMATS` (`choose_format` says which format and why)."""
from __future__ import annotations

from pathlib import Path

from moeconv.formats import choose_format
from moeconv.state import ModelState


def save_checkpoint(state: ModelState, out_dir: Path, *, fmt: str = "auto", shard_bytes: int = 5 * 10**9,
                    on_tensor=None) -> dict:
    """Write `state` into `out_dir` (which exists and is empty); returns what was written,
    including `format` and `consumer` (and `expected_class` for transformers)."""
    return choose_format(state, fmt).write(state, out_dir, shard_bytes=shard_bytes, on_tensor=on_tensor)
