"""The other lowering for each model family (slow: portable MoE graphs with many experts take
long to export): native Qwen3-MoE and Mixtral through standard ONNX ops, the upcycled Llama's
KV-cache graph through standard ops, GPT-2 (moeconv format) portable. Each matches the
stock PyTorch model within 1e-4 on inputs of other shapes than the pass tried."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export_onnx_helpers import (clone, export, moeconv_roundtrip, narrow_example, native_mixtral, native_qwen3_moe,
                                 ort_logits, ort_session, upcycled)

pytestmark = pytest.mark.slow
ATOL = 1e-4


def _fresh(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, s, generator=g) for s in ((2, 21), (1, 2), (5, 7))]


@pytest.mark.parametrize("build", [native_qwen3_moe, native_mixtral], ids=["qwen3-moe", "mixtral"])
def test_native_portable(build, tmp_path):
    from moeconv import load
    hf = build()
    stock = clone(hf)
    state = load(hf)
    rep, path = export(state, tmp_path, strategy="portable", example=narrow_example(state.module))
    par = rep.metrics["parity"]
    assert par["ok"] and par["max_abs_diff"] <= ATOL and par["cases_reaching_experts_the_example_did_not"] > 0
    assert rep.metrics["ops"].get("NonZero", 0) >= 8 and "com.microsoft.MoE" not in rep.metrics["ops"]
    sess = ort_session(path)
    for ids in _fresh(5):
        with torch.no_grad():
            ref = stock(input_ids=ids).logits.numpy()
        assert np.abs(ort_logits(sess, ids) - ref).max() <= ATOL


def test_upcycled_llama_portable_with_past(tmp_path):
    state = upcycled("llama")
    rep, _ = export(state, tmp_path, strategy="portable", with_past=True)
    par = rep.metrics["parity"]
    assert par["ok"] and par["max_abs_diff"] <= ATOL and par["generation"]["equal"]
    assert "com.microsoft.MoE" not in rep.metrics["ops"] and rep.metrics["ops"].get("NonZero", 0) >= 8
    assert any(r["past"] > 0 for r in rep.tables["parity"])


def test_gpt2_portable(tmp_path):
    state = moeconv_roundtrip(upcycled("gpt2"), tmp_path / "gpt2-moe")
    ref_model = clone(state.module)
    rep, path = export(state, tmp_path / "onnx", strategy="portable")
    assert rep.metrics["parity"]["ok"] and rep.metrics["parity"]["max_abs_diff"] <= ATOL
    sess = ort_session(path)
    for ids in _fresh(3):
        with torch.no_grad():
            ref = ref_model(input_ids=ids).logits.numpy()
        assert np.abs(ort_logits(sess, ids) - ref).max() <= ATOL
