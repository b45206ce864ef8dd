"""The demo's chain is an ordinary recipe: it parses, its steps are int8 quantization then ONNX
export, and it plans cleanly against an MoE checkpoint without calibration data (the full demo is
the slow test tests/slow/test_demo.py; its report rendering is checked here on a made-up result)."""
import io

from rich.console import Console

from moeconv.cli.commands.recipe import DENSE_FACTS
from moeconv.demo import chain_recipe
from moeconv.demo_render import _rows, write_demo_html
from moeconv.pipeline import Pipeline
from moeconv.recipe import build_passes, load_recipe


def test_chain_recipe_plans_on_an_moe_without_calibration(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(chain_recipe())
    passes = build_passes(load_recipe(path), str(path))
    assert [p.name for p in passes] == ["quantize", "export-onnx"]
    assert passes[0].config.method == "int8"
    assert Pipeline(passes).plan(set(DENSE_FACTS) | {"moe"}).ok


def _summary():
    models = [
        {"name": "dense", "where": "x.gguf (PyTorch)", "perplexity": 20.0, "bytes": 540 * 2**20, "params": 135_000_000,
         "tokens_per_second": 30.0, "text": "len, print and <range>"},
        {"name": "moe", "where": "moe/ (PyTorch)", "perplexity": 20.0, "bytes": 1400 * 2**20, "tokens_per_second": 20.0,
         "text": "len, print and <range>"},
        {"name": "compressed", "where": "compressed/model.onnx (onnxruntime)", "perplexity": 20.5,
         "bytes": 380 * 2**20, "tokens_per_second": 40.0, "text": "len, print & zip"},
    ]
    return {"prompt": "The three", "new_tokens": 24, "models": models, "seconds": 300.0,
            "held_out": {"text": "pydoc", "sequences": 8, "tokens_per_sequence": 256},
            "outputs": {"moe": "moe/report.html", "compressed": "compressed/report.html"}}


def test_rows_are_relative_to_the_dense_model_and_human_formatted():
    rows = _rows(_summary())
    assert rows[0]["perplexity"] == "20.00" and rows[2]["perplexity"] == "20.50 (1.02×)"
    assert rows[1]["size"] == "1.37 GiB (2.59×)" and rows[2]["size"] == "380.00 MiB (0.70×)"


def test_the_page_shows_every_model_text_escaped_and_links_relatively():
    page = write_demo_html(_summary())
    for text in ("len, print and &lt;range&gt;", "len, print &amp; zip", "The three"):
        assert text in page
    assert page.count("<tr><td>") == 6  # three models in each table
    assert "href='compressed/report.html'" in page and "/work" not in page
