"""Runs one rank of a data-parallel training job for test_trainer_distributed (started with
torch.multiprocessing.spawn; gloo over a file store, CPU)."""
from __future__ import annotations

import torch

from tiny_lm import TinyLM, rows
from moeconv.train.objective import DistillObjective, LossWeights, ObjectiveSpec
from moeconv.train.trainer import TrainConfig, Trainer, init_distributed

WEIGHTS = LossWeights(kl=1.0, ce=0.1, router=0.5, balance=0.01, z=0.001)
CONFIG = TrainConfig(steps=4, lr=3e-3, batch_size=8, micro_batch_size=2, seed=3)


def build():
    teacher = TinyLM(seed=1)
    student = TinyLM(seed=2)
    return DistillObjective(student, teacher, ObjectiveSpec(WEIGHTS, temperature=2.0))


def train(dist=None, run_dir=None):
    obj = build()
    result = Trainer(obj, rows(24), CONFIG, eval_rows=rows(4, seed=9), dist=dist, run_dir=run_dir).fit()
    return obj.student, result


def worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as tdist
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        dist = init_distributed()
        assert (dist.rank, dist.world_size, dist.backend) == (rank, world, "gloo")
        student, result = train(dist)
        if rank == 0:
            torch.save({"weights": student.state_dict(), "history": result.history, "evals": result.evals}, out)
    finally:
        tdist.destroy_process_group()
