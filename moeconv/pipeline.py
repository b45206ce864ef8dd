"""`Pipeline`: a flat list of passes, planned before any tensor is touched, then run inside the
instruments."""
from __future__ import annotations

from dataclasses import dataclass, field

from moeconv.context import Context
from moeconv.errors import PlanError
from moeconv.instruments import Instrument, ModelBytes, NumericCheck, Timing
from moeconv.pass_base import Pass
from moeconv.report import RunReport
from moeconv.state import ModelState

@dataclass
class PlanStep:
    name: str
    requires: frozenset[str]
    facts_before: frozenset[str]
    facts_after: frozenset[str]
    missing: frozenset[str]


@dataclass
class Plan:
    steps: list[PlanStep] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class PipelineResult:
    state: ModelState
    report: RunReport


class Pipeline:
    def __init__(self, passes: list[Pass], instruments: list[Instrument] | None = None):
        self.passes = list(passes)
        self.instruments = instruments if instruments is not None else [Timing(), NumericCheck(), ModelBytes()]

    def plan(self, facts: set[str]) -> Plan:
        """Simulate facts through the list; collect *every* problem, each with a fix hint."""
        plan = Plan()
        current = frozenset(facts)
        for i, p in enumerate(self.passes):
            c = p.contract()
            missing = set(c.requires - current)
            for fact in sorted(missing):
                plan.problems.append(f"step {i + 1} `{p.name}` requires `{fact}`: {self._hint(i, fact)}")
            needs = set(c.requires)
            assumed = set(missing)
            for group in c.requires_any:
                label = " | ".join(sorted(group))
                needs.add(label)
                if not group & current:
                    missing.add(label)
                    assumed.add(sorted(group)[0])
                    plan.problems.append(f"step {i + 1} `{p.name}` requires one of `{label}`: {self._hint(i, label)}")
            after = (current - c.invalidates) | c.provides
            plan.steps.append(PlanStep(p.name, frozenset(needs), current, after, frozenset(missing)))
            current = after | assumed  # assume fixed, so later problems are reported independently
        return plan

    def _hint(self, index: int, fact: str) -> str:
        name = self.passes[index].name
        for later in self.passes[index + 1:]:
            provides = later.contract().provides
            if fact in provides or set(fact.split(" | ")) & provides:
                return f"move `{later.name}` before `{name}`"
        return self.passes[index].hint_for(fact)

    def run(self, state: ModelState, ctx: Context | None = None) -> PipelineResult:
        ctx = ctx or Context()
        plan = self.plan(state.facts() | ctx.facts())
        if not plan.ok:
            raise PlanError(plan.problems)
        report = RunReport()
        for i, p in enumerate(self.passes):
            ctx.report_progress("pipeline", i, len(self.passes))
            ctx.report_progress(f"step {i + 1}/{len(self.passes)}: {p.name}", 0, None)
            result = p(state, ctx, instruments=self.instruments)  # the pass enforces its own contract
            report.passes.append(result.report)
            state = result.state
        ctx.report_progress("pipeline", len(self.passes), len(self.passes))
        return PipelineResult(state, report)
