"""Out-of-core execution (moeconv/stream/, moeconv/jobs/stream_sparsify.py): a skeleton's
materialised layers hold exactly what `moeconv.load` holds, outputs computed one layer at a time
equal the loaded model's, and the streamed magnitude sparsify writes the in-memory route's tensors
bit for bit, in a checkpoint stock transformers loads, verified layer by layer."""
import json

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import moeconv
from moeconv import Context
from moeconv.errors import UnsupportedError
from moeconv.io.safetensors_io import SourceCheckpoint
from moeconv.state import model_outputs
from moeconv.stream.compare import streamed_logits
from moeconv.stream.skeleton import Skeleton
from tests.tiny import tiny_hf

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _mixtral(path, dtype=torch.bfloat16):
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)).to(dtype).save_pretrained(path)
    return path


def _qwen2_moe(path):
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64)
    Qwen2MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "llama"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / request.param
    if request.param == "mixtral":
        return _mixtral(path)
    if request.param == "qwen2_moe":
        return _qwen2_moe(path)
    tiny_hf("llama", path)
    return path


def test_materialised_parameters_equal_the_loaded_model(checkpoint):
    skel = Skeleton.open(checkpoint)
    assert {p.device.type for p in skel.module.parameters()} == {"meta"}
    loaded = dict(moeconv.load(checkpoint).module.named_parameters())
    names = skel.names_under(skel.layer_paths()[1])
    skel.materialize(names)
    params = dict(skel.module.named_parameters())
    for n in names:
        assert params[n].dtype == loaded[n].dtype and torch.equal(params[n], loaded[n]), n
    skel.release(names)
    assert {p.device.type for p in skel.module.parameters()} == {"meta"}


def test_streamed_logits_equal_the_loaded_models(checkpoint):
    batches = [torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1)), torch.tensor([[5, 7, 1]])]
    got = streamed_logits(Skeleton.open(checkpoint), batches)
    model = moeconv.load(checkpoint).module
    for b, g in zip(batches, got):
        torch.testing.assert_close(g.float(), model_outputs(model, b).float(), rtol=0, atol=1e-5)


def test_only_plain_safetensors_checkpoints_stream(tmp_path):
    tiny_hf("llama", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(UnsupportedError, match="no safetensors"):
        Skeleton.open(tmp_path / "m")


def test_streamed_magnitude_equals_the_in_memory_route(tmp_path):
    from moeconv.jobs.pipeline_job import run_to_dir
    from moeconv.jobs.stream_sparsify import sparsify_streamed
    from passes.sparsify import Sparsify, SparsifyConfig
    src = _mixtral(tmp_path / "src")
    cfg = SparsifyConfig(method="magnitude")
    report = sparsify_streamed(src, tmp_path / "streamed", cfg)
    run_to_dir(src, tmp_path / "in-memory", [Sparsify(cfg)], ctx=Context())
    a, b = SourceCheckpoint(tmp_path / "streamed"), SourceCheckpoint(tmp_path / "in-memory")
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert a.get(n).dtype == b.get(n).dtype and torch.equal(a.get(n), b.get(n)), n
    # verified one layer at a time: the measured change is reported, and the experts are 2:4
    v = report["verification"]
    assert v["mode"].startswith("streamed") and 0 < v["max_abs_diff"] and 0 <= v["top1_agreement"] <= 1
    assert report["passes"][0]["metrics"]["target_sparsity"] == 0.5
    assert {r["sparsity"] for r in report["passes"][0]["tables"]["experts"]} == {0.5}
    # the consumer users have loads it as the same family, and its experts hold the zeros
    from moeconv.io.transformers_io import load_causal_lm
    model = load_causal_lm(tmp_path / "streamed", dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM"
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert (experts == 0).float().mean().item() == pytest.approx(0.5)
    assert json.loads((tmp_path / "streamed" / "recipe.json").read_text())[0]["method"] == "magnitude"


@pytest.mark.parametrize("kind,method", [("mixtral", "int8"), ("llama", "nf4")])
def test_streamed_quantize_equals_the_in_memory_route(kind, method, tmp_path):
    """Same format, same config.json, the same tensors bit for bit; verified layer by layer."""
    from moeconv.jobs.pipeline_job import run_to_dir
    from moeconv.jobs.stream_quantize import quantize_streamed
    from passes.quantize import Quantize, QuantizeConfig
    src = tmp_path / "src"
    _mixtral(src) if kind == "mixtral" else tiny_hf("llama", src)
    cfg = QuantizeConfig(method=method)
    report = quantize_streamed(src, tmp_path / "streamed", cfg)
    memory = run_to_dir(src, tmp_path / "in-memory", [Quantize(cfg)], ctx=Context(), reload_tolerance=None)
    assert report["written"]["format"] == memory["written"]["format"]
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == \
        json.loads((tmp_path / "in-memory" / "config.json").read_text())
    a, b = SourceCheckpoint(tmp_path / "streamed"), SourceCheckpoint(tmp_path / "in-memory")
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert a.get(n).dtype == b.get(n).dtype and torch.equal(a.get(n), b.get(n)), n
    v = report["verification"]
    assert v["mode"].startswith("streamed") and v["max_abs_diff"] > 0 and v["top1_agreement"] > 0.5
    metrics = report["passes"][0]["metrics"]
    assert metrics["modules_quantized"] == memory["passes"][0]["metrics"]["modules_quantized"]
    assert metrics["bytes_after"] == memory["passes"][0]["metrics"]["bytes_after"]
    moeconv.load(tmp_path / "streamed")  # the consumer of either format reads it


def test_the_cli_streams_what_it_can_and_says_why(tmp_path):
    """quantize and magnitude sparsify of a safetensors checkpoint take the streamed route; the
    report says which route and why; the compressed form is written from the streamed output."""
    from typer.testing import CliRunner
    from moeconv.cli import app
    src = _mixtral(tmp_path / "src")
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "q"), "--method", "int8"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["route"]["route"] == "streaming" and report["memory_plan"]["route"] == "streaming"
    assert report["written"]["route"] == "streaming" and "one layer at a time" in r.stdout.replace("\n", " ")
    # the report's per-pass error and size are the measured ones (report.html plots them)
    metrics = report["passes"][0]["metrics"]
    assert metrics["rel_max_diff"] == report["verification"]["rel_max_diff"] > 0
    assert metrics["model_bytes"] == report["written"]["bytes"]
    assert isinstance(report["passes"][0]["seconds"], float) and report["passes"][0]["seconds"] > 0
    r = CliRunner().invoke(app, ["sparsify", str(src), str(tmp_path / "s"), "--method", "magnitude", "--compressed"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["route"]["route"] == "streaming" and report["extra_outputs"]["compressed"]["compressed_tensors"] > 0
    assert isinstance(report["passes"][0]["seconds"], float) and report["passes"][0]["seconds"] > 0
    restored = moeconv.load(tmp_path / "s" / "compressed").module.state_dict()
    for name, t in moeconv.load(tmp_path / "s").module.state_dict().items():
        assert torch.equal(restored[name], t), name


def test_streamed_routes_refuse_nan_weights_and_stray_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner
    from moeconv.cli import app
    src = _mixtral(tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    name = next(n for n in sorted(tensors) if ".experts." in n and n.endswith("w2.weight"))
    bad = dict(tensors)
    bad[name] = bad[name].clone()
    bad[name][0, 0] = float("nan")
    save_file(bad, src / "model.safetensors", metadata={"format": "pt"})
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "q"), "--method", "int8"])
    assert r.exit_code == 2 and "NaN or Inf" in r.stderr and name in r.stderr and not (tmp_path / "q").exists()
    save_file({**tensors, "model.layers.0.stray.weight": torch.zeros(2, 2)}, src / "model.safetensors",
              metadata={"format": "pt"})
    r = CliRunner().invoke(app, ["sparsify", str(src), str(tmp_path / "s"), "--method", "magnitude"])
    assert r.exit_code == 2 and "stray" in r.stderr and not (tmp_path / "s").exists()
