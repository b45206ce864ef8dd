"""The training loop: exact resume, global batches independent of the micro-batch split, fixed
masks, data order as a pure function of the step, metrics log, and refusals."""
import json

import pytest
import torch

from tiny_lm import TinyLM, rows, weights
from moeconv.errors import ConfigError, InputError
from moeconv.train.objective import DistillObjective, LossWeights, ObjectiveSpec
from moeconv.train.trainer import TrainConfig, Trainer, find_checkpoint

KL = LossWeights(kl=1.0)


def objective(w=KL, **kw):
    return DistillObjective(TinyLM(seed=2, **kw), TinyLM(seed=1), ObjectiveSpec(w, temperature=2.0))


class Stop(Exception):
    pass


def test_resume_gives_the_same_final_weights_as_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=6, lr=3e-3, batch_size=4, micro_batch_size=2, checkpoint_every=2, seed=5)
    w = LossWeights(kl=1.0, ce=0.2, router=0.0, balance=0.01, z=0.001)
    data, held = rows(10), rows(4, seed=8)
    full = objective(w)
    Trainer(full, data, cfg, eval_rows=held, run_dir=tmp_path / "a").fit()

    broken = objective(w)

    def stop_at_5(ev):
        if ev.step == 5:
            raise Stop  # after the step-4 checkpoint, with step 5 already applied in memory
    with pytest.raises(Stop):
        Trainer(broken, data, cfg, eval_rows=held, run_dir=tmp_path / "b", on_step=stop_at_5).fit()
    assert find_checkpoint(tmp_path / "b").name == "step-00000004"

    resumed = objective(w)  # fresh process state: start weights again, then the checkpoint
    result = Trainer(resumed, data, cfg, eval_rows=held, run_dir=tmp_path / "b").fit(tmp_path / "b")
    assert result.resumed_from == 4 and [r["step"] for r in result.history] == [5, 6]
    a, b = weights(full.student), weights(resumed.student)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert not torch.equal(a["head.weight"], TinyLM(seed=2).head.weight)
    # the log holds each step once, the resume marked, and the before/after evaluations
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 6]
    assert [r["step"] for r in log if r["kind"] == "resume"] == [4]
    assert result.evals[0]["step"] == 0  # the "before" evaluation survives the resume
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


def test_resume_refuses_a_different_run(tmp_path):
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=4, checkpoint_every=1)
    Trainer(objective(), rows(8), cfg, run_dir=tmp_path).fit()
    with pytest.raises(ConfigError, match="lr was 0.001, now 0.002"):
        Trainer(objective(), rows(8), TrainConfig(**{**cfg.__dict__, "lr": 2e-3}), run_dir=tmp_path).fit(tmp_path)
    with pytest.raises(InputError, match="training data differs"):
        Trainer(objective(), rows(8, seed=4), cfg, run_dir=tmp_path).fit(tmp_path)
    with pytest.raises(InputError, match="no training checkpoint"):
        Trainer(objective(), rows(8), cfg).fit(tmp_path / "nowhere")


def test_micro_batch_split_does_not_change_the_update():
    # Per-token losses (KL, CE, z) are means over equal-length rows: any split of the global batch
    # gives the same gradient. (Load balance uses batch statistics, so it is left out here.)
    w = LossWeights(kl=1.0, ce=0.3, z=0.01)
    cfg = dict(steps=3, lr=3e-3, batch_size=8, seed=1)
    a, b = objective(w), objective(w)
    Trainer(a, rows(16), TrainConfig(micro_batch_size=8, **cfg)).fit()
    Trainer(b, rows(16), TrainConfig(micro_batch_size=2, **cfg)).fit()
    wa, wb = weights(a.student), weights(b.student)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_masked_weights_stay_exactly_zero():
    obj = objective()
    expert = obj.student.layers[0].mlp.experts[1][0]
    mask = torch.rand(expert.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        expert.weight.masked_fill_(mask, 0)
    before = expert.weight.detach().clone()
    Trainer(obj, rows(8), TrainConfig(steps=4, lr=1e-2, batch_size=4, weight_decay=0.1),
            masks={"student.layers.0.mlp.experts.1.0.weight": mask}).fit()
    w = expert.weight.detach()
    assert torch.equal(w == 0, mask)  # same zero set: nothing else became zero, no zero came back
    assert not torch.equal(w[~mask], before[~mask])


def test_global_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    obj = objective()
    data = rows(10)
    t1 = Trainer(obj, data, TrainConfig(steps=10, batch_size=4, seed=7))
    t2 = Trainer(obj, data, TrainConfig(steps=10, batch_size=4, seed=7))
    assert torch.equal(t1.global_batch(4), t2.global_batch(4))
    seen = torch.cat([t1.global_batch(s) for s in range(1, 6)])  # 20 rows = 2 epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert seen[:10].tolist() != seen[10:].tolist()  # reshuffled each epoch


def test_bad_batch_settings_are_refused():
    with pytest.raises(ConfigError, match="micro-batch size 3"):
        Trainer(objective(), rows(8), TrainConfig(steps=1, batch_size=4, micro_batch_size=3))
    obj = objective()
    obj.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        Trainer(obj, rows(8), TrainConfig(steps=1))


def test_lr_schedule():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert [round(cfg.lr_at(s), 6) for s in (1, 2)] == [0.5, 1.0]
    assert cfg.lr_at(10) == pytest.approx(0.1)
    assert TrainConfig(steps=10, lr=1.0, schedule="constant").lr_at(7) == 1.0


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path):
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=4, checkpoint_every=2)
    Trainer(objective(), rows(8), cfg, run_dir=tmp_path).fit()
    with pytest.raises(ConfigError, match="checkpoints of an earlier run"):
        Trainer(objective(), rows(8), cfg, run_dir=tmp_path).fit()
