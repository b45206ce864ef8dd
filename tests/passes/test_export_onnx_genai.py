"""`moeconv export onnx --with-past` writes what onnxruntime-genai reads beside the graph
(genai_config.json from the graph's own cache shapes, config.json, generation_config.json, the
tokenizer), and onnxruntime-genai generates PyTorch's greedy tokens from OUT directly; config.json
states the graph's cache (#21's KV-head report), and a plain export carries its files too."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "formats"))
from gguf_models import native, upcycled_llama  # noqa: E402
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


def test_config_json_states_the_graphs_cache(exported):
    """#21: optimum (transformers 4.57) met "4 KV heads vs the graph's 2". The graph and config.json
    agree (2 = num_key_value_heads); a loader that sizes the first, empty cache from config.json
    runs, and one that uses num_attention_heads — optimum-onnx's fallback for model types it does
    not list as grouped-query, mixtral among them — is refused exactly as the user saw."""
    import numpy as np
    import onnxruntime as ort

    from moeconv.onnx.genai_config import cache_shape, graph_io
    _, out = exported
    cfg = json.loads((out / "config.json").read_text())
    _, outputs = graph_io(out / "model.onnx")
    layers, kv_heads, head_size = cache_shape(out / "model.onnx", outputs)
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]) == (layers, kv_heads, head_size)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert (cfg["dtype"], cfg["use_cache"]) == ("float32", True)
    assert all(outputs[f"present.{i}.{kv}"][2] == "total_sequence" for i in range(layers) for kv in ("key", "value"))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 6, 7]], dtype=np.int64)

    def feed(heads):
        past = {f"past_key_values.{i}.{kv}": np.zeros((1, heads, 0, head_size), np.float32)
                for i in range(layers) for kv in ("key", "value")}
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), **past}
    logits, *present = sess.run(None, feed(cfg["num_key_value_heads"]))
    assert logits.shape == (1, 3, 128) and present[0].shape == (1, 2, 3, head_size)
    with pytest.raises(Exception, match="index: 1 Got: 4 Expected: 2"):
        sess.run(None, feed(cfg["num_attention_heads"]))


def test_a_config_whose_head_size_or_depth_differs_from_the_graph_is_refused(exported):
    import transformers

    from moeconv.errors import VerificationError
    from moeconv.onnx.genai_config import check_config
    src, out = exported
    for field, value, what in (("head_dim", 16, "8 head size, the model's config 16"),
                               ("num_hidden_layers", 3, "2 layers, the model's config 3"),
                               ("vocab_size", 129, "logits have 128 entries")):
        config = transformers.AutoConfig.from_pretrained(src)
        setattr(config, field, value)
        with pytest.raises(VerificationError, match=what):
            check_config(out / "model.onnx", config, with_past=True)


def test_an_export_without_past_carries_config_generation_config_and_tokenizer(tmp_path):
    """The plain graph's OUT is usable on its own too: config.json saying what the graph is
    (float32 although the model is bf16, no cache), generation_config.json, the tokenizer."""
    from moeconv.io.load import load
    from moeconv.jobs.export_onnx import export_onnx_to_dir
    from passes.export_onnx import ExportOnnxConfig
    src = native("llama", tmp_path / "llama")
    tiny_tokenizer().save_pretrained(src)
    state = load(src)
    state.module.to(torch.bfloat16)
    report = export_onnx_to_dir(src, tmp_path / "onnx", ExportOnnxConfig(latency_runs=0), state=state)
    out = tmp_path / "onnx"
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert "genai_config.json" not in names
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["dtype"], cfg["use_cache"], cfg["head_dim"], cfg["model_type"]) == ("float32", False, 8, "llama")
    assert json.loads((out / "generation_config.json").read_text())["use_cache"] is False
    assert {"config.json", "generation_config.json"} <= set(report["files"])
