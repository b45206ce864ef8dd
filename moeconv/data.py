"""Calibration and evaluation data: text / JSONL (`text` field) tokenized with the model's own
tokenizer, or a safetensors / torch tensor file of token ids."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from moeconv.errors import InputError


def read_texts(path: Path, what: str = "calibration") -> list[str]:
    """Documents of a text file (separated by blank lines) or a JSONL file (a `text` field per
    line); `what` names the file's role in error messages ("calibration", "data", …)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: {what} text is not UTF-8") from None
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
    else:
        texts = [t for t in raw.split("\n\n") if t.strip()]
    if not texts:
        raise InputError(f"{path}: {what} file is empty")
    return texts


def calibration_tokens(path: Path, model_source, *, num_samples: int = 32, seq_len: int = 128) -> torch.Tensor:
    """(num_samples, seq_len) int64 token ids, packed from the file's text."""
    path = Path(path)
    if path.suffix in (".safetensors", ".pt"):
        if path.suffix == ".pt":
            ids = torch.load(path, weights_only=True)
        else:
            from safetensors.torch import load_file
            ids = next(iter(load_file(path).values()))
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{path}: expected a 2-D integer tensor of token ids")
        return ids.long()[:num_samples]
    texts = read_texts(path)
    tok = _tokenizer(model_source)
    ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
    n = min(num_samples, len(ids) // seq_len)
    if n == 0:
        raise InputError(f"{path}: calibration text too short for one sample of {seq_len} tokens")
    return ids[: n * seq_len].reshape(n, seq_len)


def _tokenizer(model_source):
    from transformers import AutoTokenizer
    p = Path(str(model_source))
    try:
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as exc:
        raise InputError(f"{model_source}: no tokenizer to read calibration text ({exc.__class__.__name__}); "
                         "give token ids as a .safetensors file instead") from None
