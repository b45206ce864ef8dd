"""FFN discovery by graph structure (`moeconv.patterns.find_ffn_sites`) on hand-written modules
and tiny HF models: the shapes it must find, and the look-alikes it must refuse."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeconv.errors import MoeconvError, NoFfnFoundError
from moeconv.patterns import FfnSite, find_ffn_sites
from tests.tiny import INTERMEDIATE, HIDDEN, TINY_KINDS, expected_sites, tiny_hf

H, I = 32, 64


class Wrap(nn.Module):
    """Pre-norm residual around `ffn`: a site is never the model root, so FFNs live one level down."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.ffn = ffn

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def _run_ok(model: nn.Module) -> None:
    """The test modules are real, runnable models (not just traceable graphs)."""
    with torch.no_grad():
        y = model(torch.randn(2, 3, H))
    assert y.shape == (2, 3, H)


def _sites(ffn: nn.Module) -> list[FfnSite]:
    model = Wrap(ffn).eval()
    _run_ok(model)
    return find_ffn_sites(model, require=False)


def _one(ffn: nn.Module) -> FfnSite:
    sites = _sites(ffn)
    assert len(sites) == 1, sites
    return sites[0]


# ----------------------------------------------------------------------------- plain variants


class PlainModuleAct(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(H, I), act, nn.Linear(I, H)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class PlainDropouts(nn.Module):
    """Dropout between every pair of layers and after `down`."""

    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(H, I), nn.GELU(), nn.Linear(I, H)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(0.1), nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, x):
        return self.drop3(self.down(self.drop2(self.act(self.drop1(self.up(x))))))


class PlainFunctionalGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class PlainMethodRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        return self.down(self.up(x).relu())


class PlainCasts(nn.Module):
    """Pass-through dtype casts / contiguous in the chain."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        return self.down(torch.relu(self.up(x).float()).contiguous())


def test_plain_module_activation():
    s = _one(PlainModuleAct(nn.GELU()))
    assert (s.path, s.kind, s.up, s.down, s.gate) == ("ffn", "plain", "ffn.up", "ffn.down", None)
    assert (s.hidden_size, s.intermediate_size, s.output_size, s.bias) == (H, I, H, True)
    assert s.members() == {"up": "up", "down": "down"}


@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU(), nn.Tanh(), nn.Mish()], ids=lambda a: type(a).__name__)
def test_plain_any_elementwise_module_activation(act):
    assert _one(PlainModuleAct(act)).kind == "plain"


def test_plain_with_dropout_between_layers():
    s = _one(PlainDropouts())
    assert (s.path, s.kind, s.up, s.down) == ("ffn", "plain", "ffn.up", "ffn.down")


def test_plain_functional_gelu():
    s = _one(PlainFunctionalGelu())
    assert (s.kind, s.activation) == ("plain", "gelu")


def test_plain_method_relu():
    s = _one(PlainMethodRelu())
    assert (s.kind, s.activation) == ("plain", "relu")


def test_plain_through_casts():
    assert _one(PlainCasts()).kind == "plain"


def test_plain_sequential():
    s = _one(nn.Sequential(nn.Linear(H, I), nn.ReLU(), nn.Linear(I, H)))
    assert (s.path, s.kind, s.up, s.down) == ("ffn", "plain", "ffn.0", "ffn.2")


def test_no_bias_reported():
    ffn = nn.Sequential(nn.Linear(H, I, bias=False), nn.ReLU(), nn.Linear(I, H, bias=False))
    assert _one(ffn).bias is False


def test_linear_identity_linear_is_not_an_ffn():
    # nn.Identity is a pass-through, not an activation: two stacked linears are no FFN.
    assert _sites(nn.Sequential(nn.Linear(H, I), nn.Identity(), nn.Linear(I, H))) == []


# ----------------------------------------------------------------------------- gated variants


class Gated(nn.Module):
    def __init__(self, swapped: bool = False, gate_out: int = I, up_out: int = I):
        super().__init__()
        self.swapped = swapped
        self.gate_proj = nn.Linear(H, gate_out, bias=False)
        self.up_proj = nn.Linear(H, up_out, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        if self.swapped:  # plain Python attribute: resolved at trace time, not data-dependent
            return self.down_proj(self.up_proj(x) * F.silu(self.gate_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("swapped", [False, True], ids=["act_first", "up_first"])
def test_gated_either_mul_order(swapped):
    s = _one(Gated(swapped=swapped))
    assert (s.kind, s.gate, s.up, s.down) == ("gated", "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj")
    assert (s.hidden_size, s.intermediate_size, s.output_size, s.bias, s.activation) == (H, I, H, False, "silu")
    assert s.members() == {"up": "up_proj", "gate": "gate_proj", "down": "down_proj"}


class ABC(nn.Module):
    """A user FFN no name table knows: gate `a`, up `b`, down `c`, activation via torch.mul."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(H, I), nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        return self.c(torch.mul(F.gelu(self.a(x)), self.b(x)))


class Odd(nn.Module):
    """Several FFNs under names that mean nothing, nested in a block."""

    def __init__(self):
        super().__init__()
        self.zz = ABC()
        self.qq = nn.Sequential(nn.Linear(H, 48), nn.Tanh(), nn.Linear(48, H))

    def forward(self, x):
        return self.qq(x) + self.zz(x)


def test_user_module_with_meaningless_names():
    s = _one(ABC())
    assert (s.kind, s.gate, s.up, s.down, s.activation) == ("gated", "ffn.a", "ffn.b", "ffn.c", "gelu")


def test_user_block_several_ffns_in_module_order():
    model = nn.Sequential(Wrap(Odd()), Wrap(Odd())).eval()
    _run_ok(model)
    got = [(s.path, s.kind, s.intermediate_size) for s in find_ffn_sites(model)]
    assert got == [("0.ffn.zz", "gated", I), ("0.ffn.qq", "plain", 48),
                   ("1.ffn.zz", "gated", I), ("1.ffn.qq", "plain", 48)]


class FusedGated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(H, 2 * I, bias=False)
        self.down = nn.Linear(I, H, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


def test_fused_gated():
    s = _one(FusedGated())
    assert (s.kind, s.up, s.gate, s.down) == ("fused_gated", "ffn.gate_up", None, "ffn.down")
    assert (s.hidden_size, s.intermediate_size, s.output_size) == (H, I, H)


class FusedWrongDim(FusedGated):
    def forward(self, x):  # chunks along dim 0: not a gate/up split
        g, u = self.gate_up(x).chunk(2, dim=0)
        return self.down(F.silu(g) * u)


def test_fused_chunk_on_wrong_dim_is_not_matched():
    model = Wrap(FusedWrongDim()).eval()
    assert find_ffn_sites(model, require=False) == []


# ----------------------------------------------------------------------------- Conv1D, split


class GPT2StyleMLP(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.c_fc, self.c_proj = Conv1D(I, H), Conv1D(H, I)  # Conv1D(nf=out, nx=in)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


def test_conv1d():
    s = _one(GPT2StyleMLP())
    assert (s.path, s.kind, s.up, s.down) == ("ffn", "conv1d", "ffn.c_fc", "ffn.c_proj")
    assert (s.hidden_size, s.intermediate_size, s.output_size) == (H, I, H)


class SplitFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.act = nn.Linear(H, I), nn.GELU()

    def forward(self, x):
        return self.act(self.dense(x))


class SplitSecond(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.norm = nn.Linear(I, H), nn.LayerNorm(H)

    def forward(self, x, residual):
        return self.norm(self.dense(x) + residual)


class SplitBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = SplitFirst(), SplitSecond()

    def forward(self, x):
        return self.second(self.first(x), x)


def test_split_across_sibling_modules():
    model = nn.Sequential(SplitBlock()).eval()
    _run_ok(model)
    (s,) = find_ffn_sites(model)
    assert (s.path, s.kind, s.up, s.down, s.act_path) == ("0.first", "split", "0.first.dense", "0.second.dense",
                                                          "0.first.act")
    assert s.members() == {"up": "0.first.dense", "down": "0.second.dense"}


# ----------------------------------------------------------------------------- must NOT match


class ReusedActivation(nn.Module):
    """The activated intermediate also feeds something outside the chain."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        h = F.gelu(self.up(x))
        return self.down(h) + h.mean(-1, keepdim=True)


class ReusedUp(nn.Module):
    """The pre-activation value is used elsewhere too."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        u = self.up(x)
        return self.down(F.gelu(u)) + u.amax(-1, keepdim=True)


class ReusedGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(H, I), nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        g = F.silu(self.gate(x))
        return self.down(g * self.up(x)) + g.sum(-1, keepdim=True)


class ReusedThroughDropout(nn.Module):
    """The reuse hides behind a pass-through dropout."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.drop = nn.Linear(H, I), nn.Linear(I, H), nn.Dropout(0.0)

    def forward(self, x):
        h = self.drop(F.gelu(self.up(x)))
        return self.down(h) + h.mean(-1, keepdim=True)


@pytest.mark.parametrize("cls", [ReusedActivation, ReusedUp, ReusedGate, ReusedThroughDropout],
                         ids=lambda c: c.__name__)
def test_intermediate_used_elsewhere_is_not_matched(cls):
    assert _sites(cls()) == []


class ExtraOutput(nn.Module):
    """The chain is self-contained but the module computes more than the FFN: not replaceable."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        return self.down(F.gelu(self.up(x))) * 2.0


def test_module_computing_more_than_the_ffn_is_not_a_site():
    assert _sites(ExtraOutput()) == []


class MismatchedPlain(nn.Module):
    """down's input width is not up's output width (only traced, never run)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(48, H)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class MismatchedFused(nn.Module):
    """gate_up gives 2*I, but down expects 2*I rather than I (only traced, never run)."""

    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(H, 2 * I), nn.Linear(2 * I, H)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


@pytest.mark.parametrize("cls", [MismatchedPlain, MismatchedFused], ids=lambda c: c.__name__)
def test_mismatched_dims_are_not_matched(cls):
    assert find_ffn_sites(Wrap(cls()).eval(), require=False) == []


def test_gated_with_narrow_up_broadcast_is_not_matched():
    # up has 1 output that broadcasts over the gate's I: runnable, but not an FFN of width I.
    assert _sites(Gated(up_out=1)) == []


def test_gated_with_narrow_gate_broadcast_is_not_matched():
    # gate has 1 output broadcast over up's I: the gate is not an I-wide projection, so this is
    # not a gated FFN with intermediate I (an expert split by neuron would index a 1-row gate).
    assert _sites(Gated(gate_out=1)) == []


def test_gate_and_up_reading_different_inputs_is_not_matched():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(H, I), nn.Linear(H, I), nn.Linear(I, H)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x * 2.0))

    assert _sites(TwoInputs()) == []


# ----------------------------------------------------------------------------- tracing robustness


class UntraceableAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(H, H), nn.Linear(H, H)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: symbolic tracing fails here
            x = x * 0.5
        return self.o(torch.softmax(self.q(x) @ x.transpose(-1, -2), dim=-1) @ x)


class BlockWithUntraceableAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(H), UntraceableAttention()
        self.ln2, self.mlp = nn.LayerNorm(H), Gated()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ModelWithUntraceableAttention(nn.Module):
    def __init__(self, n: int = 2):
        super().__init__()
        self.emb = nn.Embedding(128, H)
        self.blocks = nn.ModuleList(BlockWithUntraceableAttention() for _ in range(n))

    def forward(self, ids):
        x = self.emb(ids)
        if ids.max() > 64:  # the root is untraceable too
            x = x * 1.0
        for b in self.blocks:
            x = b(x)
        return x


def test_untraceable_attention_does_not_hide_the_ffn():
    model = ModelWithUntraceableAttention().eval()
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 5)))
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model.blocks[0])  # the premise: plain fx fails on the block
    sites = find_ffn_sites(model)
    assert [(s.path, s.kind) for s in sites] == [("blocks.0.mlp", "gated"), ("blocks.1.mlp", "gated")]


# ----------------------------------------------------------------------------- require / errors


class AttentionOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, H)
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))

    def forward(self, ids):
        x = self.emb(ids)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
        return self.o(a @ self.v(x))


@pytest.mark.parametrize("model", [nn.Sequential(nn.Embedding(10, 4)), AttentionOnly(), nn.Linear(4, 4)],
                         ids=["embedding", "attention_only", "bare_linear"])
def test_require_raises_listing_patterns(model):
    assert find_ffn_sites(model, require=False) == []
    with pytest.raises(NoFfnFoundError) as ei:
        find_ffn_sites(model)
    assert isinstance(ei.value, MoeconvError)
    msg = ei.value.one_line()
    assert type(model).__name__ in msg
    for pattern in ("down(act(up(x)))", "down(act(gate(x))*up(x))", "gate_up", "Conv1D", "split"):
        assert pattern in msg, (pattern, msg)


def test_whole_model_is_never_a_site():
    # A root that *is* an FFN: replacing the root is not allowed, so nothing is reported.
    assert find_ffn_sites(PlainModuleAct(nn.GELU()), require=False) == []


# ----------------------------------------------------------------------------- tiny HF models


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_tiny_hf_models(kind):
    sites = find_ffn_sites(tiny_hf(kind))
    got = [dict(path=s.path, kind=s.kind, up=s.up, gate=s.gate, down=s.down) for s in sites]
    assert got == expected_sites(kind)
    for s in sites:
        assert (s.hidden_size, s.intermediate_size, s.output_size) == (HIDDEN, INTERMEDIATE, HIDDEN)


def test_tiny_hf_layer_count_follows_config():
    sites = find_ffn_sites(tiny_hf("qwen2", num_hidden_layers=3, intermediate_size=48))
    assert [s.path for s in sites] == [f"model.layers.{i}.mlp" for i in range(3)]
    assert {s.intermediate_size for s in sites} == {48}


def test_skipped_modules_are_not_looked_into_and_the_other_sites_are_the_same():
    """`skip` (what `ModelState.ffn_sites` passes: the MoE blocks) hides the sites inside those
    modules and no other: a Qwen3-MoE with a dense first layer keeps exactly its dense FFN."""
    import transformers

    from moeconv.nn.native_moe import linearise_native_moe
    from moeconv.state import ModelState
    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      num_experts=3, num_experts_per_tok=2, decoder_sparse_step=1,
                                      mlp_only_layers=[0, 2])
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    moe = linearise_native_moe(model)
    assert moe == ["model.layers.1.mlp"]
    every = find_ffn_sites(model)
    inside = [s for s in every if s.path.startswith("model.layers.1.mlp.")]
    assert len(inside) == 3  # the experts are FFNs when looked into
    skipped = find_ffn_sites(model, skip=moe)
    assert skipped == [s for s in every if s not in inside]
    assert [s.path for s in skipped] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert ModelState(model, cfg).ffn_sites() == skipped
