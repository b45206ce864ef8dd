"""Reports: what a pass did, as data. Passes never print; the CLI renders these."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PassReport:
    """Outcome of one pass: a summary, measured numbers and tables, and warnings for the user."""

    pass_name: str
    summary: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)   # e.g. max_abs_diff, params_after
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # e.g. per-layer rows
    warnings: list[str] = field(default_factory=list)
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunReport:
    """Every pass report of a pipeline run, in order."""

    passes: list[PassReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [p.to_dict() for p in self.passes]}
