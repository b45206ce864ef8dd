"""The `upcycle` pass (passes/upcycle.py) run in memory through `Pipeline`, so the NumericCheck
instrument measures every run:

- copy init is exact for every router init and with a shared expert, on every FFN kind
  (gated Llama, Conv1D GPT-2, split BERT, fused gate_up Phi-3);
- split init with top_k == num_experts and a zero router is exact, and partitions the neurons;
- drop init re-draws exactly round(r·I) neurons per expert (rows of gate/up, columns of down),
  a different set per expert, and leaves every other weight bit-identical;
- noise init moves every expert matrix by a relative amount ≈ noise_scale;
- selectors, config validation.
"""
from __future__ import annotations

import pytest
import torch

import moeconv
from moeconv import Context, Pipeline
from moeconv.errors import ConfigError, VerificationError
from passes.upcycle import Upcycle, UpcycleConfig
from upcycle_helpers import (EXACT, EXPERTS, INTER, assert_same_function, build_dense, clone, moe_blocks, outputs,
                             rel_max_diff, tokens)


def _upcycle(model, ctx: Context | None = None, **cfg):
    """(upcycled module, upcycle pass report); the input model is left untouched."""
    state = moeconv.load(clone(model))
    result = Pipeline([Upcycle(**cfg)]).run(state, ctx or Context(seed=0))
    assert len(result.report.passes) == 1
    return result.state.module, result.report.passes[0]


def _mlp(model, layer: int):
    """The dense FFN module of decoder layer `layer` of a tiny Llama / Phi-3."""
    return model.model.layers[layer].mlp


# ----------------------------------------------------------------------------- exactness (copy)

KINDS = ["llama", "gpt2", "bert", "phi3"]


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("router", ["zeros", "normal"])
@pytest.mark.parametrize("kind", KINDS)
def test_copy_init_is_exact(kind, router, shared):
    dense = build_dense(kind)
    moe, rep = _upcycle(dense, num_experts=EXPERTS, top_k=2, router_init=router, router_std=0.5,
                        shared_experts=shared, expert_init="copy", seed=3)
    # The instrument measured it and the pass promised it.
    assert rep.metrics["exact"] is True
    assert rep.metrics["rel_max_diff"] <= EXACT
    assert rep.metrics["sites_converted"] == rep.metrics["sites_found"] == 2
    blocks = moe_blocks(moe)
    assert len(blocks) == 2
    for _, b in blocks:
        assert b.num_experts == EXPERTS and b.top_k == 2
        assert (b.shared_expert is not None) == shared
        if router == "normal":  # the router really routes: not all rows equal
            assert b.router.weight.abs().max() > 0 and not torch.equal(b.router.weight[0], b.router.weight[1])
    # And independently, on inputs the instrument never saw.
    assert_same_function(moe, dense)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_copy_init_exact_with_hidden_router(kind):
    """router_init='hidden' (k-means centroids of calibration hidden states) keeps copy init exact."""
    dense = build_dense(kind)
    calib = tokens(5, batch=4, seq=16)
    moe, rep = _upcycle(dense, Context(seed=0, calibration=calib), num_experts=EXPERTS, top_k=2,
                        router_init="hidden")
    assert rep.metrics["rel_max_diff"] <= EXACT
    for _, b in moe_blocks(moe):
        assert torch.allclose(b.router.weight.norm(dim=-1), torch.ones(EXPERTS), atol=1e-5)  # unit centroids
    assert_same_function(moe, dense)


def test_hidden_router_needs_calibration():
    with pytest.raises(ConfigError, match="calib"):
        _upcycle(build_dense("llama"), num_experts=EXPERTS, top_k=2, router_init="hidden")


def test_copy_init_without_renormalisation_changes_the_function_and_says_so():
    dense = build_dense("llama")
    up = Upcycle(num_experts=EXPERTS, top_k=2, renormalize=False, router_init="normal", router_std=0.5)
    assert up.output_tolerance is None  # no exactness promise…
    moe, rep = _upcycle(dense, num_experts=EXPERTS, top_k=2, renormalize=False, router_init="normal",
                        router_std=0.5)
    assert rep.metrics["exact"] is False and rep.warnings
    assert rep.metrics["rel_max_diff"] > 1e-3  # …and the measured change is reported


# ----------------------------------------------------------------------------- split


@pytest.mark.parametrize("kind", ["llama", "gpt2", "phi3", "bert"])
def test_split_all_experts_zero_router_is_exact(kind):
    dense = build_dense(kind)
    moe, rep = _upcycle(dense, num_experts=EXPERTS, top_k=EXPERTS, router_init="zeros", expert_init="split")
    assert rep.metrics["exact"] is True
    assert rep.metrics["rel_max_diff"] <= EXACT
    assert all(row["expert_intermediate"] == INTER // EXPERTS for row in rep.tables["sites"])
    assert_same_function(moe, dense)


def test_split_shared_expert_is_exact():
    dense = build_dense("llama")
    moe, rep = _upcycle(dense, num_experts=EXPERTS, top_k=EXPERTS, expert_init="split", shared_experts=True)
    assert rep.metrics["rel_max_diff"] <= EXACT
    assert_same_function(moe, dense)


@pytest.mark.parametrize("mode", ["random", "clustered"])
def test_split_partitions_the_neurons(mode):
    dense = build_dense("llama")
    moe, _ = _upcycle(dense, num_experts=EXPERTS, top_k=EXPERTS, expert_init="split", split_mode=mode)
    for layer in range(2):
        src = _mlp(dense, layer)
        block = _mlp(moe, layer)
        owner = {}
        for e, ex in enumerate(block.experts):
            assert ex.gate_proj.weight.shape == (INTER // EXPERTS, src.gate_proj.weight.shape[1])
            for r in range(ex.gate_proj.weight.shape[0]):
                # every expert row is a source row; gate, up and down move together
                hits = (src.gate_proj.weight == ex.gate_proj.weight[r]).all(1).nonzero().flatten().tolist()
                assert len(hits) == 1
                n = hits[0]
                assert n not in owner, f"neuron {n} in experts {owner[n]} and {e}"
                owner[n] = e
                assert torch.equal(ex.up_proj.weight[r], src.up_proj.weight[n])
                torch.testing.assert_close(ex.down_proj.weight[:, r], src.down_proj.weight[:, n] * EXPERTS,
                                           rtol=0, atol=0)
        assert sorted(owner) == list(range(INTER))


def test_split_topk_below_num_experts_is_reported_not_promised():
    dense = build_dense("llama")
    moe, rep = _upcycle(dense, num_experts=EXPERTS, top_k=2, expert_init="split", router_init="normal")
    assert rep.metrics["exact"] is False and rep.metrics["rel_max_diff"] > 1e-3


def test_split_needs_divisible_intermediate():
    with pytest.raises(ConfigError, match="divide"):
        _upcycle(build_dense("llama"), num_experts=3, top_k=3, expert_init="split")


# ----------------------------------------------------------------------------- drop


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    return set((a != b).any(dim=1).nonzero().flatten().tolist())


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_drop_reinitialises_exactly_round_r_I_neurons_per_expert(ratio):
    dense = build_dense("llama")
    moe, rep = _upcycle(dense, num_experts=EXPERTS, top_k=2, expert_init="drop", drop_ratio=ratio,
                        router_init="normal", seed=11)
    n_drop = round(ratio * INTER)
    assert rep.metrics["exact"] is False and "rel_max_diff" in rep.metrics
    for layer in range(2):
        src = _mlp(dense, layer)
        sets = []
        for ex in _mlp(moe, layer).experts:
            gate = _changed_rows(ex.gate_proj.weight, src.gate_proj.weight)
            up = _changed_rows(ex.up_proj.weight, src.up_proj.weight)
            down = _changed_rows(ex.down_proj.weight.T, src.down_proj.weight.T)  # columns of down
            assert len(gate) == n_drop, (layer, len(gate), n_drop)
            assert gate == up == down
            # the untouched neurons are bit-identical
            keep = sorted(set(range(INTER)) - gate)
            assert torch.equal(ex.gate_proj.weight[keep], src.gate_proj.weight[keep])
            assert torch.equal(ex.down_proj.weight[:, keep], src.down_proj.weight[:, keep])
            sets.append(frozenset(gate))
        assert len(set(sets)) == EXPERTS, "two experts dropped the same neurons"
    # the layers got different draws too
    l0 = _changed_rows(_mlp(moe, 0).experts[0].gate_proj.weight, _mlp(dense, 0).gate_proj.weight)
    l1 = _changed_rows(_mlp(moe, 1).experts[0].gate_proj.weight, _mlp(dense, 1).gate_proj.weight)
    assert l0 != l1


def test_drop_fused_gate_up_redraws_both_halves():
    """Phi-3's fused gate_up: neuron n is row n (gate half) and row I+n (up half)."""
    dense = build_dense("phi3")
    moe, _ = _upcycle(dense, num_experts=EXPERTS, top_k=2, expert_init="drop", drop_ratio=0.25)
    src = _mlp(dense, 0)
    for ex in _mlp(moe, 0).experts:
        rows = _changed_rows(ex.gate_up_proj.weight, src.gate_up_proj.weight)
        gate_half = {r for r in rows if r < INTER}
        assert len(gate_half) == round(0.25 * INTER)
        assert rows == gate_half | {r + INTER for r in gate_half}
        assert _changed_rows(ex.down_proj.weight.T, src.down_proj.weight.T) == gate_half


def test_drop_depends_on_seed():
    dense = build_dense("llama")
    a, _ = _upcycle(dense, num_experts=EXPERTS, top_k=2, expert_init="drop", seed=1)
    b, _ = _upcycle(dense, num_experts=EXPERTS, top_k=2, expert_init="drop", seed=1)
    c, _ = _upcycle(dense, num_experts=EXPERTS, top_k=2, expert_init="drop", seed=2)
    wa, wb, wc = (_mlp(m, 0).experts[0].gate_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("scale", [0.01, 0.1])
def test_noise_moves_every_expert_by_about_noise_scale(scale):
    dense = build_dense("llama")
    moe, rep = _upcycle(dense, num_experts=EXPERTS, top_k=2, expert_init="noise", noise_scale=scale)
    assert rep.metrics["exact"] is False
    for layer in range(2):
        src = _mlp(dense, layer)
        weights = []
        for ex in _mlp(moe, layer).experts:
            for name in ("gate_proj", "up_proj", "down_proj"):
                w, w0 = getattr(ex, name).weight, getattr(src, name).weight
                rel = ((w - w0).norm() / w0.norm()).item()
                assert 0.8 * scale < rel < 1.2 * scale, (layer, name, rel)
                assert (w != w0).float().mean() > 0.99  # every entry moved
            weights.append(ex.gate_proj.weight)
        for i in range(EXPERTS):
            for j in range(i + 1, EXPERTS):
                assert not torch.equal(weights[i], weights[j]), "two experts got the same noise"
    # small noise → small, measured change of the function
    assert 0 < rep.metrics["rel_max_diff"] < 50 * scale


# ----------------------------------------------------------------------------- selection, config


def test_targets_every_2_converts_even_layers_only():
    dense = build_dense("llama", layers=4)
    moe, rep = _upcycle(dense, num_experts=EXPERTS, top_k=2, targets=["every:2"], router_init="normal")
    assert [n for n, _ in moe_blocks(moe)] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert type(moe.model.layers[1].mlp).__name__ == "LlamaMLP"
    assert rep.metrics["sites_converted"] == 2 and rep.metrics["sites_found"] == 4
    assert rep.metrics["rel_max_diff"] <= EXACT
    assert_same_function(moe, dense)


def test_ignore_and_layers_selectors():
    dense = build_dense("llama", layers=4)
    moe, _ = _upcycle(dense, num_experts=EXPERTS, top_k=2, targets=["layers:1-3"], ignore=["re:layers\\.2\\."])
    assert [n for n, _ in moe_blocks(moe)] == ["model.layers.1.mlp", "model.layers.3.mlp"]


def test_selecting_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match="no FFN site selected"):
        _upcycle(build_dense("llama"), num_experts=EXPERTS, top_k=2, targets=["layers:9"])


@pytest.mark.parametrize("fields, match", [
    ({"num_experts": 4, "top_k": 5}, "top_k"),
    ({"num_experts": 4, "top_k": 0}, "top_k"),
    ({"num_experts": 1, "top_k": 1}, "num_experts"),
    ({"targets": ["every:two"]}, "targets"),
    ({"targets": ["every:0"]}, "targets"),
    ({"targets": ["re:("]}, "targets"),
    ({"expert_init": "clone"}, "expert_init"),
    ({"drop_ratio": 1.0}, "drop_ratio"),
    ({"bogus": 1}, "unknown field"),
])
def test_bad_config_is_refused_at_construction(fields, match):
    with pytest.raises(ConfigError, match=match):
        Upcycle(**fields)


def test_exact_promise_is_enforced():
    """An 'exact' config whose result is not exact must raise, not pass silently: sabotage one
    expert after the pass runs, inside the pipeline (between run and the instrument)."""
    class Sabotaged(Upcycle):
        name = "upcycle"

        def run(self, state, ctx):
            res = super().run(state, ctx)
            with torch.no_grad():
                block = res.state.module.model.layers[0].mlp
                for ex in block.experts:
                    ex.down_proj.weight.mul_(1.5)
            return res
    state = moeconv.load(build_dense("llama"))
    with pytest.raises(VerificationError, match="broke its promise"):
        Pipeline([Sabotaged(num_experts=EXPERTS, top_k=2)]).run(state, Context(seed=0))


def test_config_exactness_table():
    assert UpcycleConfig(expert_init="copy", top_k=2, num_experts=4).is_exact()
    assert UpcycleConfig(expert_init="copy", top_k=4, num_experts=4, renormalize=False).is_exact()
    assert not UpcycleConfig(expert_init="copy", top_k=2, num_experts=4, renormalize=False).is_exact()
    assert UpcycleConfig(expert_init="split", top_k=4, num_experts=4).is_exact()
    assert not UpcycleConfig(expert_init="split", top_k=4, num_experts=4, router_init="normal").is_exact()
    assert not UpcycleConfig(expert_init="drop").is_exact()
    assert not UpcycleConfig(expert_init="noise").is_exact()


def test_outputs_helper_sanity():
    """The comparison helpers themselves detect a real difference (guards against vacuous checks)."""
    a, b = build_dense("llama", seed=0), build_dense("llama", seed=1)
    ids = tokens()
    assert rel_max_diff(outputs(a, ids), outputs(b, ids)) > 1e-2
