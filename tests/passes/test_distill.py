"""The `distill` pass on tiny Hugging Face models: heal after 2:4 pruning keeps the exact mask,
router-only touches routers only, moe-to-dense and moe-to-moe train through their extra losses,
and bad set-ups are refused before any training."""
import copy

import pytest
import torch

from upcycle_helpers import build_dense, moe_blocks
from moeconv import Context, Pipeline, load
from moeconv.errors import ConfigError, PlanError, UnsupportedError
from moeconv.nn.linear_like import weight_out_in
from moeconv.sparsity import SparsityPattern, check_pattern
from passes.distill import Distill, KeepTeacher
from passes.sparsify import Sparsify
from passes.upcycle import Upcycle

VOCAB = 128


def data(seed=0, n=40, seq=16):
    rows = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))
    return Context(calibration=rows[:32], evaluation=rows[32:], seed=0)


def upcycled(num_experts=4, top_k=2, seed=0, **init):
    state = load(build_dense("llama"))
    Pipeline([Upcycle(num_experts=num_experts, top_k=top_k, router_init="normal", seed=seed, **init)]).run(state, data())
    return state


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_heal_after_2to4_keeps_the_exact_pattern_and_lowers_kl():
    state = upcycled()
    ctx = data()
    state = Pipeline([KeepTeacher(), Sparsify(method="magnitude")]).run(state, ctx).state
    pruned = state.artifacts["sparsify"]["matrices"]
    zeros = {n: weight_out_in(state.module.get_submodule(n)).detach() == 0 for n in pruned}
    before = params(state.module)
    result = Pipeline([Distill(mode="heal", steps=15, lr=1e-3, batch_size=8)]).run(state, ctx)
    m = result.report.passes[0].metrics
    model = result.state.module
    pattern = SparsityPattern.parse("2:4")
    for n in pruned:
        w = weight_out_in(model.get_submodule(n)).detach()
        check_pattern(w, pattern, n)  # at most 2 non-zeros in every 4 inputs
        assert torch.equal(w == 0, zeros[n]), f"{n}: the zero set moved"
    after = params(model)
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2  # it did train
    assert m["masked_matrices"] == len(pruned) and m["kept_zeros"] == sum(int(z.sum()) for z in zeros.values())
    assert m["eval_kl_after"] < m["eval_kl_before"]
    assert m["loss_weights"] == {"kl": 1.0}
    assert all(p.requires_grad for p in model.parameters())  # requires_grad flags restored after training


def test_router_only_changes_only_router_weights():
    teacher = upcycled(seed=0)
    state = upcycled(seed=1)  # same experts (copies of the same FFN), different routers
    state.artifacts["teacher"] = teacher.module
    before = params(state.module)
    result = Pipeline([Distill(mode="router-only", steps=12, lr=1e-2, batch_size=8)]).run(state, data())
    m = result.report.passes[0].metrics
    after = params(result.state.module)
    routers = {n for n in after if n.endswith("router.weight")}
    assert len(routers) == 2
    for n in after:
        if n in routers:
            assert not torch.equal(before[n], after[n]), f"{n} did not train"
        else:
            assert torch.equal(before[n], after[n]), f"{n} changed in router-only mode"
    assert m["loss_weights"] == {"kl": 1.0, "router": 1.0} and m["router_pairs"] == [[0, 0], [1, 1]]
    assert m["trainable_params"] == 2 * 4 * 32
    hist = result.report.passes[0].tables["history"]
    assert hist[-1]["router"] < hist[0]["router"]


def test_moe_to_dense_smaller_student_with_hidden_projection():
    import transformers
    teacher = upcycled()
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    state = load(transformers.LlamaForCausalLM(cfg))
    state.artifacts["teacher"] = teacher.module
    d = Distill(mode="moe-to-dense", steps=20, lr=3e-3, batch_size=8,
                loss_weights={"hidden": 0.5}, layer_map={0: 1})
    result = Pipeline([d]).run(state, data())
    m = result.report.passes[0].metrics
    assert m["layer_pairs"] == [[0, 1]] and m["loss_weights"] == {"kl": 1.0, "hidden": 0.5}
    hist = result.report.passes[0].tables["history"]
    assert "hidden" in hist[0] and hist[-1]["hidden"] < hist[0]["hidden"]
    assert m["eval_kl_after"] < m["eval_kl_before"]
    assert not moe_blocks(result.state.module)


def test_moe_to_moe_fewer_experts_with_expert_map_and_regularisers():
    teacher = upcycled(num_experts=4, top_k=2)
    state = upcycled(num_experts=2, top_k=1, seed=3, expert_init="drop")  # a different function to start from
    state.artifacts["teacher"] = teacher.module
    d = Distill(mode="moe-to-moe", steps=20, lr=1e-2, batch_size=8, expert_map=[0, 0, 1, 1], router_loss="topk-ce")
    result = Pipeline([d]).run(state, data())
    rep = result.report.passes[0]
    assert rep.metrics["loss_weights"] == {"kl": 1.0, "router": 1.0, "balance": 0.01, "z": 0.001}
    hist = rep.tables["history"]
    assert {"kl", "router", "balance", "z"} <= set(hist[0])
    assert hist[-1]["router"] < hist[0]["router"] and hist[-1]["kl"] < hist[0]["kl"]


def test_default_router_loss_is_off_with_a_note_when_experts_do_not_correspond():
    teacher = upcycled(num_experts=4, top_k=2)
    state = upcycled(num_experts=2, top_k=1)
    state.artifacts["teacher"] = teacher.module
    rep = Pipeline([Distill(mode="moe-to-moe", steps=1, batch_size=8)]).run(state, data()).report.passes[0]
    assert "router" not in rep.metrics["loss_weights"]
    assert any("router distillation off" in w and "expert_map" in w for w in rep.warnings)
    # asked for explicitly, it is an error instead
    state.artifacts["teacher"] = teacher.module
    with pytest.raises(ConfigError, match="expert_map"):
        Pipeline([Distill(mode="moe-to-moe", steps=1, loss_weights={"router": 1.0})]).run(state, data())


def test_refusals():
    state = upcycled()
    with pytest.raises(PlanError, match="teacher"):
        Pipeline([Distill(mode="heal", steps=1)]).run(state, data())
    dense = load(build_dense("llama"))
    dense.artifacts["teacher"] = copy.deepcopy(state.module)
    with pytest.raises(PlanError, match="moe"):
        Pipeline([Distill(mode="router-only", steps=1)]).run(dense, data())
    with pytest.raises(ConfigError, match="teacher has no MoE"):
        Distill(mode="moe-to-dense", steps=1).check(_with_teacher(load(build_dense("llama")), dense.module), data())
    with pytest.raises(ConfigError, match="student has MoE layers"):
        Distill(mode="moe-to-dense", steps=1).check(_with_teacher(upcycled(), state.module), data())
    import transformers
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB * 2, max_position_embeddings=64))
    with pytest.raises(UnsupportedError, match="vocabularies differ"):
        Distill(mode="heal", steps=1).check(_with_teacher(load(build_dense("llama")), other), data())
    for bad in (dict(checkpoint_every=5), dict(batch_size=8, micro_batch_size=3), dict(warmup_steps=5, steps=2),
                dict(mode="moe-to-dense", loss_weights={"router": 1.0}), dict(freeze=["("]),
                dict(loss_weights={"kl": -1.0}), dict(mode="teacher-forcing")):
        with pytest.raises(ConfigError):
            Distill(**bad)


def _with_teacher(state, teacher):
    state.artifacts["teacher"] = teacher
    return state


def test_keep_teacher_is_a_snapshot():
    state = upcycled()
    state = Pipeline([KeepTeacher()]).run(state, data()).state
    teacher = state.artifacts["teacher"]
    assert "teacher" in state.facts()
    with torch.no_grad():
        next(state.module.parameters()).add_(1.0)
    assert not torch.equal(next(teacher.parameters()), next(state.module.parameters()))
