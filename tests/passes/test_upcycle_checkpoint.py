"""`moeconv upcycle SRC OUT` end to end (moeconv/jobs/upcycle.py through moeconv.cli):

- Llama / Mistral / Qwen2 / Qwen3 → a directory stock transformers loads as Mixtral / Qwen2-MoE /
  Qwen3-MoE, same logits as the dense model (computed here, not read from the report), sharded
  output with an index;
- GPT-2 / BERT / Phi-3 / builtin:* → moeconv format: `moeconv.load` gives MoEBlocks with the
  dense function; transformers refuses the directory;
- split init through the CLI; layer selection; streaming route == in-memory route (same seed,
  same tensors); byte-identical reruns; report.json / recipe.json / tokenizer files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import moeconv
from moeconv import Context, Pipeline
from passes.upcycle import Upcycle
from upcycle_helpers import (EXACT, EXPERTS, HF_FAMILY, INTER, VOCAB, assert_same_function, build_dense, cli_ok,
                             leftovers, moe_blocks, outputs, rel_max_diff, run_cli, safetensors_dict, tokens)

BASE = ["--num-experts", str(EXPERTS), "--top-k", "2"]


def _hf(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kw).eval()


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def hf_outputs(dense_ckpt, tmp_path_factory):
    """kind → OUT of `moeconv upcycle SRC OUT -e 4 -k 2 --router-init normal` (run once per module)."""
    root = tmp_path_factory.mktemp("hf-out")
    cache = {}

    def get(kind):
        if kind not in cache:
            out = root / kind
            cli_ok(dense_ckpt(kind), out, *BASE, "--router-init", "normal")  # qwen2: the shared expert by itself
            cache[kind] = out
        return cache[kind]
    return get


# ----------------------------------------------------------------------------- 1. HF families


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_family_loads_in_stock_transformers_and_matches_dense(kind, dense_ckpt, hf_outputs):
    src, out = dense_ckpt(kind), hf_outputs(kind)
    arch, experts_key = HF_FAMILY[kind]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    moe = _hf(out)
    assert type(moe).__name__ == arch
    assert getattr(moe.config, experts_key) == EXPERTS
    assert moe.config.num_experts_per_tok == 2
    if kind == "qwen2":  # added without --shared-experts (the only exact Qwen2-MoE), and said so
        assert moe.config.shared_expert_intermediate_size == INTER
        report = _report(out)
        assert "always has one" in report["shared_expert"] and report["recipe"][0]["shared_experts"] is True
    else:
        assert _report(out)["shared_expert"] is None
    if kind.startswith("qwen"):
        assert moe.config.norm_topk_prob is True and list(moe.config.mlp_only_layers) == []
    # No parameter of the MoE model was left to random init: every one is in the files.
    written = set(safetensors_dict(out))
    assert written, "no tensors written"
    # The routers really route (normal init): not all-zero.
    routers = [k for k in written if re.search(r"\.(block_sparse_moe|mlp)\.gate\.weight$", k)]
    assert len(routers) == 2
    tensors = safetensors_dict(out)
    assert all(tensors[k].abs().max() > 0 for k in routers)
    # Logits vs the dense model, computed here on fresh random batches.
    assert_same_function(moe, _hf(src), seeds=(0, 1, 2))
    rep = _report(out)
    assert rep["route"] == "streaming"
    assert rep["verification"]["consumer_class"] == arch
    assert rep["verification"]["rel_max_diff"] <= EXACT


def test_sharded_output_has_index_and_loads(dense_ckpt, tmp_path):
    src, out = dense_ckpt("llama"), tmp_path / "sharded"
    cli_ok(src, out, *BASE, "--router-init", "normal", "--shard-size", "40KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3, shards
    assert all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert sorted(set(weight_map.values())) == shards
    assert set(weight_map) == set(safetensors_dict(out))
    for s in shards:  # each shard within the limit unless it holds one tensor
        assert (out / s).stat().st_size <= 40_000 + 4096 or len([v for v in weight_map.values() if v == s]) == 1
    moe = _hf(out)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert_same_function(moe, _hf(src))
    assert _report(out)["written"]["shards"] == len(shards)


def test_run_recipe_upcycle_of_qwen2_adds_the_shared_expert(dense_ckpt, tmp_path):
    """`moeconv run` follows `moeconv upcycle`'s rule: a recipe's upcycle step that leaves
    `shared_experts` unset gets the shared expert Qwen2-MoE needs, so a Qwen2 source is written as a
    Qwen2-MoE stock transformers loads, with the dense model's logits, and the report says why."""
    from typer.testing import CliRunner
    from moeconv.cli import app
    src, out, recipe = dense_ckpt("qwen2"), tmp_path / "run", tmp_path / "recipe.yaml"
    recipe.write_text(f"steps:\n  - pass: upcycle\n    num_experts: {EXPERTS}\n    top_k: 2\n")
    r = CliRunner().invoke(app, ["run", str(recipe), "--model", str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    moe = _hf(out)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM" and moe.config.shared_expert_intermediate_size == INTER
    assert_same_function(moe, _hf(src))
    report = _report(out)
    assert "always has one" in report["shared_expert"] and report["recipe"][0]["shared_experts"] is True
    assert "shared expert: added by itself" in " ".join(r.stdout.split())


# ----------------------------------------------------------------------------- 2. moeconv format


@pytest.mark.parametrize("kind", ["gpt2", "bert", "phi3", "builtin:gpt", "builtin:llama", "builtin:bert"])
def test_moeconv_format_roundtrip(kind, dense_ckpt, tmp_path):
    from transformers import AutoModel
    if kind.startswith("builtin:"):
        src = kind
        dense = moeconv.load(kind).module
        vocab = 256
    else:
        src = dense_ckpt(kind)
        dense = moeconv.load(src).module
        vocab = VOCAB
    out = tmp_path / "moe"
    cli_ok(src, out, *BASE, "--router-init", "normal")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "moeconv"
    state = moeconv.load(out)
    blocks = moe_blocks(state.module)
    assert len(blocks) == 2
    assert all(b.num_experts == EXPERTS and b.top_k == 2 for _, b in blocks)
    assert all(b.router.weight.abs().max() > 0 for _, b in blocks)
    assert_same_function(state.module, dense, vocab=vocab)
    rep = _report(out)
    assert rep["format"] == "moeconv" and rep["verification"]["rel_max_diff"] <= EXACT
    assert rep["verification"]["dense_vs_moe_rel_max_diff"] <= EXACT
    # transformers refuses the directory loudly instead of loading something else.
    with pytest.raises(Exception):
        AutoModel.from_pretrained(out, local_files_only=True)


def test_moeconv_format_forced_on_a_hf_family(dense_ckpt, tmp_path):
    """--format moeconv on a Llama: in-memory route, moeconv.load reads it back exactly."""
    out = tmp_path / "moe"
    cli_ok(dense_ckpt("llama"), out, *BASE, "--format", "moeconv", "--router-init", "normal", "--shared-experts")
    state = moeconv.load(out)
    assert len(moe_blocks(state.module)) == 2
    assert all(b.shared_expert is not None for _, b in moe_blocks(state.module))
    assert_same_function(state.module, _hf(dense_ckpt("llama")))


# ----------------------------------------------------------------------------- 3. split via the CLI


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_split_cli_all_experts_zero_router_is_exact(kind, dense_ckpt, tmp_path):
    out = tmp_path / "split"
    extra = ["--shared-experts"] if kind == "qwen2" else []
    cli_ok(dense_ckpt(kind), out, "--num-experts", str(EXPERTS), "--top-k", str(EXPERTS), "--expert-init", "split",
           "--router-init", "zeros", *extra)
    moe = _hf(out)
    key = "intermediate_size" if kind == "llama" else "moe_intermediate_size"
    assert getattr(moe.config, key) == INTER // EXPERTS
    assert moe.config.num_experts_per_tok == EXPERTS
    assert_same_function(moe, _hf(dense_ckpt(kind)))


# ----------------------------------------------------------------------------- 5. routes agree


_MIXTRAL_TO_MOECONV = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _mixtral_name_to_module(name: str) -> str:
    """Mixtral file name → name in a Llama upcycled in memory by the `upcycle` pass."""
    m = re.fullmatch(r"(model\.layers\.\d+)\.block_sparse_moe\.(.*)", name)
    if not m:
        return name
    layer, rest = m.groups()
    if rest == "gate.weight":
        return f"{layer}.mlp.router.weight"
    e = re.fullmatch(r"experts\.(\d+)\.(w[123])\.weight", rest)
    assert e, name
    return f"{layer}.mlp.experts.{e.group(1)}.{_MIXTRAL_TO_MOECONV[e.group(2)]}.weight"


def test_streaming_equals_in_memory_pipeline(dense_ckpt, tmp_path):
    src, out = dense_ckpt("llama"), tmp_path / "stream"
    args = dict(num_experts=EXPERTS, top_k=2, expert_init="drop", drop_ratio=0.3, router_init="normal", seed=5)
    cli_ok(src, out, *BASE, "--expert-init", "drop", "--drop-ratio", "0.3", "--router-init", "normal", "--seed", "5")
    assert _report(out)["route"] == "streaming"
    streamed = safetensors_dict(out)
    state = moeconv.load(src)
    result = Pipeline([Upcycle(**args)]).run(state, Context(seed=5))
    in_memory = result.state.module.state_dict()
    mapped = {_mixtral_name_to_module(k): v for k, v in streamed.items()}
    assert set(mapped) == set(in_memory)
    different = [k for k, v in mapped.items() if not torch.equal(v, in_memory[k].to(v.dtype))]
    assert not different, different[:5]
    # drop really changed the experts (the comparison above is not copy-vs-copy)
    dense_gate = safetensors_dict(src)["model.layers.0.mlp.gate_proj.weight"]
    experts = [mapped[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(EXPERTS)]
    assert all(not torch.equal(w, dense_gate) for w in experts)
    assert not torch.equal(experts[0], experts[1])


def test_streaming_equals_in_memory_route_of_the_job(dense_ckpt, tmp_path):
    """The job's own in-memory HF route (taken for --router-init hidden) writes the same experts
    and every other tensor as the streaming route; only the routers differ by design."""
    from safetensors.torch import save_file
    src = dense_ckpt("llama")
    calib = tmp_path / "ids.safetensors"
    save_file({"ids": tokens(9, batch=4, seq=16)}, calib)
    common = [*BASE, "--expert-init", "drop", "--drop-ratio", "0.3", "--seed", "4"]
    cli_ok(src, tmp_path / "stream", *common)
    cli_ok(src, tmp_path / "mem", *common, "--router-init", "hidden", "--calib", calib)
    assert _report(tmp_path / "stream")["route"] == "streaming"
    assert _report(tmp_path / "mem")["route"] == "in-memory"
    a, b = safetensors_dict(tmp_path / "stream"), safetensors_dict(tmp_path / "mem")
    assert set(a) == set(b)
    routers = {k for k in a if k.endswith("block_sparse_moe.gate.weight")}
    assert len(routers) == 2
    for k in set(a) - routers:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for k in routers:
        assert not torch.equal(a[k], b[k])
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == \
        json.loads((tmp_path / "mem" / "config.json").read_text())


def test_pytorch_bin_source_takes_in_memory_route_and_matches_streaming(dense_ckpt, tmp_path):
    """A pytorch_model.bin source goes through the in-memory HF route; regression: _load_bin once
    left non-persistent buffers (rotary inv_freq) uninitialised, so the dense model was wrong."""
    from transformers import AutoModelForCausalLM
    st_src = dense_ckpt("llama")
    dense = AutoModelForCausalLM.from_pretrained(st_src, dtype=torch.float32)
    bin_src = tmp_path / "bin"
    dense.config.save_pretrained(bin_src)
    torch.save(dense.state_dict(), bin_src / "pytorch_model.bin")
    # The dense model itself must load right from .bin …
    assert rel_max_diff(outputs(moeconv.load(bin_src).module, tokens()), outputs(dense, tokens())) <= EXACT
    # … and both routes write the same tensors.
    common = [*BASE, "--expert-init", "drop", "--router-init", "normal"]
    cli_ok(st_src, tmp_path / "a", *common)
    cli_ok(bin_src, tmp_path / "b", *common)
    assert _report(tmp_path / "b")["route"] == "in-memory"
    a, b = safetensors_dict(tmp_path / "a"), safetensors_dict(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- 6. determinism


def _file_bytes(out: Path) -> dict[str, bytes]:
    names = [p for p in out.iterdir() if p.suffix == ".safetensors" or p.name in
             ("model.safetensors.index.json", "config.json", "recipe.json")]
    return {p.name: p.read_bytes() for p in names}


@pytest.mark.parametrize("init", ["drop", "noise"])
def test_same_seed_gives_byte_identical_files(init, dense_ckpt, tmp_path):
    src = dense_ckpt("qwen3")
    args = [*BASE, "--expert-init", init, "--router-init", "normal", "--shard-size", "60KB", "--seed", "7"]
    cli_ok(src, tmp_path / "a", *args)
    cli_ok(src, tmp_path / "b", *args)
    a, b = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert sum(n.endswith(".safetensors") for n in a) >= 2
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    # another seed really gives other numbers
    cli_ok(src, tmp_path / "c", *args[:-1], "8")
    c = _file_bytes(tmp_path / "c")
    assert any(a[n] != c.get(n) for n in a if n.endswith(".safetensors"))


def test_same_seed_byte_identical_in_memory_route(tmp_path):
    args = [*BASE, "--expert-init", "drop", "--router-init", "normal", "--seed", "3"]
    cli_ok("builtin:gpt", tmp_path / "a", *args)
    cli_ok("builtin:gpt", tmp_path / "b", *args)
    a, b = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a)


# ----------------------------------------------------------------------------- 8. layer selection


def test_every_2_on_qwen3_keeps_dense_layers(dense_ckpt, tmp_path):
    src, out = dense_ckpt("qwen3", layers=4), tmp_path / "q3"
    cli_ok(src, out, *BASE, "--layers", "every:2", "--router-init", "normal")
    moe = _hf(out)
    assert type(moe).__name__ == "Qwen3MoeForCausalLM"
    assert list(moe.config.mlp_only_layers) == [1, 3]
    kinds = [type(layer.mlp).__name__ for layer in moe.model.layers]
    assert kinds[0] == kinds[2] == "Qwen3MoeSparseMoeBlock"
    assert kinds[1] == kinds[3] == "Qwen3MoeMLP"
    assert_same_function(moe, _hf(src))
    assert _report(out)["upcycle"]["sites_converted"] == 2


def test_every_2_on_llama_refused_for_mixtral_but_fine_in_moeconv_format(dense_ckpt, tmp_path):
    src = dense_ckpt("llama", layers=4)
    r = run_cli(src, tmp_path / "mix", *BASE, "--layers", "every:2")
    assert r.exit_code == 2
    assert "dense layers" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "mix").exists() and leftovers(tmp_path) == []
    r = run_cli(src, tmp_path / "mix", *BASE, "--layers", "every:2", "--format", "hf")
    assert r.exit_code == 2 and not (tmp_path / "mix").exists() and leftovers(tmp_path) == []
    out = tmp_path / "native"
    cli_ok(src, out, *BASE, "--layers", "every:2", "--format", "moeconv", "--router-init", "normal")
    state = moeconv.load(out)
    assert [n for n, _ in moe_blocks(state.module)] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert type(state.module.model.layers[1].mlp).__name__ == "LlamaMLP"
    assert_same_function(state.module, _hf(src))


# ----------------------------------------------------------------------------- 9. output files


def test_report_recipe_and_tokenizer_files(dense_ckpt, hf_outputs):
    from transformers import AutoTokenizer
    src, out = dense_ckpt("llama"), hf_outputs("llama")
    rep = _report(out)
    assert isinstance(rep["verification"]["rel_max_diff"], float)
    assert rep["verification"]["rel_max_diff"] <= EXACT
    assert rep["verification"]["mode"] == "full"
    assert rep["output"] == str(out) and rep["source"] == str(src)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe == rep["recipe"]
    assert recipe[0]["pass"] == "upcycle"
    assert recipe[0]["num_experts"] == EXPERTS and recipe[0]["top_k"] == 2
    assert recipe[0]["router_init"] == "normal" and recipe[0]["seed"] == 0
    # every tokenizer / generation file of the source is carried over unchanged
    carried = [n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "generation_config.json") if (src / n).is_file()]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(carried)
    for name in carried:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert set(carried) <= set(rep["tokenizer_files"])
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok("w5 w6").input_ids == [5, 6]
    # nothing else left behind next to OUT
    assert leftovers(out.parent) == []


def test_report_for_in_memory_route(tmp_path):
    out = tmp_path / "g"
    cli_ok("builtin:gpt", out, *BASE)
    rep = _report(out)
    assert rep["route"] == "in-memory" and rep["consumer"] == "moeconv.load"
    assert rep["verification"]["rel_max_diff"] <= EXACT
    assert rep["tokenizer_files"] == []
    assert json.loads((out / "recipe.json").read_text())[0]["pass"] == "upcycle"


# ----------------------------------------------------------------------------- dtype


def _bf16_rounded(model):
    """The dense model with its parameters (not its fp32 rotary buffers) rounded to bf16, run in fp32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def test_bfloat16_output_streaming(dense_ckpt, tmp_path):
    out = tmp_path / "bf16"
    src = dense_ckpt("llama")
    cli_ok(src, out, *BASE, "--dtype", "bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in safetensors_dict(out).values())
    # copy init: exact against the dense model rounded to the output dtype
    assert_same_function(_hf(out), _bf16_rounded(_hf(src)))


def test_bfloat16_output_in_memory(dense_ckpt, tmp_path):
    """The in-memory route (moeconv format) casts the dense model first, then upcycles exactly."""
    out = tmp_path / "bf16"
    src = dense_ckpt("llama")
    cli_ok(src, out, *BASE, "--dtype", "bfloat16", "--format", "moeconv", "--router-init", "normal")
    tensors = safetensors_dict(out)
    assert all(t.dtype == (torch.float32 if k.endswith("router.weight") else torch.bfloat16)
               for k, t in tensors.items())
    # measured in bf16 arithmetic by the pass's check: bf16 rounding, within its dtype-scaled bound
    assert _report(out)["verification"]["dense_vs_moe_rel_max_diff"] < 2e-2
    # in fp32 arithmetic the bf16 weights compute exactly the bf16-rounded dense function
    assert_same_function(moeconv.load(out).module.float(), _bf16_rounded(_hf(src)))
