"""`moeconv distill` end to end on tiny checkpoints: the student comes back in its own format
(Mixtral stays Mixtral with its 2:4 zeros, a dense Llama stays a Llama directory, moeconv format
stays moeconv format), metrics are logged, --resume continues exactly, and bad input exits 2
with one line and no output."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from upcycle_helpers import VOCAB, leftovers, safetensors_dict


def distill(*args):
    from typer.testing import CliRunner
    from moeconv.cli import app
    return CliRunner().invoke(app, ["distill", *map(str, args)])


def ok(*args):
    r = distill(*args)
    assert r.exit_code == 0, f"exit {r.exit_code}: {r.stderr}\n{r.exception!r}"
    return r


def _save(state, path, tokenizer_from=None):
    """Write a state the way `run_to_dir` would, without its HTML report (seconds of matplotlib)."""
    from moeconv.io.save import save_checkpoint
    path.mkdir()
    save_checkpoint(state, path)
    for f in (tokenizer_from.glob("tokenizer*") if tokenizer_from else []):
        shutil.copy2(f, path / f.name)
    return path


def _upcycled(src, **kw):
    from moeconv import Context, Pipeline, load
    from passes.upcycle import Upcycle
    return Pipeline([Upcycle(num_experts=4, top_k=2, router_init="normal", **kw)]).run(load(src), Context()).state


@pytest.fixture(scope="module")
def models(tmp_path_factory, dense_ckpt):
    """teacher: llama upcycled to a 4-expert Mixtral; student: that Mixtral with 2:4 experts; text data."""
    from moeconv import Context, Pipeline
    from passes.sparsify import Sparsify
    root = tmp_path_factory.mktemp("distill")
    state = _upcycled(dense_ckpt("llama"))
    _save(state, root / "moe", dense_ckpt("llama"))
    _save(Pipeline([Sparsify(method="magnitude")]).run(state, Context()).state, root / "pruned", dense_ckpt("llama"))
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(3, 60)}" for _ in range(rng.randrange(10, 40))) for _ in range(60)]
    (root / "data.txt").write_text("\n\n".join(docs))
    return root


def test_heal_writes_mixtral_keeps_2to4_and_logs(models, tmp_path):
    out = tmp_path / "healed"
    r = ok("--teacher", models / "moe", "--student", models / "pruned", out, "--data", models / "data.txt",
           "--steps", 6, "--seq-len", 16, "--batch-size", 4, "--lr", 1e-3)
    assert "held-out perplexity" in r.stdout and "kept" in r.stdout
    flat = " ".join(r.stdout.replace("│", " ").split())  # the summary table's cells, borders dropped
    assert "strategy ddp (one process" in flat
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert (out / "tokenizer.json").is_file()
    before, after = safetensors_dict(models / "pruned"), safetensors_dict(out)
    experts = [k for k in after if ".experts." in k]
    assert experts and before.keys() == after.keys()
    for k in experts:
        w = after[k]
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all(), f"{k} lost its 2:4 pattern"
        assert torch.equal(w == 0, before[k] == 0)
    assert sum(not torch.equal(before[k], after[k]) for k in after) > len(after) // 2
    report = json.loads((out / "report.json").read_text())
    m = report["passes"][0]["metrics"]
    assert m["mode"] == "heal" and m["steps"] == 6 and report["verification"]["max_abs_diff"] == 0
    # the per-process memory: estimated for both strategies, measured for the one that ran
    memory = m["memory_per_rank"]
    assert memory["estimate"]["processes"] == 1 and memory["measured"]["strategy"] == "ddp"
    params = sum(v.numel() * v.element_size() for v in before.values())
    assert memory["measured"]["parameters"] >= 2 * params  # student and teacher, same size here
    assert memory["measured"]["optimizer_state"] >= 2 * params  # Adam's two moments of every weight
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if row["kind"] == "train"] == list(range(1, 7))
    assert {"loss", "kl", "lr", "tokens_per_s", "eta_s"} <= set(log[1])
    assert leftovers(tmp_path) == []


def test_resume_continues_to_the_same_weights(models, tmp_path):
    common = ["--teacher", models / "moe", "--student", models / "pruned", "--data", models / "data.txt",
              "--steps", 4, "--seq-len", 16, "--batch-size", 4, "--lr", 1e-3, "--checkpoint-every", 2]
    ok(*common, tmp_path / "a")
    ckpts = tmp_path / "a.run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    ok(*common, tmp_path / "b", "--resume", ckpts / "step-00000002")
    a, b = safetensors_dict(tmp_path / "a"), safetensors_dict(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "report.json").read_text())["passes"][0]["metrics"]["resumed_from"] == 2


def test_dense_student_stays_a_dense_hf_checkpoint(models, dense_ckpt, tmp_path):
    out = tmp_path / "dense"
    ok("--teacher", models / "moe", "--student", dense_ckpt("llama"), out, "--data", models / "data.txt",
       "--mode", "moe-to-dense", "--steps", 3, "--seq-len", 16, "--batch-size", 4, "--loss-weights", "kl=1,ce=0.1,hidden=0.1")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]


def test_moeconv_format_student_with_token_id_data(dense_ckpt, tmp_path):
    from safetensors.torch import save_file
    _save(_upcycled(dense_ckpt("gpt2")), tmp_path / "gpt2-moe")
    _save(_upcycled(dense_ckpt("gpt2"), seed=1), tmp_path / "gpt2-moe2")
    save_file({"ids": torch.randint(0, VOCAB, (600,), generator=torch.Generator().manual_seed(0))},
              tmp_path / "ids.safetensors")
    out = tmp_path / "routed"
    ok("--teacher", tmp_path / "gpt2-moe", "--student", tmp_path / "gpt2-moe2", out, "--data", tmp_path / "ids.safetensors",
       "--mode", "router-only", "--steps", 3, "--seq-len", 16, "--batch-size", 4, "--lr", 1e-2)
    assert "moeconv" in json.loads((out / "config.json").read_text())
    before, after = safetensors_dict(tmp_path / "gpt2-moe2"), safetensors_dict(out)
    changed = sorted(k for k in after if not torch.equal(before[k], after[k]))
    assert changed and all(k.endswith("router.weight") for k in changed), changed


@pytest.mark.parametrize("case", ["exists", "loss-weights", "mode", "no-data", "no-tokenizer", "layer-map",
                                  "teacher-is-out", "stale-checkpoints", "fsdp-one-process", "strategy",
                                  "mixed-precision-ddp"])
def test_bad_input_exits_2_with_one_line_and_no_output(case, models, dense_ckpt, tmp_path):
    out = tmp_path / "out"
    args = ["--teacher", models / "moe", "--student", models / "pruned", "--data", models / "data.txt",
            "--steps", 1, "--seq-len", 16]
    want = {"exists": "exists", "loss-weights": "--loss-weights", "mode": "mode", "no-data": "no such data file",
            "no-tokenizer": "tokenizer", "layer-map": "--layer-map", "teacher-is-out": "teacher",
            "stale-checkpoints": "earlier run", "fsdp-one-process": "torchrun", "strategy": "strategy",
            "mixed-precision-ddp": "fsdp"}[case]
    if case == "exists":
        out.mkdir()
    elif case == "loss-weights":
        args += ["--loss-weights", "kl=1,bogus=2"]
    elif case == "mode":
        args += ["--mode", "dense-to-moe"]
    elif case == "no-data":
        args[5] = tmp_path / "missing.txt"
    elif case == "no-tokenizer":
        shutil.copytree(models / "pruned", tmp_path / "student", ignore=shutil.ignore_patterns("tokenizer*"))
        args[3] = tmp_path / "student"
    elif case == "layer-map":
        args += ["--layer-map", "0-1"]
    elif case == "fsdp-one-process":  # FSDP shards over processes: refused before a model is loaded
        args += ["--strategy", "fsdp"]
    elif case == "strategy":
        args += ["--strategy", "zero3"]
    elif case == "mixed-precision-ddp":
        args += ["--strategy", "ddp", "--mixed-precision", "bf16"]
    elif case == "stale-checkpoints":  # OUT removed, its run directory kept: refuse to mix checkpoints
        (tmp_path / "out.run" / "checkpoints" / "step-00000009").mkdir(parents=True)
        args += ["--checkpoint-every", 1]
    elif case == "teacher-is-out":
        shutil.copytree(models / "moe", tmp_path / "t")
        args[1], out = tmp_path / "t", tmp_path / "t"
    r = distill(*args, out, *(["--force"] if case == "teacher-is-out" else []))
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.stderr} {r.exception!r}"
    flat = " ".join(r.stderr.split())
    assert flat.startswith("error: ") and flat.count("error:") == 1 and "Traceback" not in r.stderr
    assert want.lower() in flat.lower(), flat
    assert case in ("exists", "teacher-is-out") or not out.exists()
    assert leftovers(tmp_path) == []
