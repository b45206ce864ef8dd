"""Pipeline planning and the pass contract: problems reported all at once, with fixes, before
any tensor is touched; configs typed and validated at construction."""
import copy

import pytest
import torch
from torch import nn

from moeconv import Context, Pipeline, load
from moeconv.errors import ConfigError, PlanError, VerificationError
from moeconv.pass_base import Pass, PassConfig, PassResult
from moeconv.report import PassReport
from passes import REGISTRY, Upcycle


class _Touchy(Pass):
    """A pass that records whether it ran (plan() must never run anything)."""

    name = "needs-moe"
    summary = "test pass"
    requires = frozenset({"moe", "calibration"})
    ran = False

    def run(self, state, ctx):
        type(self).ran = True
        return PassResult(state, False, PassReport(self.name))


class _Quantizeish(Pass):
    name = "quantizeish"
    summary = "test pass"
    requires = frozenset({"float-weights"})
    provides = frozenset({"quantized"})
    invalidates = frozenset({"float-weights"})

    def run(self, state, ctx):
        return PassResult(state, False, PassReport(self.name))


def test_plan_reports_every_problem_with_a_fix_before_touching_tensors():
    state = load("builtin:llama")
    before = {k: v.clone() for k, v in state.module.state_dict().items()}
    pipe = Pipeline([_Touchy(), _Quantizeish(), Upcycle(num_experts=4, top_k=2)])
    plan = pipe.plan(state.facts() | Context().facts())
    assert not plan.ok
    text = "\n".join(plan.problems)
    # every problem at once: moe and calibration for step 1, float-weights for step 3
    assert "step 1 `needs-moe` requires `calibration`" in text and "--calib" in text
    assert "step 1 `needs-moe` requires `moe`" in text and "move `upcycle` before `needs-moe`" in text
    assert "step 3 `upcycle` requires `float-weights`" in text and "before `quantize" in text
    assert len(plan.problems) == 3
    with pytest.raises(PlanError) as exc:
        pipe.run(state)
    assert len(exc.value.problems) == 3
    assert not _Touchy.ran
    for k, v in state.module.state_dict().items():
        assert torch.equal(v, before[k])


def test_plan_ok_in_the_right_order():
    state = load("builtin:gpt")
    plan = Pipeline([Upcycle(num_experts=4, top_k=1)]).plan(state.facts())
    assert plan.ok
    assert "moe" in plan.steps[-1].facts_after


def test_run_reports_measured_error_and_time():
    state = load("builtin:gpt")
    result = Pipeline([Upcycle(num_experts=4, top_k=2, router_init="normal")]).run(state, Context(seed=1))
    rep = result.report.passes[0]
    assert rep.seconds is not None and rep.seconds >= 0
    assert rep.metrics["rel_max_diff"] <= 1e-5
    assert "moe" in result.state.facts()


class _Breaks(Pass):
    """Claims to be exact but changes the function: the numeric check must catch it."""

    name = "breaks"
    summary = "test pass"
    output_tolerance = 0.0

    def run(self, state, ctx):
        with torch.no_grad():
            for p in state.module.parameters():
                p.mul_(1.5)
        return PassResult(state, True, PassReport(self.name))


def test_numeric_check_enforces_the_promise():
    with pytest.raises(VerificationError, match="broke its promise"):
        Pipeline([_Breaks()]).run(load("builtin:gpt"))


def test_configs_are_typed_frozen_and_reject_unknown_fields():
    with pytest.raises(ConfigError, match="unknown field"):
        Upcycle(num_experts=4, top_k=2, nonsense=1)
    with pytest.raises(ConfigError, match="top_k"):
        Upcycle(num_experts=2, top_k=3)
    with pytest.raises(ConfigError):
        Upcycle(num_experts="many")
    cfg = Upcycle(num_experts=4, top_k=2).config
    with pytest.raises(Exception):
        cfg.num_experts = 5


def test_registry_passes_declare_their_contract():
    assert REGISTRY, "registry is empty"
    for p in REGISTRY:
        assert p.name and p.summary
        assert issubclass(p.Config, PassConfig)
        assert isinstance(p.requires, frozenset) and isinstance(p.provides, frozenset)


def test_layering_core_never_imports_passes():
    import pathlib
    import ast
    root = pathlib.Path(__file__).resolve().parents[2] / "moeconv"
    offenders = []
    for f in root.rglob("*.py"):
        if f.relative_to(root).parts[0] == "cli" or f.name == "recipe.py":
            continue  # the CLI shell (moeconv/cli/) and the recipe reader
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "passes" or n.startswith("passes.") for n in names):
                offenders.append(f.name)
    assert not offenders, f"moeconv/ imports passes/ in {offenders}"
