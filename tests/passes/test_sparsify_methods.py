"""The pruning math: masks, SparseGPT against a direct port of the reference algorithm, statistics
sharing, and the ordering the methods are known for (SparseGPT < Wanda < magnitude in output error
on inputs with uneven channel scales)."""
import pytest
import torch

from moeconv.sparsity import SparsityPattern, check_pattern, keep_top, nm_violations
from moeconv.hessian import InputStats
from passes.sparsify_methods import magnitude, output_energy, reconstruction_error, sparsegpt, wanda

P24 = SparsityPattern.parse("2:4")


def _reference_sparsegpt(W, H, prunen, prunem, blocksize, percdamp):
    """SparseGPT's `fasterprune` (github.com/IST-DASLab/sparsegpt, sparsegpt.py), N:M branch,
    transcribed for one matrix: the straightforward column sweep this code reorders."""
    W = W.clone()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols)
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def _data(seed=0, rows=24, cols=64, tokens=400):
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(cols, generator=g))  # uneven channel scales, as in real activations
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)  # correlated channels
    x = (torch.randn(tokens, cols, generator=g) @ mix) * scales
    w = torch.randn(rows, cols, generator=g)
    return w, x, x.t() @ x


def test_keep_top_nm_keeps_the_largest_of_each_group():
    scores = torch.tensor([[4., 1., 3., 2., 0., 9., 8., 7.]])
    keep = keep_top(scores, P24)
    assert keep.tolist() == [[True, False, True, False, False, True, True, False]]
    assert keep_top(scores, SparsityPattern.parse("1:4")).sum() == 2


def test_keep_top_unstructured_per_row():
    scores = torch.arange(20.).reshape(2, 10)
    keep = keep_top(scores, SparsityPattern.parse("unstructured", 0.3))
    assert keep.sum(1).tolist() == [7, 7] and not keep[:, :3].any()


def test_sparsegpt_matches_the_reference_sweep_and_is_batched():
    pairs = [_data(s) for s in range(3)]
    w = torch.stack([p[0] for p in pairs])
    h = torch.stack([p[2] for p in pairs])
    got, damp, row_error = sparsegpt(w, h, P24, block_size=16, dampening=0.01)
    for b, (w0, _, h0) in enumerate(pairs):
        ref = _reference_sparsegpt(w0, h0, 2, 4, 16, 0.01)
        assert torch.allclose(got[b], ref, rtol=1e-4, atol=1e-4), (got[b] - ref).abs().max()
        assert (got[b] == 0).equal(ref == 0)  # the same mask, exactly
        single = sparsegpt(w0[None], h0[None], P24, block_size=16).weight
        assert torch.allclose(single[0], got[b], atol=1e-5)
        # the error the sweep reports is the output error measured directly
        direct = output_energy((w0 - got[b])[None], h0[None])[0]
        assert row_error[b].sum().item() == pytest.approx(direct.item(), rel=1e-3)
    assert damp.tolist() == pytest.approx([0.01] * 3)
    assert nm_violations(got.reshape(-1, 64), 2, 4) == 0
    assert not torch.signbit(got[got == 0]).any()  # pruned entries are +0.0, never -0.0


def test_unstructured_sparsegpt_keeps_the_ratio_in_every_row():
    w, _, h = _data(4, cols=96)
    pat = SparsityPattern.parse("unstructured", 0.5)
    got = sparsegpt(w[None], h[None], pat, block_size=32).weight
    assert ((got[0] == 0).sum(1) >= 48).all()
    assert not torch.signbit(got[got == 0]).any()


def test_block_size_only_reorders_the_work_for_nm():
    w, _, h = _data(1)
    a = sparsegpt(w[None], h[None], P24, block_size=8).weight
    b = sparsegpt(w[None], h[None], P24, block_size=64).weight
    assert (a == 0).equal(b == 0) and torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "unstructured"])
def test_error_ordering_sparsegpt_wanda_magnitude(pattern):
    pat = SparsityPattern.parse(pattern, 0.5 if pattern == "unstructured" else None)
    errs = {"magnitude": [], "wanda": [], "sparsegpt": []}
    for seed in range(4):
        w, _, h = _data(seed)
        cands = {"magnitude": magnitude(w, pat), "wanda": wanda(w, h, pat),
                 "sparsegpt": sparsegpt(w[None], h[None], pat, block_size=16)[0][0]}
        for k, new in cands.items():
            check_pattern(new, pat, k)
            errs[k].append(reconstruction_error(w[None], new[None], h[None])[0])
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    assert mean["sparsegpt"] < mean["wanda"] < 0.8 * mean["magnitude"], mean


def test_reconstruction_error_is_the_output_error():
    w, x, h = _data(2)
    new = magnitude(w, P24)
    direct = ((x @ (w - new).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum()
    assert reconstruction_error(w[None], new[None], h[None])[0] == pytest.approx(direct.item(), rel=1e-4)
    assert reconstruction_error(w[None], new[None], torch.zeros_like(h)[None]) == [None]


def test_rank_deficient_and_dead_inputs_stay_finite():
    w, x, _ = _data(3, tokens=10)  # 10 tokens for 64 inputs: singular H
    x[:, 5] = 0  # an input never active
    h = x.t() @ x
    new, damp, row_error = sparsegpt(w[None], h[None], P24, block_size=16, dampening=1e-8)
    assert torch.isfinite(row_error).all()
    direct = output_energy((w - new[0])[None], h[None])[0]
    assert row_error.sum().item() == pytest.approx(direct.item(), rel=1e-2)
    assert torch.isfinite(new).all() and nm_violations(new[0], 2, 4) == 0
    assert damp.item() >= 1e-8


def test_input_stats_share_one_product_for_one_input():
    stats = InputStats()
    x = torch.randn(7, 6)
    stats.add("gate", x)
    stats.add("up", x)            # same tensor: product reused
    y = torch.randn(7, 6)
    stats.add("gate", y)          # a different tensor: its own product
    assert torch.allclose(stats.hessian["gate"], x.t() @ x + y.t() @ y, atol=1e-5)
    assert torch.allclose(stats.hessian["up"], x.t() @ x, atol=1e-5)
    assert stats.tokens == {"gate": 14, "up": 7}
    stats.hessian["up"].add_(1)   # accumulators are independent tensors
    assert not torch.equal(stats.hessian["gate"], stats.hessian["up"])


@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8", "3:8"])
def test_group_masks_prune_exactly_m_minus_n_even_with_ties(nm):
    from passes.sparsify_methods import _group_prune_mask
    pat = SparsityPattern.parse(nm)
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 3, (2, pat.m, 50), generator=g).float()  # many ties, all-zero groups included
    score[:, :, 0] = 0.0
    prune = _group_prune_mask(score, pat)
    assert (prune.sum(1) == pat.m - pat.n).all()
    # the pruned ones never outscore a kept one
    kept_min = score.masked_fill(prune.bool(), float("inf")).amin(1)
    pruned_max = score.masked_fill(~prune.bool(), float("-inf")).amax(1)
    assert (pruned_max <= kept_min).all()
    # without ties, the same mask as keep_top
    s = torch.randn(2, pat.m, 50, generator=g)
    assert torch.equal(_group_prune_mask(s, pat).bool(), ~keep_top(s.transpose(1, 2), pat).transpose(1, 2))
