"""Checks of MoEBlock's promises (moeconv/nn/moe.py).

1. identical experts + renormalised top-k == the source FFN (every FFN kind, random router);
2. distinct experts == a naive per-token reference (renormalise or not, router bias, shared expert);
3. dispatch is sparse (each expert only sees its routed rows);
4. the router stays fp32 through dtype casts, experts follow the cast;
5. fx.symbolic_trace / torch.export reproduce eager, routing is not baked in;
6. route() contract;
7. config validation.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moeconv.nn.experts import SplitFfn
from moeconv.nn.moe import MoEBlock, Route, RoutingConfig

H = 16
INTER = 32
SHAPE = (2, 7, H)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


class PlainFfn(nn.Module):
    def __init__(self, hidden: int = H, inter: int = INTER):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(inter, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _randomise(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Give every parameter O(1)-output random values (HF inits are tiny or zero for biases)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)
    return module


def _make_ffn(kind: str) -> tuple[nn.Module, "callable"]:
    """(expert template, reference callable computing the source FFN)."""
    if kind == "plain":
        ffn = _randomise(PlainFfn())
        return ffn, ffn
    if kind == "gated":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        cfg = LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, vocab_size=32)
        ffn = _randomise(LlamaMLP(cfg))
        return ffn, ffn
    if kind == "conv1d":
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

        cfg = GPT2Config(n_embd=H, n_layer=1, n_head=2, n_positions=16, vocab_size=32)
        ffn = _randomise(GPT2MLP(INTER, cfg)).eval()
        return ffn, ffn
    if kind == "split":
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        cfg = BertConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=32)
        inter = _randomise(BertIntermediate(cfg)).eval()
        output = _randomise(BertOutput(cfg)).eval()
        split = SplitFfn(copy.deepcopy(inter.dense), inter.intermediate_act_fn,
                         copy.deepcopy(output.dense))

        def reference(x):
            return output.dense(inter.intermediate_act_fn(inter.dense(x)))

        return split, reference
    if kind == "fused_gated":
        from transformers import Phi3Config
        from transformers.models.phi3.modeling_phi3 import Phi3MLP

        cfg = Phi3Config(hidden_size=H, intermediate_size=INTER, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32)
        ffn = _randomise(Phi3MLP(cfg))
        return ffn, ffn
    raise AssertionError(kind)


FFN_KINDS = ["plain", "gated", "conv1d", "split", "fused_gated"]
EXPERT_TOPK = [(4, 2), (8, 1), (3, 3)]


def _random_router(block: MoEBlock, scale: float = 1.0) -> MoEBlock:
    with torch.no_grad():
        block.router.weight.normal_(0.0, scale)
        if block.router.bias is not None:
            block.router.bias.normal_(0.0, scale)
    return block


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5):
    """assert_close with atol relative to the output scale."""
    scale = expected.abs().max().item()
    assert scale > 1e-3, "degenerate reference output"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def naive_moe(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Per-token reference: fp32 softmax over router logits, top-k, (renormalise), weighted sum,
    plus the (gated) shared expert."""
    shape = x.shape
    hidden = x.reshape(-1, shape[-1])
    w = block.router.weight.detach().float()
    b = block.router.bias.detach().float() if block.router.bias is not None else None
    rows = []
    for t in range(hidden.shape[0]):
        xt = hidden[t]
        logits = w @ xt.float()
        if b is not None:
            logits = logits + b
        probs = torch.softmax(logits, dim=-1)
        top_w, top_i = torch.topk(probs, block.top_k)
        if block.renormalize:
            top_w = top_w / top_w.sum()
        acc = torch.zeros_like(xt)
        for wi, ei in zip(top_w.tolist(), top_i.tolist()):
            acc = acc + wi * block.experts[ei](xt.unsqueeze(0))[0]
        if block.shared_expert is not None:
            s = block.shared_expert(xt.unsqueeze(0))[0]
            if block.shared_expert_gate is not None:
                g = block.shared_expert_gate.weight.detach().float()[0] @ xt.float()
                s = torch.sigmoid(g) * s
            acc = acc + s
        rows.append(acc)
    return torch.stack(rows).reshape(shape)


def _distinct_block(num_experts=4, top_k=2, renormalize=True, router_bias=False,
                    shared=False, seed=0) -> MoEBlock:
    torch.manual_seed(seed)
    experts = [_randomise(PlainFfn()) for _ in range(num_experts)]
    block = MoEBlock(
        experts, H, RoutingConfig(top_k=top_k, renormalize=renormalize),
        router_bias=router_bias,
        shared_expert=_randomise(PlainFfn()) if shared else None,
        shared_expert_gate=shared,
    )
    _random_router(block)
    if shared:
        with torch.no_grad():
            block.shared_expert_gate.weight.normal_(0.0, 0.5)
    return block.eval()


# --------------------------------------------------------------------------------------------
# 1. identical copies + renormalised top-k == source FFN
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,top_k", EXPERT_TOPK)
@pytest.mark.parametrize("kind", FFN_KINDS)
@torch.no_grad()
def test_identical_experts_equal_source_ffn(kind, num_experts, top_k):
    torch.manual_seed(1234)
    template, reference = _make_ffn(kind)
    block = MoEBlock([copy.deepcopy(template) for _ in range(num_experts)], H,
                     RoutingConfig(top_k=top_k, renormalize=True)).eval()
    _random_router(block, scale=2.0)
    assert block.router.weight.abs().sum() > 0
    x = torch.randn(*SHAPE)
    out = block(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    _close(out, reference(x))
    # the routing is genuinely non-trivial: more than one expert is in use
    if top_k < num_experts:
        assert block.route(x.reshape(-1, H)).indices.unique().numel() > 1


# --------------------------------------------------------------------------------------------
# 2. distinct experts == naive per-token reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,top_k", EXPERT_TOPK)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("router_bias", [False, True])
@torch.no_grad()
def test_distinct_experts_match_naive_reference(num_experts, top_k, renormalize, router_bias):
    block = _distinct_block(num_experts, top_k, renormalize, router_bias, seed=7)
    x = torch.randn(*SHAPE)
    _close(block(x), naive_moe(block, x))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("router_bias", [False, True])
@torch.no_grad()
def test_shared_expert_with_sigmoid_gate(renormalize, router_bias):
    block = _distinct_block(4, 2, renormalize, router_bias, shared=True, seed=11)
    assert block.shared_expert_gate.weight.abs().sum() > 0
    x = torch.randn(*SHAPE)
    out = block(x)
    _close(out, naive_moe(block, x))

    # explicit form of the shared-expert term: out = routed + sigmoid(x·w_s)·shared(x)
    routed = copy.deepcopy(block)
    routed.shared_expert = None
    routed.shared_expert_gate = None
    gate = torch.sigmoid(x @ block.shared_expert_gate.weight[0])
    _close(out, routed(x) + gate.unsqueeze(-1) * block.shared_expert(x))


@torch.no_grad()
def test_shared_expert_without_gate_is_added_ungated():
    torch.manual_seed(3)
    block = MoEBlock([_randomise(PlainFfn()) for _ in range(4)], H, RoutingConfig(2),
                     shared_expert=_randomise(PlainFfn())).eval()
    _random_router(block)
    assert block.shared_expert_gate is None
    x = torch.randn(*SHAPE)
    _close(block(x), naive_moe(block, x))


@torch.no_grad()
def test_fresh_block_has_zero_router_and_uniform_routing():
    """Zero-initialised router: uniform probs, so renormalised top-k averages the experts."""
    torch.manual_seed(5)
    block = MoEBlock([_randomise(PlainFfn()) for _ in range(4)], H,
                     RoutingConfig(top_k=4), router_bias=True,
                     shared_expert=PlainFfn(), shared_expert_gate=True)
    assert torch.count_nonzero(block.router.weight) == 0
    assert torch.count_nonzero(block.router.bias) == 0
    assert torch.count_nonzero(block.shared_expert_gate.weight) == 0
    block.shared_expert = None  # isolate the routed part
    block.shared_expert_gate = None
    x = torch.randn(5, H)
    expected = sum(e(x) for e in block.experts) / 4
    _close(block(x), expected)


# --------------------------------------------------------------------------------------------
# 3. sparse dispatch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,top_k", EXPERT_TOPK)
@torch.no_grad()
def test_each_expert_sees_only_its_routed_tokens(num_experts, top_k):
    block = _distinct_block(num_experts, top_k, seed=21)
    x = torch.randn(*SHAPE)
    tokens = x.shape[0] * x.shape[1]
    seen: dict[int, list[torch.Tensor]] = {e: [] for e in range(num_experts)}

    def hook_for(e):
        def hook(_mod, args, _out):
            seen[e].append(args[0].detach().clone())
        return hook

    handles = [ex.register_forward_hook(hook_for(e)) for e, ex in enumerate(block.experts)]
    try:
        block(x)
    finally:
        for h in handles:
            h.remove()

    route = block.route(x.reshape(-1, H))
    hidden = x.reshape(-1, H)
    total = 0
    for e in range(num_experts):
        rows = torch.cat(seen[e]) if seen[e] else hidden.new_zeros(0, H)
        routed_tokens = (route.indices == e).any(dim=-1).nonzero().flatten()
        assert rows.shape[0] == routed_tokens.numel(), f"expert {e}"
        # exactly the routed tokens' rows (order-insensitive)
        want = hidden[routed_tokens]
        got_sorted = rows[torch.argsort(rows[:, 0])]
        want_sorted = want[torch.argsort(want[:, 0])]
        torch.testing.assert_close(got_sorted, want_sorted, rtol=0, atol=0)
        total += rows.shape[0]
    assert total == tokens * top_k


@torch.no_grad()
def test_never_selected_expert_sees_zero_rows():
    block = _distinct_block(4, 2, router_bias=True, seed=22)
    with torch.no_grad():
        block.router.bias[3] = -1e4  # expert 3 can never win a top-2 slot
    rows = [0] * 4
    calls = [0] * 4

    def hook_for(e):
        def hook(_mod, args, _out):
            calls[e] += 1
            rows[e] += args[0].shape[0]
        return hook

    handles = [ex.register_forward_hook(hook_for(e)) for e, ex in enumerate(block.experts)]
    try:
        x = torch.randn(*SHAPE)
        out = block(x)
    finally:
        for h in handles:
            h.remove()
    assert rows[3] == 0
    assert sum(rows) == 14 * 2
    assert torch.isfinite(out).all()
    _close(out, naive_moe(block, x))


# --------------------------------------------------------------------------------------------
# 4. router stays fp32 through casts
# --------------------------------------------------------------------------------------------


CASTS = {
    "to_bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
    "half": (lambda m: m.half(), torch.float16),
    "to_fp16": (lambda m: m.to(dtype=torch.float16), torch.float16),
}


def _round_router_to(block: MoEBlock, dtype: torch.dtype) -> MoEBlock:
    """Make router/gate weights exactly representable in `dtype` so that the cast test below does
    not depend on whether the cast rounds the router (that is checked separately)."""
    with torch.no_grad():
        for m in (block.router, block.shared_expert_gate):
            if m is None:
                continue
            for p in m.parameters():
                p.copy_(p.to(dtype).float())
    return block


@pytest.mark.parametrize("cast", list(CASTS))
@torch.no_grad()
def test_router_stays_fp32_and_experts_follow_cast(cast):
    fn, dtype = CASTS[cast]
    block = _distinct_block(4, 2, router_bias=True, shared=True, seed=31)
    ret = fn(block)
    assert ret is block
    assert block.router.weight.dtype == torch.float32
    assert block.router.bias.dtype == torch.float32
    assert block.shared_expert_gate.weight.dtype == torch.float32
    for p in block.experts.parameters():
        assert p.dtype == dtype
    for p in block.shared_expert.parameters():
        assert p.dtype == dtype


@torch.no_grad()
def test_router_stays_fp32_when_nested_in_a_model():
    block = _distinct_block(4, 2, seed=32)
    model = nn.Sequential(nn.Linear(H, H), block, nn.Linear(H, H)).to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert model[1].router.weight.dtype == torch.float32
    assert model[1].experts[0].fc1.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("cast", ["to_bf16", "half"])
@torch.no_grad()
def test_cast_block_runs_and_is_close_to_fp32(cast):
    fn, dtype = CASTS[cast]
    block = _round_router_to(_distinct_block(4, 2, router_bias=True, shared=True, seed=33), dtype)
    ref_block = copy.deepcopy(block)
    fn(block)
    x = torch.randn(*SHAPE).to(dtype)
    out = block(x)
    assert out.dtype == dtype
    assert out.shape == x.shape
    # routing in the cast block is exactly the fp32 routing of the same input values
    r_cast, r_ref = block.route(x.reshape(-1, H)), ref_block.route(x.float().reshape(-1, H))
    assert r_cast.logits.dtype == torch.float32
    torch.testing.assert_close(r_cast.indices, r_ref.indices)
    ref = ref_block(x.float())
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2 * scale)





@pytest.mark.parametrize("cast", ["to_bf16", "half"])
@torch.no_grad()
def test_cast_does_not_round_router_weights(cast):
    """'routing must not degrade with casts': the router's fp32 values survive the cast."""
    fn, _ = CASTS[cast]
    block = _distinct_block(4, 2, router_bias=True, shared=True, seed=34)
    before = {k: v.clone() for k, v in block.state_dict().items()
              if k.startswith(("router.", "shared_expert_gate."))}
    fn(block)
    after = block.state_dict()
    for k, v in before.items():
        assert after[k].dtype == torch.float32, k
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"{k} was rounded by the cast")



@torch.no_grad()
def test_half_does_not_overflow_large_router_weights():
    block = _distinct_block(4, 2, seed=36)
    with torch.no_grad():
        block.router.weight[0, 0] = 1e5  # representable in fp32 (and bf16), not in fp16
    block.half()
    assert block.router.weight.dtype == torch.float32
    assert torch.isfinite(block.router.weight).all()
    assert block.router.weight[0, 0].item() == 1e5


@torch.no_grad()
def test_cast_back_to_float_and_device_move_keep_router_fp32():
    block = _distinct_block(4, 2, seed=35)
    block.to(torch.bfloat16).float()
    assert block.router.weight.dtype == torch.float32
    assert block.experts[0].fc1.weight.dtype == torch.float32
    block.to("cpu")
    assert block.router.weight.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# 5. fx / export
# --------------------------------------------------------------------------------------------


def _two_differently_routed_inputs(block, n1=(2, 7), n2=(3, 5), seed=41):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(*n1, H, generator=g)
    x2 = torch.randn(*n2, H, generator=g)
    i1 = block.route(x1.reshape(-1, H)).indices
    i2 = block.route(x2.reshape(-1, H)).indices
    return x1, x2, i1, i2


@pytest.mark.parametrize("shared", [False, True])
@torch.no_grad()
def test_fx_symbolic_trace_matches_eager(shared):
    block = _distinct_block(4, 2, router_bias=True, shared=shared, seed=42)
    gm = torch.fx.symbolic_trace(block)
    assert isinstance(gm, torch.fx.GraphModule)
    x1, x2, i1, i2 = _two_differently_routed_inputs(block)
    torch.testing.assert_close(gm(x1), block(x1), rtol=0, atol=0)
    # the trace does not bake in a routing decision: a differently routed input of a different
    # token count also matches
    assert i1.shape != i2.shape or not torch.equal(i1, i2)
    torch.testing.assert_close(gm(x2), block(x2), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gated", "fused_gated"])
@torch.no_grad()
def test_fx_symbolic_trace_with_hf_experts(kind):
    torch.manual_seed(43)
    template, _ = _make_ffn(kind)
    block = _random_router(MoEBlock([_randomise(copy.deepcopy(template)) for _ in range(4)], H,
                                    RoutingConfig(2))).eval()
    gm = torch.fx.symbolic_trace(block)
    x = torch.randn(*SHAPE)
    torch.testing.assert_close(gm(x), block(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def export_block():
    return _distinct_block(4, 2, router_bias=True, shared=True, seed=44)


@torch.no_grad()
def test_export_same_shape_different_routing(export_block):
    block = export_block
    g = torch.Generator().manual_seed(45)
    x1 = torch.randn(*SHAPE, generator=g)
    x2 = torch.randn(*SHAPE, generator=g)
    i1 = block.route(x1.reshape(-1, H)).indices
    i2 = block.route(x2.reshape(-1, H)).indices
    assert not torch.equal(i1, i2)
    # per-expert token counts differ too, so data-dependent sizes are not baked in
    c1 = torch.bincount(i1.flatten(), minlength=4)
    c2 = torch.bincount(i2.flatten(), minlength=4)
    assert not torch.equal(c1, c2)

    ep = torch.export.export(block, (x1,))
    mod = ep.module()
    torch.testing.assert_close(mod(x1), block(x1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mod(x2), block(x2), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_export_dynamic_token_count(export_block):
    block = export_block
    seq = torch.export.Dim("seq", min=2, max=64)
    x1, x2, i1, i2 = _two_differently_routed_inputs(block, n1=(2, 7), n2=(2, 11), seed=46)
    ep = torch.export.export(block, (x1,), dynamic_shapes=({1: seq},))
    mod = ep.module()
    torch.testing.assert_close(mod(x1), block(x1), rtol=1e-6, atol=1e-6)
    assert x2.shape != x1.shape
    torch.testing.assert_close(mod(x2), block(x2), rtol=1e-6, atol=1e-6)
    # an input that leaves one expert unused still matches (zero-row dispatch inside the graph)
    with torch.no_grad():
        biased = copy.deepcopy(block)
        biased.router.bias[0] = -1e4
    x3 = torch.randn(2, 5, H)
    ep_b = torch.export.export(biased, (x1,), dynamic_shapes=({1: seq},))
    assert not (biased.route(x3.reshape(-1, H)).indices == 0).any()
    torch.testing.assert_close(ep_b.module()(x3), biased(x3), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 6. route()
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,top_k", EXPERT_TOPK)
@pytest.mark.parametrize("renormalize", [True, False])
@torch.no_grad()
def test_route_contract(num_experts, top_k, renormalize):
    block = _distinct_block(num_experts, top_k, renormalize, router_bias=True, seed=51)
    hidden = torch.randn(14, H)
    r = block.route(hidden)
    assert isinstance(r, Route)
    logits, weights, indices = r
    assert logits.shape == (14, num_experts) and logits.dtype == torch.float32
    assert weights.shape == (14, top_k) and weights.dtype == torch.float32
    assert indices.shape == (14, top_k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < num_experts)).all()
    # k distinct experts per token
    assert all(len(set(row.tolist())) == top_k for row in indices)
    torch.testing.assert_close(logits, hidden @ block.router.weight.T + block.router.bias)
    probs = torch.softmax(logits, dim=-1)
    picked = probs.gather(-1, indices)
    # the k picks are the k largest probabilities
    assert (picked.min(dim=-1).values.unsqueeze(-1) + 1e-7 >= probs.scatter(-1, indices, -1.0)).all()
    assert (weights >= 0).all()
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(14))
        torch.testing.assert_close(weights, picked / picked.sum(-1, keepdim=True))
    else:
        torch.testing.assert_close(weights, picked)
        if top_k < num_experts:
            assert (weights.sum(-1) < 1).all()


@torch.no_grad()
def test_route_is_fp32_for_low_precision_input():
    block = _distinct_block(4, 2, seed=52).to(torch.bfloat16)
    r = block.route(torch.randn(6, H, dtype=torch.bfloat16))
    assert r.logits.dtype == torch.float32
    assert r.weights.dtype == torch.float32
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(6))


# --------------------------------------------------------------------------------------------
# 7. validation / metadata
# --------------------------------------------------------------------------------------------


def test_top_k_larger_than_num_experts_raises():
    with pytest.raises(ValueError):
        MoEBlock([PlainFfn() for _ in range(3)], H, RoutingConfig(top_k=4))


@pytest.mark.parametrize("k", [0, -1])
def test_routing_config_rejects_non_positive_top_k(k):
    with pytest.raises(ValueError):
        RoutingConfig(top_k=k)


def test_top_k_equal_num_experts_is_allowed_and_metadata():
    block = MoEBlock(nn.ModuleList([PlainFfn() for _ in range(3)]), H,
                     RoutingConfig(top_k=3, renormalize=False))
    assert block.num_experts == 3
    assert block.routing == RoutingConfig(3, False)
    assert "num_experts=3" in repr(block) and "top_k=3" in repr(block)
    assert block.router.weight.shape == (3, H)
    assert block.router.bias is None
