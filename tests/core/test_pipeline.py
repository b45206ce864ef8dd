"""Pipeline planning and the pass contract: problems reported all at once, with fixes, before
any tensor is touched; configs typed and validated at construction."""
import pytest
import torch

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
        c = p.default_contract()
        assert isinstance(c.requires, frozenset) and isinstance(c.provides, frozenset)
        if p.contract is not Pass.contract:  # config-dependent facts live in contract() only
            assert not ({"requires", "provides", "invalidates", "requires_any"} & set(vars(p))), p.name


class _Liar(Pass):
    """Declares `moe` but changes nothing: its promise cannot hold on a dense model."""

    name = "liar"
    summary = "test pass"
    provides = frozenset({"moe"})
    output_tolerance = 0.0

    def run(self, state, ctx):
        return PassResult(state, False, PassReport(self.name))


class _Keeper(_Liar):
    """Declares it invalidates `float-weights`, which still hold after it."""

    name = "keeper"
    provides = frozenset()
    invalidates = frozenset({"float-weights"})


@pytest.mark.parametrize("liar", [_Liar, _Keeper])
def test_a_pass_that_breaks_its_declared_facts_fails_alone_and_in_a_pipeline(liar):
    for call in (lambda s: liar()(s, Context()), lambda s: Pipeline([liar()]).run(s, Context())):
        state = load("builtin:llama")
        with pytest.raises(VerificationError, match=f"{liar.name}: declares it"):
            call(state)


def test_a_pass_called_alone_checks_requires_and_check_before_running():
    _Touchy.ran = False
    state = load("builtin:llama")
    with pytest.raises(PlanError, match=r"`needs-moe` requires `calibration`.*requires `moe`"):
        _Touchy()(state, Context())
    assert not _Touchy.ran

    class _Refuses(_Liar):
        name = "refuses"
        provides = frozenset()

        def check(self, state, ctx):
            raise ConfigError("refused in check")

        def run(self, state, ctx):
            raise AssertionError("run after a failed check")
    with pytest.raises(ConfigError, match="refused in check"):
        _Refuses()(state, Context())


def test_a_configured_pass_reports_its_own_facts():
    from passes import ExportOnnx, Quantize, Sparsify
    assert Quantize(method="int8").contract().provides == {"quantized", "int8-weights"}
    assert Quantize(method="nf4").contract().provides == {"quantized"}
    assert "calibration" not in Sparsify(method="magnitude").contract().requires
    assert "calibration" in Sparsify(method="wanda").contract().requires
    assert ExportOnnx(quantize="int8").contract().requires_any == ()
    assert Upcycle(expert_init="noise").contract().output_tolerance is None
    assert Upcycle().contract().output_tolerance == 0.0


def test_passes_json_lists_the_facts_of_default_instances():
    import json
    from typer.testing import CliRunner
    from moeconv.cli import app
    res = CliRunner().invoke(app, ["passes", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {p.name for p in REGISTRY}
    for p in REGISTRY:
        try:
            c = p().contract()
        except ConfigError:  # no default instance (prune-experts needs a budget): declared on the class
            assert p.contract is Pass.contract
            c = p.declared_contract()
        row = rows[p.name]
        assert row["requires"] == sorted(c.requires) and row["provides"] == sorted(c.provides)
        assert row["invalidates"] == sorted(c.invalidates)
        assert row["requires_any"] == [sorted(g) for g in c.requires_any]
        assert row["output_tolerance"] == c.output_tolerance


def test_layering_core_never_imports_passes():
    import pathlib
    import ast
    root = pathlib.Path(__file__).resolve().parents[2] / "moeconv"
    offenders = []
    for f in root.rglob("*.py"):
        if f.relative_to(root).parts[0] in ("cli", "jobs") or f.name == "recipe.py":
            continue  # the application layer: the CLI shell, the jobs that compose passes, the recipe reader
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "passes" or n.startswith("passes.") for n in names):
                offenders.append(f.name)
    assert not offenders, f"moeconv/ imports passes/ in {offenders}"


def test_configs_hold_configuration_only():
    """Where a run keeps its state is given to the pass, not written into its config (or recipe)."""
    from passes import Distill
    from passes.distill import DistillConfig
    assert not {"run_dir", "resume"} & set(DistillConfig.model_fields)
    with pytest.raises(ConfigError, match="checkpoint_every needs a run directory"):
        Distill(checkpoint_every=2)
    d = Distill(checkpoint_every=2, run_dir="somewhere", resume=None)
    assert d.run_dir == "somewhere" and "run_dir" not in d.config.model_dump()
