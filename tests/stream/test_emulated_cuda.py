"""The emulated CUDA GPU the device tests run on without a real one: it must catch what a GPU
catches (a CPU tensor mixed into a GPU op, `.numpy()` of a GPU tensor, a CPU generator for a GPU
factory), count GPU memory as `torch.cuda.memory_allocated` does, run what the streamed routes
run there (bitsandbytes' int8 layers, `nn.Module.to`, indexing), and leave torch as it was."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from tests.stream.emulated_cuda import EmulatedCudaTensor, emulated_cuda

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a real CUDA GPU is present")


def test_a_cpu_tensor_in_a_gpu_op_is_torchs_device_error():
    with emulated_cuda():
        x = torch.randn(4, 8).to("cuda")
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            x + torch.randn(4, 8)
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            torch.bmm(x[None], torch.randn(1, 8, 2))
        assert (x * torch.tensor(2.0)).device.type == "cuda"  # a 0-dim CPU tensor is a scalar, as on CUDA
        assert x[torch.tensor([0, 2])].shape == (2, 8)  # CPU indices are allowed, as on CUDA
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            x.numpy()
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))


def test_values_move_and_compute_as_on_the_cpu():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    with emulated_cuda():
        ga, gb = a.to("cuda"), b.cuda()
        assert ga.device == torch.device("cuda", 0) and isinstance(ga, EmulatedCudaTensor)
        prod = ga @ gb
        assert prod.device.type == "cuda"
        back = prod.cpu()
        assert type(back) is torch.Tensor and back.device.type == "cpu"
        torch.testing.assert_close(back, a @ b, rtol=0, atol=0)
        assert float(prod.sum()) == pytest.approx(float((a @ b).sum()), rel=1e-6)
        assert prod.tolist() == (a @ b).tolist() and prod[0, 0].item() == (a @ b)[0, 0].item()
        ga[0] = torch.zeros(7)  # a CPU value written into a GPU tensor: a copy, allowed
        assert float(ga[0].abs().sum()) == 0.0 and float(a[0].abs().sum()) > 0  # the source was copied
        z = torch.zeros(2, 3, device="cuda", dtype=torch.bfloat16)
        assert z.device.type == "cuda" and z.dtype == torch.bfloat16
        t = torch.as_tensor([1, 2, 3], device=ga.device)
        assert t.device.type == "cuda" and t.tolist() == [1, 2, 3]


def test_memory_is_counted_as_cuda_counts_it():
    with emulated_cuda(capacity=2**30) as emu:
        base = torch.cuda.memory_allocated()
        x = torch.empty(1024, 256, device="cuda")  # 1 MiB
        assert torch.cuda.memory_allocated() - base == 2**20
        view = x[:10]  # a view: no new memory
        assert torch.cuda.memory_allocated() - base == 2**20
        torch.cuda.reset_peak_memory_stats()
        y = x * 2
        assert torch.cuda.max_memory_allocated() - base == 2 * 2**20
        del x, view, y
        gc.collect()
        assert torch.cuda.memory_allocated() == base and torch.cuda.max_memory_allocated() - base == 2 * 2**20
        free, total = torch.cuda.mem_get_info()
        assert total == 2**30 and free == total - base and emu.peak == torch.cuda.max_memory_allocated()


def test_modules_and_bitsandbytes_int8_run_on_it():
    import bitsandbytes as bnb
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    w = torch.randn(32, 32)
    with torch.no_grad():
        cpu_q = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        q_ref = bnb.functional.int8_vectorwise_quant(w.half())[0]
        with emulated_cuda():
            glin = lin.to("cuda")
            assert glin.weight.device.type == "cuda" and isinstance(glin.weight, nn.Parameter)
            torch.testing.assert_close(glin(x.cuda()).cpu(), torch.nn.functional.linear(x, lin.weight.cpu(),
                                                                                        lin.bias.cpu()))
            l8 = bnb.nn.Linear8bitLt(32, 32, bias=False, has_fp16_weights=False)
            l8.weight = cpu_q
            l8 = l8.cuda()  # Int8Params quantizes when moved to the GPU, as on CUDA
            assert l8.weight.device.type == "cuda" and l8.weight.dtype == torch.int8
            assert torch.equal(l8.weight.cpu(), q_ref)
            out = l8(torch.randn(4, 32, device="cuda", dtype=torch.float16))
            assert out.device.type == "cuda" and torch.isfinite(out.cpu()).all()


def test_gptq_runs_where_its_inputs_are():
    """The GPTQ sweep's error buffer was made on the CPU whatever the weights' device: on a GPU
    the first block product failed. It now follows the weights, and gives the CPU's answer."""
    pytest.importorskip("compressed_tensors")
    from moeconv.formats.compressed_tensors_io import weight_args
    from moeconv.gptq import gptq
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(256, 64)
    args = weight_args("w4a16", 32, None)
    ref = gptq(w, x.t() @ x, args)
    with emulated_cuda():
        got = gptq(w.cuda(), (x.t() @ x).cuda(), args)
        assert got[0].device.type == "cuda"
        got = [t.cpu() if t is not None else None for t in got]
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def test_torch_is_left_as_it_was():
    available = torch.cuda.is_available
    with emulated_cuda():
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        gpu = torch.ones(2, device="cuda")
    assert torch.cuda.is_available is available and not torch.cuda.is_available()
    assert "_make_subclass" not in torch.Tensor.__dict__
    with pytest.raises(RuntimeError, match="outside `emulated_cuda\\(\\)`"):
        gpu + 1
    assert torch.ones(2).add(1).tolist() == [2.0, 2.0]
