"""moeconv.sparsity (pattern parsing, the mask check), moeconv.formats.compressed (the lossless
compressed form) and moeconv.sparse_cuda (where 2:4 is faster)."""
import pytest
import torch

from moeconv.errors import VerificationError
from moeconv.formats.compressed import compress, compressed_nbytes, decompress
from moeconv.sparse_cuda import semi_structured_speed, speed_note
from moeconv.sparsity import SparsityPattern, check_pattern, nm_violations


def test_parse():
    p = SparsityPattern.parse("2:4")
    assert (p.n, p.m, p.ratio, p.label) == (2, 4, 0.5, "2:4")
    u = SparsityPattern.parse("unstructured", 0.7)
    assert (u.is_nm, u.ratio) == (False, 0.7)
    for bad, ratio in (("4:4", None), ("0:4", None), ("2-4", None), ("2:4", 0.3), ("unstructured", 1.0)):
        with pytest.raises(ValueError):
            SparsityPattern.parse(bad, ratio)


def test_check_pattern_counts_groups_along_the_input_dim():
    w = torch.tensor([[1., 0., 2., 0., 3., 4., 0., 0.],
                      [0., 0., 0., 1., 1., 1., 1., 0.]])
    assert nm_violations(w, 2, 4) == 1  # row 1, second group holds 3
    with pytest.raises(VerificationError, match="more than 2"):
        check_pattern(w, SparsityPattern.parse("2:4"))
    w[1, 5] = 0
    assert check_pattern(w, SparsityPattern.parse("2:4")) == pytest.approx(9 / 16)
    # along the *input* dim: the transpose of a valid matrix is not valid here
    v = torch.tensor([[1., 1., 0., 0.]] * 4)
    assert nm_violations(v, 2, 4) == 0 and nm_violations(v.t().contiguous(), 2, 4) == 2
    with pytest.raises(VerificationError, match="non-finite"):
        check_pattern(torch.tensor([[float("nan"), 0., 0., 0.]]), SparsityPattern.parse("2:4"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g).to(dtype)
    w[w.abs() < 0.7] = 0
    w[0, 1] = -0.0  # not the same bits as +0.0: must survive
    w[1, 2] = float("nan")
    values, packed = compress(w)
    assert packed.dtype == torch.uint8 and packed.numel() == 12
    back = decompress(values, packed, w.shape)
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), w.view(torch.uint8))
    assert torch.signbit(back[0, 1]) and back[0, 1] == 0
    assert compressed_nbytes(w) == values.numel() * w.element_size() + 12


def test_24_storage_is_17_32nds_in_fp32():
    w = torch.randn(8, 64)
    w.view(8, 16, 4)[:, :, :2] = 0
    assert compressed_nbytes(w) / (w.numel() * 4) == pytest.approx(17 / 32)  # half the values + 1 bit each


def test_cpu_speed_note_is_honest():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the note describes the GPU path")
    assert "saves storage" in speed_note() and "not time" in speed_note()
    assert semi_structured_speed(torch.randn(64, 64)) is None  # no CUDA: skipped cleanly, no error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse matmul needs CUDA")
def test_cuda_semi_structured_matches_dense():
    from moeconv.sparse_cuda import to_semi_structured_
    from passes.sparsify_methods import magnitude
    lin = torch.nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        lin.weight.copy_(magnitude(lin.weight.float(), SparsityPattern.parse("2:4")))
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    dense = torch.nn.functional.linear(x, lin.weight.detach().to("cuda", torch.float16))
    holder = torch.nn.Module()
    holder.add_module("lin", lin)
    assert to_semi_structured_(holder, ["lin"]) == 1
    assert torch.allclose(holder.lin(x), dense, atol=1e-2, rtol=1e-2)
    speed = semi_structured_speed(magnitude(torch.randn(512, 512), SparsityPattern.parse("2:4")), tokens=256, repeats=3)
    assert speed["max_abs_diff"] < 0.1 and speed["sparse_ms"] > 0
