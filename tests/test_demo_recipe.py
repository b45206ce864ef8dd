"""The demo's compression step is an ordinary `moeconv export onnx` command, and its report puts
the three models side by side (the full demo is the slow test tests/slow/test_demo.py; its
rendering is checked here on a made-up result)."""
import io

from rich.console import Console

from moeconv.demo import CHAIN, chain_command
from moeconv.demo_render import _rows, write_demo_html


def test_the_compression_step_is_the_export_command_it_prints():
    """CHAIN is the config the demo runs; chain_command is what it tells the user to run: parsed by
    the CLI, the command's options hold CHAIN's values."""
    import typer
    from moeconv.cli import app
    from passes.export_onnx import ExportOnnxConfig
    args = chain_command("OUT/moe", "OUT/compressed").split()
    assert args[:3] == ["moeconv", "export", "onnx"]
    onnx_cmd = typer.main.get_command(app).commands["export"].commands["onnx"]
    params = onnx_cmd.make_context("onnx", args[3:]).params
    cfg = ExportOnnxConfig(**CHAIN)
    for key in ("quantize", "with_past", "atol"):
        assert params[key] == getattr(cfg, key), key
    assert cfg.latency_runs == 0  # the demo times generation itself


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
    assert rows[1]["size"] == "1.37 GiB (2.59×)" and rows[2]["size"] == "380 MiB (0.70×)"


def test_the_page_shows_every_model_text_escaped_and_links_relatively():
    page = write_demo_html(_summary())
    for text in ("len, print and &lt;range&gt;", "len, print &amp; zip", "The three"):
        assert text in page
    assert page.count("<tr><td>") == 6  # three models in each table
    assert "href='compressed/report.html'" in page and "/work" not in page
