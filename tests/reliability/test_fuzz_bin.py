"""Property tests: random `pytorch_model.bin` contents (what `torch.load(weights_only=True)` admits:
containers of tensors, numbers and strings) beside a valid tiny config must load or end in a
clean `MoeconvError`, never an uncaught exception."""
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeconv.errors import MoeconvError
from moeconv.io.load import load

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONFIG = ('{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,'
          ' "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,'
          ' "max_position_embeddings": 16, "tie_word_embeddings": true}')
# The real names and shapes of that config: random contents mix them with garbage.
REAL = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
        "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.self_attn.v_proj.weight": (4, 8), "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.mlp.gate_proj.weight": (16, 8), "model.layers.0.mlp.up_proj.weight": (16, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 16)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool,
          torch.complex64]


@st.composite
def tensors(draw, shape=None):
    shape = shape if shape is not None else tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    t = torch.zeros(shape, dtype=dtype) if draw(st.booleans()) else torch.ones(shape).to(dtype)
    how = draw(st.sampled_from(["plain", "expanded", "transposed", "sparse", "nan", "view"]))
    if how == "expanded" and t.dim() >= 1 and t.numel():
        t = t[..., :1].expand(*t.shape)
    elif how == "transposed" and t.dim() == 2:
        t = t.t()
    elif how == "sparse" and t.dim() >= 1 and dtype in (torch.float32, torch.float64):
        t = t.to_sparse()
    elif how == "nan" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[0] = float("nan")
    return t


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6) | tensors(),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6)


@st.composite
def state_dicts(draw):
    kind = draw(st.sampled_from(["mutated-real", "random", "not-a-dict"]))
    if kind == "not-a-dict":
        return draw(values)
    if kind == "random":
        return draw(st.dictionaries(st.text(max_size=12) | st.integers(), values, max_size=4))
    sd = {name: torch.randn(shape) for name, shape in REAL.items()}
    for name in draw(st.lists(st.sampled_from(sorted(REAL)), max_size=3, unique=True)):
        action = draw(st.sampled_from(["drop", "reshape", "garbage", "tensor"]))
        if action == "drop":
            del sd[name]
        elif action == "reshape":
            sd[name] = draw(tensors())
        elif action == "garbage":
            sd[name] = draw(values)
        else:
            sd[name] = draw(tensors(REAL[name]))
    if draw(st.booleans()):
        sd[draw(st.text(max_size=12))] = draw(values)
    return sd


def _check_bin(contents) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(CONFIG)
        try:
            torch.save(contents, Path(d) / "pytorch_model.bin")
        except Exception:
            return  # not saveable: not an input anyone can hand us
        try:
            state = load(d)
        except MoeconvError:
            return
        for p in state.module.parameters():  # what loaded must be usable: owned, dense, in place
            assert p.layout == torch.strided and 0 not in p.stride() or p.numel() <= 1


@FAST
@given(state_dicts())
def test_bin_contents_fast(contents):
    _check_bin(contents)


@pytest.mark.slow
@SLOW
@given(state_dicts())
def test_bin_contents_1000(contents):
    _check_bin(contents)
