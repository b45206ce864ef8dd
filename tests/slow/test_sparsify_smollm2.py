"""SmolLM2-135M upcycled to 4 experts (top-2, normal router), experts pruned to 2:4 by magnitude,
Wanda and SparseGPT with calibration from `pydoc_text("calib")`; perplexity on the disjoint
`pydoc_text("eval")` half through scripts/eval_quality.py. Calibrated methods must be clearly
better than magnitude, as in the published dense-model results (FIELD.md, "Reference numbers").

    python -m pytest -m slow -s tests/slow/test_sparsify_smollm2.py
"""
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SAMPLES, SEQ = 64, 256


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from moeconv.demo import smollm2_gguf
    try:
        gguf = smollm2_gguf()
    except Exception as exc:
        pytest.skip(str(exc))
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    out = tmp_path_factory.mktemp("smollm2-sparsify") / "moe"
    upcycle_checkpoint(gguf, out, UpcycleConfig(num_experts=4, top_k=2, router_init="normal"))
    return out


def test_calibrated_24_beats_magnitude_on_held_out_text(moe_dir, tmp_path):
    from moeconv import Context
    from moeconv.data import calibration_tokens
    from moeconv.evaluate import pydoc_text
    from moeconv.jobs.pipeline_job import run_to_dir
    from passes.sparsify import Sparsify
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(pydoc_text("calib"))
    calib = calibration_tokens(calib_file, moe_dir, num_samples=SAMPLES, seq_len=SEQ)
    assert tuple(calib.shape) == (SAMPLES, SEQ)
    outs, reports = {}, {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = tmp_path / method
        ctx = Context(calibration=None if method == "magnitude" else calib)
        reports[method] = run_to_dir(moe_dir, out, [Sparsify(method=method)], ctx=ctx)
        p = reports[method]["passes"][0]
        assert p["metrics"]["target_sparsity"] == pytest.approx(0.5, abs=1e-3)
        print(f"{method}: {p['summary']} ({p['seconds']} s, reconstruction error mean {p['metrics']['rel_error_mean']})")
        outs[method] = out
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_quality
    result = eval_quality.main([f"moe_dense={moe_dir}"] + [f"{m}_24={p}" for m, p in outs.items()]
                               + ["--out", str(tmp_path / "eval.json")])
    ppl = {k: v["perplexity"] for k, v in result["results"].items()}
    print("perplexity:", ppl)
    assert ppl["sparsegpt_24"] < 0.8 * ppl["magnitude_24"], ppl
    assert ppl["wanda_24"] < 0.8 * ppl["magnitude_24"], ppl
    assert ppl["moe_dense"] < min(ppl["sparsegpt_24"], ppl["wanda_24"])
