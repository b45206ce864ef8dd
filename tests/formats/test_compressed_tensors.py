"""`moeconv quantize --method w4a16|w8a16|fp8`: compressed-tensors checkpoints that stock
transformers loads with no missing or unexpected weight and computes exactly what moeconv's
in-memory quantized model computes; routers bit-identical; the config is what compressed-tensors'
own parser accepts; 2:4 zeros survive a symmetric scheme; unsupported requests exit 2."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from gguf_models import native, upcycled_llama
from moeconv.cli import app

pytest.importorskip("compressed_tensors")


def quantize(src, out, *args):
    return CliRunner().invoke(app, ["quantize", str(src), str(out), *map(str, args)])


def ok(src, out, *args) -> dict:
    r = quantize(src, out, *args)
    assert r.exit_code == 0, f"exit {r.exit_code}: {r.output}\n{r.exception!r}"
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    return {"mixtral": upcycled_llama(root), "qwen2moe": native("qwen2moe", root / "qwen2moe", seed=2),
            "qwen3moe": native("qwen3moe", root / "qwen3moe", seed=1), "llama": native("llama", root / "llama")}


def reload(out):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "fp8"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2moe", "qwen3moe", "llama"])
def test_transformers_loads_what_moeconv_computes(models, tmp_path, kind, method):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig
    args = [] if method == "fp8" else ["--group-size", 16]
    report = ok(models[kind], tmp_path / "out", "--method", method, *args)
    model, info = reload(tmp_path / "out")  # stock transformers, independently of moeconv's own check
    assert not info["missing_keys"] and not info["unexpected_keys"]
    v = report["verification"]
    assert v["rel_max_diff"] <= 1e-5 and (v["missing"], v["unexpected"]) == (0, 0)
    e = report["error_vs_float"]
    assert 0 < e["rel_max_diff"]  # it did quantize: not the float model
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(cfg)  # compressed-tensors' own parser
    assert parsed.quant_method == "compressed-tensors" and parsed.quantization_status == "compressed"
    from transformers.utils.quantization_config import CompressedTensorsConfig
    assert ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(cfg)) is not None
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.type) == {"w4a16": (4, "int"), "w8a16": (8, "int"), "fp8": (8, "float")}[method]
    # routers: bit-identical to the source's, in float
    from safetensors.torch import load_file
    src = load_file(models[kind] / "model.safetensors")
    out = {k: v for f in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(f).items()}
    routers = [k for k in src if k.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight"))]
    assert bool(routers) == (kind != "llama")
    for k in routers:
        assert torch.equal(out[k], src[k]), k
    assert any(k.endswith("weight_packed" if method != "fp8" else "weight_scale") for k in out)
    if kind == "mixtral":  # per-expert names as save_pretrained writes them
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight_" + ("packed" if method != "fp8" else "scale") in out


def test_2_4_zeros_survive_a_symmetric_w4a16_reloaded_in_transformers(models, tmp_path):
    r = CliRunner().invoke(app, ["sparsify", str(models["mixtral"]), str(tmp_path / "sparse"), "--method", "magnitude"])
    assert r.exit_code == 0, r.output
    report = ok(tmp_path / "sparse", tmp_path / "q", "--method", "w4a16", "--group-size", 16, "--symmetric")
    assert report["zeros"]["before"] > 0 and report["zeros"]["kept"] == report["zeros"]["before"]
    model, _ = reload(tmp_path / "q")
    experts = model.model.layers[0].mlp.experts
    for w in (experts.gate_up_proj, experts.down_proj):  # (E, out, in): 2 of every 4 inputs are zero
        groups = (w.detach() != 0).reshape(w.shape[0], w.shape[1], -1, 4).sum(-1)
        assert (groups <= 2).all()


@pytest.mark.parametrize("case,needle", [
    ("group", "not a multiple of --group-size 128"),
    ("fp8-group", "--group-size does not apply"),
    ("fp8-asym", "--asymmetric does not apply"),
    ("asymmetric", "cannot load compressed-tensors' packed zero points"),
    ("bnb-option", "--double-quant is a bitsandbytes option"),
    ("quantized", "already quantized"),
    ("memory", "(--max-memory 1MB); no weight was read"),
])
def test_unsupported_requests_exit_2_and_write_nothing(models, tmp_path, case, needle):
    src = models["mixtral"]
    args = {"group": ["--method", "w4a16"], "fp8-group": ["--method", "fp8", "--group-size", 16],
            "fp8-asym": ["--method", "fp8", "--asymmetric"],
            "asymmetric": ["--method", "w4a16", "--group-size", 16, "--asymmetric"], "bnb-option": ["--method", "w8a16", "--double-quant"],
            "quantized": ["--method", "w4a16", "--group-size", 16],
            "memory": ["--method", "w4a16", "--group-size", 16, "--max-memory", "1MB"]}[case]
    if case == "quantized":
        ok(src, tmp_path / "first", "--method", "w4a16", "--group-size", 16)
        src = tmp_path / "first"
    r = quantize(src, tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    flat = " ".join(r.stderr.split())
    assert flat.startswith("error: ") and flat.count("error:") == 1 and "Traceback" not in r.stderr
    assert needle in flat, flat
    assert not (tmp_path / "out").exists()
