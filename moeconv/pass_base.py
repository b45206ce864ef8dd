"""The pass contract.

A pass is a class with a typed, frozen `Config` (pydantic, `extra="forbid"`, validated at
construction) and one method `run(state, ctx) -> PassResult`. It declares the facts it needs
(`requires`), establishes (`provides`) and destroys (`invalidates`), and its numerical promise.
`requires_any` lists groups of alternatives (at least one fact of each group must hold: an
export that takes float *or* int8 weights). A pass whose needs depend on its config sets these
on the instance; `fix_for(fact)` lets it name the fix for a missing fact it knows best.
Its numerical promise:

- `output_tolerance = 0.0`  exact: outputs equal the input model's to fp rounding
  (checked against `EXACT_RTOL` scaled by the dtype);
- `output_tolerance = x > 0` lossy but bounded: relative max |Δ| ≤ x;
- `output_tolerance = None`  changes the function on purpose: the measured change is reported.

Instruments (timing, the numeric check, progress) live outside passes, in `instruments.py`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from moeconv.context import SEED_MAX, Context
from moeconv.errors import ConfigError
from moeconv.report import PassReport
from moeconv.state import ModelState

# An "exact" pass may differ by summation-order rounding: relative to the largest output value.
EXACT_RTOL = 1e-5


class PassConfig(BaseModel):
    """Base for every pass config: immutable, unknown fields rejected."""

    # NaN/Inf never configure anything: `noise_scale: inf` wrote non-finite experts once.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("seed", check_fields=False)
    @classmethod
    def _seed_in_range(cls, v):
        if not 0 <= v <= SEED_MAX:
            raise ValueError(f"seed must be from 0 to {SEED_MAX}")
        return v


@dataclass
class PassResult:
    state: ModelState
    modified: bool
    report: PassReport


class Pass(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    requires_any: ClassVar[tuple[frozenset[str], ...]] = ()
    output_tolerance: ClassVar[float | None] = None

    def __init__(self, config: PassConfig | None = None, **fields):
        if config is not None and fields:
            raise ConfigError(f"{self.name}: give either a config object or fields, not both")
        if config is None:
            try:
                config = self.Config(**fields)
            except ValidationError as exc:
                raise ConfigError(f"{self.name}: {_first_error(exc)}") from None
        elif not isinstance(config, self.Config):
            raise ConfigError(f"{self.name}: expected {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def fix_for(self, fact: str) -> str | None:
        """How to provide a missing `fact` (or `a | b` for a `requires_any` group), when this pass
        knows better than the generic hint; None otherwise."""
        return None

    def check(self, state: ModelState, ctx: Context) -> None:
        """Preconditions that need the model's numbers; raise a `MoeconvError` to refuse."""

    @abstractmethod
    def run(self, state: ModelState, ctx: Context) -> PassResult:
        """Transform `state`; return the new state, whether it changed, and a report."""

    def verify(self, result: PassResult, ctx: Context) -> None:
        """Postconditions beyond the numeric check; raise `VerificationError` when broken."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    if not loc:
        return err.get("msg", "invalid value").removeprefix("Value error, ")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return f"{loc}: {msg}"
