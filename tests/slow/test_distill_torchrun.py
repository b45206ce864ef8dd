"""`moeconv distill` under torchrun: 2 processes (gloo, CPU) give the same weights, to fp32
tolerance, as 1 process over the same global batches (--micro-batch-size fixed, so each
micro-batch is the same rows either way), rank 0 alone writes OUT / metrics / checkpoints, and a
2-process run resumed from its checkpoint ends where the uninterrupted one did."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "passes"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from upcycle_helpers import build_dense, save_dense
    from moeconv import Context, Pipeline, load
    from moeconv.io.save import save_checkpoint
    from passes.sparsify import Sparsify
    from passes.upcycle import Upcycle
    root = tmp_path_factory.mktemp("torchrun")
    save_dense(build_dense("llama"), root / "dense", tokenizer=True)
    state = Pipeline([Upcycle(num_experts=4, top_k=2, router_init="normal")]).run(load(root / "dense"), Context()).state
    for name in ("moe", "pruned"):  # written one after the other: sparsify prunes the model in place
        if name == "pruned":
            state = Pipeline([Sparsify(method="magnitude")]).run(state, Context()).state
        (root / name).mkdir()
        save_checkpoint(state, root / name)
        for f in (root / "dense").glob("tokenizer*"):
            (root / name / f.name).write_bytes(f.read_bytes())
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(3, 60)}" for _ in range(rng.randrange(10, 40))) for _ in range(80)]
    (root / "data.txt").write_text("\n\n".join(docs))
    return root


def run(nproc: int, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "moeconv.cli", "distill", *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "moeconv.cli", "distill", *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def weights(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(out / "model.safetensors")


def common(setup):
    # every loss term on, including the batch-statistic load balance: identical micro-batches make
    # even that one match
    return ["--teacher", setup / "moe", "--student", setup / "pruned", "--data", setup / "data.txt",
            "--mode", "moe-to-moe", "--loss-weights", "kl=1,ce=0.1,router=1,balance=0.01,z=0.001",
            "--steps", 4, "--seq-len", 16, "--batch-size", 8, "--micro-batch-size", 2, "--lr", 2e-3]


def test_two_processes_match_one(setup, tmp_path):
    run(1, *common(setup), tmp_path / "one")
    run(2, *common(setup), tmp_path / "two", "--checkpoint-every", 2)
    one, two, start = weights(tmp_path / "one"), weights(tmp_path / "two"), weights(setup / "pruned")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 100 * 1e-6, "training moved the weights too little for the comparison to mean anything"
    rep = json.loads((tmp_path / "two" / "report.json").read_text())["passes"][0]["metrics"]
    assert rep["world_size"] == 2
    log = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x["kind"] == "train"] == [1, 2, 3, 4]  # rank 0 only: no duplicates
    ckpt = tmp_path / "two.run" / "checkpoints" / "step-00000002"
    assert {"rng-rank0.pt", "rng-rank1.pt", "trainable.safetensors", "optimizer.pt", "trainer.json"} <= {
        p.name for p in ckpt.iterdir()}

    # resume the 2-process run from step 2: same final weights as its uninterrupted run
    run(2, *common(setup), tmp_path / "resumed", "--resume", ckpt)
    resumed = weights(tmp_path / "resumed")
    for k in two:
        torch.testing.assert_close(resumed[k], two[k], rtol=0, atol=1e-7, msg=k)


# ---- FSDP2: the same numbers with each process holding half of everything -----------------------

def relative_max_diff(a: dict, b: dict) -> float:
    """max |a − b| / max |b| over every tensor of the model."""
    return max((a[k] - b[k]).abs().max().item() for k in b) / max(b[k].abs().max().item() for k in b)


def per_tensor_relative_diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b)


FSDP_CASES = {  # mode → (teacher, student, extra options)
    "heal": ("moe", "pruned", []),
    "router-only": ("moe", "pruned", ["--loss-weights", "kl=1,router=1"]),
    "moe-to-dense": ("moe", "dense", ["--loss-weights", "kl=1,ce=0.1,hidden=0.5"]),
}


def fsdp_args(setup, mode: str) -> list:
    teacher, student, extra = FSDP_CASES[mode]
    return ["--teacher", setup / teacher, "--student", setup / student, "--data", setup / "data.txt",
            "--mode", mode, *extra, "--steps", 4, "--seq-len", 16, "--batch-size", 8, "--micro-batch-size", 2,
            "--lr", 2e-3]


@pytest.mark.parametrize("mode", sorted(FSDP_CASES))
def test_fsdp_matches_one_process(setup, tmp_path, mode):
    run(1, *fsdp_args(setup, mode), tmp_path / "one")
    run(2, *fsdp_args(setup, mode), tmp_path / "fsdp", "--strategy", "fsdp")
    run(2, *fsdp_args(setup, mode), tmp_path / "ddp", "--strategy", "ddp")
    one, fsdp, ddp = weights(tmp_path / "one"), weights(tmp_path / "fsdp"), weights(tmp_path / "ddp")
    start = weights(setup / FSDP_CASES[mode][1])
    assert one.keys() == fsdp.keys() == start.keys()
    # one process vs two: the gradients are summed in another order, and Adam's normalisation
    # makes the router's smallest gradients carry that (DDP's figure is the same)
    assert relative_max_diff(fsdp, one) <= 1e-5
    # FSDP vs DDP over the same two processes: the same update, every tensor
    assert per_tensor_relative_diff(fsdp, ddp) <= 1e-6
    moved = {k for k in one if not torch.equal(one[k], start[k])}
    assert moved, "training changed nothing: the comparison would mean nothing"
    if mode == "router-only":  # only routers moved, in both runs
        assert all(".gate." in k or "router" in k for k in moved), sorted(moved)[:3]
        assert {k for k in fsdp if not torch.equal(fsdp[k], start[k])} == moved
    if mode == "heal":  # the 2:4 zeros stayed zeros on every shard
        zeros = {k: start[k] == 0 for k in start if start[k].dim() == 2 and bool((start[k] == 0).any())}
        assert zeros, "the pruned student has no 2:4 zeros to keep"
        for k, z in zeros.items():
            assert not fsdp[k][z].any(), k
    m = json.loads((tmp_path / "fsdp" / "report.json").read_text())["passes"][0]["metrics"]
    assert (m["strategy"], m["world_size"]) == ("fsdp", 2)
    measured = m["memory_per_rank"]["measured"]
    assert measured["strategy"] == "fsdp" and measured["optimizer_state"] > 0


def test_fsdp_resume_gives_the_uninterrupted_weights(setup, tmp_path):
    args = [*fsdp_args(setup, "heal"), "--strategy", "fsdp", "--checkpoint-every", 2]
    run(2, *args, tmp_path / "whole")
    ckpt = tmp_path / "whole.run" / "checkpoints" / "step-00000002"
    assert {"rng-rank0.pt", "rng-rank1.pt", "trainable.safetensors", "masks.safetensors", "optimizer.pt"} <= {
        p.name for p in ckpt.iterdir()}
    run(2, *args, tmp_path / "resumed", "--resume", ckpt)
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-7, msg=k)
    # the checkpoint format is the strategy's own business: a DDP run resumes from it too
    run(2, *fsdp_args(setup, "heal"), tmp_path / "as-ddp", "--strategy", "ddp", "--resume", ckpt)
    assert relative_max_diff(weights(tmp_path / "as-ddp"), whole) <= 1e-5


def test_fsdp_bf16_mixed_precision_trains(setup, tmp_path):
    run(2, *fsdp_args(setup, "heal"), tmp_path / "bf16", "--strategy", "fsdp", "--mixed-precision", "bf16")
    run(1, *fsdp_args(setup, "heal"), tmp_path / "one")
    got, one, start = weights(tmp_path / "bf16"), weights(tmp_path / "one"), weights(setup / "pruned")
    assert all(v.dtype == start[k].dtype for k, v in got.items())  # fp32 master weights, written as read
    # Adam moves each weight by about lr per step whatever the gradient's size, so bf16 rounding can
    # flip single small updates; as a whole the bf16 run must follow the fp32 one, not exactly
    step = sum(((one[k] - start[k]).double() ** 2).sum() for k in one) ** 0.5
    diff = sum(((got[k] - one[k]).double() ** 2).sum() for k in one) ** 0.5
    assert 0 < diff < 0.5 * step, (diff, step)


def test_fsdp_trains_a_bf16_student_whose_routers_are_fp32(setup, tmp_path):
    """A bf16 checkpoint trains with its routers in fp32 (`MoEBlock`): FSDP needs one dtype per
    unit, so the routers are sharded as units of their own."""
    from safetensors.torch import save_file
    for name in ("moe", "pruned"):
        shutil.copytree(setup / name, tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.bfloat16() for k, v in weights(setup / name).items()}, tmp_path / name / "model.safetensors",
                  metadata={"format": "pt"})
    args = ["--teacher", tmp_path / "moe", "--student", tmp_path / "pruned", "--data", setup / "data.txt",
            "--mode", "heal", "--steps", 3, "--seq-len", 16, "--batch-size", 8, "--micro-batch-size", 2, "--lr", 2e-3]
    run(2, *args, tmp_path / "fsdp", "--strategy", "fsdp")
    run(2, *args, tmp_path / "ddp", "--strategy", "ddp")
    fsdp, ddp, start = weights(tmp_path / "fsdp"), weights(tmp_path / "ddp"), weights(tmp_path / "pruned")
    assert all(v.dtype == torch.bfloat16 for v in fsdp.values())
    assert any(not torch.equal(fsdp[k], start[k]) for k in start)
    assert per_tensor_relative_diff(fsdp, ddp) <= 1e-6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per process: 2 GPUs")
def test_fsdp_on_nccl_matches_one_process(setup, tmp_path):
    """The same code path on NCCL (one GPU per process) as on gloo."""
    run(1, *fsdp_args(setup, "heal"), tmp_path / "one")
    run(2, *fsdp_args(setup, "heal"), tmp_path / "nccl", "--strategy", "fsdp", "--device", "cuda")
    assert relative_max_diff(weights(tmp_path / "nccl"), weights(tmp_path / "one")) <= 1e-5
    m = json.loads((tmp_path / "nccl" / "report.json").read_text())["passes"][0]["metrics"]
    assert m["strategy"] == "fsdp"
