"""The README's main job, as a newcomer runs it: `moeconv demo OUT` on SmolLM2-135M-Instruct.

OUT/moe is a Mixtral that stock transformers loads and that generates the dense model's text;
OUT/compressed holds the five-step chain (upcycle → prune-experts → sparsify 2:4 → quantize int8 →
export ONNX) with a report that gives every step's measured effect, an ONNX graph onnxruntime
generates from, and OUT/recipe.yaml, which `moeconv plan` accepts as written.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from moeconv.demo import smollm2_gguf
    try:
        smollm2_gguf()
    except Exception as exc:  # not installed: the README's install command installs it
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("demo") / "nested" / "demo"  # parents are created, as `out/demo` in the README
    proc = subprocess.run([sys.executable, "-m", "moeconv.cli", "demo", str(out)], capture_output=True, text=True,
                          timeout=1800)
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_upcycled_mixtral_is_exact_and_generates_the_dense_text(demo):
    out, stdout = demo
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(out / "moe").model_type == "mixtral"
    report = json.loads((out / "moe" / "report.json").read_text())
    assert report["verification"]["rel_max_diff"] < 1e-5
    assert "identical greedy text" in stdout


def test_chain_report_measures_every_step(demo):
    out, stdout = demo
    report = json.loads((out / "compressed" / "report.json").read_text())
    names = [p["pass_name"] for p in report["passes"]]
    assert names == ["upcycle", "prune-experts", "sparsify", "quantize", "export-onnx"]
    for p in report["passes"]:
        assert p["metrics"], p["pass_name"]  # each step reports what it measured
    assert (out / "compressed" / "report.html").stat().st_size > 20_000  # plots embedded
    assert (out / "compressed" / "model.onnx").is_file()
    assert "compressed (onnxruntime" in stdout


def test_recipe_is_plannable(demo):
    out, _ = demo
    proc = subprocess.run([sys.executable, "-m", "moeconv.cli", "plan", str(out / "recipe.yaml"), "--calib"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
