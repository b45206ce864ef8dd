"""Sizes given by users: `parse_size("5GB")` → bytes (decimal units, or binary with an `i`: 2GiB).

Neutral ground for the CLI and the passes alike (no model, torch or CLI import)."""
from __future__ import annotations

import re

from moeconv.errors import InputError


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.I)
    if not m:
        raise InputError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB")
    unit = m.group(2).upper().rstrip("B").replace("I", "")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    if "I" in m.group(2).upper():
        mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    size = int(float(m.group(1)) * mult)
    if size <= 0:
        raise InputError(f"bad size {text!r}: must be positive")
    return size
