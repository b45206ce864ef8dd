"""report.html is one self-contained page with every plot, and it renders in headless Chromium."""
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from moeconv.cli import app

RECIPE = "steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n    router_init: normal\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    (d / "r.yaml").write_text(RECIPE)
    result = CliRunner().invoke(app, ["run", str(d / "r.yaml"), "--model", "builtin:llama", "--out", str(d / "out")])
    assert result.exit_code == 0, result.output
    return d / "out"


def test_html_is_self_contained_with_every_plot(report_dir):
    page = (report_dir / "report.html").read_text()
    for title in ("Expert load", "Expert sparsity", "Bytes per module group", "Error per pass"):
        assert f"<figcaption>{title}</figcaption>" in page
    assert page.count("src='data:image/png;base64,") == 4
    assert "http://" not in page and "https://" not in page  # nothing fetched at view time


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


def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    img = screenshot(report_dir / "report.html", tmp_path)
    assert img.shape[0] > 1000 and img.shape[1] > 500
    assert_not_blank(img)
