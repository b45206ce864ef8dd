"""The sparsify pass: exact 2:4 inside every expert, everything else bit-identical, outputs that
reload and match, routing-aware statistics with a fallback for experts the router never picks."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparsify_helpers import calib_tokens, hf_state, is_expert_tensor, save_native, save_upcycled  # noqa: E402
from upcycle_helpers import build_dense  # noqa: E402

from moeconv import Context, Pipeline, load  # noqa: E402
from moeconv.errors import ConfigError, PlanError  # noqa: E402
from moeconv.jobs.pipeline_job import run_to_dir  # noqa: E402
from moeconv.nn.moe import MoEBlock  # noqa: E402
from moeconv.sparsity import SparsityPattern, keep_top, nm_violations  # noqa: E402
from passes.sparsify import Sparsify  # noqa: E402
from passes.upcycle import Upcycle  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsify-src")
    return {"upcycled": save_upcycled(root / "upcycled"), "mixtral": save_native("mixtral", root / "mixtral"),
            "qwen3_moe": save_native("qwen3_moe", root / "qwen3_moe")}


@pytest.mark.parametrize("kind,method", [("upcycled", "sparsegpt"), ("mixtral", "sparsegpt"),
                                         ("qwen3_moe", "wanda"), ("mixtral", "magnitude")])
def test_checkpoint_experts_are_exactly_24_and_the_rest_bit_identical(ckpts, tmp_path, kind, method):
    src = ckpts[kind]
    calib = calib_tokens()
    report = run_to_dir(src, tmp_path / "out", [Sparsify(method=method)], ctx=Context(calibration=calib))
    before, after = hf_state(src), hf_state(tmp_path / "out")
    assert before.keys() == after.keys()
    experts = [k for k in before if is_expert_tensor(k)]
    assert len(experts) == 4  # gate_up_proj and down_proj per layer, fused as transformers holds them
    for name in before:
        if name in experts:  # (E, out, in): at most 2 non-zeros in every 4 consecutive inputs
            w = after[name]
            assert nm_violations(w.reshape(-1, w.shape[-1]), 2, 4) == 0, name
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
        else:  # routers, attention, embeddings, norms, lm_head
            assert torch.equal(before[name], after[name]), name
    # the output reloads and matches the in-memory pruned model (independently re-run here)
    mem = Pipeline([Sparsify(method=method)]).run(load(src), Context(calibration=calib)).state.module
    ids = calib_tokens(2, 17, seed=9)
    with torch.inference_mode():
        ref = mem(input_ids=ids).logits
        for reloaded in (load(tmp_path / "out").module,):
            assert torch.equal(reloaded(input_ids=ids).logits, ref)
    assert report["verification"]["max_abs_diff"] == 0
    rep = report["passes"][0]
    assert rep["metrics"]["target_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert rep["metrics"]["rel_max_diff"] > 0  # the function changed and the change is reported
    assert len(rep["tables"]["experts"]) == 8 and len(rep["tables"]["matrices"]) == 24
    if method != "magnitude":
        assert len(rep["tables"]["layers"]) == 2 and all(r["layer_rel_error"] > 0 for r in rep["tables"]["layers"])
        assert sum(r["tokens"] for r in rep["tables"]["experts"]) == 2 * 2 * calib.numel()  # top-2, 2 layers


def test_upcycled_copies_are_pruned_differently_by_their_own_tokens(ckpts):
    """The 4 experts start identical; routing-aware statistics make their masks differ."""
    state = load(ckpts["upcycled"])
    Pipeline([Sparsify(method="wanda")]).run(state, Context(calibration=calib_tokens()))
    block = state.module.model.layers[0].mlp
    masks = [(e.gate_proj.weight == 0) for e in block.experts]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


def _moe_model(router_bias=True):
    state = load(build_dense("llama"))
    up = Upcycle(num_experts=4, top_k=2, router_init="normal", router_std=0.5, router_bias=router_bias)
    return Pipeline([up]).run(state, Context()).state


def _block_inputs(model, calib, layer=0):
    """What MoEBlock `layer` receives on `calib` in the unpruned model (layer 0 sees the same
    inputs during layer-wise calibration: nothing before it is pruned)."""
    block = model.model.layers[layer].mlp
    seen = []
    h = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        for chunk in calib.split(8):
            model(input_ids=chunk)
    h.remove()
    return block, torch.cat(seen)


def _wanda_keep(w, x):
    return keep_top(w.abs() * x.float().pow(2).sum(0).sqrt(), SparsityPattern.parse("2:4"))


def _expected_wanda_masks(expert, x):
    """Wanda masks of gate/up/down from inputs `x` reaching the *unpruned* expert."""
    with torch.inference_mode():
        inner = expert.act_fn(expert.gate_proj(x)) * expert.up_proj(x)
    return {"gate_proj": _wanda_keep(expert.gate_proj.weight, x), "up_proj": _wanda_keep(expert.up_proj.weight, x),
            "down_proj": _wanda_keep(expert.down_proj.weight, inner)}


def test_statistics_are_the_routed_tokens_and_ignored_expert_falls_back_to_all_tokens():
    state = _moe_model()
    block0 = state.module.model.layers[0].mlp
    with torch.no_grad():
        block0.router.bias[2] = -1e4  # the router never selects expert 2 of layer 0
    calib = calib_tokens()
    block, x_all = _block_inputs(state.module, calib)
    routed = block.route(x_all).indices
    assert not (routed == 2).any()
    expected = {}
    for e, expert in enumerate(block.experts):
        x = x_all if e == 2 else x_all[(routed == e).any(-1)]
        expected[e] = _expected_wanda_masks(copy.deepcopy(expert), x)
    all_tok = {e: _expected_wanda_masks(copy.deepcopy(ex), x_all) for e, ex in enumerate(block.experts)}

    result = Pipeline([Sparsify(method="wanda")]).run(state, Context(calibration=calib))
    rep = result.report.passes[0]
    for e, expert in enumerate(block.experts):
        for proj, keep in expected[e].items():
            w = getattr(expert, proj).weight
            assert torch.isfinite(w).all()
            assert torch.equal(w != 0, keep), (e, proj)
    # routed statistics really differ from all-token ones for some expert (the test can tell them apart)
    assert any(not torch.equal(expected[e][p], all_tok[e][p]) for e in (0, 1, 3) for p in expected[e])
    row = next(r for r in rep.tables["experts"] if r["layer"] == 0 and r["expert"] == 2)
    assert row["tokens"] == 0 and row["fallback"] and row["stats"] == "all tokens (fallback)"
    assert row["rel_error_max"] is not None and row["rel_error_max"] > 0
    assert any("model.layers.0.mlp.experts.2 received 0 of" in w for w in rep.warnings)
    assert rep.metrics["fallback_experts"] == 1
    for m in state.module.modules():  # observe, then mutate: every hook removed
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_magnitude_fallback_and_coverage_threshold():
    state = _moe_model()
    with torch.no_grad():
        state.module.model.layers[1].mlp.router.bias[0] = -1e4
    expert = state.module.model.layers[1].mlp.experts[0]
    want = keep_top(expert.down_proj.weight.abs(), SparsityPattern.parse("2:4"))
    rep = Pipeline([Sparsify(method="sparsegpt", fallback="magnitude")]).run(
        state, Context(calibration=calib_tokens())).report.passes[0]
    assert torch.equal(expert.down_proj.weight != 0, want)
    row = next(r for r in rep.tables["experts"] if r["layer"] == 1 and r["expert"] == 0)
    assert row["stats"] == "magnitude (fallback)" and row["fallback"]
    # a threshold above every expert's share: all fall back, none is left without statistics
    rep2 = Pipeline([Sparsify(method="sparsegpt", min_coverage=0.9)]).run(
        _moe_model(), Context(calibration=calib_tokens())).report.passes[0]
    assert rep2.metrics["fallback_experts"] == 8
    assert all(r["rel_error"] is not None for r in rep2.tables["matrices"])


def test_magnitude_needs_no_data_and_calibrated_methods_do():
    state = _moe_model(router_bias=False)
    ref = {n: p.detach().clone() for n, p in state.module.named_parameters()}
    rep = Pipeline([Sparsify(method="magnitude")]).run(state, Context()).report.passes[0]
    for n, p in state.module.named_parameters():
        if ".experts." in n:
            assert torch.equal(p != 0, keep_top(ref[n].abs(), SparsityPattern.parse("2:4"))), n
            assert torch.equal(p[p != 0], ref[n][p != 0])  # kept weights unchanged by magnitude
        else:
            assert torch.equal(p, ref[n]), n
    assert rep.metrics["calibration_tokens"] == 0
    with pytest.raises(PlanError, match="calibration"):
        Pipeline([Sparsify(method="sparsegpt")]).run(_moe_model(), Context())


def test_targets_attention_unstructured_and_refusals():
    state = _moe_model(router_bias=False)
    before = {n: p.detach().clone() for n, p in state.module.named_parameters()}
    Pipeline([Sparsify(method="sparsegpt", pattern="unstructured", ratio=0.6, targets=["attention"],
                       ignore=["re:v_proj"])]).run(state, Context(calibration=calib_tokens()))
    for n, p in state.module.named_parameters():
        if "self_attn" in n and "v_proj" not in n:
            assert ((p == 0).sum(1) >= int(p.shape[1] * 0.6)).all(), n
        else:
            assert torch.equal(p, before[n]), n
    # every linear selected by a regex: routers are still never candidates; lm_head is outside
    # the layer stack, which layer-wise calibration refuses with the reason
    with pytest.raises(ConfigError, match="outside the decoder layers"):
        Pipeline([Sparsify(method="wanda", targets=["re:."])]).run(_moe_model(), Context(calibration=calib_tokens()))
    state = _moe_model(router_bias=False)
    routers = {n: p.detach().clone() for n, p in state.module.named_parameters() if "router" in n}
    Pipeline([Sparsify(method="magnitude", targets=["re:."])]).run(state, Context())
    for n, p in state.module.named_parameters():
        if "router" in n:
            assert torch.equal(p, routers[n])


@pytest.mark.parametrize("fields,match", [
    ({"pattern": "4:4"}, "N < M"), ({"pattern": "2:4", "ratio": 0.3}, "fixes the sparsity"),
    ({"block_size": 6}, "multiple of M"), ({"method": "obs"}, "method"), ({"targets": ["re:("]}, "not a valid regex"),
    ({"pattern": "3:8", "block_size": 12}, "multiple of M"),
])
def test_invalid_configs_are_refused_at_construction(fields, match):
    with pytest.raises(ConfigError, match=match):
        Sparsify(**fields)


def test_no_matching_matrix_and_wrong_calibration_are_refused():
    with pytest.raises(ConfigError, match="no matrix matches"):
        Pipeline([Sparsify(method="magnitude", targets=["nothing.here"])]).run(_moe_model(), Context())
    from moeconv.errors import InputError
    with pytest.raises(InputError, match="vocabulary"):
        Pipeline([Sparsify(method="wanda")]).run(_moe_model(), Context(calibration=calib_tokens() + 1000))


def test_moe_blocks_are_linearised_native_input_in_memory():
    from sparsify_helpers import native_moe
    model = native_moe("mixtral")
    state = load(model)
    Pipeline([Sparsify(method="wanda")]).run(state, Context(calibration=calib_tokens()))
    blocks = [m for m in state.module.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 2
    for b in blocks:
        for e in b.experts:
            for lin in (e.gate_proj, e.up_proj, e.down_proj):
                assert nm_violations(lin.weight, 2, 4) == 0


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_reported_matrix_error_is_the_output_error_measured_directly(ckpts, method):
    """The pass takes ‖ΔW X‖² from SparseGPT's sweep and ‖W X‖² from the observed outputs, not
    from H products; both must equal the direct measurement. Layer 0 sees the embeddings, which
    pruning cannot change, so its inputs can be recaptured from the unpruned model."""
    from moeconv.calibrate import observe_inputs
    from moeconv.nn.linear_like import weight_out_in
    calib = calib_tokens()
    state = load(ckpts["mixtral"])
    before = {n: weight_out_in(m).detach().clone() for n, m in state.module.named_modules()
              if ".layers.0." in n and ".experts." in n and hasattr(m, "weight")}
    assert before
    xs = {n: [] for n in before}
    mods = dict(state.module.named_modules())
    with observe_inputs({n: mods[n] for n in before}, lambda n, x: xs[n].append(x.clone())), torch.inference_mode():
        for chunk in calib.split(Sparsify(method=method).config.batch_size):
            state.module(input_ids=chunk)
    result = Pipeline([Sparsify(method=method)]).run(state, Context(calibration=calib))
    rows = {r["matrix"]: r for r in result.report.passes[0].tables["matrices"]}
    pruned = dict(result.state.module.named_modules())
    for n, w in before.items():
        x = torch.cat(xs[n]).double()
        new = weight_out_in(pruned[n]).detach().double()
        direct = ((x @ (w.double() - new).t()) ** 2).sum() / ((x @ w.double().t()) ** 2).sum()
        assert rows[n]["rel_error"] == pytest.approx(direct.item(), rel=2e-3), n
