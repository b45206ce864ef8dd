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
    return {"mixtral": upcycled_llama(root), "native-mixtral": native("mixtral", root / "native-mixtral", seed=3),
            "qwen2moe": native("qwen2moe", root / "qwen2moe", seed=2),
            "qwen3moe": native("qwen3moe", root / "qwen3moe", seed=1), "llama": native("llama", root / "llama")}


def reload(out):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)


@pytest.mark.parametrize("method", ["w4a16", "w8a16", "fp8"])
@pytest.mark.parametrize("kind", ["mixtral", "native-mixtral", "qwen2moe", "qwen3moe", "llama"])
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
    if kind.endswith("mixtral"):  # per-expert names as save_pretrained writes them
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


# ---- GPTQ -------------------------------------------------------------------------------------------

def test_gptq_halves_the_output_error_of_rounding_and_stays_on_its_grid():
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from moeconv.formats.compressed_tensors_io import _qparams, weight_args
    from moeconv.gptq import gptq
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.3  # correlated inputs
    args = weight_args("w4a16", 32, None)
    q, scale, zp = gptq(w, x.t() @ x, args)
    rtn = fake_quantize(w, *_qparams(w, args), args)

    def err(a):
        return float(((a - w) @ x.t()).square().sum())
    assert err(q) < 0.6 * err(rtn)  # measured 0.48
    assert torch.equal(fake_quantize(q, scale, zp, args), q)  # compressing it loses nothing more
    assert scale.shape == (64, 256 // 32)
    # a 2:4 pattern survives the error spreading
    mask = torch.zeros(64, 256, dtype=torch.bool)
    mask[:, 0::4] = mask[:, 1::4] = True
    q24, _, _ = gptq(w.masked_fill(mask, 0), x.t() @ x, args)
    assert torch.equal(q24 == 0, mask | (q24 == 0)) and not q24[mask].any()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    import random
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(" ".join(f"w{rng.randrange(3, 120)}" for _ in range(rng.randrange(30, 80)))
                                for _ in range(60)))
    return path


@pytest.fixture(scope="module")
def mixtral_tok(models, tmp_path_factory):
    import shutil

    from upcycle_helpers import tiny_tokenizer
    path = tmp_path_factory.mktemp("tok") / "mixtral"
    shutil.copytree(models["mixtral"], path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["native-mixtral", "qwen2moe", "qwen3moe", "llama"])
def test_gptq_outputs_of_every_family_load_in_transformers(models, calib, tmp_path, kind):
    import shutil

    from upcycle_helpers import tiny_tokenizer
    src = tmp_path / "src"
    shutil.copytree(models[kind], src)
    tiny_tokenizer().save_pretrained(src)
    report = ok(src, tmp_path / "out", "--method", "w4a16", "--group-size", 16, "--algorithm", "gptq",
                "--calib", calib, "--calib-seq-len", 32)
    _, info = reload(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert report["verification"]["rel_max_diff"] <= 1e-5 and report["error_vs_float"]["rel_max_diff"] > 0


def test_gptq_output_reloads_exactly_and_names_experts_it_calibrated_on_their_block(mixtral_tok, calib, tmp_path,
                                                                                   monkeypatch):
    report = ok(mixtral_tok, tmp_path / "gptq", "--method", "w4a16", "--group-size", 16, "--algorithm", "gptq",
                "--calib", calib, "--calib-seq-len", 32)
    assert report["algorithm"] == "gptq" and report["verification"]["rel_max_diff"] <= 1e-5
    assert report["gptq"]["calibration_tokens"] > 0 and report["gptq"]["fallback"] == []
    import moeconv.gptq
    monkeypatch.setattr(moeconv.gptq, "MIN_TOKENS", 10**9)  # no expert has enough: all on their block's inputs
    report = ok(mixtral_tok, tmp_path / "fallback", "--method", "w4a16", "--group-size", 16, "--algorithm", "gptq",
                "--calib", calib, "--calib-seq-len", 32)
    fallback = report["gptq"]["fallback"]
    assert len(fallback) == 2 * 4 * 3  # 2 layers × 4 experts × gate/up/down, every one of them still quantized
    assert any("calibrated on their MoE block's inputs" in w for w in report["warnings"])
    assert report["quantized_modules"] == 2 * (4 + 4 * 3)


@pytest.mark.parametrize("args,needle", [
    (["--algorithm", "gptq"], "needs calibration text: --calib FILE"),
    (["--calib", "CALIB"], "--calib is read by --algorithm gptq only"),
    (["--algorithm", "obq", "--calib", "CALIB"], "--algorithm must be rtn or gptq"),
])
def test_gptq_requests_refused(models, calib, tmp_path, args, needle):
    args = [str(calib) if a == "CALIB" else a for a in args]
    r = quantize(models["mixtral"], tmp_path / "out", "--method", "w4a16", "--group-size", 16, *args)
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.stderr.split()) and not (tmp_path / "out").exists()


def test_fp8_without_a_float8_dtype_is_refused(models, tmp_path, monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")  # a torch build without float8
    r = quantize(models["mixtral"], tmp_path / "out", "--method", "fp8")
    assert r.exit_code == 2 and "no float8_e4m3fn dtype" in " ".join(r.stderr.split())
    assert not (tmp_path / "out").exists()
