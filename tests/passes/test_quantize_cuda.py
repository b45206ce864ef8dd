"""On a CUDA GPU, a quantized MoE checkpoint (written and reloaded on CPU) runs on the GPU, agrees
with its CPU run, and its speed is measured against the fp16 float model. Skipped without a GPU."""
from __future__ import annotations

import copy
import time

import pytest
import torch

import moeconv
from moeconv import Context, Pipeline
from moeconv.jobs.pipeline_job import run_to_dir
from passes.quantize import Quantize
from passes.upcycle import Upcycle
from quantize_helpers import logits
from upcycle_helpers import build_dense, tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ms_per_call(model, ids, reps=20) -> float:
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_moe_runs_on_cuda(method, tmp_path, record_property):
    state = moeconv.load(build_dense("llama"))
    state = Pipeline([Upcycle(num_experts=4, top_k=2, router_init="normal")]).run(state, Context()).state
    float_fp16 = copy.deepcopy(state.module).half().cuda().eval()  # the float MoE, fp16, for speed
    cfg = dict(method=method, blocksize=32) if method != "int8" else dict(method=method)
    run_to_dir(None, tmp_path / "q", [Quantize(**cfg)], state=state)
    cpu = moeconv.load(tmp_path / "q").module
    ids = tokens(3)
    ref = logits(cpu, ids)
    gpu = moeconv.load(tmp_path / "q").module.cuda()
    got = logits(gpu, ids.cuda()).cpu()
    assert torch.isfinite(got).all()
    # different kernels (CPU bf16 packed vs CUDA), same quantized weights: close, not equal
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max(), (got - ref).abs().max()
    ids = tokens(4, batch=8, seq=64).cuda()
    q_ms, f_ms = _ms_per_call(gpu, ids), _ms_per_call(float_fp16, ids)
    record_property(f"{method}_ms", q_ms)
    record_property("fp16_ms", f_ms)
    print(f"\n{method}: {q_ms:.2f} ms/forward vs fp16 {f_ms:.2f} ms ({torch.cuda.get_device_name()})")
