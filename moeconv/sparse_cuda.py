"""Where 2:4 sparsity is faster, measured honestly: PyTorch has no CPU kernel for semi-structured
sparse matmul (FIELD.md), so on CPU 2:4 is a storage and accuracy feature. `speed_note()` says so;
`semi_structured_speed()` measures the CUDA path where a GPU exists and returns None elsewhere;
`to_semi_structured_` swaps weights for CUDA sparse tensors for inference."""
from __future__ import annotations

import torch


def speed_note() -> str:
    if torch.cuda.is_available():
        return ("CUDA available: 2:4 weights can run through torch.sparse.to_sparse_semi_structured "
                "(sparse tensor cores); it pays off at larger batch sizes — measure with scripts/bench_sparsify.py")
    return ("CPU only: 2:4 saves storage (with --compressed), not time — PyTorch has no CPU kernel for "
            "semi-structured sparse matmul, so the zeros are multiplied like any other weight")


def semi_structured_speed(weight: torch.Tensor, tokens: int = 4096, repeats: int = 20) -> dict | None:
    """Time `x @ Wᵀ` dense vs `to_sparse_semi_structured(W)` on CUDA (fp16). None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torch.sparse import to_sparse_semi_structured
    w = weight.detach().to("cuda", torch.float16)
    x = torch.randn(tokens, w.shape[1], device="cuda", dtype=torch.float16)
    sw = to_sparse_semi_structured(w)

    def bench(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    dense_ms = bench(lambda: torch.nn.functional.linear(x, w))
    sparse_ms = bench(lambda: torch.nn.functional.linear(x, sw))
    err = (torch.nn.functional.linear(x, sw) - torch.nn.functional.linear(x, w)).abs().max().item()
    return {"tokens": tokens, "shape": list(w.shape), "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "max_abs_diff": err}


def to_semi_structured_(module: torch.nn.Module, names: list[str]) -> int:
    """Swap the named `nn.Linear` weights for CUDA semi-structured sparse tensors, for inference
    only (such a module is not saved; save the dense form). Returns how many were converted."""
    if not torch.cuda.is_available():
        return 0
    from torch.sparse import to_sparse_semi_structured
    done = 0
    for name in names:
        lin = module.get_submodule(name).to("cuda", torch.float16)  # the kernels take fp16/bf16 on CUDA
        lin.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
        done += 1
    return done
