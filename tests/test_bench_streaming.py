"""Smoke test of scripts/bench_streaming.py (issue #16) and its synthetic Mixtral writer: a tiny
checkpoint loads with no missing/unexpected keys and the expected experts, the floor child is
measured (wall and peak RSS > 0, every tensor copied bit for bit), failures are reported as one
line, and the targets are judged from the measurements. ~15 s: one child process that imports
transformers."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_streaming as bench  # noqa: E402
from synthetic_checkpoint import MixtralShape, tensor_specs, write_checkpoint  # noqa: E402

SHAPE = MixtralShape(layers=2, hidden=64, intermediate=128, experts=4, top_k=2, heads=4, kv_heads=2, vocab=512)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "mixtral"
    info = write_checkpoint(path, SHAPE, shard_size="150KB", seed=0)
    assert info["shards"] > 1  # sharded, as the benchmark's checkpoints are
    return path


def test_synthetic_mixtral_has_mixtral_names_and_loads(tiny_mixtral):
    from transformers import AutoModelForCausalLM
    import moeconv
    from moeconv.state import native_moe_shape

    index = json.loads((tiny_mixtral / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(index) == [n for n, _ in tensor_specs(SHAPE)]
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index
    config = json.loads((tiny_mixtral / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4

    model, info = AutoModelForCausalLM.from_pretrained(tiny_mixtral, output_loading_info=True,
                                                       trust_remote_code=False, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.bfloat16
    assert torch.all(model.model.norm.weight == 1)
    std = model.lm_head.weight.float().std().item()
    assert 0.015 < std < 0.025, std

    state = moeconv.load(tiny_mixtral)
    blocks = state.moe_blocks()
    assert len(blocks) == SHAPE.layers
    assert all(native_moe_shape(b) == (SHAPE.experts, SHAPE.top_k) for _, b in blocks)


def test_tokenizer_covers_text(tiny_mixtral):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_mixtral, local_files_only=True, trust_remote_code=False)
    text = "def f(x):\n    return x ** 2  # héllo"
    ids = tok(text).input_ids
    assert max(ids) < SHAPE.vocab and tok.unk_token_id not in ids and len(set(ids)) > 10
    assert tok.decode(ids) == text


def test_floor_is_measured_and_copies_every_tensor(tiny_mixtral, tmp_path):
    from safetensors import safe_open
    out = tmp_path / "floor"
    m = bench.run_child_helper("floor", [str(tiny_mixtral), str(out), "150KB"], 300, tmp_path / "logs")
    assert m.ok, m.error
    assert m.wall_s > 0 and m.max_rss_kib > 0 and m.cpu_s > 0
    src = json.loads((tiny_mixtral / "model.safetensors.index.json").read_text())["weight_map"]
    dst = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(dst) == set(src) and len(set(dst.values())) > 1
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    with safe_open(str(tiny_mixtral / src[name]), "pt") as a, safe_open(str(out / dst[name]), "pt") as b:
        assert torch.equal(a.get_tensor(name), b.get_tensor(name))


def test_the_int8_floor_quantizes_what_the_command_quantizes_as_bitsandbytes_does(tiny_mixtral, tmp_path):
    """floor-int8 writes bitsandbytes' int8 rows and scales for every attention and expert matrix
    (the same rows moeconv's quantize stores), and copies the rest."""
    from safetensors import safe_open

    from moeconv.nn.quantized import QuantSpec, quantize_linear, serialized
    out = tmp_path / "floor-int8"
    m = bench.run_child_helper("floor_int8", [str(tiny_mixtral), str(out), "150KB"], 300, tmp_path / "logs")
    assert m.ok, m.error
    dst = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    src = json.loads((tiny_mixtral / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    with safe_open(str(tiny_mixtral / src[name]), "pt") as f:
        weight = f.get_tensor(name)
    with safe_open(str(out / dst[name]), "pt") as f:
        rows, scales = f.get_tensor(name), f.get_tensor(name.replace(".weight", ".SCB"))
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    stored = serialized(quantize_linear(linear, QuantSpec(method="int8")))
    assert rows.dtype == torch.int8 and torch.equal(rows, stored["weight"]) and torch.equal(scales, stored["SCB"])
    kept = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.block_sparse_moe.gate.weight"]
    with safe_open(str(out / dst[kept[0]]), "pt") as f:
        assert f.get_tensor(kept[0]).dtype == torch.bfloat16
    assert all(not n.endswith(".SCB") or n[:-4] + ".weight" in src for n in dst) and all(k in dst for k in kept)


def test_rss_is_the_childs_own_not_the_parents():
    # This process holds torch and transformers (hundreds of MiB); a bare `python -c pass` child
    # measured through the runner must not inherit that high-water mark.
    m = bench.measure([sys.executable, "-c", "pass"], timeout=60)
    assert m.ok and 0 < m.max_rss_kib < 100 * 1024, m


def test_failure_is_one_line_not_a_crash(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.stderr.write('noise\\nerror: refused: needs 9 GiB,\\n  4 GiB free\\n')\n"
                      "sys.exit(2)\n")
    m = bench.measure([sys.executable, str(script)], timeout=60)
    assert m.rc == 2 and not m.ok
    assert m.error == "error: refused: needs 9 GiB, 4 GiB free"
    slow = bench.measure([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
    assert slow.timed_out and not slow.ok and "timed out" in slow.error


def _m(rss_mib: float, wall: float, rc: int = 0) -> bench.Measurement:
    return bench.Measurement([], rc, wall, int(rss_mib * 1024), wall, error=None if rc == 0 else "boom")


def test_targets_are_judged_from_the_measurements():
    results = {4: {"floor": _m(400, 5), "quantize-int8": _m(1000, 10), "sparsify-wanda": _m(1000, 20),
                   "prune-experts": _m(900, 10)},
               32: {"floor": _m(400, 20), "quantize-int8": _m(1200, 50), "sparsify-wanda": _m(2000, 250),
                    "prune-experts": _m(900, 10, rc=2)}}
    s = bench.summarize(results, 4, 32, wall_target=10.0)
    assert s["quantize-int8"]["rss_met"] is True and s["quantize-int8"]["wall_met"] is True
    assert s["quantize-int8"]["floor_ratio"] == pytest.approx(2.5) and s["quantize-int8"]["floor_met"] is True
    assert s["sparsify-wanda"]["rss_ratio"] == pytest.approx(2.0) and s["sparsify-wanda"]["rss_met"] is False
    assert s["sparsify-wanda"]["wall_met"] is False and "floor_met" not in s["sparsify-wanda"]
    assert s["prune-experts"]["rss_ratio"] is None and s["prune-experts"]["rss_met"] is None
    table = bench.format_table(results, s, 4, 32)
    assert "NOT MET" in table and "FAILED L32 prune-experts: boom" in table


def test_parse_size_matches_moeconv():
    from moeconv.units import parse_size
    for text in ("256MB", "5GB", "2GiB", "1000", "150KB", "1.5GB"):
        assert bench.parse_size(text) == parse_size(text)


def test_repeated_runs_are_judged_by_their_medians():
    """Each figure is its own median over the runs; a failed run fails the command; every run's
    peak RSS is listed under the table."""
    runs = [_m(1000, 12), _m(1400, 10), _m(1100, 30)]
    m = bench.median_run(runs)
    assert (m.max_rss_kib, m.wall_s) == (1100 * 1024, 12) and len(m.runs) == 3
    assert bench.median_run([_m(1000, 1), _m(1000, 1, rc=2)]).rc == 2
    assert bench.median_run([_m(900, 3)]).runs is None
    results = {4: {"floor": _m(400, 5), "sparsify-wanda": m}, 32: {"floor": _m(400, 20),
                                                                   "sparsify-wanda": bench.median_run(runs)}}
    table = bench.format_table(results, bench.summarize(results, 4, 32, wall_target=10.0), 4, 32)
    assert "L32  sparsify-wanda      1000, 1400, 1100" in table
