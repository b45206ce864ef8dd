"""Calibrated passes streamed one decoder layer at a time (moeconv/jobs/stream_layerwise.py): a
single pass writes the in-memory route's tensors bit for bit; a recipe runs in one sweep with at
most one decoder layer in memory; what cannot stream is named; the CLI takes this route for
safetensors checkpoints and refuses an over-budget plan before reading a tensor."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeconv
from moeconv import Context
from moeconv.errors import UnsupportedError
from moeconv.io.safetensors_io import SourceCheckpoint
from moeconv.jobs.pipeline_job import run_to_dir
from moeconv.jobs.stream_layerwise import run_streamed, why_not_streamed
from moeconv.sparsity import SparsityPattern, check_pattern
from moeconv.stream import residency
from passes.prune_experts import PruneExperts
from passes.quantize import Quantize
from passes.sparsify import Sparsify
from passes.upcycle import Upcycle
from tests.stream.test_stream import _mixtral, _qwen2_moe

ROOT = Path(__file__).resolve().parents[2]
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def source(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("layerwise") / request.param
    return _mixtral(path) if request.param == "mixtral" else _qwen2_moe(path)


def _same_tensors(a: Path, b: Path) -> None:
    x, y = SourceCheckpoint(a), SourceCheckpoint(b)
    assert set(x.names()) == set(y.names())
    for n in x.names():
        assert x.specs[n] == y.specs[n] and torch.equal(x.get(n), y.get(n)), n


@pytest.mark.parametrize("make", [lambda: [Sparsify(method="wanda")], lambda: [Sparsify(method="sparsegpt")],
                                  lambda: [PruneExperts(keep=2)], lambda: [PruneExperts(keep=3, merge=True)],
                                  lambda: [PruneExperts(keep=3, recalibrate_router=True, recalib_steps=5)]],
                         ids=["wanda", "sparsegpt", "prune", "prune-merge", "prune-recalibrate"])
def test_one_pass_streamed_equals_the_in_memory_route(source, make, tmp_path):
    ctx = Context(calibration=CALIB)
    streamed = run_streamed(source, tmp_path / "s", make(), ctx=ctx)
    in_memory = run_to_dir(source, tmp_path / "m", make(), ctx=ctx)
    _same_tensors(tmp_path / "s", tmp_path / "m")
    assert streamed["written"]["route"] == "streaming" and streamed["written"]["format"] == in_memory["written"]["format"]
    a, b = streamed["passes"][0], in_memory["passes"][0]
    assert a["summary"] == b["summary"] and a["tables"]["experts"] == b["tables"]["experts"]
    v = streamed["verification"]
    assert v["against"] == "float source" and v["max_abs_diff"] > 0 and 0 <= v["top1_agreement"] <= 1
    assert a["metrics"]["rel_max_diff"] == v["rel_max_diff"]  # the measured change, under the check's name


def test_a_recipe_is_one_sweep_with_one_layer_in_memory(source, tmp_path, monkeypatch):
    """prune-experts → sparsify → quantize: each layer read once and written once; whenever a
    layer is read, every other decoder layer is on `meta`."""
    entered, resident = [], []
    enter = residency.StreamedLayers.enter

    def counting(self, index, path):
        enter(self, index, path)
        entered.append(index)
        resident.append(sum(any(p.device.type != "meta" for p in layer.parameters())
                            for layer in self.skel.module.get_submodule(self.skel.prefix)))
    monkeypatch.setattr(residency.StreamedLayers, "enter", counting)
    passes = [PruneExperts(keep=3), Sparsify(method="wanda"), Quantize(method="int8")]
    said = []
    report = run_streamed(source, tmp_path / "out", passes,
                          ctx=Context(calibration=CALIB, progress=lambda *a, **kw: said.append((a, kw))))
    assert entered == [0, 1, 2] and resident == [1, 1, 1]  # three layers, one sweep, one layer at a time
    # progress names the pass at work on each layer and the bytes written so far
    sweep = [(a[1], kw["detail"]) for a, kw in said if a[0] == "layers (read, changed, written)"]
    assert [d for done, d in sweep if done == 0] == ["prune-experts · 0 B written", "prune-experts · 0 B written",
                                                     "sparsify · 0 B written", "quantize and write · 0 B written"], sweep
    after_first = [d for done, d in sweep if done == 1][1]  # layer 0 is on disk by then
    assert after_first.startswith("prune-experts · ") and after_first.endswith("KiB written"), sweep
    assert [p["pass_name"] for p in report["passes"]] == ["prune-experts", "sparsify", "quantize"]
    assert all(p["metrics"]["route"] == "streaming" for p in report["passes"])
    # one sweep, yet each row has its own time (its per-layer work, summed): no "-" in report.html
    assert all(isinstance(p["seconds"], float) and p["seconds"] > 0 for p in report["passes"]), report["passes"]
    assert report["written"]["format"] == "moeconv-quantized" and report["written"]["shards"] == 4
    state = moeconv.load(tmp_path / "out")  # the consumer of this format
    blocks = state.moe_blocks()
    assert len(blocks) == 3 and all(b.num_experts == 3 for _, b in blocks)
    assert "quantized" in state.facts()
    rows = report["passes"][1]["tables"]["matrices"]
    assert rows and all(r["sparsity"] == 0.5 for r in rows)
    assert all(".experts.3." not in r["matrix"] for r in rows)  # the dropped expert is no target any more


def test_a_float_recipe_keeps_the_pattern_in_the_written_weights(source, tmp_path):
    run_streamed(source, tmp_path / "out", [PruneExperts(keep=3), Sparsify(method="sparsegpt")],
                 ctx=Context(calibration=CALIB))
    state = moeconv.load(tmp_path / "out")
    pat = SparsityPattern.parse("2:4")
    experts = [(n, m) for n, m in state.module.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)]
    assert experts and all(b.num_experts == 3 for _, b in state.moe_blocks())
    for name, m in experts:
        check_pattern(m.weight.detach(), pat, name)


def test_what_cannot_stream_is_named(source, tmp_path):
    assert why_not_streamed([Sparsify(method="wanda")], calibrated=False).startswith("the layer-by-layer passes need")
    assert "whole model" in why_not_streamed([Upcycle(num_experts=2), Sparsify(method="wanda")], calibrated=True)
    assert "global" in why_not_streamed([PruneExperts(ratio=0.5, per_layer="global")], calibrated=True)
    assert why_not_streamed([], calibrated=True) == "no pass"
    assert why_not_streamed([PruneExperts(keep=2), Quantize(method="int8")], calibrated=True) is None
    assert why_not_streamed([PruneExperts(keep=2)], calibrated=False).startswith("the layer-by-layer passes need")
    # data-free recipes stream without calibration data: the sweep runs no forward
    assert why_not_streamed([Quantize(method="int8")], calibrated=False) is None
    assert why_not_streamed([Sparsify(method="magnitude"), Quantize(method="nf4")], calibrated=False) is None
    with pytest.raises(UnsupportedError, match="cannot stream this recipe"):
        run_streamed(source, tmp_path / "out", [Sparsify(method="wanda")], ctx=Context())
    assert not (tmp_path / "out").exists()


def test_a_data_free_recipe_streams_without_calibration(source, tmp_path):
    """magnitude 2:4 writes the in-memory route's tensors; magnitude → int8 and int8 alone stream too
    (one decoder layer at a time, no forward), and what they write loads with its consumer."""
    streamed = run_streamed(source, tmp_path / "s", [Sparsify(method="magnitude")], ctx=Context())
    in_memory = run_to_dir(source, tmp_path / "m", [Sparsify(method="magnitude")], ctx=Context())
    _same_tensors(tmp_path / "s", tmp_path / "m")
    assert streamed["written"]["route"] == "streaming"
    assert streamed["passes"][0]["summary"] == in_memory["passes"][0]["summary"]
    for name, passes in {"sq": [Sparsify(method="magnitude"), Quantize(method="int8")],
                         "q": [Quantize(method="int8")]}.items():
        report = run_streamed(source, tmp_path / name, passes, ctx=Context())
        assert [p["pass_name"] for p in report["passes"]] == [p.name for p in passes]
        assert report["written"]["route"] == "streaming" and report["verification"]["max_abs_diff"] > 0
        assert "quantized" in moeconv.load(tmp_path / name).facts()


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "moeconv.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_the_cli_streams_a_recipe_and_refuses_an_over_budget_plan_first(tmp_path):
    from safetensors.torch import save_file
    src = _mixtral(tmp_path / "src")
    ids = tmp_path / "ids.safetensors"
    save_file({"ids": CALIB}, ids)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - pass: prune-experts\n    keep: 3\n  - pass: sparsify\n    method: wanda\n"
                      "  - pass: quantize\n    method: nf4\n")
    r = _cli("run", recipe, "--model", src, "--out", tmp_path / "out", "--calib", ids)
    assert r.returncode == 0, r.stderr
    assert "streamed: every decoder layer read once" in " ".join(r.stdout.split())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["route"]["route"] == "streaming" and report["memory_plan"]["route"] == "streaming"
    assert (tmp_path / "out" / "tokenizer.json").exists() == (src / "tokenizer.json").exists()
    r = _cli("run", recipe, "--model", src, "--out", tmp_path / "small", "--calib", ids, "--max-memory", "10MB")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "one decoder layer at a time" in r.stderr and not (tmp_path / "small").exists()


def test_memory_does_not_grow_when_a_pass_drops_modules(tmp_path):
    """Experts prune-experts drops are out of the model but may stay referenced by garbage that
    only a full gc collects (the structure tracing makes such cycles): their weights are freed
    with the layer anyway, so the real tensors alive after each layer do not accumulate."""
    import gc

    import transformers
    from moeconv.calibrate import run_layerwise
    from moeconv.module_groups import module_groups
    from moeconv.stream.skeleton import Skeleton
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    skel = Skeleton.open(tmp_path / "src")
    job = PruneExperts(keep=6).layer_job(skel.state(), Context(calibration=CALIB))
    alive = []

    class Counting(residency.StreamedLayers):
        def leave(self, index, path, layer):
            super().leave(index, path, layer)
            alive.append(sum(o.numel() for o in gc.get_objects()  # plain tensors: not the fake ones tracing leaves
                             if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type != "meta"
                             and o.numel() >= 64 * 96))
    gc.collect()
    gc.disable()  # as in a long run, where a full collection is rare
    try:
        module_groups(skel.state())  # what the streamed jobs do first: traces the model (cyclic garbage)
        run_layerwise(skel.module, [CALIB], job.on_layer, residency=Counting(skel))
    finally:
        gc.enable()
    assert len(alive) == 6 and len(set(alive)) == 1, alive  # the embeddings and head only, after every layer


@pytest.mark.parametrize("make", [lambda: [Sparsify(method="wanda")],
                                  lambda: [PruneExperts(keep=3), Sparsify(method="sparsegpt"), Quantize(method="int8")]],
                         ids=["wanda", "recipe"])
def test_hidden_states_over_the_budget_spill_to_disk_and_change_nothing(source, make, tmp_path, monkeypatch):
    """With no memory for hidden states at all, every batch the sweep and the passes cache goes to
    the offload directory and is read back: the written tensors are the unbounded run's, bit for
    bit, and no file is left behind."""
    from moeconv.stream import activations
    written = []
    spill = activations._Spilled.write
    monkeypatch.setattr(activations._Spilled, "write",
                        classmethod(lambda cls, path, t: written.append(path) or spill.__func__(cls, path, t)))
    offload = tmp_path / "offload"
    offload.mkdir()
    ctx = Context(calibration=CALIB)
    bounded = run_streamed(source, tmp_path / "b", make(), ctx=ctx, activation_budget=0, offload_dir=offload)
    free = run_streamed(source, tmp_path / "f", make(), ctx=ctx)
    _same_tensors(tmp_path / "b", tmp_path / "f")
    assert len(written) > 0 and all(p.parent.parent == offload for p in written)
    assert bounded["activations"]["spilled_peak_bytes"] > 0 and "activations" not in free
    assert not list(offload.iterdir())
    assert bounded["verification"]["max_abs_diff"] == free["verification"]["max_abs_diff"]


def test_the_cli_takes_an_offload_dir_and_refuses_a_missing_one(tmp_path):
    from safetensors.torch import save_file
    src = _mixtral(tmp_path / "src")
    ids = tmp_path / "ids.safetensors"
    save_file({"ids": CALIB}, ids)
    r = _cli("sparsify", src, tmp_path / "bad", "--method", "wanda", "--calib", ids, "--offload-dir", tmp_path / "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--offload-dir" in r.stderr
    assert not (tmp_path / "bad").exists()
    offload = tmp_path / "offload"
    offload.mkdir()
    r = _cli("sparsify", src, tmp_path / "out", "--method", "wanda", "--calib", ids, "--offload-dir", offload)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["activations"] == {"spilled_peak_bytes": 0, "offload_dir": str(offload)}  # a tiny model fits
    assert report["memory_plan"]["spillable_bytes"] > 0
    assert not list(offload.iterdir()) and not [p for p in (tmp_path / "out").iterdir() if "activations" in p.name]
