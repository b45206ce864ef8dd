"""The leaf-tolerant tracer (`moeconv.trace`): islands of FX graphs that cover a model even when
parts of it (attention with data-dependent control flow, HF decoder stacks) cannot be traced."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from models import gpt, llama
from moeconv.trace import TracedIsland, export_graph, trace_forest, trace_module
from tests.tiny import tiny_hf

H, I = 32, 64


def _module_targets(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class BranchyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.proj(x)
        return -self.proj(x)


class BranchyNorm(nn.Module):
    """A second, different untraceable class with parameters (not a 1-D-weight norm)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(H, H, bias=False)

    def forward(self, x):
        for _ in range(int(x.shape[-1] > 0 and x.abs().max() > 0)):  # data-dependent loop count
            x = self.scale(x)
        return x


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = BranchyNorm()
        self.attn = BranchyAttention()
        self.mlp = Mlp()

    def forward(self, x):
        x = x + self.attn(self.pre(x))
        return x + self.mlp(x)


class RootBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        if x.mean() > 10:  # the root itself cannot be traced
            x = x / 2
        for b in self.blocks:
            x = b(x)
        return x


# ----------------------------------------------------------------------------- trace_module


def test_trace_module_traceable_module():
    gm, leaves = trace_module(Mlp())
    assert isinstance(gm, fx.GraphModule)
    assert _module_targets(gm) == ["up", "down"]  # relative to the root: no wrapper prefix
    assert leaves == set()


def test_trace_module_graph_computes_the_module():
    torch.manual_seed(0)
    for mod in (gpt.Block(gpt.GPTConfig(n_embd=H)).eval(), llama.Block(llama.LlamaConfig(dim=H)).eval()):
        gm, _ = trace_module(mod)
        assert gm is not None
        x = torch.randn(2, 5, H)
        with torch.no_grad():
            assert torch.allclose(gm(x), mod(x))


def test_trace_module_turns_failing_children_into_leaves():
    block = Block()
    gm, leaves = trace_module(block)
    assert gm is not None
    assert {BranchyAttention, BranchyNorm} <= leaves
    targets = _module_targets(gm)
    assert "attn" in targets and "pre" in targets  # opaque leaves
    assert "mlp.up" in targets and "mlp.down" in targets  # the rest is traced through
    assert "attn.proj" not in targets
    x = torch.randn(2, 3, H)
    with torch.no_grad():
        assert torch.allclose(gm(x), block(x))


def test_trace_module_reuses_known_leaves():
    _, leaves = trace_module(Block())
    gm, leaves2 = trace_module(Block(), leaves)
    assert gm is not None and leaves2 == leaves


def test_trace_module_own_forward_untraceable_returns_none():
    gm, _ = trace_module(BranchyAttention())
    assert gm is None


def test_trace_module_leaf_root_returns_none():
    assert trace_module(nn.Linear(4, 4))[0] is None
    assert trace_module(nn.LayerNorm(4))[0] is None


def test_trace_module_forward_needing_two_inputs_returns_none():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(H, H)

        def forward(self, x, residual):
            return self.lin(x) + residual

    assert trace_module(TwoInputs())[0] is None


# ----------------------------------------------------------------------------- trace_forest


def test_trace_forest_traceable_model_is_one_island():
    cfg = gpt.GPTConfig(n_embd=H)
    model = nn.Sequential(gpt.Block(cfg), gpt.Block(cfg)).eval()
    islands = trace_forest(model)
    assert [i.path for i in islands] == [""]
    assert {"0.attn.c_attn", "0.mlp.c_fc", "1.mlp.c_proj"} <= set(islands[0].leaf_paths)


def test_trace_forest_builtin_gpt_size_check_makes_root_untraceable():
    # GPT.forward raises on a too-long input (a Python `if` on the length): blocks become islands.
    model = gpt.build_model(n_embd=H, vocab_size=128)
    assert [i.path for i in trace_forest(model)] == ["h.0", "h.1"]


def test_trace_forest_keeps_opaque_modules_whole():
    """An `opaque` module is one leaf call where it is used, and no island lies inside it."""
    cfg = gpt.GPTConfig(n_embd=H)
    model = nn.Sequential(gpt.Block(cfg), gpt.Block(cfg)).eval()
    (island,) = trace_forest(model, opaque=["1.mlp"])
    assert "1.mlp" in island.leaf_paths and "0.mlp.c_fc" in island.leaf_paths
    assert not any(p.startswith("1.mlp.") for p in island.leaf_paths)
    assert trace_forest(model, opaque=[""]) == []


def test_trace_forest_untraceable_root_falls_back_to_children():
    model = RootBranchy().eval()
    islands = trace_forest(model)
    paths = [i.path for i in islands]
    assert "" not in paths
    assert paths[:2] == ["blocks.0", "blocks.1"]
    for isl in islands[:2]:
        assert isinstance(isl, TracedIsland)
        assert {"attn", "pre", "mlp.up", "mlp.down"} <= set(isl.leaf_paths)
        assert isl.leaf_paths == _module_targets(isl.graph_module)


def test_trace_forest_island_paths_resolve_and_share_modules():
    model = RootBranchy().eval()
    for isl in trace_forest(model):
        root = model.get_submodule(isl.path)
        for lp in isl.leaf_paths:
            # Islands see the model's own modules, not copies.
            assert isl.graph_module.get_submodule(lp) is root.get_submodule(lp)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "phi3"])
def test_trace_forest_hf_decoder_layers_are_islands(kind):
    model = tiny_hf(kind)
    islands = {i.path: i for i in trace_forest(model)}
    prefix = "transformer.h" if kind == "gpt2" else "model.layers"
    attn = "attn" if kind == "gpt2" else "self_attn"
    for layer in range(2):
        isl = islands[f"{prefix}.{layer}"]
        assert attn in isl.leaf_paths  # attention is opaque inside the layer's graph
        assert any(p.startswith("mlp.") for p in isl.leaf_paths)


def test_trace_forest_leaves_model_unchanged():
    model = tiny_hf("llama")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before_mods = [(n, type(m), id(m)) for n, m in model.named_modules()]
    with torch.no_grad():
        before = model(ids).logits
    trace_forest(model)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert [(n, type(m), id(m)) for n, m in model.named_modules()] == before_mods
    assert all(torch.equal(before_sd[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_trace_forest_module_without_parameters_gives_no_island():
    assert trace_forest(nn.Sequential(nn.ReLU(), nn.Tanh())) == []


# ----------------------------------------------------------------------------- export_graph


def test_export_graph_whole_model():
    model = gpt.build_model(n_embd=H, vocab_size=128, n_layer=1)
    gm = export_graph(model, (torch.zeros(1, 8, dtype=torch.long),))
    assert isinstance(gm, fx.GraphModule)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("linear" in t or "addmm" in t or "mm" in t for t in targets), targets
