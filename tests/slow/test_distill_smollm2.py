"""Heal on the real checkpoint: SmolLM2-135M upcycled to a 4-expert top-2 Mixtral, its experts
2:4-pruned by the `sparsify` pass (magnitude), then a short `moeconv distill --mode heal` against
the unpruned MoE on pydoc calibration text. Held-out perplexity (the disjoint pydoc eval half,
measured by scripts/eval_quality.py) must go down versus the pruned model, and every expert
matrix must keep its exact 2:4 zeros.

Kept to a few CPU minutes: 12 steps of 4×64 tokens, training the last 10 of 30 layers (backward
stops there) with the embeddings frozen; set MOECONV_HEAL_STEPS for a longer run. Figures are
printed (run with -s) and written to $MOECONV_HEAL_JSON when set."""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = int(os.environ.get("MOECONV_HEAL_STEPS", "12"))


@pytest.fixture(scope="module")
def gguf():
    from moeconv.demo import smollm2_gguf
    try:
        return smollm2_gguf()
    except Exception as exc:
        pytest.skip(str(exc))


def heal_args(root: Path, out: Path) -> list[str]:
    return ["distill", "--teacher", str(root / "moe"), "--student", str(root / "pruned"), str(out),
            "--data", str(root / "calib.txt"), "--mode", "heal", "--steps", str(STEPS), "--seq-len", "64",
            "--batch-size", "4", "--lr", "3e-4", "--warmup-steps", "2",
            "--freeze", "embed_tokens", "--freeze", r"layers\.1?[0-9]\.", "--eval-rows", "8"]


def test_heal_lowers_heldout_perplexity_of_2to4_pruned_smollm2(gguf, tmp_path):
    from typer.testing import CliRunner

    from moeconv import Context, Pipeline, load
    from moeconv.cli import app
    from moeconv.evaluate import pydoc_text
    from moeconv.io.save import save_checkpoint
    from passes.sparsify import Sparsify
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_quality

    t0 = time.perf_counter()
    upcycle_checkpoint(gguf, tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2, router_init="normal"))
    state = load(tmp_path / "moe")
    sp = Pipeline([Sparsify(method="magnitude")]).run(state, Context()).report.passes[0]
    (tmp_path / "pruned").mkdir()
    save_checkpoint(state, tmp_path / "pruned")
    for f in (tmp_path / "moe").glob("tokenizer*"):
        shutil.copy2(f, tmp_path / "pruned" / f.name)
    del state
    (tmp_path / "calib.txt").write_text(pydoc_text("calib"))
    t_prep = time.perf_counter() - t0

    t0 = time.perf_counter()
    r = CliRunner().invoke(app, heal_args(tmp_path, tmp_path / "healed"))
    assert r.exit_code == 0, f"{r.stderr}\n{r.exception!r}"
    t_heal = time.perf_counter() - t0
    m = json.loads((tmp_path / "healed" / "report.json").read_text())["passes"][0]["metrics"]

    t0 = time.perf_counter()
    ev = eval_quality.main([f"upcycled={tmp_path / 'moe'}", f"pruned={tmp_path / 'pruned'}",
                            f"healed={tmp_path / 'healed'}", "--seq-len", "256", "--batches", "4",
                            "--out", str(tmp_path / "eval_quality.json")])["results"]
    t_eval = time.perf_counter() - t0

    from safetensors.torch import load_file
    before, after = load_file(tmp_path / "pruned" / "model.safetensors"), load_file(tmp_path / "healed" / "model.safetensors")
    experts = [k for k in after if ".experts." in k]
    assert len(experts) == 30 * 4 * 3
    for k in experts:
        w = after[k]
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), k
        assert torch.equal(w == 0, before[k] == 0), k
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith(tuple(f"model.layers.{i}." for i in range(20, 30))) or k == "model.norm.weight"
                           for k in changed), changed[:5]

    figures = {"steps": STEPS, "tokens": m["tokens"], "trainable_params": m["trainable_params"],
               "kept_zeros": m["kept_zeros"], "sparsify": sp.summary,
               "eval_quality_ppl": {k: v["perplexity"] for k, v in ev.items()},
               "distill_heldout_ppl": [m.get("eval_ppl_before"), m.get("eval_ppl_after")],
               "distill_heldout_kl": [m.get("eval_kl_before"), m.get("eval_kl_after")],
               "seconds": {"prepare": round(t_prep), "heal": round(t_heal), "eval": round(t_eval)},
               "command": "moeconv " + " ".join(heal_args(Path("RUN"), Path("RUN/healed")))}
    print(json.dumps(figures, indent=1))
    if os.environ.get("MOECONV_HEAL_JSON"):
        Path(os.environ["MOECONV_HEAL_JSON"]).write_text(json.dumps(figures, indent=1) + "\n")
    assert ev["healed"]["perplexity"] < ev["pruned"]["perplexity"]
    assert m["eval_kl_after"] < m["eval_kl_before"]
