"""The per-process training memory estimate (`moeconv.train.memory`): what each strategy holds,
and `--strategy auto`'s choice from it."""
from moeconv.train.memory import TrainingSizes, both, choose_strategy, per_rank

GB = 2**30
SIZES = TrainingSizes(student=10 * GB, teacher=10 * GB, trained=10 * GB, largest_layer=GB // 4, activations=GB)


def test_fsdp_holds_a_share_of_parameters_gradients_and_optimizer_state():
    ddp, fsdp = per_rank(SIZES, 4, "ddp"), per_rank(SIZES, 4, "fsdp")
    assert ddp["parameters"] == 20 * GB and ddp["optimizer_state"] == 20 * GB and ddp["gradients"] == 20 * GB
    assert fsdp["parameters"] == 5 * GB + GB // 2  # a quarter, plus one layer gathered and one prefetched
    assert fsdp["optimizer_state"] == 5 * GB
    assert fsdp["gradients"] == 10 * GB // 4 + GB // 4
    # accumulating micro-batches keeps unsharded gradients until the last one
    assert per_rank(SIZES, 4, "fsdp", micro_batches=2)["gradients"] == 10 * GB // 4 + 10 * GB
    for est in (ddp, fsdp):
        assert est["total"] == sum(est[k] for k in ("parameters", "gradients", "optimizer_state", "activations"))


def test_one_process_needs_no_gradient_buckets():
    assert per_rank(SIZES, 1, "ddp")["gradients"] == 10 * GB


def test_auto_picks_fsdp_only_when_ddp_does_not_fit():
    est = both(SIZES, 2)
    assert choose_strategy("auto", est, 100 * GB, 2)[0] == "ddp"
    strategy, why = choose_strategy("auto", est, 40 * GB, 2)
    assert strategy == "fsdp" and "DDP would hold" in why
    assert choose_strategy("auto", est, 1 * GB, 1) == ("ddp", "one process: nothing to shard")
    assert choose_strategy("fsdp", est, 100 * GB, 2) == ("fsdp", "requested")
