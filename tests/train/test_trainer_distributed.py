"""Two processes (gloo, CPU) over the same global batches give the same weights, to fp32
tolerance, as one process: per-rank micro-batches + DDP gradient averaging = the same update."""
import pytest
import torch
import torch.multiprocessing as mp

import dist_worker

pytestmark = pytest.mark.slow  # two fresh interpreters importing torch: ~10-25 s on the shared 2 cores


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(dist_worker.worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    student, result = dist_worker.train()
    one = student.state_dict()
    assert two["weights"].keys() == one.keys()
    start = dist_worker.build().student.state_dict()
    moved = 0
    for k in one:
        torch.testing.assert_close(two["weights"][k], one[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(one[k], start[k]))
    assert moved > len(one) // 2, "training changed too few tensors for the comparison to mean anything"
    for a, b in zip(two["history"], result.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert set(a) >= {"kl", "ce", "router", "balance", "z"}
    assert two["evals"][-1]["eval_ppl"] == pytest.approx(result.evals[-1]["eval_ppl"], rel=1e-5)
