"""Every command that writes an OUT leaves report.json and report.html in it, on each of its routes,
and the page shows the command's work in the pass table (so no command publishes an empty page).

Tiny models only: a 2-layer Llama (saved as safetensors, so the streamed routes are taken), its
4-expert Mixtral upcycle, and `builtin:llama` for the in-memory routes. `export onnx` is marked slow
(`-m slow`); the rest take seconds each."""
import json

import pytest
import torch
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.report_html import PASS_COLUMNS
from tests.tiny import VOCAB, tiny_hf

SPARSIFY_RECIPE = "steps:\n  - pass: sparsify\n    method: wanda\n"
UPCYCLE_RECIPE = "steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    tiny_hf("llama", root / "dense")
    torch.save(torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0)), root / "ids.pt")
    (root / "sparsify.yaml").write_text(SPARSIFY_RECIPE)
    (root / "upcycle.yaml").write_text(UPCYCLE_RECIPE)
    result = _invoke(["upcycle", root / "dense", root / "moe", "-e", "4", "-k", "2", "--router-init", "normal"])
    assert result.exit_code == 0, result.output
    return root


# name: (command line, the passes its table shows, the route it must take — None: only one route)
COMMANDS = {
    "upcycle, streamed": (["upcycle", "{dense}", "{out}", "-e", "4", "-k", "2", "--router-init", "normal"],
                          ["upcycle"], "streaming"),
    "upcycle, in memory": (["upcycle", "builtin:llama", "{out}", "-e", "4", "-k", "2"], ["upcycle"], "in-memory"),
    "quantize bitsandbytes, streamed": (["quantize", "{moe}", "{out}", "--method", "int8"], ["quantize"], "streaming"),
    "quantize bitsandbytes, in memory": (["quantize", "builtin:llama", "{out}", "--method", "int8"], ["quantize"],
                                         "in-memory"),
    "quantize compressed-tensors": (["quantize", "{moe}", "{out}", "--method", "w4a16", "--group-size", "32"],
                                    ["quantize"], None),
    "sparsify magnitude, streamed": (["sparsify", "{moe}", "{out}", "--method", "magnitude"], ["sparsify"],
                                     "streaming"),
    "sparsify wanda, streamed": (["sparsify", "{moe}", "{out}", "--method", "wanda", "--calib", "{ids}"],
                                 ["sparsify"], "streaming"),
    "sparsify, in memory": (["sparsify", "builtin:llama", "{out}", "--method", "magnitude", "--targets", "dense-ffn"],
                            ["sparsify"], "in-memory"),
    "prune-experts": (["prune-experts", "{moe}", "{out}", "--keep", "2", "--calib", "{ids}"], ["prune-experts"], None),
    "export onnx": (["export", "onnx", "{moe}", "{out}"], ["export-onnx"], None),
    "export gguf": (["export", "gguf", "{moe}", "{out}"], ["export-gguf"], None),  # llama.cpp's check skips itself
    "distill": (["distill", "{out}", "--teacher", "{moe}", "--student", "{moe}", "--data", "{ids}", "--steps", "1",
                 "--batch-size", "2", "--seq-len", "16"], ["distill"], None),
    "run, streamed": (["run", "{sparsify_recipe}", "--model", "{moe}", "--out", "{out}", "--calib", "{ids}"],
                      ["sparsify"], "streaming"),
    "run, in memory": (["run", "{upcycle_recipe}", "--model", "builtin:llama", "--out", "{out}"], ["upcycle"],
                       "in-memory"),
}


def _invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _route(report: dict) -> str | None:
    """The route the run took, wherever the job records it."""
    route = report.get("route")
    if isinstance(route, dict):
        return route["route"]
    return route or report.get("written", {}).get("route")


# torch.onnx.export and onnxruntime's parity runs take ~10 s even on these models
HEAVY = {"export onnx"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in COMMANDS])
def test_command_writes_report_json_and_html(name, inputs, tmp_path):
    argv, passes, route = COMMANDS[name]
    paths = {"dense": inputs / "dense", "moe": inputs / "moe", "ids": inputs / "ids.pt", "out": tmp_path / "out",
             "sparsify_recipe": inputs / "sparsify.yaml", "upcycle_recipe": inputs / "upcycle.yaml"}
    result = _invoke([a.format(**paths) for a in argv])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    page = (out / "report.html").read_text()
    if route is not None:
        assert _route(report) == route
    assert [p["pass_name"] for p in report["passes"]] == passes
    table = page.split("<table class=\"passes\">")[1].split("</table>")[0]
    header = table.split("</tr>")[0]
    assert [f"<th>{c}</th>" in header for c in ("pass", "rel. max |Δ|", "KL", "top-1", "perplexity")] == [True] * 5
    assert header.count("<th>") == len(PASS_COLUMNS)
    for p in passes:
        assert f"<td>{p}</td>" in table  # the pass's row, not only the header


def test_a_failed_check_keeps_both_reports_beside_the_failure(inputs, tmp_path):
    """A check that fails after the work (llama.cpp disagreeing beyond an impossible bound) leaves
    OUT.failed/ with report.json and report.html, and no OUT."""
    pytest.importorskip("llama_cpp")
    result = _invoke(["export", "gguf", inputs / "moe", tmp_path / "out", "--atol", "0"])
    assert result.exit_code == 2, result.output
    failed = tmp_path / "out.failed"
    assert not (tmp_path / "out").exists() and (failed / "FAILED").is_file()
    assert json.loads((failed / "report.json").read_text())["status"] == "failed"
    page = (failed / "report.html").read_text()
    assert "<td>export-gguf</td>" in page
