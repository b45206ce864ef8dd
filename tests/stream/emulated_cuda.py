"""A CUDA GPU emulated on the CPU, for testing `--device cuda` on machines without one.

What it is for: the streamed routes move each layer to `--device cuda`, and the classic bugs of
such code are invisible on a CPU-only run — a tensor created on the CPU and combined with one on
the GPU, a `.numpy()` of a GPU tensor, a part never moved, a GPU working set larger than the
plan said. Inside `emulated_cuda()`:

- `torch.cuda.is_available()` is True, and `torch.cuda`'s memory calls (`memory_allocated`,
  `max_memory_allocated`, `reset_peak_memory_stats`, `mem_get_info`, `synchronize`,
  `empty_cache`) answer for the emulated device;
- a tensor asked for on "cuda" (`.to("cuda")`, `.cuda()`, a factory with `device=`) is an
  `EmulatedCudaTensor`: its `device` is `cuda:0`, its data a CPU tensor, and every op on it runs
  the CPU kernel on that data (bitsandbytes' custom ops included);
- an op mixing an emulated GPU tensor with a CPU tensor of one or more dimensions raises torch's
  own "Expected all tensors to be on the same device" error, as CUDA does (0-dim CPU tensors,
  copies between devices and CPU index tensors are allowed, as in CUDA);
- the bytes of live GPU storages are counted, so a test can bound the peak as
  `torch.cuda.max_memory_allocated()` does on a real GPU.

What it is not: a GPU. Autograd is not emulated (GPU tensors never require grad: the streamed
routes run under `torch.no_grad()`). Results are the CPU kernels' (bit for bit the CPU run's
where no random numbers are drawn on the device), nothing runs faster, and CUDA-only kernels
(semi-structured sparse matmul, CUDA events) are not there. On a machine with a real GPU, the tests use that.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA0 = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# Ops that take tensors on both devices in CUDA: copies between them, and CPU index tensors
_CROSS_DEVICE = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default,
                 aten._copy_from_and_resize.default, aten.index.Tensor, aten.index_put_.default,
                 aten.index_put.default, aten._index_put_impl_.default, aten.lift_fresh.default,
                 aten._has_compatible_shallow_copy_type.default}


class EmulatedCudaTensor(torch.Tensor):
    """A tensor whose device is `cuda:0` and whose data (`inner`) is a CPU tensor."""

    inner: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=CUDA0, requires_grad=False)
        r.inner = inner
        return r

    def __repr__(self) -> str:  # noqa: D105 - what a failing assertion prints
        return f"EmulatedCudaTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"an emulated CUDA tensor was used outside `emulated_cuda()` ({func})")


def _device_of(kwargs: dict) -> torch.device | None:
    d = kwargs.get("device")
    return None if d is None else torch.device(d)


class _Emulator(TorchDispatchMode):
    """Routes every op: unwraps emulated tensors, checks devices, runs the CPU kernel, wraps what
    comes out on the GPU, and counts the GPU's live storages."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.live: dict[int, list[int]] = {}  # storage address → [holders alive, bytes]
        self.allocated = self.peak = 0
        # CPU-typed tensors (a bitsandbytes `Int8Params`) whose `.data` was set to a GPU tensor, as
        # CUDA allows: their data
        self.adopted: dict[int, torch.Tensor] = {}  # by id(): a tensor's == is elementwise

    def data(self, x) -> torch.Tensor | None:
        """The CPU data of `x` when it is on the emulated GPU, else None."""
        if isinstance(x, EmulatedCudaTensor):
            return x.inner
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            return self.adopted.get(id(x))
        return None

    def host(self, x):
        """`x` as the CPU kernels take it: its data when it is on the emulated GPU, else itself."""
        d = self.data(x)
        return x if d is None else d

    # ---- memory -------------------------------------------------------------------------------
    def _hold(self, holder: torch.Tensor, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [0, storage.nbytes()]
            self.allocated += entry[1]
            self.peak = max(self.peak, self.allocated)
        entry[0] += 1
        weakref.finalize(holder, self._release, key)

    def wrap(self, t: torch.Tensor) -> EmulatedCudaTensor:
        w = EmulatedCudaTensor(t)
        self._hold(w, t)
        return w

    def adopt(self, holder: torch.Tensor, t: torch.Tensor) -> None:
        self.adopted[id(holder)] = t
        holder.requires_grad_(False)  # no autograd on the emulated GPU (called from `_Moves`, not re-routed)
        weakref.finalize(holder, self.adopted.pop, id(holder), None)
        self._hold(holder, t)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.allocated -= entry[1]
            del self.live[key]

    # ---- dispatch -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        on_gpu = any(self.data(x) is not None for x in flat)
        wanted = _device_of(kwargs)
        if wanted is not None and wanted.type == "cuda":
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type != "cuda":
                raise RuntimeError(f"Expected a 'cuda' device type for generator but found '{gen.device.type}' "
                                   f"(emulated CUDA: {func})")
            kwargs["device"] = CPU
        if on_gpu and func not in _CROSS_DEVICE:
            for x in flat:
                if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() > 0:
                    raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                                       f"devices, cuda:0 and cpu! (emulated CUDA: {func})")
        out = func(*tree_map(self.host, args), **tree_map(self.host, kwargs))
        if wanted is not None:
            to_gpu = wanted.type == "cuda"
        elif func in (aten.copy_.default, aten._copy_from.default):
            to_gpu = self.data(args[1] if func is aten._copy_from.default else args[0]) is not None
        else:
            to_gpu = on_gpu
        schema = func._schema
        if schema.arguments and schema.arguments[0].alias_info is not None \
                and schema.arguments[0].alias_info.is_write and isinstance(out, torch.Tensor):
            return args[0]  # in place: the caller's own tensor, as torch returns it
        if not to_gpu:
            return out
        return tree_map(lambda x: self.wrap(x) if type(x) is torch.Tensor else x, out)


# Methods that read a GPU tensor's values on the host (torch's bindings would first look for a CUDA
# device guard, which a CPU build lacks): run on the data
_READS_TO_HOST = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
                  torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__complex__}
_SET_DATA, _GET_DATA = torch.Tensor.data.__set__, torch.Tensor.data.__get__
_SET_REQUIRES_GRAD = torch.Tensor.requires_grad.__set__
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_NO_CUDA = "not linked with support for cuda devices"  # what a CPU build of torch says of a CUDA guard


class _Moves(TorchFunctionMode):
    """What torch's Python bindings do before dispatching an op, where a CPU build of torch
    refuses a CUDA device: moves (`Tensor.to`, `.cuda()`, `.cpu()`; a copy, as between real
    devices), host reads (`.item()`, `float()`, `.tolist()`; `.numpy()` raises, as on CUDA), and
    `.data` (a CPU tensor given GPU data is adopted, as bitsandbytes' `Int8Params` does)."""

    def __init__(self, emu: _Emulator):
        super().__init__()
        self.emu = emu

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        data = self.emu.data(args[0]) if args else None
        if func is torch.Tensor.cuda:
            return self._move(args[0], CUDA0, None)
        if func is torch.Tensor.cpu:
            return self._move(args[0], CPU, None)
        if func is torch.Tensor.to:
            device, dtype, _non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None:
                return self._move(args[0], torch.device(device), dtype, memory_format)
            return func(*args, **kwargs)
        wanted = _device_of(kwargs) if func in _FROM_DATA else None
        if wanted is not None and wanted.type == "cuda":
            # these build their tensor with torch's modes switched off: built on the CPU, then moved
            out = func(*tree_map(self.emu.host, args), **{**kwargs, "device": CPU})
            if args and type(args[0]) is torch.Tensor and out.untyped_storage().data_ptr() == \
                    args[0].untyped_storage().data_ptr():
                out = out.clone()  # a CPU tensor given to the GPU is copied there
            return self.emu.wrap(out)
        if data is None:
            if func == _SET_DATA and self.emu.data(args[1]) is not None:
                func(*args)
                self.emu.adopt(args[0], self.emu.data(args[1]))
                return None
            return func(*args, **kwargs)
        if func in _READS_TO_HOST:
            return func(data, *args[1:], **kwargs)  # a sync and a copy to the host, on CUDA
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first. (emulated CUDA)")
        if func in (torch.Tensor.requires_grad_, _SET_REQUIRES_GRAD):
            return args[0] if func is torch.Tensor.requires_grad_ else None  # no autograd on the GPU
        if func == _GET_DATA:
            return self.emu.wrap(data.detach())
        if func == _SET_DATA:
            new = self.emu.data(args[1])
            if new is None:
                raise RuntimeError("emulated CUDA: moving a GPU tensor's .data back to the CPU is not emulated")
            if isinstance(args[0], EmulatedCudaTensor):
                args[0].inner = new
            else:
                self.emu.adopt(args[0], new)
            return None
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if _NO_CUDA not in str(e):
                raise
        # A binding that takes a CUDA device guard before dispatching (indexing, `new_*`): the
        # same call on the data, its tensors handed back on the GPU
        out = func(*tree_map(self.emu.host, args), **tree_map(self.emu.host, kwargs))
        return tree_map(lambda x: self.emu.wrap(x) if type(x) is torch.Tensor else x, out)

    def _move(self, t: torch.Tensor, device: torch.device, dtype, memory_format=None):
        data = self.emu.data(t)
        fmt = {} if memory_format is None else {"memory_format": memory_format}
        if (data is not None) == (device.type == "cuda"):  # no move: as torch, maybe only a dtype change
            return t.to(dtype=dtype, **fmt) if dtype is not None else t
        if device.type == "cpu":
            return data.to(dtype=dtype or t.dtype, copy=True, **fmt)
        if device.type != "cuda":
            raise RuntimeError(f"emulated CUDA: a move to {device} is not emulated")
        return self.emu.wrap(t.detach().to(dtype=dtype or t.dtype, copy=True, **fmt))


@contextlib.contextmanager
def emulated_cuda(capacity: int = 80 * 2**30) -> Iterator[_Emulator]:
    """Inside: torch sees one CUDA GPU of `capacity` bytes, emulated on the CPU (module docstring).
    Yields the emulator (`peak`, `allocated`: bytes of live GPU storages)."""
    from moeconv.nn.quantized import _bnb
    _bnb()  # bitsandbytes picks its backends when imported: the CPU ones, before torch is told of a GPU
    emu = _Emulator(capacity)
    cuda = torch.cuda
    patches = {
        "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
        "is_initialized": lambda: True, "_lazy_init": lambda: None,
        "synchronize": lambda device=None: None, "empty_cache": lambda: None,
        "memory_allocated": lambda device=None: emu.allocated,
        "max_memory_allocated": lambda device=None: emu.peak,
        "reset_peak_memory_stats": lambda device=None: setattr(emu, "peak", emu.allocated),
        "mem_get_info": lambda device=None: (emu.capacity - emu.allocated, emu.capacity),
        "get_device_name": lambda device=None: "emulated CUDA GPU (CPU kernels)",
    }
    saved = {name: getattr(cuda, name) for name in patches}
    for name, fn in patches.items():
        setattr(cuda, name, fn)
    make_subclass = torch._C.TensorBase._make_subclass

    def make_subclass_on_gpu(cls, data, require_grad=False, **kwargs):
        """`Tensor._make_subclass` (`nn.Parameter`, bitsandbytes' `Int8Params`) of GPU data: the
        subclass made on the CPU data, then given the GPU data as CUDA gives it."""
        inner = emu.data(data)
        if inner is None:
            return make_subclass(cls, data, require_grad, **kwargs)
        t = make_subclass(cls, inner, False, **kwargs)
        t.data = data  # `_Moves`: adopted
        return t
    torch.Tensor._make_subclass = staticmethod(make_subclass_on_gpu)
    try:
        with emu, _Moves(emu):
            yield emu
    finally:
        del torch.Tensor._make_subclass
        for name, fn in saved.items():
            setattr(cuda, name, fn)
