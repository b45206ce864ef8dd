"""`moeconv export onnx SRC OUT`: exit codes, what is left on disk, and the summary.

- success: OUT holds model.onnx, report.json (status ok), recipe.json; no temporary or failed dir;
- a parity failure: exit code 2, OUT not written, OUT.failed/ holds FAILED + report.json;
- an unsupported model (torch.export cannot trace it) or op (no ONNX translation), and a fused
  request onnxruntime cannot run exactly: exit code 2, one line naming the failing module.
"""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from typer.testing import CliRunner

from export_onnx_helpers import write_tiny_moe_file

TMP_MARK = ".moeconv-tmp-"


def run(*args):
    from moeconv.cli import app
    return CliRunner().invoke(app, ["export", "onnx", *map(str, args)])


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if TMP_MARK in p.name)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_tiny_moe_file(tmp_path_factory.mktemp("models"))


def test_cli_success_int8(model_file, tmp_path):
    out = tmp_path / "out"
    r = run(f"{model_file}:build_model", out, "--quantize", "int8")
    assert r.exit_code == 0, r.stderr + repr(r.exception)
    assert {"model.onnx", "report.json", "recipe.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    m = report["passes"][0]["metrics"]
    assert m["parity"]["ok"] and m["parity"]["cases"] >= 5
    q = m["quantization"]
    assert q["mode"] == "int8" and q["quantized_nodes"] > 0
    assert len(q["kept_float"]) == 1  # the router's MatMul
    model = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QMoE", "MatMulNBits"} <= ops  # fused experts → 8-bit QMoE, the head → 8-bit MatMulNBits
    # the router weight is still a float initializer feeding a plain MatMul
    inits = {t.name: t for t in model.graph.initializer}
    router = [n for n in inits if "moe.router.weight" in n]
    assert router and all(inits[n].data_type == onnx.TensorProto.FLOAT for n in router)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["moeconv.recipe"])[0]["quantize"] == "int8"
    assert "parity" in r.stdout and "latency" in r.stdout
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.failed").exists()


def test_cli_parity_failure_marks_output(model_file, tmp_path):
    out = tmp_path / "out"
    r = run(f"{model_file}:build_mismatch", out)
    assert r.exit_code == 2
    assert "differs from PyTorch" in r.stderr and "out.failed" in r.stderr
    lines = r.stderr.strip().splitlines()  # progress lines (a log, not a terminal), then one error line
    assert [ln for ln in lines if not ln.startswith("[")] == [lines[-1]] and lines[-1].startswith("error:")
    assert not out.exists() and leftovers(tmp_path) == []
    failed = tmp_path / "out.failed"
    assert (failed / "FAILED").is_file() and (failed / "model.onnx").is_file()
    report = json.loads((failed / "report.json").read_text())
    assert report["status"] == "failed" and not report["passes"][0]["metrics"]["parity"]["ok"]
    rows = report["passes"][0]["tables"]["parity"]
    assert all(abs(r["max_abs_diff"] - 0.01) < 1e-4 for r in rows)  # the planted 0.01, on every input
    # a later successful export removes the stale failure
    r = run(f"{model_file}:build_model", out)
    assert r.exit_code == 0 and out.is_dir() and not failed.exists()


def test_cli_untraceable_model_names_module(model_file, tmp_path):
    r = run(f"{model_file}:build_branchy", tmp_path / "out")
    assert r.exit_code == 2
    assert "gatekeeper (Gatekeeper)" in r.stderr and "torch.export" in r.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_unconvertible_op_names_module(tmp_path):
    (tmp_path / "odd.py").write_text('''
import torch
from torch import nn

@torch.library.custom_op("moeconv_test::odd", mutates_args=())
def odd(x: torch.Tensor) -> torch.Tensor:
    return x * 2

@odd.register_fake
def _(x):
    return torch.empty_like(x)

class Inner(nn.Module):
    def forward(self, x):
        return torch.ops.moeconv_test.odd(x)

class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.inner = Inner()
    def forward(self, idx):
        return self.inner(self.emb(idx))

def build_model():
    return M().eval()
''')
    r = run(f"{tmp_path / 'odd.py'}:build_model", tmp_path / "out")
    assert r.exit_code == 2
    assert "inner (Inner)" in r.stderr and "moeconv_test.odd" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_fused_refuses_inexact_block(tmp_path):
    from export_onnx_helpers import moeconv_roundtrip, upcycled
    moeconv_roundtrip(upcycled("bert"), tmp_path / "bert")
    r = run(tmp_path / "bert", tmp_path / "out", "--strategy", "fused")
    assert r.exit_code == 2
    assert "encoder.layer.0.intermediate" in r.stderr and "--strategy portable" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,msg", [(("--strategy", "magic"), "strategy"), (("--quantize", "int3"), "quantize"),
                                      (("--block-size", "48"), "power of two"), (("--opset", "12"), "opset")])
def test_cli_bad_options(model_file, tmp_path, args, msg):
    r = run(f"{model_file}:build_model", tmp_path / "out", *args)
    assert r.exit_code == 2 and msg in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_with_past_refused_for_plain_module(model_file, tmp_path):
    r = run(f"{model_file}:build_model", tmp_path / "out", "--with-past")
    assert r.exit_code == 2 and "--with-past" in r.stderr
