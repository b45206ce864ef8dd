"""Numbers as people read them: `1.4 GiB`, `2m05s`, `0.0123`, `93.8%`, `1,093` — for report.html and
the terminal. Each helper takes None (nothing measured) and returns "-", so a caller never
branches on a missing value."""
from __future__ import annotations

import math

MISSING = "-"


def fmt_bytes(n: int | float | None) -> str:
    """Binary units with three significant digits: 512 B, 1.5 KiB, 158 MiB, 1.42 GiB."""
    if n is None:
        return MISSING
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{_sig(n, 3)} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_seconds(s: float | None) -> str:
    """0.012 s, 3.4 s, 2m05s, 1h02m: the precision a duration of that size needs."""
    if s is None:
        return MISSING
    s = float(s)
    if s < 60:
        return f"{_sig(s, 2)} s" if s < 10 else f"{s:.0f} s"
    minutes, sec = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def fmt_float(x: float | None, digits: int = 3) -> str:
    """`digits` significant digits, scientific only for very small or large magnitudes:
    1093.1382 → 1,093; 0.012345 → 0.0123; 3.2e-07 stays 3.2e-07; 0 → 0."""
    if x is None:
        return MISSING
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 10**digits:
        return f"{x:,.0f}" if mag < 1e15 else _sci(x, digits)
    if mag < 1e-3:
        return _sci(x, digits)
    return _sig(x, digits)


def _sci(x: float, digits: int) -> str:
    """3.20e-07 → 3.2e-7."""
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.') if '.' in mantissa else mantissa}e{int(exponent)}"


def fmt_pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage: 0.9375 → 93.8%; 1.0 → 100%."""
    if x is None:
        return MISSING
    x = float(x) * 100
    return "100%" if x == 100 else f"{x:.{digits}f}%"


def fmt_count(n: int | None) -> str:
    """Thousands separated: 1234567 → 1,234,567."""
    return MISSING if n is None else f"{int(n):,}"


def fmt_change(before: float | None, after: float | None, digits: int = 4) -> str:
    """`before → after (+x.x%)`, e.g. perplexity 20.07 → 20.1 (+0.1%)."""
    if before is None or after is None:
        return MISSING
    rel = f" ({(after / before - 1):+.1%})" if before else ""
    return f"{fmt_float(before, digits)} → {fmt_float(after, digits)}{rel}"


def _sig(x: float, digits: int) -> str:
    """`digits` significant digits in positional notation, trailing zeros dropped."""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
