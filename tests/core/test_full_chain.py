"""The whole chain as users meet it (issue 9): upcycle 8×top-2 → prune-experts keep 6 → sparsify
2:4 (wanda) → quantize int8 → export onnx, on a tiny Llama, from the CLI and from Python.

Both runs must leave byte-identical files (checkpoint, model.onnx, config, recipe; report.json
equal once timings are removed), the ONNX file must hold the bitsandbytes int8 weights as int8
(DequantizeLinear, routers in float), and report.html must render in headless Chromium with
every plot present.
"""
import base64
import io
import json

import pytest
import torch
from typer.testing import CliRunner

from moeconv import Context, Pipeline
from moeconv.cli import app
from moeconv.data import calibration_tokens
from moeconv.jobs.pipeline_job import run_to_dir
from passes import ExportOnnx, PruneExperts, Quantize, Sparsify, Upcycle
from tests.core.test_report_html import assert_not_blank, screenshot
from tests.tiny import tiny_hf

RECIPE = """\
steps:
  - pass: upcycle
    num_experts: 8
    top_k: 2
    router_init: normal
  - pass: prune-experts
    keep: 6
  - pass: sparsify
    pattern: "2:4"
    method: wanda
  - pass: quantize
    method: int8
  - pass: export-onnx
    latency_runs: 0
"""
PASSES = ("upcycle", "prune-experts", "sparsify", "quantize", "export-onnx")
TIMING_KEYS = {"seconds", "step_seconds", "export_seconds", "latency", "output"}  # and every `*_s`


def python_passes():
    """The recipe above, written with the Python API."""
    return [Upcycle(num_experts=8, top_k=2, router_init="normal"), PruneExperts(keep=6),
            Sparsify(pattern="2:4", method="wanda"), Quantize(method="int8"), ExportOnnx(latency_runs=0)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only contend on a busy machine
    try:
        d = tmp_path_factory.mktemp("chain")
        src = d / "llama"
        tiny_hf("llama", src)
        torch.save(torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(5)), d / "calib.pt")
        (d / "recipe.yaml").write_text(RECIPE)
        result = CliRunner().invoke(app, ["run", str(d / "recipe.yaml"), "--model", str(src), "--out", str(d / "cli"),
                                          "--calib", str(d / "calib.pt")])
        assert result.exit_code == 0, result.output
        ctx = Context(calibration=calibration_tokens(d / "calib.pt", str(src)), seed=0)
        report = run_to_dir(str(src), d / "py", python_passes(), ctx=ctx)
        return d, report
    finally:
        torch.set_num_threads(before)


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS and not k.endswith("_s")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_cli_and_python_write_identical_files(runs):
    d, _ = runs
    cli, py = d / "cli", d / "py"
    names = sorted(p.name for p in cli.iterdir())
    assert names == sorted(p.name for p in py.iterdir())
    assert {"model.safetensors", "model.onnx", "config.json", "recipe.json", "report.json", "report.html"} <= set(names)
    # the float graph was written with external data for the int8 rewrite; none of it is left over
    assert not any(n.endswith(".data") for n in names), names
    for name in names:
        if name.startswith("report."):
            continue
        assert (cli / name).read_bytes() == (py / name).read_bytes(), f"{name} differs between CLI and Python"
    rc, rp = (json.loads((p / "report.json").read_text()) for p in (cli, py))
    # the CLI plans memory before it starts (a Python caller may call moeconv.memory_plan itself)
    assert rc.pop("memory_plan")["route"] == "in-memory" and "memory_plan" not in rp
    assert rc.pop("route")["route"] == "in-memory" and "route" not in rp  # upcycle works on the whole model
    assert _without_timings(rc) == _without_timings(rp)


def test_onnx_carries_the_int8_weights_and_runs(runs):
    import onnx
    d, report = runs
    q, export = report["passes"][3], report["passes"][4]
    carried = export["metrics"]["int8_weights"]
    # every layer bitsandbytes quantized is int8 in the ONNX file, none left as float
    assert carried["int8_layers"] == q["metrics"]["modules_quantized"] == carried["int8_layers_carried"] > 0
    assert carried["layers_not_found"] == []
    model = onnx.load(str(d / "py" / "model.onnx"))
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == carried["initializers_rewritten"]
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == len(int8)
    assert carried["int8_bytes"] < carried["float_bytes_replaced"] / 3.5  # 4 → 1 byte per weight (+ row scales)
    assert carried["bytes"] < carried["dequantized_float_bytes"]
    # routers stay float: their weights are float initializers
    assert not any("router" in i.name for i in int8)
    # the promise: onnxruntime == the same weights in float arithmetic; bitsandbytes' own distance measured
    assert export["metrics"]["parity"]["ok"] and export["metrics"]["parity"]["max_abs_diff"] < 1e-4
    vs_bnb = carried["vs_bitsandbytes"]["max_abs_diff"]
    assert 0 < vs_bnb < 0.1 and carried["vs_bitsandbytes"]["min_top1_agreement"] > 0.5


def test_report_shows_every_step(runs):
    d, report = runs
    assert [p["pass_name"] for p in report["passes"]] == list(PASSES)
    for p in report["passes"]:  # each step's error against the step before (export: ONNX vs PyTorch) and bytes
        assert p["metrics"]["rel_max_diff"] is not None and p["metrics"]["model_bytes"] > 0
    assert report["passes"][4]["metrics"]["rel_max_diff"] < 1e-4
    assert report["passes"][3]["metrics"]["bytes_after"] < report["passes"][3]["metrics"]["bytes_before"]
    assert report["passes"][4]["metrics"]["bytes"] == (d / "py" / "model.onnx").stat().st_size
    assert report["onnx_files"] == ["model.onnx"]
    # 2:4 inside the experts survives int8 quantization, and the report still sees it
    assert all(f >= 0.5 for fr in report["model"]["expert_sparsity"].values() for f in fr)
    page = (d / "py" / "report.html").read_text()
    for name in PASSES:
        assert f"<td>{name}</td>" in page
    assert "<th>bytes after</th>" in page and "(model.onnx)</td>" in page


def test_report_html_renders_with_every_plot(runs, tmp_path):
    import matplotlib.image as mpimg
    d, _ = runs
    page = (d / "cli" / "report.html").read_text()
    titles = ("Expert load (before / after)", "Sparsity per layer", "Bytes per module group", "Error per pass")
    for title in titles:
        assert f"<figcaption>{title}</figcaption>" in page
    plots = page.split("src='data:image/png;base64,")[1:]
    assert len(plots) == len(titles)
    for p in plots:  # each embedded plot decodes and is not blank
        assert_not_blank(mpimg.imread(io.BytesIO(base64.b64decode(p.split("'", 1)[0])), format="png"))
    img = screenshot(d / "cli" / "report.html", tmp_path, height=3200)
    import matplotlib.image
    matplotlib.image.imsave(d / "screenshot.png", img)  # kept with the run for a person to look at
    assert img.shape[0] > 1000 and img.shape[1] > 500
    assert_not_blank(img)
    # the plots are in the rendered page, not below it: the lower half has content too
    assert_not_blank(img[img.shape[0] // 3:])


def test_plan_accepts_int8_then_export_and_refuses_4bit_with_the_fix():
    dense = {"dense-ffn", "float-weights", "hf-config"}
    assert Pipeline([Quantize(method="int8"), ExportOnnx()]).plan(dense).ok
    plan = Pipeline([Quantize(method="nf4"), ExportOnnx()]).plan(dense)
    assert len(plan.problems) == 1 and "--quantize int4" in plan.problems[0]
    plan = Pipeline([Quantize(method="int8"), ExportOnnx(quantize="int8")]).plan(dense)
    assert len(plan.problems) == 1 and "twice" in plan.problems[0]
    assert Pipeline([ExportOnnx(quantize="int8"), Quantize(method="int8")]).plan(dense).ok


def test_cli_refuses_4bit_before_export_and_a_second_quantization(runs):
    d, _ = runs
    nf4 = d / "nf4.yaml"
    nf4.write_text(RECIPE.replace("method: int8", "method: nf4"))
    result = CliRunner().invoke(app, ["plan", str(nf4), "--calib"])
    assert result.exit_code == 2 and "--quantize int4" in " ".join(result.output.split())
    # the chain's own output is an int8 checkpoint: exporting it again with --quantize is refused
    result = CliRunner().invoke(app, ["export", "onnx", str(d / "cli"), str(d / "again"), "--quantize", "int8"])
    assert result.exit_code == 2 and "twice" in " ".join(result.output.split())
    assert not (d / "again").exists()
