"""report.html is one self-contained page with every plot, it renders in headless Chromium, and it
shows what a reader needs: each pass's KL, top-1 agreement and perplexity beside its relative
max |Δ|, expert load before and after, sparsity per layer, the generated text, numbers formatted."""
import base64
import io
import json
import shutil
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.report_html import write_html

PLOTS = ("Expert load (before / after)", "Sparsity per layer", "Bytes per module group", "Error per pass")
GENERATIONS = {"prompt": "def add(a, b):", "texts": {"dense": "    return a + b", "moe": "    return a + b  # <sum>"}}


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """An MoE (upcycled, 2:4-sparsified) quantized to int8 with held-out text: a report with KL,
    top-1 and perplexity, expert load before and after, sparsity and bytes before and after."""
    d = tmp_path_factory.mktemp("run")
    torch.save(torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0)), d / "eval.pt")
    _cli("upcycle", "builtin:llama", d / "moe", "-e", "4", "-k", "2", "--router-init", "normal")
    _cli("sparsify", d / "moe", d / "sparse", "--method", "magnitude", "--pattern", "2:4")
    _cli("quantize", d / "sparse", d / "out", "--method", "int8", "--eval", d / "eval.pt")
    return d / "out"


def _images(page: str) -> dict[str, str]:
    """caption → PNG data of every figure on the page."""
    out = {}
    for fig in page.split("<figure>")[1:]:
        caption = fig.split("<figcaption>")[1].split("</figcaption>")[0]
        out[caption] = fig.split("src='data:image/png;base64,")[1].split("'")[0]
    return out


def _decode(png_b64: str):
    import matplotlib.image as mpimg
    return mpimg.imread(io.BytesIO(base64.b64decode(png_b64)), format="png")


def test_html_is_self_contained_with_every_plot(report_dir):
    page = (report_dir / "report.html").read_text()
    assert list(_images(page)) == list(PLOTS)
    assert page.count("src='data:image/png;base64,") == len(PLOTS)
    assert "http://" not in page and "https://" not in page  # nothing fetched at view time


def test_pass_table_has_kl_top1_and_perplexity_formatted(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    m = report["passes"][0]["metrics"]
    assert {"kl", "top1_agreement", "ppl_before", "ppl_after", "rel_max_diff"} <= set(m)
    page = (report_dir / "report.html").read_text()
    table = page.split('<table class="passes">')[1].split("</table>")[0]
    for header in ("rel. max |Δ|", "KL", "top-1", "perplexity", "time", "bytes after"):
        assert f"<th>{header}</th>" in table
    row = table.split("</tr>")[1]
    assert f"{m['top1_agreement']:.1%}" in row or "100%" in row
    assert " → " in row and "%)" in row  # perplexity before → after (+x%)
    assert "KiB" in row  # bytes, not 123456
    assert repr(m["kl"]) not in row and repr(m["ppl_after"]) not in row  # no raw floats


def test_report_records_expert_load_before_and_after(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    before, after = report["input_model"], report["model"]
    assert before["expert_load"].keys() == after["expert_load"].keys() and len(after["expert_load"]) == 2
    assert all(len(v) == 4 for v in before["expert_load"].values())
    assert all(v == 0.5 for v in before["layer_sparsity"].values())  # the 2:4 input...
    assert all(v == 0.5 for v in after["layer_sparsity"].values())   # ...stays 2:4 in int8


def test_expert_load_plot_has_both_panels(report_dir):
    img = _decode(_images((report_dir / "report.html").read_text())[PLOTS[0]])
    rgb = img[..., :3]
    coloured = (rgb.max(-1) - rgb.min(-1)) > 0.2  # heatmap cells, not white, grey or black
    left, right = coloured[:, : img.shape[1] // 2], coloured[:, img.shape[1] // 2:]
    assert left.mean() > 0.1 and right.mean() > 0.1


def test_generations_are_shown_escaped(report_dir, tmp_path):
    report = json.loads((report_dir / "report.json").read_text())
    write_html({**report, "generations": GENERATIONS}, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Generated text</h2>" in page and "def add(a, b):" in page
    assert "# &lt;sum&gt;" in page and "<sum>" not in page
    assert page.count("<tr><td>") >= len(GENERATIONS["texts"])


def screenshot(html_path, tmp_path, height: int = 2400):
    """A headless-Chromium screenshot of `html_path` as an (H, W, channels) float array, or a skip."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's package)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size=1000,{height}",
                    html_path.as_uri()], check=True, capture_output=True, timeout=120)
    import matplotlib.image as mpimg
    return mpimg.imread(shot)


def assert_not_blank(img):
    """Many distinct colours (the plots), and clearly non-white content."""
    flat = (img[..., :3] * 255).astype(int).reshape(-1, 3)
    distinct = {tuple(c) for c in flat[:: max(1, len(flat) // 200000)]}
    assert len(distinct) > 50
    assert (flat.sum(axis=1) < 600).mean() > 0.02


def _coloured_bands(img, min_share: float = 0.05) -> int:
    """How many separate vertical bands of the page hold colour (plots; text is black on white)."""
    rgb = img[..., :3]
    rows = (((rgb.max(-1) - rgb.min(-1)) > 0.2).mean(axis=1)) > min_share
    return int((rows[1:] & ~rows[:-1]).sum() + rows[0])


def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    report = json.loads((report_dir / "report.json").read_text())
    write_html({**report, "generations": GENERATIONS}, tmp_path / "report.html")
    img = screenshot(tmp_path / "report.html", tmp_path, height=3200)
    assert img.shape[0] > 1000 and img.shape[1] > 500
    assert_not_blank(img)
    assert _coloured_bands(img) >= len(PLOTS)  # every plot drawn on screen, below one another


def test_numbers_are_formatted_for_people():
    from moeconv.report_format import fmt_bytes, fmt_change, fmt_float, fmt_pct, fmt_seconds
    assert fmt_bytes(1420 * 2**20) == "1.39 GiB" and fmt_bytes(512) == "512 B" and fmt_bytes(None) == "-"
    assert fmt_seconds(1093.1382) == "18m13s" and fmt_seconds(3.456) == "3.5 s" and fmt_seconds(7322) == "2h02m"
    assert fmt_float(1093.1382) == "1,093" and fmt_float(0.012345) == "0.0123" and fmt_float(3.2e-7) == "3.2e-7"
    assert fmt_float(0.0) == "0" and fmt_pct(0.9375) == "93.8%" and fmt_pct(1.0) == "100%"
    assert fmt_change(20.07, 20.1) == "20.07 → 20.1 (+0.1%)"


def test_sparsity_plot_needs_sparsity_and_deep_models_keep_their_plots_readable():
    """Rounding's ~0.2% of zeros is no sparsity to plot; 1% is. A 32-layer model's expert-load
    title sits just above its panels (not inches away), and its layer axis is thinned."""
    from moeconv import report_plots
    layers = [f"model.layers.{i}" for i in range(32)]
    flat = {"layer_sparsity": {k: 0.002 for k in layers}}
    assert report_plots.layer_sparsity({}, flat["layer_sparsity"], {}) is None
    assert report_plots.layer_sparsity({}, {k: 0.01 for k in layers}, {}) is not None
    ticks, labels = report_plots._thinned(list(range(32)), [str(i) for i in range(32)])
    assert labels == [str(i) for i in range(0, 32, 2)] and ticks == list(range(0, 32, 2))
    load = {f"{k}.mlp": [1, 2, 3, 4, 5, 6, 7, 8] for k in layers}
    _, png = report_plots.expert_load(load, load)
    img = _decode(png.split(",", 1)[1])
    rows = [(img[r, :, :3] < 0.5).any() for r in range(img.shape[0])]  # rows holding dark ink
    first_ink, title_end = rows.index(True), None
    for r in range(first_ink, len(rows)):
        if not rows[r]:
            title_end = r
            break
    gap = rows.index(True, title_end) - title_end  # blank rows between the title and what follows
    assert gap < 0.2 * 90  # under 0.2 inch at the report's 90 dpi (was ~2 inches)
