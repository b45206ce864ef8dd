"""Which route a command takes: streamed (disk → one layer → disk, memory independent of depth)
whenever the source and the options allow it, else in memory. The choice and its reason go into
the report, so a user sees why a run held the whole model."""
from __future__ import annotations

from pathlib import Path

from moeconv.stream.skeleton import streamable

STREAMED_COMMANDS = ("quantize", "sparsify")


def choose_route(src, command: str, *, method: str | None = None) -> tuple[str, str]:
    """("streaming" | "in-memory", why) for `command` on `src` (`method`: sparsify's)."""
    if command not in STREAMED_COMMANDS:
        return "in-memory", f"{command} is not streamed yet"
    path = Path(str(src))
    if not path.is_dir():
        return "in-memory", "the source is not a checkpoint directory"
    why = streamable(path)
    if why is not None:
        return "in-memory", f"the source is {why}" if why.startswith("a ") else why
    if command == "sparsify" and method != "magnitude":
        return "in-memory", f"{method} calibrates on the whole model (the streamed route prunes by magnitude)"
    return "streaming", "a safetensors checkpoint: read, changed and written one layer at a time"
