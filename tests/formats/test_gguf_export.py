"""`moeconv export gguf`: every --type read back with the gguf package's own reader (names,
shapes, types, routers in F32, stacked experts, metadata llama.cpp reads), the tokenizer embedded,
and what llama.cpp would compute differently refused with one line and nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gguf_models import LAYERS, native, upcycled_llama, bpe_tokenizer
from moeconv.cli import app

gguf = pytest.importorskip("gguf")
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def export(src, out, *args):
    return CliRunner().invoke(app, ["export", "gguf", str(src), str(out), *map(str, args)])


def ok(src, out, *args):
    r = export(src, out, *args)
    assert r.exit_code == 0, f"exit {r.exit_code}: {r.output}\n{r.exception!r}"
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return upcycled_llama(tmp_path_factory.mktemp("gguf"))


def tensors(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("kind", TYPES)
def test_every_type_reads_back_with_names_shapes_and_types(mixtral, tmp_path, kind):
    report = ok(mixtral, tmp_path / kind, "--type", kind)
    reader, got = tensors(tmp_path / kind / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.expert_count"].contents() == 4
    assert reader.fields["llama.expert_used_count"].contents() == 2
    per_layer = {"attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm", "ffn_gate_inp",
                 "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
    want = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in per_layer}
    assert set(got) == want
    wanted = gguf.GGMLQuantizationType[kind.upper()]
    for name, t in got.items():
        if name.endswith("norm.weight") or "ffn_gate_inp" in name:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name  # norms and routers: F32 always
        else:
            assert t.tensor_type == wanted, name
    gate = got["blk.0.ffn_gate_exps.weight"]
    assert [int(d) for d in gate.shape] == [32, 64, 4]  # GGUF order: (in, out, experts)
    assert [int(d) for d in got["blk.0.ffn_down_exps.weight"].shape] == [64, 32, 4]
    assert [int(d) for d in got["blk.0.ffn_gate_inp.weight"].shape] == [32, 4]
    assert report["read_back"]["tensors"] == len(want)
    assert (tmp_path / kind / "Modelfile").read_text() == "FROM ./model.gguf\n"


def test_f32_tensors_are_the_models_own_after_llama_cpps_rotary_permutation(mixtral, tmp_path):
    """The stacked experts are the upcycled copies of the dense FFN; q/k are permuted the way
    llama.cpp's converter permutes them for the llama architecture."""
    from safetensors.torch import load_file
    ok(mixtral, tmp_path / "f32", "--type", "f32")
    _, got = tensors(tmp_path / "f32" / "model.gguf")
    dense = load_file(mixtral.parent / "llama-dense" / "model.safetensors")
    gate = np.asarray(got["blk.1.ffn_gate_exps.weight"].data)  # (experts, out, in) in numpy order
    for e in range(4):
        assert np.array_equal(gate[e], dense["model.layers.1.mlp.gate_proj.weight"].numpy())
    q = dense["model.layers.0.self_attn.q_proj.weight"]
    heads = 4
    permuted = q.reshape(heads, 2, q.shape[0] // heads // 2, q.shape[1]).swapaxes(1, 2).reshape(q.shape)
    assert np.array_equal(np.asarray(got["blk.0.attn_q.weight"].data), permuted.numpy())
    assert not torch.equal(permuted, q)


@pytest.mark.parametrize("kind", ["qwen2moe", "qwen3moe", "qwen2", "qwen3", "mistral"])
def test_other_families(tmp_path, kind):
    report = ok(native(kind, tmp_path / kind), tmp_path / "out", "--type", "q8_0")
    reader, got = tensors(tmp_path / "out" / "model.gguf")
    arch = "llama" if kind == "mistral" else kind
    assert reader.fields["general.architecture"].contents() == arch == report["architecture"]
    if kind == "qwen2moe":
        assert {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight",
                "blk.0.ffn_gate_inp_shexp.weight"} <= set(got)
        assert got["blk.0.ffn_gate_inp_shexp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        assert reader.fields["qwen2moe.expert_shared_feed_forward_length"].contents() == 48
    if kind.startswith("qwen3"):
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= set(got)
        assert reader.fields[f"{kind}.attention.key_length"].contents() == 8
    if kind.startswith("qwen2"):
        assert "blk.0.attn_q.bias" in got and got["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    if kind.endswith("moe"):
        assert reader.fields[f"{kind}.expert_feed_forward_length"].contents() == 32


def test_byte_level_bpe_tokenizer_is_embedded_with_its_merges(tmp_path):
    src = native("llama", tmp_path / "llama", vocab=300)
    bpe_tokenizer(src, 300)
    report = ok(src, tmp_path / "out")
    reader, _ = tensors(tmp_path / "out" / "model.gguf")
    assert report["tokenizer"]["kind"] == "gpt2"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 300 and "<|endoftext|>" in tokens
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 0
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokens.index("<|endoftext|>")] == 3  # CONTROL
    # this tokenizer adds neither BOS nor EOS to a text: said explicitly (llama.cpp's default may differ)
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert reader.fields["tokenizer.ggml.add_eos_token"].contents() is False


def test_a_model_without_a_tokenizer_llama_cpp_reads_says_so(mixtral, tmp_path):
    report = ok(mixtral, tmp_path / "out")
    assert report["tokenizer"]["kind"] == "none"
    assert any("token ids only" in w for w in report["warnings"])
    check = report["verification"]
    assert check["status"] in ("passed", "skipped")
    if check["status"] == "skipped":
        assert any("llama.cpp check skipped" in w for w in report["warnings"])


@pytest.mark.parametrize("case,needle", [
    ("qwen2moe-renorm", "norm_topk_prob=True"),
    ("qwen3moe-no-renorm", "norm_topk_prob=False"),
    ("gelu", "hidden_act='gelu'"),
    ("rope-linear", "rope_scaling 'linear'"),
    ("sliding-window", "sliding_window=16"),
    ("type", "--type must be one of"),
])
def test_what_llama_cpp_computes_differently_is_refused(tmp_path, case, needle):
    if case == "qwen2moe-renorm":
        src = native("qwen2moe", tmp_path / "m", norm_topk_prob=True)
    elif case == "qwen3moe-no-renorm":
        src = native("qwen3moe", tmp_path / "m", norm_topk_prob=False)
    elif case == "gelu":
        src = native("llama", tmp_path / "m", hidden_act="gelu")
    elif case == "sliding-window":
        src = native("mistral", tmp_path / "m", sliding_window=16)
    elif case == "rope-linear":
        src = native("llama", tmp_path / "m", rope_scaling={"rope_type": "linear", "factor": 2.0})
    else:
        src = native("llama", tmp_path / "m")
    r = export(src, tmp_path / "out", *(["--type", "q3_k"] if case == "type" else []))
    assert r.exit_code == 2, r.output
    flat = " ".join(r.stderr.split())
    assert flat.startswith("error: ") and flat.count("error:") == 1 and "Traceback" not in r.stderr
    assert needle in flat, flat
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "moeconv-tmp" in p.name]
