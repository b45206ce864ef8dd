"""Absurd or malformed model inputs: config values, `pytorch_model.bin` contents, and sizes that
would make moeconv work for hours or allocate gigabytes (issue classes: unbounded work,
tracebacks, wrong output with exit 0). Each is refused in one line, before the work: the runs
whose cost matters are separate processes with their peak memory and time measured."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moeconv.cli import app
from tests.reliability.cli_process import assert_refused, run_cli
from tests.reliability.corpus import copy_dir
from tests.reliability.test_bad_inputs import _assert_clean_failure, _invoke


def edit_config(d: Path, text: str | None = None, **fields) -> None:
    raw = json.loads((d / "config.json").read_text())
    raw.update(fields)
    (d / "config.json").write_text(text if text is not None else json.dumps(raw))


def nested(depth: int) -> str:
    return '{"model_type": "llama", "x": ' + "[" * depth + "]" * depth + "}"


# case: (config edit, what the one line must name)
CONFIG_CASES = {
    "hidden-negative": (dict(hidden_size=-32), "hidden_size"),
    "intermediate-zero": (dict(intermediate_size=0), "intermediate_size"),
    "hidden-string": (dict(hidden_size="32"), "hidden_size"),
    "hidden-fraction": (dict(hidden_size=32.5), "hidden_size"),
    "layers-huge-int": (dict(num_hidden_layers=10**30), "num_hidden_layers"),
    "heads-bool": (dict(num_attention_heads=True), "num_attention_heads"),
    "experts-per-token-over-experts": (dict(num_local_experts=4, num_experts_per_tok=6), "num_experts_per_tok"),
    "5000-digit-integer": (None, "config.json"),
    "deeply-nested": (None, "config.json"),
}


def _apply_config_case(src: Path, case: str) -> None:
    edit, _ = CONFIG_CASES[case]
    if case == "5000-digit-integer":
        raw = (src / "config.json").read_text()
        (src / "config.json").write_text(raw.replace('"hidden_size": 32', '"hidden_size": ' + "9" * 5000))
    elif case == "deeply-nested":
        (src / "config.json").write_text(nested(100_000))
    else:
        edit_config(src, **edit)


@pytest.mark.parametrize("command", ["inspect", "upcycle", "quantize"])
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values(case, command, good, moe, tmp_path):
    base = moe if case == "experts-per-token-over-experts" else good
    src = copy_dir(base, tmp_path / "src")
    _apply_config_case(src, case)
    err = refused_by(command, src, tmp_path)
    assert CONFIG_CASES[case][1] in err and str(src) in err, err


def refused_by(command: str, src: Path, tmp_path: Path) -> str:
    """Run inspect / upcycle / quantize on `src` in process; the clean one-line refusal."""
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out"
    args = {"inspect": ["inspect", src], "upcycle": ["upcycle", src, out, "-e", "4", "-k", "2"],
            "quantize": ["quantize", src, out, "--method", "int8"]}[command]
    result, shown = _invoke(args)
    return _assert_clean_failure(result, out, shown)


def test_zero_width_prints_no_library_warning(good, tmp_path):
    """As reported: torch's warnings came around the one-line error. A real process's stderr."""
    src = copy_dir(good, tmp_path / "src")
    edit_config(src, intermediate_size=0)
    (tmp_path / "w").mkdir()
    assert_refused(run_cli(["upcycle", src, tmp_path / "w" / "out"]), tmp_path / "w" / "out",
                   names="intermediate_size")


# The runs that used to hang or grow to gigabytes: (edit, command extra args, what the line names).
UNBOUNDED = {
    "million-layers": (dict(num_hidden_layers=1_000_000), "layers"),
    "ten-million-vocab-bin": (dict(vocab_size=10_000_000), "vocab_size"),
    "million-vocab-bin": (dict(vocab_size=1_000_000), "shape"),
    "million-experts": (None, "experts"),
}


def _to_bin(src: Path) -> None:
    from safetensors.torch import load_file
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")


@pytest.mark.parametrize("case", sorted(UNBOUNDED))
@pytest.mark.parametrize("command", [pytest.param("inspect", marks=pytest.mark.slow), "upcycle", "upcycle-moeconv"])
def test_absurd_sizes_are_refused_before_the_work(case, command, good, tmp_path):
    if case == "million-experts" and command == "inspect":
        pytest.skip("inspect takes no expert count")
    src = copy_dir(good, tmp_path / "src")
    edit, names = UNBOUNDED[case]
    if edit:
        edit_config(src, **edit)
    if case.endswith("-bin"):
        _to_bin(src)
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out"
    experts = "1000000" if case == "million-experts" else "4"
    args = {"inspect": ["inspect", src],
            "upcycle": ["upcycle", src, out, "-e", experts, "-k", "2"],
            "upcycle-moeconv": ["upcycle", src, out, "-e", experts, "-k", "2", "--format", "moeconv"]}[command]
    # 3 GiB of address space is plenty for a refusal (torch alone maps ~1.5 GiB) and far too
    # little for the work: a run that builds first dies instead of passing slowly.
    result = run_cli(args, memory_limit=3 * 2**30, timeout=120)
    assert_refused(result, out, names=names)


def _bin_with(src: Path, change) -> None:
    from safetensors.torch import load_file
    sd = dict(load_file(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(change(sd), src / "pytorch_model.bin")


UP = "model.layers.0.mlp.up_proj.weight"
# case: (state-dict edit, what the line names)
BIN_CASES = {
    "wrong-shape": (lambda sd: {**sd, UP: sd[UP][:5]}, "up_proj"),
    "integer-weight": (lambda sd: {**sd, UP: sd[UP].to(torch.int32)}, "int32"),
    "list-value": (lambda sd: {**sd, UP: sd[UP].tolist()}, "list"),
    "int-value": (lambda sd: {**sd, UP: 7}, "int"),
    "string-value": (lambda sd: {**sd, UP: "weights"}, "str"),
    "non-string-key": (lambda sd: {**sd, 3: sd[UP]}, "key"),
    "not-a-dict": (lambda sd: list(sd.values()), "not a state dict"),
    "sparse-tensor": (lambda sd: {**sd, UP: sd[UP].to_sparse()}, "dense"),
    "huge-expanded-wrong-shape": (lambda sd: {**sd, UP: torch.zeros(1, 1).expand(10**6, 10**6)}, "up_proj"),
    "extra-tensor": (lambda sd: {**sd, "model.stray.weight": torch.zeros(3)}, "unexpected"),
}


@pytest.mark.parametrize("command", ["inspect", "upcycle", "quantize"])
@pytest.mark.parametrize("case", sorted(BIN_CASES))
def test_malformed_bin_contents(case, command, good, tmp_path):
    src = copy_dir(good, tmp_path / "src")
    _bin_with(src, BIN_CASES[case][0])
    err = refused_by(command, src, tmp_path)
    assert BIN_CASES[case][1] in err and str(src) in err, err


def test_a_stride_zero_tensor_of_the_right_shape_converts(good, tmp_path):
    """Not malformed, only unusual: an expanded view is given memory of its own and converts."""
    src = copy_dir(good, tmp_path / "src")
    _bin_with(src, lambda sd: {**sd, UP: torch.full((1, sd[UP].shape[1]), 0.01).expand_as(sd[UP])})
    result = CliRunner().invoke(app, ["upcycle", str(src), str(tmp_path / "out"), "-e", "4", "-k", "2"])
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.mark.parametrize("route", ["hf", "moeconv"])
def test_non_finite_experts_are_a_failure(route, good, tmp_path):
    """`--noise-scale inf` is refused as a value; a finite scale large enough to overflow is caught
    when its output is measured (it once wrote NaN experts and reported `max |Δ| nan` as success)."""
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out"
    base = ["upcycle", good, out, "-e", "4", "-k", "2", "--expert-init", "noise", "--format", route]
    result, shown = _invoke([*base, "--noise-scale", "inf"])
    assert "noise_scale" in _assert_clean_failure(result, out, shown)
    result, shown = _invoke([*base, "--noise-scale", "1e300"])
    err = _assert_clean_failure(result, out, shown)
    assert "non-finite" in err or "NaN" in err, err


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**70), "1.5", "abc"])
@pytest.mark.parametrize("command", ["upcycle", "quantize", "sparsify", "prune-experts", "export-onnx", "run"])
def test_seed_out_of_range(seed, command, good, moe, data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n")
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out"
    args = {"upcycle": ["upcycle", good, out],
            "quantize": ["quantize", moe, out],
            "sparsify": ["sparsify", moe, out, "--method", "magnitude"],
            "prune-experts": ["prune-experts", moe, out, "--keep", "2", "--calib", data],
            "export-onnx": ["export", "onnx", moe, out],
            "run": ["run", recipe, "--model", good, "--out", out]}[command]
    result, shown = _invoke([*args, "--seed", seed])
    err = _assert_clean_failure(result, out, shown)
    assert "seed" in err, err


def test_stray_tensor_is_one_rule_for_every_command(good, tmp_path):
    """A tensor the architecture does not have: refused by every command alike, naming it
    (upcycle once dropped it with a note while quantize refused)."""
    from safetensors.torch import load_file, save_file
    src = copy_dir(good, tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    sd["model.stray.weight"] = torch.zeros(3)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    for args in (["upcycle", src, tmp_path / "w1" / "out", "-e", "4", "-k", "2"],
                 ["quantize", src, tmp_path / "w2" / "out", "--method", "int8"],
                 ["inspect", src]):
        if len(args) > 2:
            Path(args[2]).parent.mkdir()
        result, shown = _invoke(args)
        err = result.stderr.strip()
        assert result.exit_code == 2 and "model.stray.weight" in err and "\n" not in err, (args[0], err)
