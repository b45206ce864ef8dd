"""Calibration and evaluation data: text / JSONL (`text` field) tokenized with the model's own
tokenizer, or a safetensors / torch tensor file of token ids.

Bounded by construction, so hostile files are refused (or read in part) before any expensive work:
- text is read only as far as the requested tokens need (`num_samples × seq_len` tokens at up to
  `CHARS_PER_TOKEN` characters each, at most `MAX_CALIB_CHARS`), so the tokenizer never sees a
  200 MB document; a JSONL line is at most `MAX_JSONL_LINE_BYTES`;
- token-id files are checked (one integer tensor, its shape) from their header before being read,
  and only the rows asked for are read;
- every token id is checked against the model's vocabulary, and the sequence length against its
  position table (`max_position_embeddings`, read from config.json without building the model);
- `num_samples × seq_len` is bounded by an estimate of the activation memory it needs.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from moeconv.errors import ConfigError, InputError
from moeconv.io.config_checks import format_bytes
from moeconv.model_limits import check_sequences, check_token_rows, model_limits

DEFAULT_SEQ_LEN = 128                  # calibration sequence length when none is asked for
CHARS_PER_TOKEN = 16                   # text read per requested token (first try; grows ×4 if short)
MIN_CALIB_CHARS = 64 * 1024
MAX_CALIB_CHARS = 4 * 1024 * 1024      # never more text than this goes to the tokenizer at once
MAX_JSONL_LINE_BYTES = 16 * 2**20      # one JSON document per line, at most this long
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
_SAFETENSORS_INTEGERS = {"I64", "I32", "I16", "U8", "I8"}


# ---- reading text ------------------------------------------------------------------------------
def read_texts(path: Path, what: str = "calibration", *, max_chars: int | None = None,
               max_bytes: int | None = None) -> list[str]:
    """Documents of a text file (separated by blank lines) or a JSONL file (a `text` field per
    line); `what` names the file's role in error messages ("calibration", "data", …). With
    `max_chars`, only about that many characters are read (the last document is cut); with
    `max_bytes`, a larger file is refused before it is read."""
    return _read_texts(path, what, max_chars=max_chars, max_bytes=max_bytes)[0]


def _read_texts(path: Path, what: str, *, max_chars: int | None = None,
                max_bytes: int | None = None) -> tuple[list[str], bool]:
    """(documents, whether the file holds more than was read)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise InputError(f"{path}: {format_bytes(size)} of {what} text; at most {format_bytes(max_bytes)} is read "
                         "(give token ids as a .safetensors file instead)")
    if path.suffix == ".jsonl":
        texts, truncated = _read_jsonl(path, what, max_chars)
    else:
        try:
            with open(path, encoding="utf-8") as f:  # universal newlines, as Path.read_text
                raw = f.read(max_chars) if max_chars else f.read()
                truncated = bool(max_chars) and len(raw) >= max_chars and f.read(1) != ""
        except UnicodeDecodeError:
            raise InputError(f"{path}: {what} text is not UTF-8") from None
        texts = [t for t in raw.split("\n\n") if t.strip()]
    if not texts:
        raise InputError(f"{path}: {what} file is empty")
    return texts, truncated


def _read_jsonl(path: Path, what: str, max_chars: int | None) -> tuple[list[str], bool]:
    texts: list[str] = []
    total = 0
    with open(path, "rb") as f:
        for lineno in itertools.count(1):
            line = f.readline(MAX_JSONL_LINE_BYTES + 1)
            if not line:
                return texts, False
            if len(line) > MAX_JSONL_LINE_BYTES:
                raise InputError(f"{path}:{lineno}: line longer than {format_bytes(MAX_JSONL_LINE_BYTES)} "
                                 f"(one {what} document per line)")
            try:
                line_text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{lineno}: {what} text is not UTF-8") from None
            if not line_text.strip():
                continue
            try:
                obj = json.loads(line_text)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 5000-digit number, [[[[…
                raise InputError(f"{path}:{lineno}: not valid JSON ({exc.__class__.__name__}); "
                                 "expected a JSON object with a 'text' field") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise InputError(f"{path}:{lineno}: expected a JSON object with a 'text' field")
            text = obj["text"]
            if not isinstance(text, str):
                raise InputError(f"{path}:{lineno}: field 'text' must be a string, not "
                                 f"{_json_type(text)}")
            if max_chars is not None and total + len(text) >= max_chars:
                texts.append(text[:max_chars - total])
                return texts, True
            texts.append(text)
            total += len(text)
    raise AssertionError("unreachable")  # pragma: no cover


def _json_type(v) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object",
            type(None): "null"}.get(type(v), type(v).__name__)


# ---- reading token ids -------------------------------------------------------------------------
def read_token_tensor(path: Path, what: str = "calibration", *, dims: tuple[int, ...] = (2,),
                      max_rows: int | None = None) -> torch.Tensor:
    """The one integer tensor of token ids in a `.safetensors` or `.pt` file (read with
    `weights_only=True`: a pickle payload is refused, never run), as int64. Its dimensionality
    must be one of `dims`; with `max_rows`, only that many rows of a 2-D tensor are read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    shape_text = " or ".join(("(tokens,)", "(rows, seq_len)")[d - 1] for d in dims)
    if path.suffix == ".safetensors":
        ids = _read_safetensors_ids(path, what, dims, shape_text, max_rows)
    else:
        try:
            try:
                ids = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                ids = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format
        except Exception as exc:  # torch raises a dozen types on a broken file; all mean "unreadable"
            raise InputError(f"{path}: unreadable {what} token file ({exc.__class__.__name__}); "
                             f"expected a tensor saved with torch.save") from None
        if not isinstance(ids, torch.Tensor):
            raise InputError(f"{path}: expected one integer tensor of token ids {shape_text}, "
                             f"found {type(ids).__name__}")
        if ids.layout != torch.strided or ids.device.type != "cpu" or ids.is_quantized:
            raise InputError(f"{path}: expected a plain (dense, CPU) tensor of token ids {shape_text}, "
                             f"found a {str(ids.layout).removeprefix('torch.')} tensor on {ids.device.type}")
        _check_ids_shape(path, ids.dtype in INTEGER_DTYPES, str(ids.dtype).removeprefix("torch."),
                         tuple(ids.shape), dims, shape_text)
        if max_rows is not None and ids.dim() == 2:
            ids = ids[:max_rows]
    return ids.long()


def _read_safetensors_ids(path, what, dims, shape_text, max_rows) -> torch.Tensor:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if len(names) != 1:
                raise InputError(f"{path}: expected exactly one tensor of token ids, found {len(names)}")
            sl = f.get_slice(names[0])
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
            _check_ids_shape(path, dtype in _SAFETENSORS_INTEGERS, dtype, shape, dims, shape_text)
            return sl[:max_rows] if max_rows is not None and len(shape) == 2 else sl[:]
    except InputError:
        raise
    except Exception as exc:  # SafetensorError, OSError, …: a broken file
        raise InputError(f"{path}: unreadable {what} token file ({exc.__class__.__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None


def _check_ids_shape(path, integer: bool, dtype: str, shape: tuple, dims, shape_text) -> None:
    if not integer or len(shape) not in dims:
        raise InputError(f"{path}: expected an integer tensor of token ids {shape_text}, "
                         f"found {dtype} of shape {list(shape)}")
    if any(n == 0 for n in shape):
        raise InputError(f"{path}: the tensor of token ids is empty (shape {list(shape)})")


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, where: str, *, model: str = "the model") -> None:
    """Every id in [0, vocab_size) (or ≥ 0 when the vocabulary is unknown); the first offender is
    named with its position."""
    if not ids.numel():
        return
    bad = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        pos = [int(i) for i in bad.nonzero()[0]]
        value = int(ids[tuple(pos)])
        at = f"row {pos[0]}, position {pos[1]}" if len(pos) == 2 else f"position {pos[0]}"
        span = f"the vocabulary of {model} (0..{vocab_size - 1})" if vocab_size is not None else "any vocabulary"
        raise InputError(f"{where}: token id {value} at {at} is outside {span}")


def _positive_int(value, flag: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag} must be an integer of at least {minimum}, not {str(value)[:40]}")
    return value


# ---- calibration -------------------------------------------------------------------------------
def calibration_tokens(path: Path, model_source, *, num_samples: int = 32, seq_len: int | None = None,
                       what: str = "calibration", seq_len_flag: str | None = None,
                       samples_flag: str | None = None) -> torch.Tensor:
    """(n ≤ num_samples, seq_len) int64 token ids: the rows of a token-id file, or packed from the
    file's text (`.txt`, or `.jsonl` with a `text` field) tokenized by the model's tokenizer — what
    `Context(calibration=…)` takes. `model_source` is the checkpoint path or the `ModelState`
    `moeconv.load` returned for it. `seq_len=None`: DEFAULT_SEQ_LEN, or the model's position count
    if smaller. The flags name the command-line options behind `seq_len` / `num_samples` in error
    messages."""
    path = Path(path)
    num_samples = _positive_int(num_samples, samples_flag or f"the number of {what} samples", 1)
    limits = model_limits(model_source)
    if seq_len is None:
        seq_len = limits.seq_len(DEFAULT_SEQ_LEN)
    seq_len = _positive_int(seq_len, seq_len_flag or f"the {what} sequence length", 2)
    if path.suffix in (".safetensors", ".pt"):
        ids = read_token_tensor(path, what, dims=(2,), max_rows=num_samples)
        check_token_rows(limits, path, *ids.shape)
        check_token_ids(ids, limits.vocab_size, str(path), model=limits.name)
        return ids
    need = num_samples * seq_len
    budget = min(MAX_CALIB_CHARS, max(MIN_CALIB_CHARS, need * CHARS_PER_TOKEN))
    texts, truncated = _read_texts(path, what, max_chars=budget)
    check_sequences(limits, num_samples, seq_len, seq_len_flag=seq_len_flag, samples_flag=samples_flag, what=what)
    tok = _tokenizer(model_source)
    while True:
        ids = tok("\n\n".join(texts), return_tensors="pt").input_ids[0]
        if ids.numel() >= need or not truncated or budget >= MAX_CALIB_CHARS:
            break
        budget = min(MAX_CALIB_CHARS, budget * 4)  # long tokens: read more, still bounded
        texts, truncated = _read_texts(path, what, max_chars=budget)
    n = min(num_samples, len(ids) // seq_len)
    if n == 0:
        read = f" (in its first {budget:,} characters)" if truncated else ""
        raise InputError(f"{path}: {what} text too short for one sample of {seq_len} tokens: "
                         f"{len(ids)} tokens{read}")
    ids = ids[: n * seq_len].reshape(n, seq_len)
    check_token_ids(ids, limits.vocab_size, f"{path} (tokenized for {limits.name})", model=limits.name)
    return ids


def _tokenizer(model_source):
    from moeconv.io.transformers_io import read_tokenizer
    info = getattr(model_source, "source", None)  # a ModelState: the tokenizer it was loaded with
    if info is not None:
        # a GGUF source's path is the .gguf file, which holds its tokenizer
        model_source = info.tokenizer_dir or info.path or info.spec or "the model"
    try:
        return read_tokenizer(model_source)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{model_source}: no tokenizer to read calibration text ({exc.__class__.__name__}); "
                         "give token ids as a .safetensors file instead") from None
