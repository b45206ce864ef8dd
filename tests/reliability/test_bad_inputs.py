"""A corpus of bad inputs × every CLI command it applies to: exit code 2, one line naming the
problem, no traceback, and no output directory (nor a hidden temp sibling) left behind."""
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeconv.cli import app
from tests.reliability.corpus import MODEL_CASES, SOURCE_NAMES, copy_dir

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
    # targets valid for dense and MoE sources alike: the broken model is what must be named
    "sparsify": lambda m, out, r, g, d: ["sparsify", m, out, "--method", "wanda", "--targets", "dense-ffn",
                                         "--targets", "experts",
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
    src = copy_dir(sources[fmt], tmp_path / "src")
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
    "onnx-head-bits-5": ("head_bits", ["export", "onnx", "{moe}", "{out}", "--quantize", "int4", "--head-bits", "5"]),
    "onnx-int4-scheme-block": ("quant_scheme", ["export", "onnx", "{moe}", "{out}", "--quantize", "int4",
                                                "--quant-scheme", "block"]),
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
    src = copy_dir(good, tmp_path / "src")
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    result = CliRunner().invoke(app, ["upcycle", str(src), str(tmp_path / "out"), "-e", "4", "-k", "2"])
    assert result.exit_code == 0, result.output
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    result = CliRunner().invoke(app, ["upcycle", str(src), str(src / "inside"), "-e", "4", "-k", "2"])
    assert result.exit_code == 2
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before


def test_a_python_source_runs_again_only_when_trusted(tmp_path, monkeypatch):
    """A moeconv-format checkpoint of a FILE.py model records the file; the user who named it may
    reload it in the same run, anyone loading the checkpoint later must opt in."""
    from moeconv.io import specs as load_mod
    mine = tmp_path / "mine.py"
    mine.write_text((Path(__file__).resolve().parents[2] / "models" / "gpt.py").read_text())
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["upcycle", f"{mine}:build_model", str(out), "-e", "4", "-k", "2",
                                      "--format", "moeconv"])
    assert result.exit_code == 0, result.output  # verified by reloading it: the user's own file, trusted
    monkeypatch.setattr(load_mod, "TRUSTED_SPECS", set())  # as in a new process
    result, _ = _invoke(["inspect", out])
    assert result.exit_code == 2 and "MOECONV_TRUST_CODE" in result.stderr and "mine.py" in result.stderr
    monkeypatch.setenv("MOECONV_TRUST_CODE", "1")
    assert CliRunner().invoke(app, ["inspect", str(out)]).exit_code == 0
