"""`moeconv sparsify`: end to end on a tiny upcycled Mixtral with text calibration, the compressed
form restored exactly by `moeconv.load`, and one-line refusals that leave no output behind."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparsify_helpers import save_upcycled  # noqa: E402
from upcycle_helpers import TMP_MARK  # noqa: E402


def _cli(*args):
    from typer.testing import CliRunner
    from moeconv.cli import app
    return CliRunner().invoke(app, ["sparsify", *map(str, args)])


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsify-cli")
    src = save_upcycled(root / "moe")
    words = [" ".join(f"w{(i * 7 + j * 13) % 120 + 3}" for j in range(60)) for i in range(30)]
    (root / "calib.txt").write_text("\n\n".join(words))
    return src, root / "calib.txt"


def test_cli_sparsegpt_with_text_calibration_and_compressed_form(moe, tmp_path):
    from moeconv import load
    src, calib = moe
    out = tmp_path / "out"
    r = _cli(src, out, "--calib", calib, "--num-samples", 8, "--seq-len", 32, "--compressed")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "per layer / per expert" in r.stdout and "saves storage" in r.stdout
    report = json.loads((out / "report.json").read_text())
    p = report["passes"][0]
    assert p["metrics"]["calibration_tokens"] == 8 * 32 and p["metrics"]["pattern"] == "2:4"
    comp = report["extra_outputs"]["compressed"]
    assert comp["compressed_tensors"] == 24  # 2 layers × 4 experts × (w1, w2, w3); nothing else gets smaller
    assert comp["bytes"] < 0.75 * comp["dense_bytes"]
    dense, restored = load(out), load(out / "compressed")
    sd, sr = dense.module.state_dict(), restored.module.state_dict()
    assert sd.keys() == sr.keys() and all(torch.equal(sd[k], sr[k]) for k in sd)
    assert type(restored.module).__name__ == "MixtralForCausalLM"
    from transformers import AutoModelForCausalLM
    with pytest.raises(Exception):  # unknown model_type: refused loudly, never random experts
        AutoModelForCausalLM.from_pretrained(out / "compressed")
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("args,message", [
    ([], "needs calibration data"),
    (["--pattern", "2-4", "--method", "magnitude"], "pattern must be N:M"),
    (["--method", "magnitude", "--targets", "nothing"], "no matrix matches"),
])
def test_cli_refusals_are_one_line_and_leave_nothing(moe, tmp_path, args, message):
    src, _ = moe
    r = _cli(src, tmp_path / "out", *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]
