"""Tests for the reference models in ``models/``: shapes, determinism,
fx-traceability of blocks and FFN modules, torch.export of full models, causality."""

import pytest
import torch
import torch.fx

from models import bert, gpt, llama

B, T = 2, 16


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ctor = {"gpt": lambda: gpt.GPT(gpt.GPTConfig()),
            "llama": lambda: llama.Llama(llama.LlamaConfig()),
            "bert": lambda: bert.Bert(bert.BertConfig())}[name]
    return ctor().eval()


MODELS = ["gpt", "llama", "bert"]
OUT_DIM = {"gpt": 256, "llama": 256, "bert": 64}


@pytest.mark.parametrize("name", MODELS)
def test_output_shape_and_nontrivial(name):
    out = _model(name)(_tokens())
    assert out.shape == (B, T, OUT_DIM[name])
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3  # init is not degenerate


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_in_eval(name):
    m, x = _model(name), _tokens()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
    # Same seed -> same weights -> same output.
    with torch.no_grad():
        assert torch.equal(m(x), _model(name)(x))


def _bcfg():
    return bert.BertConfig()


# name -> (module factory, input width, number of (B, T, *) inputs), covering every
# Block/Layer and FFN module type; each must trace on its own.
TRACE_CASES = {
    "gpt.Block": (lambda: gpt.Block(gpt.GPTConfig()), 64, 1),
    "gpt.MLP": (lambda: gpt.MLP(gpt.GPTConfig()), 64, 1),
    "llama.Block": (lambda: llama.Block(llama.LlamaConfig()), 64, 1),
    "llama.FeedForward": (lambda: llama.FeedForward(llama.LlamaConfig()), 64, 1),
    "bert.Layer": (lambda: bert.Layer(_bcfg()), 64, 1),
    "bert.Intermediate": (lambda: bert.Intermediate(_bcfg()), 64, 1),
    "bert.Output": (lambda: bert.Output(_bcfg()), 128, 2),  # (x, residual)
}


@pytest.mark.parametrize("case", list(TRACE_CASES))
def test_symbolic_trace_matches_eager(case):
    factory, width, arity = TRACE_CASES[case]
    torch.manual_seed(0)
    mod = factory().eval()
    gm = torch.fx.symbolic_trace(mod)
    assert isinstance(gm, torch.fx.GraphModule)
    args = [torch.randn(B, T, width)]
    if arity == 2:
        args.append(torch.randn(B, T, 64))
    with torch.no_grad():
        torch.testing.assert_close(gm(*args), mod(*args), rtol=0, atol=0)


def test_traced_bert_layer_with_mask():
    torch.manual_seed(0)
    layer = bert.Layer(bert.BertConfig()).eval()
    gm = torch.fx.symbolic_trace(layer)
    x = torch.randn(B, T, 64)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[0, ..., T // 2:] = False
    with torch.no_grad():
        torch.testing.assert_close(gm(x, mask), layer(x, mask), rtol=0, atol=0)
        assert not torch.allclose(layer(x, mask), layer(x))


@pytest.mark.parametrize("name", MODELS)
def test_export_matches_eager(name):
    m, x = _model(name), _tokens()
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x), rtol=0, atol=1e-5)
        x2 = _tokens(seed=1)  # other tokens, same shape
        torch.testing.assert_close(ep.module()(x2), m(x2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_causal_masking(name):
    m, x = _model(name), _tokens()
    y = x.clone()
    y[:, T // 2] = (y[:, T // 2] + 1) % 256  # change one later token
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, : T // 2], b[:, : T // 2], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, T // 2 :], b[:, T // 2 :])


def test_bert_is_bidirectional_and_respects_padding_mask():
    m, x = _model("bert"), _tokens()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 256
    mask = torch.ones(B, T, dtype=torch.long)
    mask[:, -1] = 0
    with torch.no_grad():
        # Without a mask, a change to the last token reaches the first position ...
        assert not torch.allclose(m(x)[:, 0], m(y)[:, 0])
        # ... with it masked out as padding, other positions are unaffected.
        torch.testing.assert_close(m(x, mask)[:, :-1], m(y, mask)[:, :-1], rtol=0, atol=1e-6)


def test_gpt_lm_head_tied_llama_untied():
    g, l = _model("gpt"), _model("llama")
    assert g.lm_head.weight is g.wte.weight
    assert l.output.weight is not l.tok_embeddings.weight


def test_llama_rope_buffers_not_in_state_dict():
    sd = _model("llama").state_dict()
    assert not any(k.endswith(("rotary.cos", "rotary.sin")) for k in sd)
