"""A corpus of bad inputs × every CLI command it applies to: exit code 2, one line naming the
problem, no traceback, and no output directory (nor a hidden temp sibling) left behind."""
import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from moeconv.cli import app


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


def _edit_config(d, **fields):
    """Set model config fields: top level for HF checkpoints, the recorded source config for moeconv's format."""
    raw = json.loads((d / "config.json").read_text())
    if "moeconv_sparse" in raw:  # sparsify --compressed: the dense checkpoint's config is inside
        raw["moeconv_sparse"]["dense_config"].update(fields)
    else:
        (raw["moeconv"]["source"]["config"] if "moeconv" in raw else raw).update(fields)
    (d / "config.json").write_text(json.dumps(raw))


def _index_outside(d):
    """An index whose shard lies outside the checkpoint directory (a copy of the real one, so only the path is wrong)."""
    from safetensors import safe_open
    (d.parent / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        wm = {n: "../outside.safetensors" for n in f.keys()}
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _shape_mismatch(d):
    _edit_config(d, intermediate_size=48)


def _cut_tensor(d, suffix, cut):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    name = next(n for n in sorted(sd) if n.endswith(suffix))  # suffix: a str or a tuple
    sd[name] = cut(sd[name]).contiguous()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


# the FFN's up projection: Llama-style, Mixtral experts, and the kept values of a compressed 2:4 one
UP = ("up_proj.weight", ".w3.weight", ".w3.weight.sparse_values")
DOWN = ("down_proj.weight", ".w2.weight")


def _wrong_dtype(d):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    name = next(n for n in sorted(sd) if n.endswith(UP))
    sd[name] = sd[name].to(torch.int64)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _nan_weights(d):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    name = next((n for n in sorted(sd) if n.endswith(DOWN) and sd[n].is_floating_point()), None)
    name = name or next(n for n in sorted(sd) if n.endswith("norm.weight"))  # quantized: a float norm scale
    sd[name].view(-1)[0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MOECONV_EVIL_MARKER', '/tmp/moeconv-evil')}",))


def _malicious_pickle(d, protocol=pickle.DEFAULT_PROTOCOL):
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Evil()}, fh, protocol=protocol)


def _empty_dir(d):
    for f in d.iterdir():
        f.unlink()


def _unknown_model_type(d):
    _edit_config(d, model_type="definitely-not-a-model")


def _config_not_json(d):
    (d / "config.json").write_text("{ this is : not json")


MODEL_CASES = {
    "corrupt-header": _corrupt_header,
    "truncated-shard": _truncate,
    "index-missing-tensor": _index_missing_tensor,
    "index-shard-outside": _index_outside,
    "shape-mismatch": _shape_mismatch,
    "attn-shape-mismatch": lambda d: _cut_tensor(d, "q_proj.weight", lambda t: t[: t.shape[0] // 2]),
    "ffn-shape-mismatch": lambda d: _cut_tensor(d, UP, lambda t: t[..., : t.shape[-1] // 2]),
    "wrong-dtype": _wrong_dtype,
    "nan-weights": _nan_weights,
    "malicious-pickle": _malicious_pickle,
    "malicious-pickle-p2": lambda d: _malicious_pickle(d, protocol=2),  # torch.load's own protocol: refused at the global
    "empty-dir": _empty_dir,
    "unknown-model-type": _unknown_model_type,
    "config-not-json": _config_not_json,
}

# What each case's message must name (besides the source path).
NAMES = {
    "corrupt-header": "model.safetensors", "truncated-shard": "truncated",
    "index-missing-tensor": "model.layers.9.mlp.up_proj.weight", "index-shard-outside": "../outside.safetensors", "shape-mismatch": "shape",
    "wrong-dtype": "int64", "nan-weights": "NaN", "malicious-pickle": "pytorch_model.bin",
    "malicious-pickle-p2": "pytorch_model.bin", "empty-dir": "config.json",
    "unknown-model-type": "definitely-not-a-model", "config-not-json": "config.json",
    "attn-shape-mismatch": "q_proj", "ffn-shape-mismatch": "up_proj",
}
# moeconv's formats (plain, quantized, compressed) read only safetensors: a pickle beside the config is never
# opened; Mixtral names its expert projections w1/w2/w3.
_SAFETENSORS_ONLY = {"malicious-pickle": "model.safetensors", "malicious-pickle-p2": "model.safetensors"}
SOURCE_NAMES = {
    "hf": NAMES,
    "mixtral": {**NAMES, "ffn-shape-mismatch": "w3", "wrong-dtype": "int64"},
    "moeconv-format": {**NAMES, **_SAFETENSORS_ONLY},
    "quantized": {**NAMES, **_SAFETENSORS_ONLY},
    "compressed": {**NAMES, **_SAFETENSORS_ONLY, "ffn-shape-mismatch": "w3", "wrong-dtype": "w3"},
}

RECIPE = "steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n"

# Every command that takes a model, with how it is called: (bad model, OUT, recipe, good model, data file).
# Each would run on the good model (or, for MoE-only commands, fail on it for a different reason):
# the failure must come from the bad model.
COMMANDS = {
    "inspect": lambda m, out, r, g, d: ["inspect", m],
    "upcycle": lambda m, out, r, g, d: ["upcycle", m, out, "-e", "4", "-k", "2"],
    "upcycle-moeconv": lambda m, out, r, g, d: ["upcycle", m, out, "-e", "4", "-k", "2", "--format", "moeconv"],
    "run": lambda m, out, r, g, d: ["run", r, "--model", m, "--out", out],
    "quantize": lambda m, out, r, g, d: ["quantize", m, out, "--method", "int8"],
    "sparsify": lambda m, out, r, g, d: ["sparsify", m, out, "--method", "wanda", "--targets", "dense-ffn",
                                         "--calib", d, "--num-samples", "2", "--seq-len", "16"],
    "prune-experts": lambda m, out, r, g, d: ["prune-experts", m, out, "--keep", "2", "--calib", d,
                                              "--calib-samples", "2", "--calib-seq-len", "16"],
    "export-onnx": lambda m, out, r, g, d: ["export", "onnx", m, out],
    "distill-teacher": lambda m, out, r, g, d: ["distill", out, "--teacher", m, "--student", g, "--data", d,
                                                "--steps", "1", "--batch-size", "2", "--seq-len", "16"],
    "distill-student": lambda m, out, r, g, d: ["distill", out, "--teacher", g, "--student", m, "--data", d,
                                                "--steps", "1", "--batch-size", "2", "--seq-len", "16"],
}


# Python shows these to a user by default: any one of them would be a second line on stderr.
_SHOWN = (UserWarning, RuntimeWarning, FutureWarning, SyntaxWarning, BytesWarning, UnicodeWarning)


def _invoke(args) -> tuple:
    """Run the CLI in process; also returns the warnings a real run would print (pytest hides them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [str(a) for a in args])
    return result, [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, _SHOWN)]


def _assert_clean_failure(result, out: Path, shown=()):
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    err = result.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert "Traceback" not in result.output
    assert not shown, shown
    # nothing at all beside OUT either: no hidden temp sibling, no distill OUT.run, no ONNX OUT.failed
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == []
    return err


# Sources other than a dense HF checkpoint have their own loaders: moeconv's format (MoE) and its
# quantized form (bitsandbytes layers), each broken in the same ways, × the commands that take them.
OTHER_SOURCES = {
    "mixtral": ["inspect", "quantize", "sparsify", "prune-experts", "export-onnx", "distill-student"],
    "compressed": ["inspect", "sparsify"],
    "moeconv-format": ["inspect", "quantize", "sparsify", "prune-experts", "export-onnx", "distill-teacher",
                       "distill-student"],
    "quantized": ["inspect", "quantize"],
}
SOURCE_COMMANDS = [("hf", c) for c in sorted(COMMANDS)] + [(f, c) for f, cs in OTHER_SOURCES.items() for c in cs]


@pytest.mark.parametrize("command", SOURCE_COMMANDS, ids=lambda fc: fc[1] if fc[0] == "hf" else f"{fc[0]}-{fc[1]}")
@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_inputs(command, case, good, moe, moe_native, quantized, compressed, data, tmp_path, monkeypatch):
    fmt, command = command
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv("MOECONV_EVIL_MARKER", str(marker))
    sources = {"hf": good, "mixtral": moe, "moeconv-format": moe_native, "quantized": quantized, "compressed": compressed}
    src = _copy(sources[fmt], tmp_path / "src")
    MODEL_CASES[case](src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    result, shown = _invoke(COMMANDS[command](src, out, recipe, good, data))
    err = _assert_clean_failure(result, out, shown)
    assert str(src) in err and SOURCE_NAMES[fmt][case] in err, err
    assert not marker.exists(), "a pickle payload was executed"


_PRUNE = ["--calib", "{data}", "--calib-samples", "2", "--calib-seq-len", "16"]  # a later --calib wins
_DISTILL = ["--teacher", "{moe}", "--student", "{moe}", "--steps", "1", "--batch-size", "2", "--seq-len", "16"]

# case: (what the message must name, command line)
ARG_CASES = {
    "top-k-0": ("top_k", ["upcycle", "{m}", "{out}", "-e", "4", "-k", "0"]),
    "num-experts-1": ("num_experts", ["upcycle", "{m}", "{out}", "-e", "1", "-k", "1"]),
    "top-k-over-experts": ("top_k", ["upcycle", "{m}", "{out}", "-e", "2", "-k", "3"]),
    "calib-empty": ("empty", ["upcycle", "{m}", "{out}", "--router-init", "hidden", "--calib", "{empty}"]),
    "calib-not-utf8": ("UTF-8", ["upcycle", "{m}", "{out}", "--router-init", "hidden", "--calib", "{binary}"]),
    "recipe-unknown-pass": ("no-such-pass", ["run", "{bad_recipe}", "--model", "{m}", "--out", "{out}"]),
    "recipe-cycle": ("no dense FFN", ["run", "{cycle_recipe}", "--model", "{m}", "--out", "{out}"]),
    "recipe-not-yaml": ("UTF-8", ["run", "{binary}", "--model", "{m}", "--out", "{out}"]),
    "missing-model": ("nope", ["upcycle", "{tmp}/nope", "{out}"]),
    # run: the same refusals reached through a recipe
    "run-top-k-0": ("top_k", ["run", "{recipe}", "--model", "{m}", "--out", "{out}", "--set", "upcycle.top_k=0"]),
    "run-num-experts-1": ("num_experts", ["run", "{recipe}", "--model", "{m}", "--out", "{out}",
                                          "--set", "upcycle.num_experts=1", "--set", "upcycle.top_k=1"]),
    "run-calib-empty": ("empty", ["run", "{wanda_recipe}", "--model", "{m}", "--out", "{out}", "--calib", "{empty}"]),
    "run-calib-not-utf8": ("UTF-8", ["run", "{wanda_recipe}", "--model", "{m}", "--out", "{out}",
                                     "--calib", "{binary}"]),
    # quantize
    "quantize-unknown-method": ("method", ["quantize", "{moe}", "{out}", "--method", "int3"]),
    "quantize-twice": ("already quantized", ["quantize", "{quantized}", "{out}", "--method", "int8"]),
    "quantize-eval-empty": ("empty", ["quantize", "{moe}", "{out}", "--eval", "{empty}"]),
    "quantize-eval-not-utf8": ("UTF-8", ["quantize", "{moe}", "{out}", "--eval", "{binary}"]),
    # prune-experts (the MoE routes top-2 of 4)
    "prune-keep-below-top-k": ("top_k", ["prune-experts", "{moe}", "{out}", "--keep", "1", *_PRUNE]),
    "prune-unknown-criterion": ("criterion", ["prune-experts", "{moe}", "{out}", "--keep", "2",
                                              "--criterion", "vibes", *_PRUNE]),
    "prune-dense-model": ("moe", ["prune-experts", "{m}", "{out}", "--keep", "2", *_PRUNE]),
    "prune-calib-empty": ("empty", ["prune-experts", "{moe}", "{out}", "--keep", "2", *_PRUNE, "--calib", "{empty}"]),
    "prune-calib-not-utf8": ("UTF-8", ["prune-experts", "{moe}", "{out}", "--keep", "2", *_PRUNE,
                                       "--calib", "{binary}"]),
    # sparsify
    "sparsify-pattern-5:4": ("5:4", ["sparsify", "{moe}", "{out}", "--pattern", "5:4", "--method", "magnitude"]),
    "sparsify-pattern-0:4": ("0:4", ["sparsify", "{moe}", "{out}", "--pattern", "0:4", "--method", "magnitude"]),
    "sparsify-calib-empty": ("empty", ["sparsify", "{moe}", "{out}", "--method", "wanda", "--calib", "{empty}"]),
    "sparsify-calib-not-utf8": ("UTF-8", ["sparsify", "{moe}", "{out}", "--method", "wanda", "--calib", "{binary}"]),
    # distill
    "distill-data-empty": ("empty", ["distill", "{out}", *_DISTILL, "--data", "{empty}"]),
    "distill-data-not-utf8": ("UTF-8", ["distill", "{out}", *_DISTILL, "--data", "{binary}"]),
    "distill-eval-data-empty": ("empty", ["distill", "{out}", *_DISTILL, "--data", "{data}", "--eval-data", "{empty}"]),
    # export onnx
    "onnx-opset-99": ("opset", ["export", "onnx", "{moe}", "{out}", "--opset", "99"]),
    "onnx-opset-7": ("opset", ["export", "onnx", "{moe}", "{out}", "--opset", "7"]),
}


@pytest.mark.parametrize("case", sorted(ARG_CASES))
def test_bad_arguments(case, good, moe, quantized, data, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 50)
    (tmp_path / "bad.yaml").write_text("steps:\n  - pass: upcycle\n  - pass: no-such-pass\n")
    # an upcycle after an upcycle: the second needs dense FFNs the first removed (a cycle back)
    (tmp_path / "cycle.yaml").write_text(RECIPE + "  - pass: upcycle\n    num_experts: 4\n")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    (tmp_path / "wanda.yaml").write_text(RECIPE + "  - pass: sparsify\n    method: wanda\n")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    args = [a.format(m=good, moe=moe, quantized=quantized, data=data, out=out, empty=tmp_path / "empty.txt",
                     binary=tmp_path / "binary.txt", bad_recipe=tmp_path / "bad.yaml",
                     cycle_recipe=tmp_path / "cycle.yaml", recipe=tmp_path / "recipe.yaml",
                     wanda_recipe=tmp_path / "wanda.yaml", tmp=tmp_path)
            for a in ARG_CASES[case][1]]
    result, shown = _invoke(args)
    err = _assert_clean_failure(result, out, shown)
    assert ARG_CASES[case][0] in err, err


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
