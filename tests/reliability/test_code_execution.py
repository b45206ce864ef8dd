"""Nothing a checkpoint names is ever imported or run (issue class: code execution).

Three layers of proof:
- an audit of the source: every `from_pretrained` passes `trust_remote_code=False`, transformers'
  Auto classes are reached only through `moeconv/io/transformers_io.py`, YAML is only parsed
  safely, pickles only through `torch.load(weights_only=True)`, and nothing calls eval/exec;
- in process, transformers' dynamic-module loader is replaced by a tripwire while every command
  reads a checkpoint whose tokenizer or config is custom code;
- as a user runs it, in a fresh process with `y` on standard input (what once made transformers'
  prompt run the payload): exit 2, one line, and the payload's marker file never appears.
"""
import ast
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeconv.cli import app
from tests.reliability.cli_process import assert_refused, run_cli
from tests.reliability.corpus import copy_dir

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("moeconv", "passes", "scripts", "models") for p in sorted((ROOT / d).rglob("*.py"))]
GATEWAY = ROOT / "moeconv" / "io" / "transformers_io.py"
PAYLOAD = ("import os, pathlib\n"
           "pathlib.Path(os.environ['MOECONV_EVIL_MARKER']).touch()\n")


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield node, f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def audit(path: Path, root: Path = ROOT) -> list[str]:
    """Every call in `path` that could let an input run code, as `file:line: why`."""
    tree = ast.parse(path.read_text())
    where = path.relative_to(root)
    found = []
    for node, name in _calls(tree):
        kw = {k.arg: k.value for k in node.keywords}
        owner = getattr(getattr(node.func, "value", None), "id", "")
        line = f"{where}:{node.lineno}"
        if name == "from_pretrained":
            v = kw.get("trust_remote_code")
            if not (isinstance(v, ast.Constant) and v.value is False):
                found.append(f"{line}: from_pretrained without trust_remote_code=False")
        if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all"):
            found.append(f"{line}: yaml.{name} can construct Python objects; use yaml.safe_load")
        if owner == "torch" and name == "load":
            v = kw.get("weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                found.append(f"{line}: torch.load without weights_only=True")
        if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
            found.append(f"{line}: {name}() of a string")
        if owner in ("pickle", "dill", "marshal") and name in ("loads", "load"):
            found.append(f"{line}: unpickling outside torch.load(weights_only=True)")
    if path != GATEWAY:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "transformers":
                auto = [a.name for a in node.names if a.name.startswith("Auto")]
                if auto:
                    found.append(f"{where}:{node.lineno}: import {auto} through moeconv.io.transformers_io")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_never_lets_an_input_run_code(path):
    assert audit(path) == []


def test_the_audit_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, yaml\nfrom transformers import AutoTokenizer\n"
                   "AutoTokenizer.from_pretrained('x', local_files_only=True)\n"
                   "yaml.load(open('r'))\ntorch.load('w.bin')\neval('1')\n")
    found = audit(bad, tmp_path)
    assert [f.split(": ", 1)[1].split(" ")[0] for f in found] == [
        "from_pretrained", "yaml.load", "torch.load", "eval()", "import"], found


def custom_tokenizer(d: Path) -> None:
    """The checkpoint's tokenizer class exists only as `evil.py` beside it (via `auto_map`)."""
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "evil.py").write_text(PAYLOAD + "from transformers import PreTrainedTokenizerFast\n"
                               "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")


def custom_config(d: Path) -> None:
    """A model type transformers does not know, whose config and model classes are `evil.py`."""
    raw = json.loads((d / "config.json").read_text())
    raw.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(raw))
    (d / "evil.py").write_text(PAYLOAD + "from transformers import LlamaConfig, LlamaForCausalLM\n"
                               "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
                               "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")


_CALIB = ["--calib", "{data}"]
# Commands that read the model's tokenizer (calibration or training text): (command line).
TOKENIZER_COMMANDS = {
    "upcycle-hidden": ["upcycle", "{src}", "{out}", "-e", "4", "-k", "2", "--router-init", "hidden", *_CALIB],
    "sparsify": ["sparsify", "{src}", "{out}", "--method", "wanda", "--targets", "dense-ffn", *_CALIB,
                 "--num-samples", "2", "--seq-len", "16"],
    "quantize-eval": ["quantize", "{src}", "{out}", "--method", "int8", "--eval", "{data}"],
    "run": ["run", "{recipe}", "--model", "{src}", "--out", "{out}", *_CALIB],
    "distill": ["distill", "{out}", "--teacher", "{src}", "--student", "{src}", "--data", "{data}", "--steps", "1",
                "--batch-size", "2", "--seq-len", "16"],
}
# Every command that reads a model: an unknown, code-only model type is refused by each.
MODEL_COMMANDS = {
    "inspect": ["inspect", "{src}"],
    "upcycle": ["upcycle", "{src}", "{out}", "-e", "4", "-k", "2"],
    "quantize": ["quantize", "{src}", "{out}", "--method", "int8"],
    "export-onnx": ["export", "onnx", "{src}", "{out}"],
    **TOKENIZER_COMMANDS,
}
RECIPE = "steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n  - pass: sparsify\n    method: wanda\n"


def _args(template, **paths):
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in template]


@pytest.fixture
def tripwire(monkeypatch, tmp_path):
    """transformers' loader of checkpoint code, replaced: any call fails the test."""
    import transformers.dynamic_module_utils as dmu
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("transformers was asked to import code from a checkpoint")
    monkeypatch.setattr(dmu, "get_class_from_dynamic_module", refuse)
    monkeypatch.setenv("MOECONV_EVIL_MARKER", str(tmp_path / "evil-ran"))
    return calls


# (payload, the commands it applies to, the file the one line names)
PAYLOADS = {"tokenizer": (custom_tokenizer, TOKENIZER_COMMANDS, "tokenizer_config.json"),
            "config": (custom_config, MODEL_COMMANDS, "config.json")}
CASES = [(p, c) for p, (_, commands, _) in PAYLOADS.items() for c in sorted(commands)]


@pytest.mark.parametrize("payload,command", CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_checkpoint_code_is_never_run(payload, command, good, data, tmp_path, tripwire):
    make, commands, names = PAYLOADS[payload]
    src = copy_dir(good, tmp_path / "src")
    make(src)
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    result = CliRunner().invoke(app, _args(commands[command], src=src, out=out, data=data,
                                           recipe=tmp_path / "r.yaml"), input="y\ny\n")
    assert result.exit_code == 2, (result.output, result.exception)
    err = result.stderr.strip()
    assert "\n" not in err and names in err and "custom code" in err, err
    assert tripwire == [] and not (tmp_path / "evil-ran").exists()
    assert list((tmp_path / "work").iterdir()) == []


@pytest.mark.parametrize("case", ["tokenizer", "config"])
def test_yes_on_stdin_runs_nothing(case, good, data, tmp_path):
    """As it was reported: a separate process, `y` piped in. transformers never gets to ask."""
    src = copy_dir(good, tmp_path / "src")
    (custom_tokenizer if case == "tokenizer" else custom_config)(src)
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    marker = tmp_path / "evil-ran"
    result = run_cli(_args(TOKENIZER_COMMANDS["sparsify"], src=src, out=out, data=data), stdin="y\n" * 4,
                     env={"MOECONV_EVIL_MARKER": str(marker)})
    assert_refused(result, out, names="custom code")
    assert not marker.exists(), "the checkpoint's code ran"


@pytest.mark.parametrize("name", ["pipeline", "AutoTokenizer", "TrainingArguments", "__class__", "LlamaModel.x"])
def test_architectures_never_pick_an_arbitrary_attribute(name, good, tmp_path):
    """`architectures` is a name from the checkpoint: only a model class registered for the
    config's type may be built from it; anything else falls back to that type's causal LM."""
    from moeconv.io.transformers_io import model_class
    from transformers import AutoConfig, LlamaForCausalLM
    config = AutoConfig.for_model("llama", architectures=[name])
    assert model_class(config) is LlamaForCausalLM
    src = copy_dir(good, tmp_path / "src")
    raw = json.loads((src / "config.json").read_text())
    raw["architectures"] = [name]
    (src / "config.json").write_text(json.dumps(raw))
    result = CliRunner().invoke(app, ["inspect", str(src)])
    assert result.exit_code == 0, result.output
