"""`prune-experts` on small constructed MoE blocks: importance scores against hand-computed values,
block surgery (kept experts and router rows bit-identical), merging, global allocation, and the
router re-calibration."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moeconv import Context, Pipeline
from moeconv.errors import ConfigError
from moeconv.nn.moe import MoEBlock, RoutingConfig
from moeconv.state import ModelState
from passes.expert_importance import best_subset, expert_scores, observe_block, rank_keep, subset_error
from passes.prune_experts import (PruneExperts, PruneExpertsConfig, allocate_global, apply_prune, merge_experts,
                                  merge_targets, recalibrate_router)


def _linear(weight) -> nn.Linear:
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight, dtype=torch.float32))
    return lin


def _block(router_rows, expert_weights, top_k=2, renormalize=True) -> MoEBlock:
    block = MoEBlock([_linear(w) for w in expert_weights], 2, RoutingConfig(top_k, renormalize))
    with torch.no_grad():
        block.router.weight.copy_(torch.tensor(router_rows, dtype=torch.float32))
    return block


def _softmax(logits):
    z = sum(math.exp(v) for v in logits)
    return [math.exp(v) / z for v in logits]


I = [[1.0, 0.0], [0.0, 1.0]]
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]])  # three tokens


def test_scores_match_hand_computation_and_never_selected_expert_ranks_last():
    # Router logits per token (x · r): x1 → (2, 0, 1, -3), x2 → (0, 2, 1, -3), x3 → (2, 1, 1.5, -4.5).
    # Top-2 by hand: x1 → {0, 2}, x2 → {1, 2}, x3 → {0, 2}. Expert 3 is never selected.
    rows = [[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, -3.0]]
    experts = [I, [[2.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]]]
    block = _block(rows, experts)
    s = expert_scores(block, X, observe_block(block, X))

    p1, p2, p3 = _softmax([2, 0, 1, -3]), _softmax([0, 2, 1, -3]), _softmax([2, 1, 1.5, -4.5])
    # frequency: count / (N·k) = count / 6
    assert s["tokens"].tolist() == [2, 1, 3, 0]
    assert s["frequency"].tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6, 0.0])
    # mass: Σ probability (before renormalisation) where selected, / N
    assert s["mass"].tolist() == pytest.approx([(p1[0] + p3[0]) / 3, p2[1] / 3, (p1[2] + p2[2] + p3[2]) / 3, 0.0])
    # REAP: mean over routed tokens of (renormalised gate) · ‖E(x)‖. ‖E0 x1‖ = 1, ‖E0 x3‖ = √1.25,
    # ‖E1 x2‖ = 2, and expert 2 (a swap) keeps every norm.
    g1 = p1[0] / (p1[0] + p1[2])          # token 1: gate of expert 0; expert 2 gets 1 - g1
    g2 = p2[1] / (p2[1] + p2[2])          # token 2: gate of expert 1
    g3 = p3[0] / (p3[0] + p3[2])          # token 3: gate of expert 0
    r = math.sqrt(1.25)
    want = [(g1 * 1 + g3 * r) / 2, g2 * 2 / 1, ((1 - g1) * 1 + (1 - g2) * 1 + (1 - g3) * r) / 3, 0.0]
    assert s["reap"].tolist() == pytest.approx(want)
    for crit in ("frequency", "mass", "reap"):
        assert rank_keep(s[crit], 3) == [0, 1, 2], crit  # the never-selected expert goes first
    # Removing expert 3 changes nothing (to rounding: softmax over 3 instead of 4 logits).
    assert s["reconstruction"][3] < 1e-12 and min(s["reconstruction"][:3]) > 1e-3
    assert best_subset(observe_block(block, X), 3)[0] == [0, 1, 2]


def test_zero_output_expert_ranks_last_by_reap_although_it_is_the_most_selected():
    # Logits: x1 → (2, 1, 0) → {0, 1}; x2 → (0, 1.2, 2) → {2, 1}; x3 → (2, 1.6, 1) → {0, 1}.
    rows = [[2.0, 0.0], [1.0, 1.2], [0.0, 2.0]]
    block = _block(rows, [I, [[0.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [0.0, 3.0]]])
    s = expert_scores(block, X, observe_block(block, X))
    assert s["tokens"].tolist() == [2, 3, 1]
    assert s["reap"][1] == 0.0 and min(s["reap"][0], s["reap"][2]) > 0
    assert rank_keep(s["reap"], 2) == [0, 2]
    assert rank_keep(s["frequency"], 2) == [0, 1]  # frequency alone would keep the useless expert


def test_reconstruction_error_is_the_relative_output_error_of_the_subset():
    rows = [[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    block = _block(rows, [I, [[2.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]], top_k=1)
    obs = observe_block(block, X)
    # top-1: x1 → 0, x2 → 1, x3 → 0. Full outputs (1, 0), (0, 2), (1, .5): ‖F‖² = 1 + 4 + 1.25.
    # Without expert 1, x2 goes to expert 2 (logit 1 > 0): output (1, 0) instead of (0, 2): error 5.
    assert subset_error(obs, [0, 2]) == pytest.approx(5 / 6.25)
    assert expert_scores(block, X, obs)["reconstruction"][1] == pytest.approx(5 / 6.25)


def test_apply_prune_keeps_experts_and_router_rows_bit_identical():
    torch.manual_seed(0)
    block = MoEBlock([nn.Linear(2, 2) for _ in range(4)], 2, RoutingConfig(2), router_bias=True,
                     shared_expert=nn.Linear(2, 2), shared_expert_gate=True)
    with torch.no_grad():
        for p in (block.router.weight, block.router.bias, block.shared_expert_gate.weight):
            p.normal_()
    src_router = block.router.weight.clone()
    src_bias = block.router.bias.clone()
    kept_modules = [block.experts[1], block.experts[3]]
    shared, gate = block.shared_expert, block.shared_expert_gate
    apply_prune(block, [1, 3], {}, [1, 1, 1, 1])
    assert block.num_experts == 2 and list(block.experts) == kept_modules
    assert torch.equal(block.router.weight, src_router[[1, 3]]) and torch.equal(block.router.bias, src_bias[[1, 3]])
    assert block.router.weight.dtype == torch.float32
    assert block.shared_expert is shared and block.shared_expert_gate is gate


def test_merge_is_frequency_weighted_into_the_most_similar_kept_expert():
    # Expert 2 behaves like expert 0 (a scaled copy), unlike expert 1: it is merged into 0.
    rows = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    w0, w1, w2 = I, [[0.0, -1.0], [1.0, 0.0]], [[1.5, 0.0], [0.0, 1.5]]
    block = _block(rows, [w0, w1, w2], top_k=1)
    obs = observe_block(block, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
    assert merge_targets(obs, [0, 1], [2]) == {2: 0}
    assert merge_targets(obs, [1, 2], [0]) == {0: 2}
    merged = merge_experts([block.experts[0], block.experts[2]], [3, 1])
    want = (3 * torch.tensor(w0) + 1 * torch.tensor(w2)) / 4
    assert torch.allclose(merged.weight, want)
    assert torch.equal(block.experts[0].weight, torch.tensor(w0))  # sources untouched
    # Two never-routed experts merge with equal weights.
    assert torch.allclose(merge_experts([block.experts[0], block.experts[2]], [0, 0]).weight,
                          (torch.tensor(w0) + torch.tensor(w2)) / 2)


def test_global_allocation_removes_the_smallest_shares_and_respects_top_k():
    scores = {"a": torch.tensor([0.4, 0.3, 0.2, 0.1]), "b": torch.tensor([5.0, 5.0, 5.0, 5.0]),
              "c": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    layers = [("a", 4, 2), ("b", 4, 2), ("c", 4, 2)]
    # Shares: a (.4 .3 .2 .1), b (.25 ×4), c (0 0 0 1). Keep 8 of 12: remove c0, c1 (0; c2 would go
    # below top_k=2), then a3 (.1), a2 (.2).
    assert allocate_global(scores, [3, 3, 2], layers) == [2, 4, 2]


def test_recalibration_lowers_the_error_and_changes_only_the_router():
    # Experts 0 and 1 are equal; expert 2 is harmful. Every token uses {0, 1}; once 1 is dropped,
    # tokens use {0, 2} and the best router pushes expert 2's gate towards 0.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=g).abs() + 0.1
    rows = [[1.0, 1.0], [1.0, 1.0], [0.6, 0.6]]
    block = _block(rows, [I, I, [[-3.0, 0.0], [0.0, -3.0]]])
    obs = observe_block(block, x)
    expert_before = block.experts[0].weight.clone()
    apply_prune(block, [0, 2], {}, [1, 1, 1])
    cfg = PruneExpertsConfig(keep=2, recalibrate_router=True, recalib_steps=200, recalib_lr=0.05)
    out = recalibrate_router(block, obs, obs.outputs[[0, 2]], cfg)
    assert out["recal_improved"] and out["recal_error_after"] < 0.25 * out["recal_error_before"]
    assert torch.equal(block.experts[0].weight, expert_before)


# ---- the pass on a toy model ---------------------------------------------------------------------

class _Layer(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.mlp = block

    def forward(self, h):
        return h + self.mlp(h)


class _Toy(nn.Module):
    """Embedding → residual MoE layers: a decoder stack `run_layerwise` can walk."""

    def __init__(self, blocks):
        super().__init__()
        self.embed = nn.Embedding(16, 2)
        self.layers = nn.ModuleList(_Layer(b) for b in blocks)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return h


def _toy():
    torch.manual_seed(0)
    blocks = [_block([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, -3.0]],
                     [I, [[2.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
              for _ in range(2)]
    model = _Toy(blocks).eval()
    with torch.no_grad():
        model.embed.weight.copy_(torch.rand(16, 2) + 0.1)  # positive hidden states: expert 3 never routed
    return model


def test_pass_drops_the_never_routed_expert_and_reports_every_expert():
    model = _toy()
    calib = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(1))
    result = Pipeline([PruneExperts(keep=3, criterion="frequency")]).run(ModelState(model), Context(calibration=calib))
    rep = result.report.passes[0]
    assert [b.num_experts for b in (l.mlp for l in model.layers)] == [3, 3]
    assert [r["kept"] for r in rep.tables["layers"]] == [[0, 1, 2], [0, 1, 2]]
    rows = rep.tables["experts"]
    assert len(rows) == 8 and {r["layer"] for r in rows} == {"layers.0.mlp", "layers.1.mlp"}
    never = [r for r in rows if r["expert"] == 3]
    assert all(r["status"] == "dropped" and r["tokens"] == 0 and r["reconstruction"] < 1e-12 for r in never)
    assert all(r["status"] == "kept" for r in rows if r["expert"] != 3)
    assert all(set(r) >= {"frequency", "mass", "reap", "reconstruction", "new_index", "merged_into"} for r in rows)
    # Dropping an expert nothing was routed to is exact (to rounding), even on the check inputs.
    assert rep.metrics["mean_error_pruned"] < 1e-12 and rep.metrics["max_abs_diff"] < 1e-6
    assert any("no calibration tokens" in w for w in rep.warnings)


def test_per_layer_and_global_budgets_on_the_toy():
    calib = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(1))
    model = _toy()
    for b in (l.mlp for l in model.layers):
        b.source_site = object()  # as if upcycled by moeconv: the moeconv format holds per-layer counts
    Pipeline([PruneExperts(per_layer=[3, 2], criterion="reap")]).run(ModelState(model), Context(calibration=calib))
    assert [l.mlp.num_experts for l in model.layers] == [3, 2]
    model = _toy()
    for b in (l.mlp for l in model.layers):
        b.source_site = object()
    res = Pipeline([PruneExperts(keep=3, per_layer="global", criterion="mass")]).run(ModelState(model),
                                                                                     Context(calibration=calib))
    counts = [l.mlp.num_experts for l in model.layers]
    assert sum(counts) == 6 and min(counts) >= 2
    assert res.report.passes[0].metrics["allocation"].startswith("global")


@pytest.mark.parametrize("fields, message", [
    (dict(keep=1), "top_k=2"),
    (dict(per_layer=[3, 1]), "top_k=2"),
    (dict(per_layer=[3]), "2 MoE layers"),
    (dict(keep=4), "removes no expert"),
    (dict(keep=5), "removes no expert"),
    (dict(ratio=0.6, per_layer="global"), None),  # 2 + 2 = top_k sum: allowed
])
def test_budget_refusals_on_the_toy(fields, message):
    model = _toy()
    for b in (l.mlp for l in model.layers):
        b.source_site = object()
    calib = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    run = lambda: Pipeline([PruneExperts(**fields)]).run(ModelState(model), Context(calibration=calib))
    if message is None:
        run()
        return
    with pytest.raises(ConfigError, match=message):
        run()
    assert [l.mlp.num_experts for l in model.layers] == [4, 4]  # refused before touching anything


@pytest.mark.parametrize("fields", [dict(), dict(keep=2, ratio=0.5), dict(keep=2, per_layer=[2, 2]),
                                    dict(per_layer="global"), dict(keep=2, criterion="entropy"), dict(keep=0)])
def test_invalid_configs_are_refused_at_construction(fields):
    with pytest.raises(ConfigError):
        PruneExperts(**fields)


def test_captured_rows_are_subsampled_batch_by_batch_as_from_the_whole(tmp_path):
    """`_subsample_store` keeps the rows `_subsample` keeps of all the rows concatenated, in order,
    bit for bit, reading one stored batch at a time, whether the batches sit in memory or were
    spilled to files."""
    from moeconv.stream.activations import HiddenStates
    from passes.prune_experts import _subsample, _subsample_store
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 8, generator=g).to(torch.bfloat16) for n in (5, 17, 1, 9, 30)]
    whole = torch.cat(batches)
    for budget in (None, 0):
        store = HiddenStates() if budget is None else HiddenStates(budget, tmp_path / f"s{budget}")
        for b in batches:
            store.append(b)
        for limit in (1, 7, 31, 62, 100):
            got = _subsample_store(store, limit)
            assert torch.equal(got, _subsample(whole, limit)), (budget, limit)
            assert got.data_ptr() not in {b.data_ptr() for b in batches}  # a copy of its own
        assert store.shape(1) == (17, 8)
        store.release()
