"""Freed tensors go back to the operating system, so a streamed run's memory stays flat.

glibc serves allocations below its mmap threshold from its heaps, and raises that threshold (up to
32 MiB) every time a large block is freed: a stream of layer-sized tensors then lands in the heaps,
where fragmentation keeps freed memory in the process. Measured with `/usr/bin/time` on the CLI's
streamed int8 quantize of a synthetic bf16 Mixtral (hidden 1024, 8 experts, 32 layers, 4.7 GB):
peak RSS 2.0-5.0 GB with glibc's defaults, 1.19 GB with `fixed_mmap_threshold` + `release_freed`
after each layer (1.12 GB at 4 layers), 0.85 GB with `MALLOC_MMAP_THRESHOLD_=131072` set before
the process starts.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers
M_TRIM_THRESHOLD = -1


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def release_freed() -> None:
    """Hand memory freed inside the allocator's arenas back to the system (`malloc_trim`): called
    after each layer, it keeps the peak at one layer even where the mmap threshold was set after
    the allocator had already served large blocks from its heaps (measured: the CLI's streamed int8
    quantize of a 4.7 GB, 32-layer checkpoint peaked at 2.0-5.0 GB without, 0.85 GB with the
    threshold fixed at process start)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


DEFAULT_MMAP_THRESHOLD = 128 * 1024
_fixed: int | None = None  # the threshold this process last fixed (glibc has no call that reads it)


def fixed_mmap_threshold(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Serve every allocation of at least `threshold` bytes with its own mapping (returned to the
    system when freed). Returns whether the allocator took the setting (glibc on Linux only)."""
    global _fixed
    mallopt = getattr(_LIBC, "mallopt", None)  # not glibc (musl has no mallopt): nothing to set
    took = bool(mallopt(M_MMAP_THRESHOLD, int(threshold))) if mallopt is not None else False
    if took:
        _fixed = int(threshold)
    return took


@contextmanager
def untouched_allocations_mapped():
    """While active, allocations of 128 KiB and more get mappings of their own; afterwards the
    threshold a job fixed before (if any) is back. For building modules whose parameters are
    allocated and dropped at once, never touched (`parameters_on_meta`): served from the heap
    under glibc's dynamic threshold, those blocks, interleaved with the small allocations that
    stay, fragmented it by the model's size (24 GB of heap free space after opening a 181-layer,
    26 GB Mixtral skeleton, measured with `mallinfo2`); a streamed layer's work then reuses that
    free space page by page and holds what it touched until the layer ends, so the peak depended
    on the heap's layout. Mapped, they cost an `mmap`/`munmap` pair and leave nothing behind."""
    before = _fixed
    fixed_mmap_threshold(DEFAULT_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if before is not None and before != DEFAULT_MMAP_THRESHOLD:
            fixed_mmap_threshold(before)


KERNEL_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's own cache of compiled kernels
IDEEP_CACHE_VARIABLE = "LRU_CACHE_CAPACITY"  # ideep's (torch's oneDNN layer) cache of matmul computations
KERNEL_CACHE_CAPACITY = 32


def bounded_kernel_cache(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Keep at most `capacity` compiled kernels in each of the two caches torch's bf16 matmuls on
    CPU fill, one entry per matmul shape, 1024 by default: oneDNN's (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`)
    and ideep's (`LRU_CACHE_CAPACITY`, at least 1: torch 2.13 crashes with 0). A user's own
    setting of either wins. An MoE's experts see a different token count in every layer, so a
    streamed sweep meets new shapes in every layer and, unbounded, grows with depth. Measured:
    200 shapes of a 1024 x 2816 bf16 matmul grew RSS by 145 MB, 79 MB with oneDNN's cache off,
    6 MB with both bounded; the bench's streamed wanda sweep (hidden 256, 24 layers) grew its
    allocator's in-use memory by ~3 MB per layer with oneDNN's cache bounded alone, and stayed
    flat from layer 11 on with ideep's bounded too. At the bench's default shape (hidden 1024, 8
    experts) 128 entries each filled for 8 layers (+60 MB between layers) and 16 stayed flat from
    the second; 32 holds the ~20 shapes one layer of an 8-expert MoE meets (its repeated forwards
    reuse them), and a miss only recompiles a kernel (milliseconds, against seconds of work per
    layer). Both libraries read their variable when they first compile a kernel, so this must run
    before the process's first bf16 matmul."""
    os.environ.setdefault(KERNEL_CACHE_VARIABLE, str(int(capacity)))
    os.environ.setdefault(IDEEP_CACHE_VARIABLE, str(max(1, int(capacity))))


def heap_top_kept(trim_threshold: int) -> bool:
    """Let a `free` leave up to `trim_threshold` bytes unused at the top of the heap instead of
    handing them back to the system at once (glibc's `M_TRIM_THRESHOLD`: 128 KiB by default, no
    longer moved by glibc once the mmap threshold is fixed). For a job that frees and allocates
    the same large temporaries matrix after matrix and calls `release_freed` at every layer's
    end: the heap is reused within the layer rather than faulted in afresh for each matrix, and
    the layer's end still returns it.
    Returns whether the allocator took the setting (glibc on Linux only)."""
    mallopt = getattr(_LIBC, "mallopt", None)
    return bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold))) if mallopt is not None else False


def prepare_streaming(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int | None = None) -> None:
    """What a streamed job sets for its process before it reads a layer, so memory stays flat
    with depth: freed layers go back to the system (`fixed_mmap_threshold`), and oneDNN keeps a
    bounded number of kernels (`bounded_kernel_cache`). `trim_threshold`: see `heap_top_kept`."""
    bounded_kernel_cache()
    fixed_mmap_threshold(mmap_threshold)
    if trim_threshold is not None:
        heap_top_kept(trim_threshold)


LARGE_BYTES = 256 * 2**20


def free_memory(held_bytes: int | None = None) -> None:
    """Collect reference cycles now, then `release_freed`: between the stages of a long job (the
    export's steps, the upcycle's check) so a stage's leftovers, held only by cycles (an exported
    ONNX IR, a traced graph), are not still in memory when the next stage allocates its own.
    `held_bytes`: the size of the model the stage worked on; below `LARGE_BYTES` the full
    collection (0.1-0.5 s in a process that imported torch and transformers) is skipped, since
    a small model's leftovers do not matter and the test suite runs thousands of small jobs."""
    if held_bytes is None or held_bytes >= LARGE_BYTES:
        import gc
        gc.collect()
    release_freed()


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (what `free_memory` is told a stage held)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
