"""A model whose head is tied to its embeddings (SmolLM2, most small Llamas) streamed one layer at a
time computes what transformers computes: the tied head gets the embeddings' tensor when the
outer part is read, and goes back to `meta` with it (it used to keep an uninitialised tensor,
which made the streamed quantize check report noise, zeros or NaN)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))
from gguf_models import native  # noqa: E402


def test_streamed_logits_of_a_tied_head_equal_transformers(tmp_path):
    import transformers

    from moeconv.stream.compare import streamed_logits
    from moeconv.stream.skeleton import Skeleton
    src = native("llama", tmp_path / "tied", tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    skel = Skeleton.open(src)
    got = streamed_logits(skel, [ids])[0]
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
    head = skel.module.get_output_embeddings().weight
    assert head.device.type == "meta" and head is skel.module.get_input_embeddings().weight  # released together


def test_streamed_quantize_of_a_tied_model_measures_real_logits(tmp_path):
    import json

    from typer.testing import CliRunner

    from moeconv.cli import app
    src = native("llama", tmp_path / "tied", tie_word_embeddings=True)
    r = CliRunner().invoke(app, ["quantize", str(src), str(tmp_path / "q"), "--method", "int8"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "q" / "report.json").read_text())["passes"][0]["metrics"]
    assert m["logits_scale"] > 1 and 0 < m["kl"] < 1  # measured on real logits, not on noise or zeros
