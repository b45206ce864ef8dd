"""`moeconv export onnx --with-past` writes what onnxruntime-genai reads beside the graph
(genai_config.json from the graph's own cache shapes, config.json, generation_config.json, the
tokenizer), and onnxruntime-genai generates PyTorch's greedy tokens from OUT directly."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))
from gguf_models import upcycled_llama  # noqa: E402
from upcycle_helpers import tiny_tokenizer  # noqa: E402

from moeconv.cli import app  # noqa: E402


def readme_snippet() -> str:
    import re
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```py\n(.*?)```", readme, re.S) if "onnxruntime_genai" in b)
    return "\n".join(line[2:] if line.startswith("  ") else line for line in block.splitlines())


def test_the_readme_generation_loop_runs_on_an_export(tmp_path, capsys):
    """The README's onnxruntime-genai snippet, as written, on a model with a byte-level BPE tokenizer."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    src = upcycled_llama(tmp_path, vocab=300, tokenizer=True)
    r = CliRunner().invoke(app, ["export", "onnx", str(src), str(tmp_path / "onnx"), "--with-past"])
    assert r.exit_code == 0, r.output
    exec(compile(readme_snippet().replace('"OUT"', repr(str(tmp_path / "onnx"))), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("Hello") and len(printed.strip()) > len("Hello")
    assert og is not None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    src = upcycled_llama(root)
    tiny_tokenizer().save_pretrained(src)
    r = CliRunner().invoke(app, ["export", "onnx", str(src), str(root / "onnx"), "--with-past"])
    assert r.exit_code == 0, r.output
    return src, root / "onnx"


def test_genai_config_describes_the_graph(exported):
    src, out = exported
    assert {"model.onnx", "genai_config.json", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "decoder" and dec["filename"] == "model.onnx"
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"], dec["num_attention_heads"]) == (
        2, 2, 8, 4)
    assert dec["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    assert cfg["search"]["past_present_share_buffer"] is False
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    report = json.loads((out / "report.json").read_text())
    assert "genai_config.json" in report["files"]


def test_a_config_that_disagrees_with_the_graph_is_refused(exported):
    import transformers

    from moeconv.errors import VerificationError
    from moeconv.onnx.genai_config import genai_config
    src, out = exported
    config = transformers.AutoConfig.from_pretrained(src)
    config.num_key_value_heads = 4  # the graph's cache has 2
    with pytest.raises(VerificationError, match="2 KV heads, the model's config 4"):
        genai_config(out / "model.onnx", config)


def test_onnxruntime_genai_generates_pytorchs_greedy_tokens(exported):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    import transformers
    src, out = exported
    model = og.Model(str(out))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    eos = json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]
    for seed in (0, 1):
        prompt = torch.randint(3, 128, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 20, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        got = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        want, seq = [], torch.tensor([prompt])
        with torch.no_grad():
            while len(want) < 20 and (not want or want[-1] != eos):
                want.append(int(torch_model(input_ids=seq).logits[0, -1].argmax()))
                seq = torch.cat([seq, torch.tensor([[want[-1]]])], dim=1)
        assert got == want
