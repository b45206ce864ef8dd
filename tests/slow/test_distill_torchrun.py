"""`moeconv distill` under torchrun: 2 processes (gloo, CPU) give the same weights, to fp32
tolerance, as 1 process over the same global batches (--micro-batch-size fixed, so each
micro-batch is the same rows either way), rank 0 alone writes OUT / metrics / checkpoints, and a
2-process run resumed from its checkpoint ends where the uninterrupted one did."""
import json
import os
import random
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
    for name, st in (("moe", state), ("pruned", Pipeline([Sparsify(method="magnitude")]).run(state, Context()).state)):
        (root / name).mkdir()
        save_checkpoint(st, root / name)
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
