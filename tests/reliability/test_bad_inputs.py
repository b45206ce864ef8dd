"""A corpus of bad inputs × every CLI command it applies to: exit code 2, one line naming the
problem, no traceback, and no output directory (nor a hidden temp sibling) left behind."""
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from moeconv.cli import app
from tests.tiny import tiny_hf


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "llama"
    tiny_hf("llama", path)
    return path


def _copy(good: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in good.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _corrupt_header(d):
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json at all" + raw[24:])


def _truncate(d):
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])


def _index_missing_tensor(d):
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    wm = {n: "model.safetensors" for n in names}
    wm["model.layers.9.mlp.up_proj.weight"] = "model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _shape_mismatch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))


def _wrong_dtype(d):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    name = next(n for n in sd if n.endswith("up_proj.weight"))
    sd[name] = sd[name].to(torch.int64)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _nan_weights(d):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    name = next(n for n in sd if n.endswith("down_proj.weight"))
    sd[name][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MOECONV_EVIL_MARKER', '/tmp/moeconv-evil')}",))


def _malicious_pickle(d):
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Evil()}, fh)


def _empty_dir(d):
    for f in d.iterdir():
        f.unlink()


def _unknown_model_type(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "definitely-not-a-model"
    (d / "config.json").write_text(json.dumps(cfg))


def _config_not_json(d):
    (d / "config.json").write_text("{ this is : not json")


MODEL_CASES = {
    "corrupt-header": _corrupt_header,
    "truncated-shard": _truncate,
    "index-missing-tensor": _index_missing_tensor,
    "shape-mismatch": _shape_mismatch,
    "wrong-dtype": _wrong_dtype,
    "nan-weights": _nan_weights,
    "malicious-pickle": _malicious_pickle,
    "empty-dir": _empty_dir,
    "unknown-model-type": _unknown_model_type,
    "config-not-json": _config_not_json,
}

RECIPE = "steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n"

# Every command that takes a model, with how it is called.
COMMANDS = {
    "inspect": lambda m, out, r: ["inspect", str(m)],
    "upcycle": lambda m, out, r: ["upcycle", str(m), str(out), "-e", "4", "-k", "2"],
    "upcycle-moeconv": lambda m, out, r: ["upcycle", str(m), str(out), "-e", "4", "-k", "2", "--format", "moeconv"],
    "run": lambda m, out, r: ["run", str(r), "--model", str(m), "--out", str(out)],
}


def _assert_clean_failure(result, out: Path):
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".moeconv-tmp-" in p.name]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_inputs(command, case, good, tmp_path, monkeypatch):
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv("MOECONV_EVIL_MARKER", str(marker))
    src = _copy(good, tmp_path / "src")
    MODEL_CASES[case](src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    result = CliRunner().invoke(app, COMMANDS[command](src, out, recipe))
    _assert_clean_failure(result, out)
    assert not marker.exists(), "a pickle payload was executed"


ARG_CASES = {
    "top-k-0": ["upcycle", "{m}", "{out}", "-e", "4", "-k", "0"],
    "num-experts-1": ["upcycle", "{m}", "{out}", "-e", "1", "-k", "1"],
    "top-k-over-experts": ["upcycle", "{m}", "{out}", "-e", "2", "-k", "3"],
    "calib-empty": ["upcycle", "{m}", "{out}", "--router-init", "hidden", "--calib", "{empty}"],
    "calib-not-utf8": ["upcycle", "{m}", "{out}", "--router-init", "hidden", "--calib", "{binary}"],
    "recipe-unknown-pass": ["run", "{bad_recipe}", "--model", "{m}", "--out", "{out}"],
    "recipe-cycle": ["run", "{cycle_recipe}", "--model", "{m}", "--out", "{out}"],
    "recipe-not-yaml": ["run", "{binary}", "--model", "{m}", "--out", "{out}"],
    "missing-model": ["upcycle", "{tmp}/nope", "{out}"],
}


@pytest.mark.parametrize("case", sorted(ARG_CASES))
def test_bad_arguments(case, good, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 50)
    (tmp_path / "bad.yaml").write_text("steps:\n  - pass: upcycle\n  - pass: no-such-pass\n")
    # an upcycle after an upcycle: the second needs dense FFNs the first removed (a cycle back)
    (tmp_path / "cycle.yaml").write_text(RECIPE + "  - pass: upcycle\n    num_experts: 4\n")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    args = [a.format(m=good, out=out, empty=tmp_path / "empty.txt", binary=tmp_path / "binary.txt",
                     bad_recipe=tmp_path / "bad.yaml", cycle_recipe=tmp_path / "cycle.yaml", tmp=tmp_path)
            for a in ARG_CASES[case]]
    result = CliRunner().invoke(app, args)
    _assert_clean_failure(result, out)


def test_existing_out_is_never_touched(good, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["upcycle", str(good), str(out), "-e", "4", "-k", "2"])
    assert result.exit_code == 2
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_input_is_never_modified(good, tmp_path):
    src = _copy(good, tmp_path / "src")
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    result = CliRunner().invoke(app, ["upcycle", str(src), str(tmp_path / "out"), "-e", "4", "-k", "2"])
    assert result.exit_code == 0, result.output
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    result = CliRunner().invoke(app, ["upcycle", str(src), str(src / "inside"), "-e", "4", "-k", "2"])
    assert result.exit_code == 2
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
