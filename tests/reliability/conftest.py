"""Fixtures shared by the reliability tests: one tiny dense llama (with a tokenizer, so text data is
valid for it), a calibration/training text, and that llama upcycled to a 4-expert Mixtral; each
built once per session."""
from contextlib import contextmanager
from pathlib import Path

import pytest

DATA = "\n\n".join(" ".join(f"w{(i * 7 + j * 13) % 120 + 3}" for j in range(40)) for i in range(12))


@pytest.fixture(scope="session")
def good(tmp_path_factory) -> Path:
    from tests.passes.upcycle_helpers import tiny_tokenizer
    from tests.tiny import tiny_hf
    path = tmp_path_factory.mktemp("good") / "llama"
    with one_torch_thread():
        tiny_hf("llama", path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(DATA)
    return path


@pytest.fixture(scope="session")
def moe(good, tmp_path_factory) -> Path:
    """`good` upcycled to Mixtral (4 experts, top-2) with a random router, so routing is not uniform."""
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    path = tmp_path_factory.mktemp("moe") / "mixtral"
    with one_torch_thread():
        upcycle_checkpoint(good, path, UpcycleConfig(num_experts=4, top_k=2, router_init="normal", router_std=0.5))
    return path


@pytest.fixture(scope="session")
def moe_native(good, tmp_path_factory) -> Path:
    """`good` upcycled into moeconv's own format (read by a different loader than HF MoE families)."""
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    path = tmp_path_factory.mktemp("moe-native") / "moeconv"
    with one_torch_thread():
        upcycle_checkpoint(good, path, UpcycleConfig(num_experts=4, top_k=2, router_init="normal", router_std=0.5),
                           fmt="moeconv")
    return path


@pytest.fixture(scope="session")
def quantized(moe, tmp_path_factory) -> Path:
    """`moe` quantized to nf4 by the CLI (a bitsandbytes checkpoint in moeconv's format)."""
    from typer.testing import CliRunner
    from moeconv.cli import app
    path = tmp_path_factory.mktemp("quantized") / "nf4"
    with one_torch_thread():
        result = CliRunner().invoke(app, ["quantize", str(moe), str(path), "--method", "nf4"])
    assert result.exit_code == 0, result.output
    return path


@contextmanager
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting slows them several-fold (a 2-step distill measured 12.6 s → 0.2 s). Restored
    afterwards for other test folders."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def compressed(moe, tmp_path_factory) -> Path:
    """`moe` pruned to 2:4 by magnitude; its `compressed/` form (values + bitmask, own loader)."""
    from typer.testing import CliRunner
    from moeconv.cli import app
    path = tmp_path_factory.mktemp("sparse") / "out"
    with one_torch_thread():
        result = CliRunner().invoke(app, ["sparsify", str(moe), str(path), "--method", "magnitude", "--compressed"])
    assert result.exit_code == 0, result.output
    return path / "compressed"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield
