"""Reading the JSON files of a checkpoint (config.json, tokenizer_config.json, …).

One place for what any JSON input can do wrong: not UTF-8, not JSON, nested deeper than Python
recurses, an integer of more digits than Python converts, a size no config has. `read_json_object`
refuses each in one line naming the file; `json_object_or_none` is for readers that only peek
(the file's own reader refuses it later, with its own message).
"""
from __future__ import annotations

import json
from pathlib import Path

from moeconv.errors import InputError

MAX_JSON_BYTES = 16 * 2**20  # the largest configs (vision-language, many experts) are ~100 KB


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or `InputError` naming the file and what is wrong."""
    path = Path(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InputError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB; not a config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a config") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise InputError(f"{path}: unreadable JSON value ({' '.join(str(exc).split())[:100]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def json_object_or_none(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is absent or would be refused by `read_json_object`."""
    try:
        return read_json_object(path)
    except (OSError, InputError):
        return None
