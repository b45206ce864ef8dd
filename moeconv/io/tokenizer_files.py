"""Carrying a source's tokenizer next to the converted weights, one way for every source kind, so
an output directory is usable on its own."""
from __future__ import annotations

import shutil
from pathlib import Path

from moeconv.io.transformers_io import read_tokenizer
from moeconv.state import SourceInfo

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "generation_config.json", "chat_template.jinja", "added_tokens.json")


def carry_tokenizer(source: SourceInfo | None, out_dir: Path) -> tuple[list[str], str | None]:
    """Copy the tokenizer / generation files of `source` into `out_dir` (never over a file the
    writer made), or rebuild them from a GGUF file, which carries its tokenizer inside. Returns
    (the file names written, a warning when a tokenizer exists but could not be carried)."""
    if source is None:
        return [], None
    tok_dir = source.tokenizer_dir
    if tok_dir is not None and Path(tok_dir).is_dir():
        copied = []
        for name in TOKENIZER_FILES:
            if (Path(tok_dir) / name).is_file() and not (out_dir / name).exists():
                shutil.copy2(Path(tok_dir) / name, out_dir / name)
                copied.append(name)
        return copied, None
    if source.kind == "gguf" and source.path is not None:
        try:
            return [Path(f).name for f in read_tokenizer(source.path).save_pretrained(out_dir)], None
        except Exception as exc:  # the weights are the job; the report says the tokenizer is missing
            return [], f"tokenizer not carried over from {Path(source.path).name}: {exc.__class__.__name__}"
    return [], None
