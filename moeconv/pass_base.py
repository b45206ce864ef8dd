"""The pass contract.

A pass is a class with a typed, frozen `Config` (pydantic, `extra="forbid"`, validated at
construction) and one method `run(state, ctx) -> PassResult`. It declares the facts it needs
(`requires`), establishes (`provides`) and destroys (`invalidates`), and its numerical promise.
`requires_any` lists groups of alternatives (at least one fact of each group must hold: an
export that takes float *or* int8 weights). These are class attributes; a pass whose facts or
promise depend on its config overrides `contract()` instead (and declares no class-level facts),
so what `moeconv passes` shows is what a default-configured instance has. `fix_for(fact)` lets a
pass name the fix for a missing fact it knows best.

Calling a pass (`p(state, ctx)`) enforces the contract, inside a `Pipeline` or alone (onnx-ir's
`PassBase.__call__` is the model): requires → `check` → `run` (inside the instruments) → `verify`
→ every fact it `provides` holds and none it `invalidates` does, as *derived from the module*
(`ModelState.facts()`), never as flags the pass sets. `run` is the implementation; do not call
it directly.

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
from typing import ClassVar, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from moeconv.context import SEED_MAX, Context
from moeconv.errors import ConfigError, PlanError, VerificationError
from moeconv.report import PassReport
from moeconv.state import ModelState

# How a missing fact is usually provided, when no later pass in a list provides it.
FACT_HINTS = {
    "moe": "add `upcycle` before `{name}`, or start from an MoE model",
    "dense-ffn": "`{name}` needs dense FFN blocks and the model has no dense FFN (left); start from a dense model",
    "calibration": "give calibration data (`--calib FILE`, or `Context(calibration=...)`)",
    "float-weights": "move `{name}` before `quantize`; it needs float weights",
    "int8-weights": "quantize with `method: int8` before `{name}`",
    "teacher": "keep a teacher snapshot (`--teacher`) before `{name}`",
    "hf-config": "`{name}` needs a Hugging Face model with a config",
}

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


@dataclass(frozen=True)
class Contract:
    """The facts a configured pass needs, establishes and destroys, and its numerical promise."""

    requires: frozenset[str] = frozenset()
    requires_any: tuple[frozenset[str], ...] = ()
    provides: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()
    output_tolerance: float | None = None

    def missing(self, facts: set[str] | frozenset[str]) -> list[str]:
        """Facts (or `a | b` groups) this contract needs that `facts` lacks, sorted."""
        out = sorted(self.requires - set(facts))
        out += [" | ".join(sorted(g)) for g in self.requires_any if not g & set(facts)]
        return out

    @property
    def promise(self) -> str:
        if self.output_tolerance is None:
            return "reported"
        return "exact" if self.output_tolerance == 0 else f"≤ {self.output_tolerance}"

    def to_dict(self) -> dict:
        return {"requires": sorted(self.requires), "requires_any": [sorted(g) for g in self.requires_any],
                "provides": sorted(self.provides), "invalidates": sorted(self.invalidates),
                "output_tolerance": self.output_tolerance, "promise": self.promise}


@dataclass
class PassResult:
    state: ModelState
    modified: bool
    report: PassReport


class LayerJob(ABC):
    """A pass's work cut into decoder layers, so one sweep can run several passes and a layer
    never needs to be in memory before or after its turn (`moeconv.calibrate.run_layerwise`).

    Promise: calling `on_layer` / `after_layer` for every layer in order, then `finish`, does
    exactly what the pass's `run` does on the same model and batches."""

    batch_size: int = 8  # calibration sequences per forward

    def pre_sweeps(self) -> list:
        """Read-only sweeps (`on_layer` callables) the job needs over the unchanged model before
        its own (e.g. scores for a global budget); each is run, in order, before the main sweep."""
        return []

    @abstractmethod
    def on_layer(self, index: int, path: str, layer, forward) -> None:
        """Observe and change decoder layer `index`; `forward()` runs it on the calibration inputs."""

    def after_layer(self, index: int, path: str, layer, outputs) -> None:
        """The changed layer's outputs (the next layer's inputs), e.g. to measure the change."""

    @abstractmethod
    def finish(self) -> PassResult:
        """After the last layer: the pass's result and report."""

    def part_checks(self, path: str, module) -> None:
        """Checks on the final weights of the decoder layer (or, with `path` None, the parts
        outside the layers) while they are still in memory: the pass's `verify`, one part at a time."""


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

    @classmethod
    def declared_contract(cls) -> Contract:
        """The facts and promise declared on the class (what every instance has, unless the pass
        overrides `contract`)."""
        return Contract(cls.requires, cls.requires_any, cls.provides, cls.invalidates, cls.output_tolerance)

    @classmethod
    def default_contract(cls) -> Contract:
        """What a default-configured instance has (what `moeconv passes` shows). A pass whose
        config has required fields has no default instance; it must not override `contract`."""
        return cls.declared_contract() if cls.contract is Pass.contract else cls().contract()

    def contract(self) -> Contract:
        """This instance's facts and promise; override when they depend on the config."""
        return self.declared_contract()

    def __call__(self, state: ModelState, ctx: Context | None = None, *, instruments: Iterable = ()) -> PassResult:
        """Run the pass with its contract enforced on the facts derived from `state` and `ctx`.
        Raises `PlanError` for a missing fact (before any work) and `VerificationError` when the
        result breaks the declared facts."""
        ctx = ctx or Context()
        contract = self.contract()
        missing = contract.missing(state.facts() | ctx.facts())
        if missing:
            raise PlanError([f"`{self.name}` requires `{m}`: {self.hint_for(m)}" for m in missing])
        self.check(state, ctx)
        instruments = list(instruments)
        for ins in instruments:
            ins.before(self, state, ctx)
        result = self.run(state, ctx)
        for ins in instruments:
            ins.after(self, result, ctx)
        self.verify(result, ctx)
        self._check_facts(contract, result.state.facts() | ctx.facts())
        return result

    def _check_facts(self, contract: Contract, after: set[str]) -> None:
        lost = sorted(contract.provides - after)
        kept = sorted(contract.invalidates & after)
        if lost:
            raise VerificationError(f"{self.name}: declares it provides `{', '.join(lost)}`, but the model after "
                                    "it does not have it (a bug in the pass)")
        if kept:
            raise VerificationError(f"{self.name}: declares it invalidates `{', '.join(kept)}`, but the model after "
                                    "it still has it (a bug in the pass)")

    def hint_for(self, fact: str) -> str:
        """How to provide a missing `fact`: the pass's own fix, else the usual one."""
        return self.fix_for(fact) or FACT_HINTS.get(fact, "add a pass that provides it before `{name}`").format(
            name=self.name)

    def fix_for(self, fact: str) -> str | None:
        """How to provide a missing `fact` (or `a | b` for a `requires_any` group), when this pass
        knows better than the generic hint; None otherwise."""
        return None

    def check(self, state: ModelState, ctx: Context) -> None:
        """Preconditions that need the model's numbers; raise a `MoeconvError` to refuse."""

    def layer_job(self, state: ModelState, ctx: Context) -> LayerJob | None:
        """This run cut into decoder layers (see `LayerJob`), or None when the pass does not work
        layer by layer with calibration data (then it cannot join a streamed sweep)."""
        return None

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
