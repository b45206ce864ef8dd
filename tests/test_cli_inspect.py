"""`moeconv inspect` end to end: tiny HF checkpoints, the built-in models and FILE.py sources list
the right FFN sites (kind, dimensions, paths); a model with no FFN exits 2 with one line on stderr."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeconv.cli import app
from tests.tiny import HIDDEN, INTERMEDIATE, LAYERS, TINY_KINDS, expected_sites, tiny_hf

REPO = Path(__file__).resolve().parents[1]
ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel", "phi3": "Phi3ForCausalLM"}

NO_FFN_PY = "from torch import nn\n\ndef build_model():\n    return nn.Sequential(nn.Embedding(10, 4))\n"
ATTENTION_ONLY_PY = '''
import torch
from torch import nn


class AttentionOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, ids):
        x = self.emb(ids)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1)
        return x + self.o(a @ self.v(x))


def build_model():
    return AttentionOnly()
'''


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def inspect_json(source: str) -> dict:
    r = invoke("inspect", source, "--json")
    assert r.exit_code == 0, (r.exit_code, r.stderr, r.exception)
    return json.loads(r.stdout)


def _check_sites(info: dict, expected: list[dict], hidden: int, intermediate: int) -> None:
    sites = info["ffn_sites"]
    assert [dict(path=s["path"], kind=s["kind"], up=s["up"], gate=s["gate"], down=s["down"]) for s in sites] == expected
    for s in sites:
        assert (s["hidden_size"], s["intermediate_size"], s["output_size"]) == (hidden, intermediate, hidden), s
    assert info["moe_layers"] == []
    assert "dense-ffn" in info["facts"] and "moe" not in info["facts"]


# ----------------------------------------------------------------------------- HF checkpoints


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (tiny_hf(kind, root / kind), root / kind) for kind in TINY_KINDS}


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_inspect_hf_checkpoint(hf_dirs, kind):
    model, path = hf_dirs[kind]
    info = inspect_json(str(path))
    assert info["architecture"] == ARCH[kind]
    assert info["model_type"] == kind
    assert info["source"] == "hf"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["dtypes"] == {"float32": len(list(model.parameters()))}
    _check_sites(info, expected_sites(kind), HIDDEN, INTERMEDIATE)
    assert len(info["ffn_sites"]) == LAYERS  # one site per layer


def test_inspect_hf_bias_and_activation(hf_dirs):
    by_kind = {k: inspect_json(str(p))["ffn_sites"][0] for k, (_, p) in hf_dirs.items() if k in ("gpt2", "bert", "llama")}
    assert by_kind["gpt2"]["bias"] is True and by_kind["bert"]["bias"] is True
    assert by_kind["llama"]["bias"] is False
    assert by_kind["bert"]["act_path"] == "encoder.layer.0.intermediate.intermediate_act_fn"


def test_inspect_hf_more_layers(tmp_path):
    tiny_hf("mistral", tmp_path, num_hidden_layers=3, hidden_size=48, intermediate_size=80)
    info = inspect_json(str(tmp_path))
    _check_sites(info, expected_sites("mistral", 3), 48, 80)


# ----------------------------------------------------------------------------- built-in models / FILE.py

BUILTIN = {
    "gpt": dict(kind="plain", path="h.{i}.mlp", up="h.{i}.mlp.c_fc", gate=None, down="h.{i}.mlp.c_proj",
                hidden=64, intermediate=256, arch="GPT"),
    "llama": dict(kind="gated", path="layers.{i}.feed_forward", up="layers.{i}.feed_forward.up_proj",
                  gate="layers.{i}.feed_forward.gate_proj", down="layers.{i}.feed_forward.down_proj",
                  hidden=64, intermediate=172, arch="Llama"),
    "bert": dict(kind="split", path="layers.{i}.intermediate", up="layers.{i}.intermediate.dense", gate=None,
                 down="layers.{i}.output.dense", hidden=64, intermediate=128, arch="Bert"),
}


def _builtin_expected(name: str) -> list[dict]:
    e = BUILTIN[name]
    return [{k: (e[k].format(i=i) if e[k] is not None else None) for k in ("path", "kind", "up", "gate", "down")}
            for i in range(2)]


@pytest.mark.parametrize("name", list(BUILTIN))
def test_inspect_builtin(name):
    info = inspect_json(f"builtin:{name}")
    e = BUILTIN[name]
    assert info["architecture"] == e["arch"] and info["source"] == "builtin" and info["model_type"] is None
    _check_sites(info, _builtin_expected(name), e["hidden"], e["intermediate"])


@pytest.mark.parametrize("name", list(BUILTIN))
def test_inspect_models_file_relative_path(name, monkeypatch):
    monkeypatch.chdir(REPO)
    info = inspect_json(f"models/{name}.py")
    assert info["source"] == "module"
    e = BUILTIN[name]
    _check_sites(info, _builtin_expected(name), e["hidden"], e["intermediate"])


def test_inspect_models_file_absolute_path_with_factory():
    info = inspect_json(f"{REPO / 'models' / 'gpt.py'}:build_model")
    _check_sites(info, _builtin_expected("gpt"), 64, 256)


def test_inspect_user_file_with_factory_and_odd_names(tmp_path):
    f = tmp_path / "odd.py"
    f.write_text(
        "import torch.nn.functional as F\nfrom torch import nn\n\n"
        "class A(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b, self.c = nn.Linear(8, 24), nn.Linear(8, 24), nn.Linear(24, 8)\n"
        "    def forward(self, x):\n"
        "        return self.c(F.silu(self.a(x)) * self.b(x))\n\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(8, 8), A(), A())\n")
    info = inspect_json(f"{f}:make")
    assert [(s["path"], s["kind"], s["gate"], s["up"], s["down"], s["intermediate_size"]) for s in info["ffn_sites"]] == [
        ("1", "gated", "1.a", "1.b", "1.c", 24), ("2", "gated", "2.a", "2.b", "2.c", 24)]


def test_inspect_text_output():
    r = invoke("inspect", "builtin:gpt")
    assert r.exit_code == 0, r.stderr
    assert "GPT" in r.stdout and "2 FFN sites" in r.stdout
    for needle in ("h.0.mlp", "h.1.mlp", "plain", "256"):
        assert needle in r.stdout
    assert r.stderr == ""


# ----------------------------------------------------------------------------- errors: exit 2, one line


@pytest.fixture
def no_ffn_files(tmp_path):
    (tmp_path / "embedding_only.py").write_text(NO_FFN_PY)
    (tmp_path / "attention_only.py").write_text(ATTENTION_ONLY_PY)
    return tmp_path


@pytest.mark.parametrize("fname,arch", [("embedding_only.py", "Sequential"), ("attention_only.py", "AttentionOnly")])
def test_inspect_no_ffn_exits_2(no_ffn_files, fname, arch):
    r = invoke("inspect", str(no_ffn_files / fname))
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.startswith("error: ")
    assert "no FFN" in r.stderr and arch in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("error:") == 1


def test_inspect_no_ffn_json_exits_2(no_ffn_files):
    r = invoke("inspect", str(no_ffn_files / "embedding_only.py"), "--json")
    assert r.exit_code == 2 and r.stdout == ""


def test_inspect_short_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "noconfig").mkdir()
    for source, needle in (("nope", "no such file"), ("noconfig", "config.json"), ("builtin:xyz", "xyz")):
        r = invoke("inspect", source)
        assert r.exit_code == 2, source
        assert r.stderr.startswith("error: ") and needle in r.stderr
        assert "Traceback" not in r.stderr
        if len(r.stderr) < 70:  # longer ones wrap: see test_binary_no_ffn_reason_is_one_line
            assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, repr(r.stderr)


def test_inspect_verbose_shows_traceback():
    r = invoke("-v", "inspect", "builtin:xyz")
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and "error: " in r.stderr


def _moeconv_binary() -> list[str]:
    exe = shutil.which("moeconv")
    return [exe] if exe else [sys.executable, "-m", "moeconv.cli"]


def _run_binary(*args: str, cwd: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["COLUMNS"] = "80"  # a terminal's usual width; stderr is a pipe here anyway
    return subprocess.run(_moeconv_binary() + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_binary_no_ffn_exit_code_and_no_traceback(no_ffn_files):
    p = _run_binary("inspect", "embedding_only.py", cwd=no_ffn_files)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert p.stderr.startswith("error: embedding_only.py: no FFN")
    assert "Traceback" not in p.stderr


def test_binary_no_ffn_reason_is_one_line(no_ffn_files):
    p = _run_binary("inspect", str(no_ffn_files / "attention_only.py"), cwd=no_ffn_files)
    assert p.returncode == 2
    lines = p.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "no FFN" in lines[0] and "split patterns" in lines[0]
