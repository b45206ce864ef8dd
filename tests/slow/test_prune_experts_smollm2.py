"""`prune-experts` on a real model: SmolLM2-135M upcycled to an 8-expert top-2 Mixtral whose experts
differ (noise init at 0.3·std, random normal router), pruned 8 → 6
with each criterion, with and without router re-calibration. Held-out perplexity (pydoc eval
half; calibration uses the other half) is measured for each; re-calibration must not make it
worse. One configuration also goes through the CLI: written as Mixtral, reloaded by stock
transformers with 6 experts, same perplexity as in memory.

Figures go to stdout and to $PRUNE_EXPERTS_EVAL_JSON when set.
"""
from __future__ import annotations

import copy
import gc
import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow

CRITERIA = ("frequency", "mass", "reap", "reconstruction")
UPCYCLE = dict(num_experts=8, top_k=2, expert_init="noise", noise_scale=0.3, router_init="normal")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moeconv.demo import smollm2_gguf
    from moeconv.evaluate import pydoc_text, token_batches
    from transformers import AutoTokenizer
    try:
        gguf = smollm2_gguf()
    except Exception as exc:
        pytest.skip(str(exc))
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    root = tmp_path_factory.mktemp("prune-smollm2")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    calib = token_batches(tok, pydoc_text("calib"), seq_len=128, max_batches=32)
    # The streaming route (dense safetensors in): the in-memory route's reload check is exact-or-fail,
    # and a noisy, sharply routed 30-layer MoE reloads in transformers at ~5e-5 relative (top-k
    # near-ties decided differently by fused vs per-expert fp32 rounding).
    from moeconv import load
    load(gguf).module.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")  # carried into the MoE dir: the CLI tokenizes --calib text with it
    upcycle_checkpoint(root / "dense", root / "moe8", UpcycleConfig(**UPCYCLE))
    (root / "calib.txt").write_text(pydoc_text("calib"))
    evals = token_batches(tok, pydoc_text("eval"), seq_len=256, max_batches=8)
    return {"root": root, "moe": root / "moe8", "calib": calib, "eval": evals}


def test_prune_8_to_6_each_criterion_with_and_without_router_recalibration(setup):
    from moeconv import Context, Pipeline, load
    from moeconv.evaluate import perplexity
    from passes.prune_experts import PruneExperts
    torch.manual_seed(0)
    base = load(setup["moe"])
    figures = {"unpruned (8 experts)": perplexity(base.module, setup["eval"])}
    errors = {}
    for criterion in CRITERIA:
        for recal in (False, True):
            state = copy.deepcopy(base)
            res = Pipeline([PruneExperts(keep=6, criterion=criterion, recalibrate_router=recal)]).run(
                state, Context(calibration=setup["calib"]))
            m = res.report.passes[0].metrics
            assert [b.num_experts for _, b in res.state.moe_blocks()] == [6] * 30
            name = f"{criterion}{' + router re-cal' if recal else ''}"
            figures[name] = perplexity(res.state.module, setup["eval"])
            errors[name] = {k: m[k] for k in m if "error" in k}
            print(f"{name:34s} ppl {figures[name]:9.3f}  {errors[name]}", flush=True)
            del state, res
            gc.collect()
    out = {"upcycle": UPCYCLE, "perplexity": figures, "layer_errors": errors,
           "eval_tokens": int(setup["eval"].numel()), "calibration_tokens": int(setup["calib"].numel())}
    if os.environ.get("PRUNE_EXPERTS_EVAL_JSON"):
        with open(os.environ["PRUNE_EXPERTS_EVAL_JSON"], "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    for criterion in CRITERIA:
        plain, recal = figures[criterion], figures[f"{criterion} + router re-cal"]
        assert torch.isfinite(torch.tensor(plain)) and plain < 10 * figures["unpruned (8 experts)"]
        assert recal <= plain, f"{criterion}: router re-calibration made perplexity worse ({plain:.3f} → {recal:.3f})"


def test_cli_writes_a_6_expert_mixtral_that_transformers_reloads(setup):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner
    from moeconv import load
    from moeconv.cli import app
    from moeconv.evaluate import perplexity
    out = setup["root"] / "pruned-reap"
    r = CliRunner().invoke(app, ["prune-experts", str(setup["moe"]), str(out), "--keep", "6", "--criterion", "reap",
                                 "--calib", str(setup["root"] / "calib.txt"), "--recalibrate-router"])
    assert r.exit_code == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 6
    ppl_hf = perplexity(model, setup["eval"])
    ppl_moeconv = perplexity(load(out).module, setup["eval"])
    assert abs(ppl_hf - ppl_moeconv) <= 1e-3 * ppl_moeconv
    report = json.loads((out / "report.json").read_text())
    # a safetensors Mixtral streams: written tensors re-read and checksummed, the output measured
    # against the source one layer of each at a time (no in-memory result to reload against)
    assert report["route"]["route"] == "streaming" and report["verification"]["against"] == "float source"
    assert report["verification"]["rel_max_diff"] == report["passes"][0]["metrics"]["rel_max_diff"]
    assert len(report["passes"][0]["tables"]["experts"]) == 30 * 8
