"""Fixtures for the upcycle tests: tiny dense checkpoints saved once per session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # upcycle_helpers, whatever the import mode

from upcycle_helpers import build_dense, save_dense  # noqa: E402


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory):
    """dense_ckpt(kind, layers=2) → path of a saved tiny checkpoint (built once per session).

    Llama checkpoints carry a tokenizer too (tokenizer.json, tokenizer_config.json, …)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("dense")

    def get(kind: str, layers: int = 2) -> Path:
        key = (kind, layers)
        if key not in cache:
            path = root / f"{kind}-{layers}l"
            save_dense(build_dense(kind, layers=layers), path, tokenizer=kind == "llama")
            cache[key] = path
        return cache[key]
    return get


@pytest.fixture
def dense_model():
    """dense_model(kind, layers=2): the in-memory twin of `dense_ckpt(kind)` (same seed → same weights)."""
    return lambda kind, layers=2: build_dense(kind, layers=layers)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting slows these tests several-fold; restored afterwards for other test dirs."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
