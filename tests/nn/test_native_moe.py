"""Linearising a native HF MoE block (`moeconv.nn.native_moe`): the experts are built where the
fused parameters are, so a streamed skeleton (parameters on `meta`) allocates no expert memory,
and a real block keeps its weights and its function."""
from __future__ import annotations

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from moeconv.nn.native_moe import linearise_native_moe
from moeconv.stream.skeleton import parameters_on_meta

HIDDEN, INTER, EXPERTS = 64, 176, 4


def _mixtral() -> transformers.MixtralForCausalLM:
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


class _RealAllocations(TorchDispatchMode):
    """Sizes of the tensors off `meta` that any op creates while active."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.sizes.append(t.numel())
        return out


def test_a_meta_model_is_linearised_without_allocating_its_experts():
    seen = _RealAllocations()
    with parameters_on_meta():  # as `Skeleton.open` builds and linearises a model
        model = _mixtral()
        with seen:
            paths = linearise_native_moe(model)
    assert len(paths) == 2
    params = list(model.named_parameters())
    assert sum(".experts." in n for n, _ in params) == 2 * EXPERTS * 3 and all(p.is_meta for _, p in params)
    # the routers (EXPERTS x HIDDEN, fp32) may be real; no expert-sized matrix ever was
    assert max(seen.sizes, default=0) < HIDDEN * INTER


def test_a_real_model_keeps_its_weights_and_its_function():
    model = _mixtral()
    fused = model.model.layers[0].mlp.experts
    want_gate_up, want_down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        linearise_native_moe(model)
        after = model(ids).logits
    expert = model.model.layers[0].mlp.experts[1]
    assert expert.gate_proj.weight.device.type == "cpu"
    assert torch.equal(expert.gate_proj.weight, want_gate_up[1, :INTER])
    assert torch.equal(expert.up_proj.weight, want_gate_up[1, INTER:])
    assert torch.equal(expert.down_proj.weight, want_down[1])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
