"""`moeconv quantize SRC OUT` end to end: the table of bytes per module group, report.json, the
consumer named; unsupported requests (unknown method, an already-quantized model, options of
another method) exit 2 with one line and write nothing; `--eval FILE` reports perplexity;
`moeconv inspect` shows the quantized layers."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from moeconv.cli import app
from upcycle_helpers import leftovers


def _cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_quantize_moe_checkpoint(dense_ckpt, tmp_path):
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    upcycle_checkpoint(dense_ckpt("llama"), tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2))
    (tmp_path / "eval.txt").write_text(" ".join(f"w{3 + i % 120}" for i in range(400)))
    r = _cli("quantize", tmp_path / "moe", tmp_path / "q", "--method", "nf4", "--blocksize", "32",
             "--eval", tmp_path / "eval.txt", "--eval-batches", "2", "--eval-seq-len", "64")
    assert r.exit_code == 0, r.stderr + repr(r.exception)
    assert "bytes per module group" in r.stdout and "moeconv.load" in r.stdout and "perplexity" in r.stdout
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["written"]["consumer"] == "moeconv"
    assert report["passes"][0]["metrics"]["ppl_after"] > 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(report["tokenizer_files"])
    assert report["recipe"][0]["pass"] == "quantize" and report["recipe"][0]["method"] == "nf4"
    inspected = _cli("inspect", tmp_path / "q", "--json")
    assert inspected.exit_code == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert {q["method"] for q in info["quantized_layers"] if q["group"] == "experts"} == {"nf4"}

    # quantizing the quantized output again: refused, nothing written
    r = _cli("quantize", tmp_path / "q", tmp_path / "again", "--method", "int8")
    assert r.exit_code == 2 and "already quantized" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "again").exists() and not leftovers(tmp_path)


def test_unsupported_requests_exit_2_and_write_nothing(dense_ckpt, tmp_path):
    src = dense_ckpt("llama")
    for args, msg in ((["--method", "int4"], "method"), (["--method", "int8", "--blocksize", "64"], "nf4/fp4 only"),
                      (["--method", "nf4", "--blocksize", "48"], "--block-size"),
                      (["--method", "nf4", "--compute-dtype", "float8"], "compute_dtype"),
                      (["--targets", "re:nothing"], "no layer to quantize")):
        r = _cli("quantize", src, tmp_path / "out", *args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_dense_output_names_transformers(dense_ckpt, tmp_path):
    r = _cli("quantize", dense_ckpt("llama"), tmp_path / "q", "--method", "int8")
    assert r.exit_code == 0, r.stderr + repr(r.exception)
    assert "transformers.AutoModelForCausalLM" in r.stdout
    assert "quantization_config" in json.loads((tmp_path / "q" / "config.json").read_text())
