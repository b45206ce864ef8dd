"""`moeconv upcycle` on bad input: exit code 2, one error message on stderr (no traceback), and
nothing left behind: no OUT, no hidden `.moeconv-tmp-` sibling, an existing OUT untouched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from upcycle_helpers import EXPERTS, cli_ok, leftovers, run_cli

BASE = ["--num-experts", str(EXPERTS), "--top-k", "2"]


def _assert_refused(r, parent: Path, out: Path, *, contains: str):
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.stderr!r} {r.exception!r}"
    err = r.stderr
    assert "Traceback" not in err and "Traceback" not in r.stdout
    flat = " ".join(err.split())  # one-line-ness: test_error_message_is_one_line
    assert flat.startswith("error: ") and flat.count("error:") == 1, err
    assert contains.lower() in flat.lower(), flat
    assert r.stdout.strip() == ""
    assert not out.exists(), f"{out} was created"
    assert leftovers(parent) == [], leftovers(parent)


def _no_config(tmp_path, dense_ckpt):
    src = tmp_path / "no-config"
    src.mkdir()
    (src / "model.safetensors").write_bytes((dense_ckpt("llama") / "model.safetensors").read_bytes())
    return src


CASES = {
    # id: (source maker, extra args, text the message must contain)
    "missing-config": (_no_config, BASE, "config.json"),
    "missing-source": (lambda tmp, ck: tmp / "nowhere", BASE, "no such file"),
    "gpt2-format-hf": (lambda tmp, ck: ck("gpt2"), [*BASE, "--format", "hf"], "gpt2"),
    "topk-above-experts": (lambda tmp, ck: ck("llama"), ["--num-experts", "4", "--top-k", "5"], "top_k"),
    "topk-zero": (lambda tmp, ck: ck("llama"), ["--num-experts", "4", "--top-k", "0"], "top_k"),
    "one-expert": (lambda tmp, ck: ck("llama"), ["--num-experts", "1", "--top-k", "1"], "num_experts"),
    "bad-layers-every": (lambda tmp, ck: ck("llama"), [*BASE, "--layers", "every:x"], "every:x"),
    "bad-layers-zero-step": (lambda tmp, ck: ck("llama"), [*BASE, "--layers", "every:0"], "every:0"),
    "bad-layers-regex": (lambda tmp, ck: ck("llama"), [*BASE, "--layers", "re:("], "regex"),
    "layers-select-nothing": (lambda tmp, ck: ck("llama"), [*BASE, "--layers", "layers:9"], "no FFN site"),
    "layers-subset-mixtral": (lambda tmp, ck: ck("llama"), [*BASE, "--layers", "every:2"], "dense layers"),
    "qwen2-no-shared-experts": (lambda tmp, ck: ck("qwen2"), [*BASE, "--no-shared-experts"], "--format moeconv"),
    "qwen3-with-shared": (lambda tmp, ck: ck("qwen3"), [*BASE, "--shared-experts"], "shared expert"),
    "mixtral-no-renormalize": (lambda tmp, ck: ck("llama"), [*BASE, "--no-renormalize"], "renormalis"),
    "split-indivisible": (lambda tmp, ck: ck("llama"), ["--num-experts", "3", "--top-k", "3", "--expert-init",
                                                        "split"], "divide"),
    "bad-format": (lambda tmp, ck: ck("llama"), [*BASE, "--format", "onnx"], "--format"),
    "bad-expert-init": (lambda tmp, ck: ck("llama"), [*BASE, "--expert-init", "clone"], "expert_init"),
    "bad-shard-size": (lambda tmp, ck: ck("llama"), [*BASE, "--shard-size", "lots"], "size"),
    "hidden-without-calib": (lambda tmp, ck: ck("llama"), [*BASE, "--router-init", "hidden"], "--calib"),
    "unknown-builtin": (lambda tmp, ck: "builtin:nope", BASE, "built-in"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_and_leaves_nothing(case, tmp_path, dense_ckpt):
    make_src, args, contains = CASES[case]
    src = make_src(tmp_path, dense_ckpt)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    r = run_cli(src, out, *args)
    _assert_refused(r, work, out, contains=contains)


def test_existing_out_without_force_is_untouched(tmp_path, dense_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    r = run_cli(dense_ckpt("llama"), out, *BASE)
    assert r.exit_code == 2
    assert "--force" in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_existing_out_survives_a_failed_forced_run(tmp_path, dense_ckpt):
    """--force replaces OUT only once the new output is verified: a run failing midway keeps it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_cli(dense_ckpt("llama"), out, *BASE, "--layers", "every:2", "--force")  # fails inside the job
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_force_replaces_existing_out(tmp_path, dense_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    cli_ok(dense_ckpt("llama"), out, *BASE, "--force")
    assert not (out / "stale.txt").exists()
    assert (out / "report.json").is_file() and json.loads((out / "report.json").read_text())["verification"]
    assert leftovers(tmp_path) == []


def test_output_inside_source_is_refused(tmp_path, dense_ckpt):
    src = tmp_path / "src"
    src.mkdir()
    for f in dense_ckpt("llama").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    before = sorted(p.name for p in src.iterdir())
    r = run_cli(src, src / "out", *BASE)
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert sorted(p.name for p in src.iterdir()) == before


def test_success_prints_a_summary_on_stdout(tmp_path, dense_ckpt):
    out = tmp_path / "out"
    r = cli_ok(dense_ckpt("qwen3"), out, *BASE)
    assert "Traceback" not in r.stderr
    assert "Qwen3MoeForCausalLM" in " ".join(r.stdout.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_error_message_is_one_line(tmp_path, dense_ckpt):
    """Regression: rich used to wrap the message at the console width (80 columns off a terminal)."""
    # A long OUT path makes the message longer than any console is wide.
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    out = deep / "out"
    out.mkdir(parents=True)
    r = run_cli(dense_ckpt("llama"), out, *BASE)
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
