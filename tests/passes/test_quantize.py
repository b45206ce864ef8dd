"""The `quantize` pass (passes/quantize.py) and its checkpoints (moeconv/formats/quantized.py).

- MoE models — a tiny upcycled Mixtral (in memory, and as the Mixtral directory the upcycle job
  writes) and transformers-native random Mixtral / Qwen3-MoE / Qwen2-MoE with fused 3-D experts:
  every expert projection becomes a bitsandbytes layer, routers are bit-identical to the input,
  the output is moeconv format (transformers refuses it), `moeconv.load` rebuilds it and its
  logits equal the in-memory quantized model's;
- dense Llama: transformers loads the output with its `quantization_config`, logits equal;
- the bitsandbytes CPU save trap: error measured (forwards run) before saving does not change
  what is saved — checked against an independent quantization saved before any forward;
- every selected layer is quantized or listed with its reason; selection and config validation;
- measured error and perplexity are reported, never promised.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import moeconv
from moeconv import Context, Pipeline
from moeconv.errors import ConfigError, PlanError, UnsupportedError
from moeconv.jobs.pipeline_job import run_to_dir
from moeconv.nn.quantized import QuantSpec, method_of, quantize_linear, serialized
from passes.quantize import Quantize
from passes.upcycle import Upcycle
from quantize_helpers import bnb_layers, expert_projections, logits, native_moe, router_tensors
from upcycle_helpers import build_dense, clone, tokens

NF4 = dict(method="nf4", blocksize=32)


def _upcycled(seed: int = 0):
    """A dense Llama upcycled in memory (router_init normal: routers are not all-zero)."""
    state = moeconv.load(build_dense("llama", seed=seed))
    return Pipeline([Upcycle(num_experts=4, top_k=2, router_init="normal")]).run(state, Context()).state


def _quantize_to(tmp_path, state_or_src, **cfg):
    out = tmp_path / "q"
    state = state_or_src if isinstance(state_or_src, moeconv.ModelState) else None
    report = run_to_dir(None if state else state_or_src, out, [Quantize(**cfg)], state=state)
    return out, report


# ------------------------------------------------------------------------------ MoE models

@pytest.mark.parametrize("source", ["upcycled-in-memory", "upcycled-mixtral-dir", "mixtral", "qwen3_moe", "qwen2_moe"])
def test_moe_every_expert_quantized_routers_identical_reload_equal(source, tmp_path):
    if source == "upcycled-in-memory":
        src = _upcycled()
        routers_in = router_tensors(src.module)
    elif source == "upcycled-mixtral-dir":
        from passes.upcycle import UpcycleConfig
        from moeconv.jobs.upcycle import upcycle_checkpoint
        build_dense("llama").save_pretrained(tmp_path / "dense")
        upcycle_checkpoint(tmp_path / "dense", tmp_path / "mixtral", UpcycleConfig(num_experts=4, top_k=2, router_init="normal"))
        src = tmp_path / "mixtral"
        routers_in = router_tensors(moeconv.load(src).module)
    else:
        native = native_moe(source)
        native.save_pretrained(tmp_path / "native")
        src = tmp_path / "native"
        routers_in = router_tensors(native)  # the fused HF blocks, before moeconv touches them
    assert routers_in and any(t.abs().sum() > 0 for t in routers_in.values())

    out, report = _quantize_to(tmp_path, src, **NF4)
    assert report["written"]["consumer"] == "moeconv" and report["written"]["format"] == "moeconv-quantized"
    assert json.loads((out / "config.json").read_text())["model_type"] == "moeconv"
    with pytest.raises(Exception):  # transformers refuses loudly; never float or random experts
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(out)

    reloaded = moeconv.load(out).module
    experts = expert_projections(reloaded)
    assert experts and all(method_of(m) == "nf4" for m in experts.values()), \
        [p for p, m in experts.items() if method_of(m) != "nf4"]
    assert not any(p.dim() >= 3 for p in reloaded.parameters())  # no fused float experts left
    routers_out = router_tensors(reloaded)
    assert routers_out.keys() == routers_in.keys()
    for name, t in routers_in.items():
        assert routers_out[name].dtype == torch.float32 and torch.equal(routers_out[name], t), name

    metrics = report["passes"][0]["metrics"]
    assert metrics["experts_ratio_vs_fp16"] < 0.4  # nf4 + fp32 scales per 32 weights, plus tiny-layer overhead
    assert report["verification"]["max_abs_diff"] == 0.0  # the job compared reload vs in-memory
    # the same, independently: a fresh process-level reload against a model run before saving
    ids = tokens(5)
    state = moeconv.load(out)
    assert state.facts() >= {"moe", "quantized"} and "float-weights" not in state.facts()
    assert torch.equal(logits(state.module, ids), logits(moeconv.load(out).module, ids))


def test_int8_on_native_mixtral_quantizes_every_expert(tmp_path):
    native = native_moe("mixtral", seed=3)
    routers_in = router_tensors(native)
    state = moeconv.load(clone(native))
    result = Pipeline([Quantize(method="int8")]).run(state, Context())
    q = result.state.module
    assert all(method_of(m) == "int8" for m in expert_projections(q).values())
    assert all(torch.equal(router_tensors(q)[k], v) for k, v in routers_in.items())
    # LLM.int8 is close: top-1 agreement high, KL small (measured, reported)
    m = result.report.passes[0].metrics
    assert m["top1_agreement"] >= 0.9 and 0 <= m["kl"] < 0.01, m


def test_fused_experts_in_a_state_are_linearised_first():
    """A ModelState built around a native module (not via `load`, so not linearised) still has
    every expert quantized: fused 3-D experts are never silently skipped."""
    from moeconv.state import ModelState
    native = native_moe("qwen3_moe")
    ref = logits(native, tokens())
    state = ModelState(native, native.config)
    assert any(p.dim() == 3 for p in state.module.parameters())
    result = Pipeline([Quantize(method="int8")]).run(state, Context())
    report = result.report.passes[0]
    assert report.metrics["linearised_moe_blocks"] == 2
    assert not any(p.dim() >= 3 for p in result.state.module.parameters())
    assert len(expert_projections(result.state.module)) == 2 * 4 * 3
    assert all(method_of(m) == "int8" for m in expert_projections(result.state.module).values())
    assert (logits(result.state.module, tokens()) - ref).abs().max() < 0.1 * ref.abs().max()


# ------------------------------------------------------------------------------ dense models

@pytest.mark.parametrize("cfg", [NF4, dict(method="int8"), dict(method="fp4", blocksize=32, double_quant=True)],
                         ids=["nf4", "int8", "fp4-dq"])
def test_dense_llama_loads_in_transformers_with_quantization_config(cfg, tmp_path):
    from transformers import AutoModelForCausalLM
    import bitsandbytes as bnb
    dense = build_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    out, report = _quantize_to(tmp_path, tmp_path / "dense", **cfg)
    assert report["written"]["consumer"] == "transformers"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and "lm_head" in qc["llm_int8_skip_modules"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = bnb.nn.Linear8bitLt if cfg["method"] == "int8" else bnb.nn.Linear4bit
    assert isinstance(hf.model.layers[1].mlp.down_proj, want)
    assert type(hf.lm_head) is torch.nn.Linear
    ours = moeconv.load(out).module  # moeconv.load reads it too (through transformers)
    ids = tokens(9)
    assert torch.equal(logits(hf, ids), logits(ours, ids))
    # the quantized model is close to the dense one, but not equal: the change is real
    diff = (logits(hf, ids) - logits(dense, ids)).abs().max().item()
    assert 0 < diff < logits(dense, ids).abs().max().item()


# ------------------------------------------------------------------------------ the CPU save trap

@pytest.mark.parametrize("double_quant", [False, True])
def test_measuring_before_saving_does_not_corrupt_the_checkpoint(double_quant, tmp_path):
    """FIELD.md: a Linear4bit's first CPU forward repacks it in place, and `state_dict()` after
    that writes garbage (and corrupts the layer). The pass measures error (forwards) before the
    job saves. Anchor: the same float model quantized independently, saved before any forward."""
    from moeconv.io.save import save_checkpoint
    dense = build_dense("llama", seed=1)
    ids = tokens(11)
    cfg = dict(NF4, double_quant=double_quant)

    # independent anchor: the same layers quantized without any forward, saved, reloaded, run
    anchor_state = moeconv.load(clone(dense))
    for path, m in list(anchor_state.module.named_modules()):
        if type(m) is torch.nn.Linear and path != "lm_head" and m.out_features % 32 == 0:
            anchor_state.module.set_submodule(path, quantize_linear(m, QuantSpec("nf4", 32, double_quant)))
    (tmp_path / "anchor").mkdir()
    save_checkpoint(anchor_state, tmp_path / "anchor")
    anchor = logits(moeconv.load(tmp_path / "anchor").module, ids)

    state = moeconv.load(clone(dense))
    result = Pipeline([Quantize(**cfg)]).run(state, Context())  # NumericCheck + the pass run forwards
    model = result.state.module
    packed = [m for m in bnb_layers(model).values() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    before_save = logits(model, ids)
    (tmp_path / "q").mkdir()
    save_checkpoint(result.state, tmp_path / "q")
    assert torch.equal(logits(model, ids), before_save)  # saving did not touch the live model
    reloaded = logits(moeconv.load(tmp_path / "q").module, ids)
    assert torch.equal(reloaded, before_save)
    assert torch.equal(before_save, anchor)  # and both equal a quantization never run before saving
    if not packed:
        pytest.skip("this CPU does not repack 4-bit weights (no AVX512-BF16): the trap cannot fire here")


def test_the_trap_is_real_for_a_naive_state_dict(tmp_path):
    """Negative control: saving bitsandbytes' own `state_dict()` after a forward changes the
    weights. If a bitsandbytes release fixes it, this skips (the guard stays harmless)."""
    lin = torch.nn.Linear(64, 64, bias=False)
    q = quantize_linear(lin, QuantSpec("nf4", 64, False)).eval()
    x = torch.randn(3, 64)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.inference_mode():
        y = q(x)
    if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("no in-place CPU repacking on this machine")
    after = q.state_dict()
    with torch.inference_mode():
        y2 = q(x)
    corrupted = not all(torch.equal(before[k], after[k]) for k in before) or not torch.equal(y, y2)
    if not corrupted:
        pytest.skip("this bitsandbytes round-trips state_dict() after a forward")
    assert all(torch.equal(before[k], v) for k, v in serialized(q).items())  # our snapshot is the clean one


def test_repacked_layer_without_snapshot_is_refused():
    from moeconv.nn.quantized import SNAPSHOT_ATTR
    q = quantize_linear(torch.nn.Linear(64, 64), QuantSpec("nf4", 64, False)).eval()
    object.__delattr__(q, SNAPSHOT_ATTR)
    with torch.inference_mode():
        q(torch.randn(2, 64))
    if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("no in-place CPU repacking on this machine")
    with pytest.raises(UnsupportedError, match="repacked"):
        serialized(q)


# ------------------------------------------------------------------------------ selection, reporting

def _run(model, ctx=None, **cfg):
    state = moeconv.load(clone(model))
    result = Pipeline([Quantize(**cfg)]).run(state, ctx or Context())
    return result.state.module, result.report.passes[0]


def test_every_linear_is_quantized_or_listed_with_a_reason():
    model, report = _run(_upcycled().module, method="nf4")  # default blocksize 64 > hidden 32
    rows = {r["module"]: r for r in report.tables["modules"]}
    linears = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(rows) == set(linears)
    for p, r in rows.items():
        if r["action"] == "kept":
            assert r["reason"], p
        else:
            assert method_of(model.get_submodule(p)) == "nf4"
    blocked = [r for r in rows.values() if r.get("problem")]
    assert blocked and all("blocksize" in r["reason"] or "multiple of 32" in r["reason"] for r in blocked)
    assert any("left in float" in w for w in report.warnings)
    assert rows["lm_head"]["reason"].startswith("lm_head")
    assert all(r["reason"].startswith("router") for r in rows.values() if r["group"] == "router")


def test_selection_by_group_layers_and_regex():
    model = _upcycled().module
    q, _ = _run(model, method="int8", ignore=["attention"])
    assert not any("self_attn" in p for p in bnb_layers(q)) and any(".experts." in p for p in bnb_layers(q))
    q, _ = _run(model, method="int8", targets=["experts"], ignore=["layers:1"])
    assert bnb_layers(q) and all(p.startswith("model.layers.0.mlp.experts.") for p in bnb_layers(q))
    q, _ = _run(model, method="int8", targets=["re:o_proj$"])
    assert sorted(bnb_layers(q)) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    with pytest.raises(UnsupportedError, match="no layer to quantize"):
        _run(model, method="int8", targets=["re:nothing-matches"])


def test_router_quantized_only_on_request_with_a_warning():
    model = _upcycled().module
    q, report = _run(model, method="int8", quantize_routers=True)
    assert method_of(q.get_submodule("model.layers.0.mlp.router")) == "int8"
    assert any("routers quantized" in w for w in report.warnings)


def test_tied_lm_head_is_never_quantized():
    dense = build_dense("llama")
    dense.config.tie_word_embeddings = True
    dense.tie_weights()
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    q, report = _run(dense, method="int8", quantize_lm_head=True)
    row = next(r for r in report.tables["modules"] if r["module"] == "lm_head")
    assert row["action"] == "kept" and "tied" in row["reason"]
    assert q.lm_head.weight is q.model.embed_tokens.weight


def test_error_and_perplexity_are_measured():
    from moeconv.evaluate import perplexity
    dense = build_dense("llama")
    evaluation = tokens(21, batch=4, seq=32)
    ppl_float = perplexity(dense, evaluation)
    _, report = _run(dense, Context(evaluation=evaluation), method="int8")
    m = report.metrics
    assert m["ppl_before"] == pytest.approx(ppl_float, rel=1e-6)
    assert m["ppl_after"] > 0 and m["ppl_after"] != m["ppl_before"]
    assert 0 < m["kl"] and 0 < m["top1_agreement"] <= 1 and m["logits_max_abs_diff"] > 0
    assert m["error_inputs"] == "eval text"
    groups = {g["group"]: g for g in report.tables["groups"]}
    assert groups["mlp"]["bytes_after"] < 0.6 * groups["mlp"]["bytes_before"]  # int8 ≈ ¼ of fp32 + scales
    assert groups["embeddings"]["bytes_after"] == groups["embeddings"]["bytes_before"]


def test_quantizing_twice_and_bad_configs_are_refused():
    q, _ = _run(build_dense("llama"), method="int8")
    state = moeconv.load(q)
    assert "quantized" in state.facts()
    with pytest.raises(PlanError, match="float-weights"):
        Pipeline([Quantize(method="nf4")]).run(state, Context())
    with pytest.raises(UnsupportedError, match="already quantized"):
        Quantize(method="nf4").check(state, Context())
    for bad in (dict(method="nf8"), dict(method="int8", blocksize=64), dict(method="int8", double_quant=True),
                dict(method="nf4", blocksize=48), dict(ignore=["re:("]), dict(targets=["layers:x"])):
        with pytest.raises(ConfigError):
            Quantize(**bad)


def test_inspect_shows_method_and_bytes_per_layer(tmp_path):
    from moeconv.inspect import inspect_state
    out, _ = _quantize_to(tmp_path, _upcycled(), **NF4)
    info = inspect_state(moeconv.load(out))
    layers = {q["path"]: q for q in info["quantized_layers"]}
    assert layers["model.layers.0.mlp.experts.3.down_proj"]["method"] == "nf4"
    assert layers["model.layers.0.mlp.experts.3.down_proj"]["group"] == "experts"
    assert layers["model.layers.0.mlp.experts.3.down_proj"]["shape"] == [32, 64]
    storage = {s["group"]: s for s in info["storage"]}
    assert set(storage["experts"]["storage"]) == {"nf4"} and set(storage["router"]["storage"]) == {"float32"}
    assert storage["experts"]["bytes"] == sum(q["bytes"] for q in layers.values() if q["group"] == "experts")


def test_an_expert_without_tokens_does_not_crash_the_process():
    """bitsandbytes 0.50.2's packed CPU 4-bit kernel dies with SIGFPE on an empty batch, and MoE
    dispatch hands one to every expert no token was routed to. Run in a subprocess so that a
    regression fails this test instead of killing the test run."""
    import subprocess
    import sys
    from pathlib import Path
    code = (
        "import torch\n"
        "from moeconv.nn.moe import MoEBlock, RoutingConfig\n"
        "from moeconv.nn.quantized import QuantSpec, quantize_linear\n"
        "torch.manual_seed(0)\n"
        "block = MoEBlock([torch.nn.Linear(64, 64) for _ in range(4)], 64, RoutingConfig(top_k=1)).eval()\n"
        "for e in range(4):\n"
        "    block.experts[e] = quantize_linear(block.experts[e], QuantSpec('nf4', 64)).eval()\n"
        "x = torch.randn(5, 64)\n"
        "with torch.inference_mode():\n"
        "    idx = block.route(x).indices\n"
        "    assert idx.unique().numel() == 1, idx  # zero router: every token to expert 0, the rest get none\n"
        "    y = block(x)\n"
        "print('ok', tuple(y.shape))\n")
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok (5, 64)" in r.stdout, (r.returncode, r.stderr[-2000:])
