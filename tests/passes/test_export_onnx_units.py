"""Pieces of the ONNX export (moeconv/onnx/): the fused-MoE probe and lowering, the Gemm → MatMul
rewrite, and quantization with onnxruntime's tools (routers float, QMoE layout right).

The QMoE check is a cross-check between two onnxruntime quantizers: for the same experts, the
fused graph (experts in `QMoE`, quantized by `quantize_matmul_4bits`) and the portable graph
(one `MatMulNBits` per expert projection, by `MatMulNBitsQuantizer`) must agree — a wrong weight
layout in QMoE gives garbage, not a small difference.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from moeconv.nn.experts import SplitFfn
from moeconv.nn.moe import MoEBlock, RoutingConfig
from moeconv.onnx.moe_export import PROBE_RTOL, FusedMoE, expert_weights, lowered, plan_lowering, probe_fused
from moeconv.onnx.quantize import gemm_to_matmul, quantize_model

H, I = 16, 32


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _block(experts, *, shared=None, bias=False, renormalize=True, seed=0):
    torch.manual_seed(seed)
    b = MoEBlock(experts, H, RoutingConfig(2, renormalize), router_bias=bias, shared_expert=shared,
                 shared_expert_gate=shared is not None)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.5)
    return b.eval()


def _plain(act):
    return nn.Sequential(nn.Linear(H, I), act, nn.Linear(I, H))


@pytest.mark.parametrize("renormalize", [True, False])
def test_probe_gated_is_swiglu_and_lowering_matches_block(renormalize):
    block = _block([Gated() for _ in range(4)], shared=Gated(), bias=True, renormalize=renormalize)
    result = probe_fused(block)
    assert result.ok and result.activation == "swiglu" and result.rel_max_diff < 1e-5
    fused = FusedMoE(block, expert_weights(block), "swiglu")
    # interleaved rows: fc1[e, 2j] is gate row j, fc1[e, 2j+1] is up row j
    torch.testing.assert_close(fused.fc1[1, 0::2], block.experts[1].gate_proj.weight)
    torch.testing.assert_close(fused.fc1[1, 1::2], block.experts[1].up_proj.weight)
    x = torch.randn(3, 5, H)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)


def test_probe_picks_the_plain_activation_and_refuses_erf_gelu():
    relu = _block([_plain(nn.ReLU()) for _ in range(4)], bias=True)
    assert probe_fused(relu).activation == "relu"
    # onnxruntime's fused GELU is the tanh approximation: exact GELU experts are not reproduced
    erf = _block([SplitFfn(nn.Linear(H, I), nn.GELU(), nn.Linear(I, H)) for _ in range(4)])
    r = probe_fused(erf)
    assert not r.ok and r.tried["gelu"] > PROBE_RTOL
    tanh = _block([SplitFfn(nn.Linear(H, I), nn.GELU(approximate="tanh"), nn.Linear(I, H)) for _ in range(4)])
    assert probe_fused(tanh).activation == "gelu"


def test_plan_lowering_strategies_and_restore():
    model = nn.Sequential(_block([Gated() for _ in range(4)]),
                          _block([SplitFfn(nn.Linear(H, I), nn.GELU(), nn.Linear(I, H)) for _ in range(4)]))
    auto = plan_lowering(model, "auto")
    assert [p.lowering for p in auto] == ["fused", "portable"] and auto[1].reason
    assert [p.lowering for p in plan_lowering(model, "portable")] == ["portable", "portable"]
    from moeconv.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match=r"^1: onnxruntime's fused MoE operator") as info:
        plan_lowering(model, "fused")
    assert "--strategy portable" in info.value.one_line()
    original = model[0]
    with pytest.raises(RuntimeError):
        with lowered(model, auto):
            assert isinstance(model[0], FusedMoE) and isinstance(model[1], MoEBlock)
            raise RuntimeError("export failed")
    assert model[0] is original  # restored even when the export fails


def test_gemm_to_matmul_is_exact():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    bias = rng.normal(size=(6,)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y1"], name="g1", transB=1),
             helper.make_node("Gemm", ["x", "w"], ["y2"], name="g2", transB=1),
             helper.make_node("Add", ["y1", "y2"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    import onnxruntime as ort
    x = rng.normal(size=(5, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert gemm_to_matmul(model) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul", "Add"]
    assert {t.name for t in model.graph.initializer} == {"w.T", "b"}  # the shared weight is transposed once
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """The CLI's tiny MoE LM exported portable and fused (float)."""
    from export_onnx_helpers import export, write_tiny_moe_file
    from moeconv import load
    root = tmp_path_factory.mktemp("tiny")
    state = load(f"{write_tiny_moe_file(root)}:build_model")
    paths = {}
    for strategy in ("portable", "fused"):
        rep, path = export(state, root / strategy, strategy=strategy)
        assert rep.metrics["parity"]["ok"]
        paths[strategy] = path
    return state, paths


def _run(model: onnx.ModelProto, ids):
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy()})[0]


def test_int4_quantizes_expert_matmuls_and_keeps_router_float(tiny_exports):
    _, paths = tiny_exports
    q, res = quantize_model(onnx.load(str(paths["portable"])), "int4", block_size=16, accuracy_level=0)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 4 * 2 + 1  # two projections per expert, and the head
    assert ops.count("MatMul") == 1 and res.kept_float and res.qmoe_blocks == 0
    router = [n for n in q.graph.node if n.op_type == "MatMul"][0]
    inits = {t.name: t for t in q.graph.initializer}
    assert "router" in router.input[1] and inits[router.input[1]].data_type == TensorProto.FLOAT


def test_qmoe_agrees_with_matmulnbits(tiny_exports):
    state, paths = tiny_exports
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    # round-to-nearest on both sides (QMoE's integer zero points allow nothing else)
    port, _ = quantize_model(onnx.load(str(paths["portable"])), "int4", scheme="rtn", block_size=16, accuracy_level=0)
    fused, res = quantize_model(onnx.load(str(paths["fused"])), "int4", scheme="rtn", block_size=16, accuracy_level=0)
    assert res.qmoe_blocks == 1
    assert [n.op_type for n in fused.graph.node].count("QMoE") == 1
    assert "MoE" not in [n.op_type for n in fused.graph.node]
    a, b = _run(port, ids), _run(fused, ids)
    with torch.no_grad():
        ref = state.module(ids).numpy()
    assert np.abs(a - ref).max() > 1e-3  # int4 did change the function …
    np.testing.assert_allclose(b, a, atol=1e-4)  # … identically in both layouts


def test_int8_fused_becomes_8bit_qmoe(tiny_exports):
    _, paths = tiny_exports
    q, res = quantize_model(onnx.load(str(paths["fused"])), "int8", block_size=32)
    node = [n for n in q.graph.node if n.op_type == "QMoE"][0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["expert_weight_bits"] == 8 and attrs["block_size"] == 16  # 32 does not divide width 16
    head = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert len(head) == 1 and {a.name: helper.get_attribute_value(a) for a in head[0].attribute}["bits"] == 8
    assert res.scheme == "block"


def test_int8_tensor_scheme_and_int4_hqq(tiny_exports):
    state, paths = tiny_exports
    q, res = quantize_model(onnx.load(str(paths["portable"])), "int8", scheme="tensor")
    ops = [n.op_type for n in q.graph.node]
    assert {"DynamicQuantizeMatMul", "MatMulInteger"} & set(ops) and res.quantized_nodes == 9
    q4, res4 = quantize_model(onnx.load(str(paths["portable"])), "int4", block_size=16)
    assert res4.scheme == "hqq"
    nbits = [n for n in q4.graph.node if n.op_type == "MatMulNBits"]
    inits = {t.name: t for t in q4.graph.initializer}
    zero_points = [inits[n.input[3]] for n in nbits if len(n.input) > 3]
    assert len(nbits) == 9 and zero_points and all(z.data_type == TensorProto.FLOAT for z in zero_points)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = state.module(ids).numpy()
    rtn, _ = quantize_model(onnx.load(str(paths["portable"])), "int4", scheme="rtn", block_size=16, accuracy_level=0)
    # HQQ is no worse than round-to-nearest on the same weights
    assert np.abs(_run(q4, ids) - ref).mean() <= np.abs(_run(rtn, ids) - ref).mean() * 1.05


def _bits_by_weight(q: onnx.ModelProto) -> dict[str, int]:
    return {n.input[1]: {a.name: helper.get_attribute_value(a) for a in n.attribute}["bits"]
            for n in q.graph.node if n.op_type == "MatMulNBits"}


def test_int4_keeps_the_output_projection_at_8_bits_unless_told(tmp_path):
    """A 4-bit head alone cost SmolLM2 +10% perplexity where 4-bit experts and attention cost <1%
    (scripts/bench_onnx.py): int4 mode quantizes the head of a causal LM to 8 bits by default."""
    from export_onnx_helpers import export, upcycled
    rep, path = export(upcycled("llama"), tmp_path / "llama", strategy="portable")
    assert rep.metrics["parity"]["ok"]
    q, res = quantize_model(onnx.load(str(path)), "int4", block_size=16)
    bits = sorted(_bits_by_weight(q).values())
    assert bits.count(8) == 1 and bits.count(4) == len(bits) - 1 and len(bits) > 8
    assert any("8 bits" in n for n in res.notes)
    q4, _ = quantize_model(onnx.load(str(path)), "int4", block_size=16, head_bits=4)
    assert set(_bits_by_weight(q4).values()) == {4} and len(_bits_by_weight(q4)) == len(bits)


def test_int4_rtn_asym_writes_packed_integer_zero_points(tiny_exports):
    state, paths = tiny_exports
    q, res = quantize_model(onnx.load(str(paths["portable"])), "int4", scheme="rtn-asym", block_size=16, accuracy_level=0)
    inits = {t.name: t for t in q.graph.initializer}
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"
             and {a.name: helper.get_attribute_value(a) for a in n.attribute}["bits"] == 4]
    assert len(nbits) == 9 and res.scheme == "rtn-asym"  # 4 experts × 2 projections, and the last Linear
    assert all(len(n.input) > 3 and inits[n.input[3]].data_type == TensorProto.UINT8 for n in nbits)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = state.module(ids).numpy()
    assert np.abs(_run(q, ids) - ref).max() < 0.5 * np.abs(ref).max()  # quantized, still the same function roughly
