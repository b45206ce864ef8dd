"""Smoke test of scripts/bench_upcycle.py (issue #16): in its quick mode (a 2-layer Llama) it
measures `moeconv upcycle`, a copy of its output and mergekit-moe, and prints both ratios, or why
mergekit was skipped; the job it gives mergekit is ours (every expert the source, top-2, random
routers). Behaviour only: no wall-clock thresholds. ~15 s (two or three child processes)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_upcycle.py"
sys.path.insert(0, str(ROOT / "scripts"))

import bench_upcycle as bench  # noqa: E402

RATIO = r"(\d+\.\d+)x"


def _run(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path / "work"),
                           "--out", str(out), *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, json.loads(out.read_text())


def test_quick_run_without_mergekit_prints_the_copy_ratio_and_why_mergekit_is_skipped(tmp_path):
    stdout, result = _run(tmp_path, "--mergekit-venv", str(tmp_path / "no-venv"))
    assert re.search(rf"ratio upcycle/copy: {RATIO} \(target <= 2x: (MET|NOT MET)\)", stdout), stdout
    assert re.search(r"ratio upcycle/mergekit: n/a \(mergekit skipped: no mergekit-moe in .*no-venv", stdout), stdout
    assert "mergekit-moe: skipped:" in stdout
    up, copy = result["upcycle"], result["copy"]
    assert up["seconds"] > 0 and up["peak_rss_bytes"] > 0 and copy["seconds"] > 0
    assert up["out_bytes"] == copy["out_bytes"] > result["source"]["bytes"]  # the copy moved moeconv's bytes
    assert up["report"]["route"] == "streaming" and up["report"]["verification_mode"] == "full"
    assert result["summary"]["upcycle_over_copy"] == pytest.approx(up["seconds"] / copy["seconds"], rel=1e-2)
    assert result["summary"]["upcycle_over_mergekit"] is None and result["summary"]["target_mergekit_met"] is None
    # nothing left behind but the cached source checkpoint
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["dense-L2-h64", "dense-L2-h64.json"]


@pytest.mark.skipif(bench.mergekit_missing(bench.DEFAULT_VENV) is not None,
                    reason=f"no mergekit venv at {bench.DEFAULT_VENV}")
def test_quick_run_with_mergekit_prints_both_ratios(tmp_path):
    stdout, result = _run(tmp_path)
    assert re.search(rf"ratio upcycle/copy: {RATIO}", stdout), stdout
    assert re.search(rf"ratio upcycle/mergekit: {RATIO} \(target <= 0.5x: (MET|NOT MET)\)", stdout), stdout
    assert re.search(rf"ratio peak RSS upcycle/mergekit: {RATIO}", stdout), stdout
    mk = result["mergekit"]
    assert mk["seconds"] > 0 and mk["peak_rss_bytes"] > 0 and result["mergekit_version"]
    # the same job: mergekit's weights are as many bytes as ours (8 copies of every FFN; the
    # other files, moeconv's report.html among them, differ)
    assert abs(mk["weights_bytes"] - result["upcycle"]["weights_bytes"]) < 0.01 * mk["weights_bytes"]


def test_mergekit_is_given_our_job():
    cfg = yaml.safe_load(bench.mergekit_config(Path("/src/dense"), 8))
    assert cfg["base_model"] == "/src/dense" and cfg["gate_mode"] == "random"
    assert cfg["experts_per_token"] == 2 and cfg["dtype"] == "bfloat16"
    assert [e["source_model"] for e in cfg["experts"]] == ["/src/dense"] * 8
    argv = bench.mergekit_argv(Path("/venv"), Path("c.yml"), Path("out"))
    assert argv[0] == "/venv/bin/mergekit-moe" and "--i-understand-this-is-not-useful-without-training" in argv
    assert bench.moeconv_argv(Path("s"), Path("o"), 8)[3:] == ["upcycle", "s", "o", "--num-experts", "8", "--top-k", "2",
                                                              "--router-init", "normal"]


def test_synthetic_llama_is_what_transformers_builds(tmp_path):
    from transformers import AutoModelForCausalLM
    info = bench.build_checkpoint(tmp_path / "d", bench.QUICK, shard_size="100KB")
    assert info["shards"] > 1
    model, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "d", output_loading_info=True,
                                                          local_files_only=True)
    assert not any(loading.values()), loading
    state = model.state_dict()
    assert {n: tuple(state[n].shape) for n in state} == dict(bench.llama_specs(bench.QUICK))
    assert info["bytes"] == sum(t.numel() * 2 for t in state.values())
    # the full shape is the issue's: 12 layers, hidden 2048, ~1.4 GiB of bf16
    full = sum(2 * math.prod(d) for _, d in bench.llama_specs(bench.FULL))
    assert bench.FULL.layers == 12 and bench.FULL.hidden == 2048 and 1.3 * 2**30 < full < 1.5 * 2**30


def test_targets_are_judged_from_the_measurements():
    s = bench.summarize({"seconds": 30.0, "peak_rss_bytes": 1}, {"seconds": 20.0}, {"seconds": 50.0, "peak_rss_bytes": 4})
    assert s == {"upcycle_over_copy": 1.5, "upcycle_over_mergekit": 0.6, "rss_upcycle_over_mergekit": 0.25,
                 "target_copy_met": True, "target_mergekit_met": False}
    failed = bench.summarize({"error": "boom"}, {"seconds": 20.0}, {"skipped": "no venv"})
    assert failed["upcycle_over_copy"] is None and failed["target_copy_met"] is None
    lines = bench.report_lines({"summary": failed, "copy": {"seconds": 20.0, "cpu_s": 9.0, "peak_rss_bytes": 2**30},
                                "upcycle": {"error": "boom"}, "mergekit": {"skipped": "no venv"}})
    assert "moeconv upcycle: FAILED: boom" in lines and "mergekit-moe: skipped: no venv" in lines
    assert "copy floor: 20.00 s (cpu 9.0 s), peak RSS 1.00 GiB" in lines
    assert "ratio upcycle/mergekit: n/a (mergekit skipped: no venv) (target <= 0.5x: n/a)" in lines
