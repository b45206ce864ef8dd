"""Training data: text / JSONL tokenized with the student's tokenizer, or token-id tensors, packed
into fixed-length rows, with a held-out split.

Promises:
- Packing: documents are tokenized one by one (no special tokens added), each followed by the
  tokenizer's EOS id (when it has one), concatenated into one stream and cut into rows of
  `seq_len`; the incomplete tail is dropped. Every row is full, so per-token means are the same
  however rows are grouped into (micro-)batches.
- Token-id files (`.safetensors`, one integer tensor; `.pt`, read with `weights_only=True`): a 1-D
  stream is packed like text; a 2-D `(rows, seq_len)` tensor is used as is when its width is
  `seq_len`, otherwise flattened and re-packed.
- Held-out split: the *last* `eval_fraction` of the rows (contiguous, so adjacent chunks of one
  document cannot leak into training), or a separate file. Train and held-out rows never overlap.
- Every id is checked against the vocabulary size when one is given (the first offender is named).
- Bounded: a text file over `MAX_DATA_TEXT_BYTES` (a token-id file over `MAX_DATA_TOKEN_BYTES`) is
  refused before it is read, a JSONL line over `moeconv.data.MAX_JSONL_LINE_BYTES` is refused, and
  a long document goes to the tokenizer in pieces of at most `TOKENIZE_CHUNK_CHARS` characters, cut
  before a whitespace character (only a longer run without whitespace is cut inside).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moeconv.data import check_token_ids, read_texts, read_token_tensor
from moeconv.errors import InputError
from moeconv.io.config_checks import format_bytes

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")
TENSOR_SUFFIXES = (".safetensors", ".pt")
MAX_DATA_TEXT_BYTES = 64 * 2**20
MAX_DATA_TOKEN_BYTES = 2 * 2**30
TOKENIZE_CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class TokenData:
    """`train` and `eval` are (rows, seq_len) int64 tensors of token ids."""

    train: torch.Tensor
    eval: torch.Tensor | None

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def check_data_file(path: Path, what: str = "data") -> None:
    """The cheap checks of a data file, before any model is loaded: it exists and is not over the
    size this reader takes."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    size = path.stat().st_size
    limit = MAX_DATA_TOKEN_BYTES if path.suffix in TENSOR_SUFFIXES else MAX_DATA_TEXT_BYTES
    if size > limit:
        kind = "token ids" if path.suffix in TENSOR_SUFFIXES else "text"
        raise InputError(f"{path}: {format_bytes(size)} of {what} {kind}; at most {format_bytes(limit)} is read"
                         + ("" if path.suffix in TENSOR_SUFFIXES else " (give token ids as a .safetensors file instead)"))


def read_documents(path: Path) -> list[str]:
    """Documents of a text file (separated by blank lines) or a JSONL file (a `text` field per line)."""
    return read_texts(path, what="data", max_bytes=MAX_DATA_TEXT_BYTES)


def _pieces(doc: str, size: int | None = None):
    """`doc` in pieces of at most `size` (TOKENIZE_CHUNK_CHARS) characters, each (but the first)
    starting at a whitespace character, so word-level and BPE tokenizers see the same words as in
    one call (only a run of `size` characters without whitespace is cut inside)."""
    size = size or TOKENIZE_CHUNK_CHARS
    start = 0
    while len(doc) - start > size:
        cut = max(doc.rfind(" ", start + 1, start + size), doc.rfind("\n", start + 1, start + size))
        cut = cut if cut > start else start + size
        yield doc[start:cut]
        start = cut
    yield doc[start:]


def tokenize_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """One 1-D int64 stream: each document's ids (no special tokens) followed by EOS (if any)."""
    from array import array
    eos = getattr(tokenizer, "eos_token_id", None)
    stream = array("q")  # 8 bytes a token, however many documents
    for doc in docs:
        for piece in _pieces(doc):
            stream.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
    return torch.frombuffer(stream, dtype=torch.int64).clone() if stream else torch.zeros(0, dtype=torch.int64)


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D stream into (rows, seq_len); the incomplete tail is dropped."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"seq_len must be an integer of at least 2, got {str(seq_len)[:40]}")
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).clone()


def read_token_file(path: Path) -> torch.Tensor:
    """The 1-D or 2-D integer tensor of a `.safetensors` / `.pt` file, as int64."""
    if Path(path).is_file():
        check_data_file(path)
    return read_token_tensor(path, "data", dims=(1, 2))


def rows_from_file(path: Path, seq_len: int, tokenizer=None) -> torch.Tensor:
    """(rows, seq_len) token ids from a text, JSONL or token-id file."""
    path = Path(path)
    if path.suffix in TENSOR_SUFFIXES:
        ids = read_token_file(path)
        rows = ids if ids.dim() == 2 and ids.shape[1] == seq_len else pack(ids.reshape(-1), seq_len)
    else:
        if tokenizer is None:
            raise InputError(f"{path}: text data needs the student's tokenizer; give token ids "
                             f"({', '.join(TENSOR_SUFFIXES)}) for a model without one")
        rows = pack(tokenize_documents(tokenizer, read_documents(path)), seq_len)
    if rows.shape[0] == 0:
        raise InputError(f"{path}: too little data for one row of {seq_len} tokens")
    return rows


def check_vocab(rows: torch.Tensor, vocab_size: int | None, what: str, model: str = "the model") -> None:
    """Every id in [0, vocab_size) (≥ 0 when the size is unknown); names the first offender."""
    check_token_ids(rows, vocab_size, what, model=model)


def split_holdout(rows: torch.Tensor, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(train, held-out): the last ⌈fraction·rows⌉ rows are held out (at least one row stays for training)."""
    if not 0 <= eval_fraction < 1:
        raise InputError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return rows, None
    n_eval = max(1, int(round(rows.shape[0] * eval_fraction)))
    if n_eval >= rows.shape[0]:
        raise InputError(f"only {rows.shape[0]} rows of data: too few to hold out {eval_fraction:.0%} for evaluation")
    return rows[:-n_eval], rows[-n_eval:]


def load_token_data(path: Path, *, seq_len: int, tokenizer=None, eval_fraction: float = 0.1,
                    eval_path: Path | None = None, vocab_size: int | None = None,
                    model: str = "the model") -> TokenData:
    """Training rows (and held-out rows) from `path`; with `eval_path`, all of `path` is training data."""
    rows = rows_from_file(path, seq_len, tokenizer)
    check_vocab(rows, vocab_size, str(path), model)
    if eval_path is not None:
        held = rows_from_file(eval_path, seq_len, tokenizer)
        check_vocab(held, vocab_size, str(eval_path), model)
        return TokenData(rows, held)
    train, held = split_holdout(rows, eval_fraction)
    return TokenData(train, held)


def fingerprint(rows: torch.Tensor) -> str:
    """A short hash of the rows: a resumed run must see exactly the data the checkpoint saw."""
    import hashlib
    return hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest()[:16] + f"-{tuple(rows.shape)}"
