"""export-onnx on a bitsandbytes-quantized model: int8 weights carried into ONNX exactly (int8 +
row scales → DequantizeLinear), 4-bit refused with the fix, `quantize` on a quantized model refused.

The end-to-end recipe (upcycle → … → quantize int8 → export onnx, fused MoE lowering) is in
tests/core/test_full_chain.py; here: the rewrite itself on hand-made graphs, a dense model (2-D
weights only) and the refusals.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from moeconv import Context, Pipeline, load
from moeconv.errors import UnsupportedError
from moeconv.nn.quantized import QuantSpec, quantize_linear
from moeconv.onnx.int8_weights import carry_int8, int8_layers
from passes import ExportOnnx, Quantize
from tests.tiny import tiny_hf


def _int8_model(out_f=8, in_f=16, n=2, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(in_f, out_f) for _ in range(n)])
    for i in range(n):
        model[i] = quantize_linear(model[i], QuantSpec("int8"))
    return model


def _graph(inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One Identity per initializer: the graph outputs the weights themselves."""
    nodes = [helper.make_node("Identity", [k], [k + "_out"]) for k in inits]
    outs = [helper.make_tensor_value_info(k + "_out", TensorProto.FLOAT, list(v.shape)) for k, v in inits.items()]
    g = helper.make_graph(nodes, "g", [], outs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_carry_rewrites_row_major_transposed_and_stacked_weights_bit_exactly():
    import onnxruntime as ort
    model = _int8_model(n=4)
    layers = int8_layers(model)
    w = [l.weight().numpy() for l in layers]
    other = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    inits = {"a": w[0], "b_t": np.ascontiguousarray(w[1].T), "stacked": np.stack([w[0], w[2]]),
             "interleaved": np.stack([w[2][0::2], w[1][1::2]]), "router": other}
    m = _graph(inits)
    res = carry_int8(m, layers)
    assert res.initializers == 4 and res.layers == 4 and res.layers_carried == 3
    assert res.missing == ["3"]  # a layer none of whose rows is in the graph is reported
    kinds = {i.name: i.data_type for i in m.graph.initializer}
    assert kinds["router"] == TensorProto.FLOAT and "a" not in kinds
    assert all(kinds[k + "_int8"] == TensorProto.INT8 for k in ("a", "b_t", "stacked", "interleaved"))
    onnx.checker.check_model(m)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {})))
    for k, v in inits.items():  # DequantizeLinear reproduces every float weight bit for bit
        assert got[k + "_out"].shape == v.shape
        assert np.array_equal(got[k + "_out"].view(np.uint32), v.view(np.uint32)), k


@pytest.fixture(scope="module")
def int8_llama():
    state = load(tiny_hf("llama"))
    return Pipeline([Quantize(method="int8")]).run(state, Context(seed=0)).state


def test_dense_int8_model_exports_with_int8_weights(int8_llama, tmp_path):
    report = ExportOnnx(latency_runs=0, workdir=tmp_path)(int8_llama, Context(seed=0)).report
    m = report.metrics
    i8 = m["int8_weights"]
    n = len(int8_layers(int8_llama.module))
    assert i8["int8_layers"] == i8["int8_layers_carried"] == n > 0 and i8["initializers_rewritten"] == n
    assert m["parity"]["ok"] and m["parity"]["max_abs_diff"] < 1e-4
    assert i8["vs_bitsandbytes"]["max_abs_diff"] > 0  # measured, not promised
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert sum(i.data_type == TensorProto.INT8 for i in model.graph.initializer) == n
    assert i8["int8_bytes"] * 3.5 < i8["float_bytes_replaced"]
    # the PyTorch model is returned as it was: bitsandbytes layers back in place
    assert len(int8_layers(int8_llama.module)) == n


def test_export_with_quantize_on_a_quantized_model_is_refused(int8_llama):
    with pytest.raises(UnsupportedError, match="twice") as exc:
        ExportOnnx(quantize="int8").check(int8_llama, Context())
    assert "drop --quantize" in exc.value.one_line()
    plan = Pipeline([ExportOnnx(quantize="int4")]).plan(int8_llama.facts())
    assert not plan.ok and "twice" in plan.problems[0]
    assert Pipeline([ExportOnnx()]).plan(int8_llama.facts()).ok


def test_4bit_model_is_refused_at_plan_time_and_in_check():
    state = load(tiny_hf("llama"))
    # blocksize 32: every tiny layer fits bitsandbytes' CPU 4-bit kernel
    state = Pipeline([Quantize(method="nf4", blocksize=32)]).run(state, Context(seed=0)).state
    assert "int8-weights" not in state.facts() and "float-weights" not in state.facts()
    plan = Pipeline([ExportOnnx()]).plan(state.facts())
    assert len(plan.problems) == 1 and "--quantize int4" in plan.problems[0]
    with pytest.raises(UnsupportedError, match="nf4") as exc:
        ExportOnnx().check(state, Context())
    line = exc.value.one_line()
    assert "\n" not in line and "--quantize int4" in line


def test_swap_releases_float_weights_under_a_block_and_rebuilds_them_bit_exactly():
    from moeconv.onnx.int8_weights import dequantized
    model = nn.Sequential(nn.Sequential(_int8_model(n=2), _int8_model(n=1, seed=1)), _int8_model(n=1, seed=2))
    layers = int8_layers(model)
    with dequantized(model, layers) as swap:
        before = {p: m.weight.clone() for p, m in swap.float_modules.items()}
        swap.release_under("0")  # the layers under block 0 only
        sizes = {p: m.weight.numel() for p, m in swap.float_modules.items()}
        assert sizes == {"0.0.0": 0, "0.0.1": 0, "0.1.0": 0, "1.0": 8 * 16}
        swap.rebuild()
        for p, m in swap.float_modules.items():
            assert torch.equal(m.weight.view(torch.int32), before[p].view(torch.int32)), p
        assert not swap.released
