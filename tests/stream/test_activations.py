"""moeconv/stream/activations.py: a sweep's hidden states stay within a memory budget; beyond it
they are written to files and read back bit for bit, one batch at a time."""
import sys

import pytest
import torch

from moeconv.stream.activations import HiddenStates


def _batches(n=5, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 7 + i, 16, generator=g).to(dtype) for i in range(n)]


def test_within_the_budget_batches_stay_in_memory(tmp_path):
    store = HiddenStates(budget_bytes=10**9, spill_dir=tmp_path)
    batches = _batches()
    for b in batches:
        store.append(b)
    assert store.spilled_bytes == 0 and not list(tmp_path.iterdir())
    assert all(got is b for got, b in zip(store, batches))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
def test_beyond_the_budget_batches_spill_and_read_back_bit_for_bit(tmp_path, dtype):
    batches = _batches(dtype=dtype)
    one = batches[0].numel() * batches[0].element_size()
    store = HiddenStates(budget_bytes=one, spill_dir=tmp_path)  # room for the first batch only
    for b in batches:
        store.append(b)
    assert store.resident_bytes == one
    assert len(list(tmp_path.iterdir())) == len(batches) - 1
    assert len(store) == len(batches)
    for got, b in zip(store, batches):
        assert got.dtype == b.dtype and got.shape == b.shape
        assert torch.equal(got.view(torch.uint8) if dtype.is_floating_point else got,
                           b.view(torch.uint8) if dtype.is_floating_point else b)
    assert store[3] is not store[3]  # read afresh each time: nothing held between uses


def test_release_deletes_every_file(tmp_path):
    store = HiddenStates(budget_bytes=0, spill_dir=tmp_path)
    for b in _batches():
        store.append(b)
    assert len(list(tmp_path.iterdir())) == 5
    store.release()
    assert not list(tmp_path.iterdir()) and len(store) == 0
    for b in _batches(2):  # usable again
        store.append(b)
    del store
    assert not list(tmp_path.iterdir())  # garbage-collected: its files go too


def test_a_budget_needs_a_directory():
    with pytest.raises(ValueError, match="directory"):
        HiddenStates(budget_bytes=0)


def test_no_bound_keeps_everything_in_memory():
    store = HiddenStates()
    for b in _batches():
        store.append(b)
    assert store.spilled_bytes == 0 and len(store) == 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_spilled_batches_do_not_stay_in_memory(tmp_path):
    """400 MB of hidden states through a store with a 16 MB budget: resident memory grows by far
    less than they weigh (each batch read back is freed with its tensor)."""
    from moeconv.stream.allocator import fixed_mmap_threshold

    def anon_mb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    fixed_mmap_threshold()  # as a streamed job sets it: freed batches go back to the system
    store = HiddenStates(budget_bytes=16 * 2**20, spill_dir=tmp_path)
    before = anon_mb()
    for _ in range(50):
        store.append(torch.ones(1024, 4096, dtype=torch.bfloat16))  # 8 MB each
    total = 0.0
    for t in store:
        total += float(t[0, 0])
    assert total == 50.0
    assert anon_mb() - before < 100, "spilled hidden states stayed in memory"
    assert store.spilled_bytes >= 380 * 2**20
    store.release()


def test_stores_share_one_budget(tmp_path):
    """A layer's inputs and outputs (two stores) spill once their total passes the budget; what a
    released store held frees room for the next."""
    from moeconv.stream.activations import ActivationBudget
    batches = _batches(4, dtype=torch.float32)
    size = max(b.numel() * b.element_size() for b in batches)
    budget = ActivationBudget(3 * size, tmp_path)
    inputs, outputs = budget.store(), budget.store()
    for b in batches[:2]:
        inputs.append(b)
    for b in batches:
        outputs.append(b)
    assert inputs.spilled_bytes == 0 and outputs.spilled_bytes > 0
    assert budget.resident_bytes <= 3 * size and budget.spilled_bytes == outputs.spilled_bytes
    inputs.release()
    nxt = budget.store()
    nxt.append(batches[0])
    assert nxt.spilled_bytes == 0  # the released inputs' room is free again
    assert all(torch.equal(a, b) for a, b in zip(outputs, batches))
    outputs.release(), nxt.release()
    assert budget.resident_bytes == 0 and not list(tmp_path.iterdir())
