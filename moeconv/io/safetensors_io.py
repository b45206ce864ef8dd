"""Safetensors reading (through the `safetensors` library) and *streaming* sharded writing.

Why a writer of our own: `safetensors.torch.save_file` needs every tensor of a shard in memory at
once. A conversion plan knows each output tensor's name, dtype and shape before any data moves,
so a shard's header can be written first and its tensors streamed in one at a time: peak memory
is one tensor, whatever the shard size. The format (8-byte little-endian header length, JSON
header, raw little-endian data) is tiny and stable; every file we write is re-read with the
`safetensors` library itself and checked tensor by tensor (shape, dtype, checksum).

The checksum is XXH3-128 (`xxhash`), not SHA-256: it guards against a write that went wrong (a
torn or raced file, a wrong offset), not against an adversary, and it runs at memory speed. On
the 32-layer int8 Mixtral benchmark (2.3 GB written) SHA-256 cost 1.6 s while writing and 1.1 s
re-reading on this project's 2-core machine (1.46 GB/s a core); XXH3-128 hashes 13.7 GB/s.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import xxhash
from safetensors import safe_open

from moeconv.errors import InputError, VerificationError

_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_ST = {v: k for k, v in _DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def dtype_from_str(s: str) -> torch.dtype:
    return _FROM_ST[s]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class SourceCheckpoint:
    """Lazy view of a safetensors checkpoint (single file or sharded): names, specs, one tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files: dict[str, Path] = {}  # tensor name → shard file
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except Exception as exc:
                raise InputError(f"{index}: not a valid safetensors index ({exc.__class__.__name__})") from None
            if not isinstance(weight_map, dict):
                raise InputError(f"{index}: weight_map is not an object")
            for name, fname in weight_map.items():
                # a shard is a file of this directory: never a path elsewhere (../x, /etc/…)
                if not isinstance(fname, str) or fname in ("", ".", "..") or "/" in fname or "\\" in fname:
                    raise InputError(f"{index}: shard {str(fname)[:60]!r} of tensor {name} is not a file name "
                                     "in the checkpoint directory")
                self.files[name] = self.path / fname
        elif (self.path / SINGLE_NAME).is_file():
            self.files = {}
            for name in self._names_in(self.path / SINGLE_NAME):
                self.files[name] = self.path / SINGLE_NAME
        else:
            raise InputError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}")
        specs: dict[str, TensorSpec] = {}
        for fname in sorted(set(self.files.values())):
            if not fname.is_file():
                raise InputError(f"{fname}: shard named in the index is missing")
            with self._open(fname) as f:
                present = set(f.keys())  # membership only: never iterated, its order follows the hash seed
                for name in f.keys():
                    sl = f.get_slice(name)
                    dt = sl.get_dtype()
                    if dt not in _FROM_ST:
                        raise InputError(f"{fname}: tensor {name} has unsupported dtype {dt}")
                    specs[name] = TensorSpec(name, _FROM_ST[dt], tuple(sl.get_shape()))
            for name, f2 in self.files.items():
                if f2 == fname and name not in present:
                    raise InputError(f"{fname}: tensor {name} named in the index is not in the shard")
        # Sorted by name, the order the safetensors library itself writes and lists: everything
        # planned from `names()` (the streaming upcycle's output order) is then the same in every
        # process and whatever way the source was sharded.
        self.specs: dict[str, TensorSpec] = dict(sorted(specs.items()))

    @staticmethod
    def _open(fname: Path):
        try:
            return safe_open(str(fname), framework="pt", device="cpu")
        except Exception as exc:
            raise InputError(f"{fname}: corrupt or truncated safetensors file ({' '.join(str(exc).split())[:120]})") from None

    def _names_in(self, fname: Path) -> list[str]:
        with self._open(fname) as f:
            return list(f.keys())

    def names(self) -> list[str]:
        """Every tensor name, sorted: the same list in every process."""
        return list(self.specs)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`, read into memory of its own (never a view of a memory-mapped file: a
        mapped shard's touched pages count in the process's RSS for as long as any tensor from it
        lives, several GB with 5 GB shards, and a streamed run must stay small)."""
        fname = self.files[name]
        start, end = self._offsets(fname)[name]
        spec = self.specs[name]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(fname, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(memoryview(buf.numpy())) if end > start else 0
        if got != end - start:
            raise InputError(f"{fname}: truncated safetensors file (tensor {name})")
        return buf.view(spec.dtype).reshape(spec.shape) if spec.shape else buf.view(spec.dtype).reshape(())

    def mapped(self, name: str) -> torch.Tensor:
        """Tensor `name` as a private (copy-on-write) mapping of its own bytes in the shard: the
        page cache's pages, not a copy of them (the streaming upcycle reads its source this way:
        reading and checking the 1.4 GB of a Llama took 1.9 s with `get`, 1.4 s mapped). Only the
        tensor's own bytes are mapped and they are unmapped when the tensor is freed, so its pages
        count in the RSS only while it lives, as with `get`. The shard must not be truncated while
        the tensor lives (a read past the end of a mapped file is a SIGBUS, not an error)."""
        fname = self.files[name]
        start, end = self._offsets(fname)[name]
        spec = self.specs[name]
        item = torch.empty((), dtype=spec.dtype).element_size()
        if end == start or start % item:  # nothing to map, or a misaligned tensor: a copy of its own
            return self.get(name)
        lead = start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
        with open(fname, "rb") as fh:
            try:
                m = mmap.mmap(fh.fileno(), lead + end - start, offset=start - lead, access=mmap.ACCESS_COPY)
            except ValueError:  # the file ends before the tensor does
                raise InputError(f"{fname}: truncated safetensors file (tensor {name})") from None
        buf = torch.frombuffer(m, dtype=torch.uint8, count=end - start, offset=lead)  # holds `m`: unmapped with it
        return buf.view(spec.dtype).reshape(spec.shape)

    def checksum(self, name: str, buf: bytearray) -> str:
        """`checksum` of tensor `name`'s bytes as stored, read through `buf` (reused: no new memory)."""
        fname = self.files[name]
        start, end = self._offsets(fname)[name]
        h, view = xxhash.xxh3_128(), memoryview(buf)
        with open(fname, "rb", buffering=0) as fh:
            pos = start
            while pos < end:
                got = os.preadv(fh.fileno(), [view[:min(len(buf), end - pos)]], pos)
                if got <= 0:
                    raise InputError(f"{fname}: truncated safetensors file (tensor {name})")
                h.update(view[:got])
                pos += got
        return h.hexdigest()

    def location(self, name: str) -> tuple[Path, int]:
        """(shard file, byte offset) where tensor `name`'s bytes start."""
        fname = self.files[name]
        return fname, self._offsets(fname)[name][0]

    def _offsets(self, fname: Path) -> dict[str, tuple[int, int]]:
        """{name: (first byte, end byte)} of the tensors of shard `fname`, as file positions."""
        cache = self.__dict__.setdefault("_offset_cache", {})
        if fname not in cache:
            with open(fname, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            cache[fname] = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                            for k, v in header.items() if k != "__metadata__"}
        return cache[fname]


def validate_checkpoint(path: Path) -> SourceCheckpoint:
    """Open every shard's header; raises `InputError` naming the file for anything broken."""
    return SourceCheckpoint(path)


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[int, int]]]:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets = []
    pos = 0
    for s in specs:
        header[s.name] = {"dtype": _DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets.append((pos, pos + s.nbytes))
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the library writes it
    return raw, offsets


def checksum(data) -> str:
    """XXH3-128 of `data` (any buffer) as hex: the checksum every written tensor is verified by
    (see the module's note)."""
    return xxhash.xxh3_128_hexdigest(data)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_sharded(
    out_dir: Path,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    *,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> dict[str, str]:
    """Write `specs` into shards under `out_dir`, asking `produce` for one tensor at a time.

    Returns the checksum manifest {name: `checksum` of its bytes}. Every produced tensor must match its spec.
    """
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    checksums: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards):
        checksums.update(write_shard(out_dir / fname, shard, produce, metadata=metadata, on_tensor=on_tensor))
        weight_map.update({spec.name: fname for spec in shard})
        total += sum(spec.nbytes for spec in shard)
    if n > 1:
        write_index(out_dir, weight_map, total)
    return checksums


def write_shard(path: Path, specs: list[TensorSpec], produce: Callable[[TensorSpec], torch.Tensor], *,
                metadata: dict[str, str] | None = None,
                on_tensor: Callable[[TensorSpec], None] | None = None) -> dict[str, str]:
    """One safetensors file holding `specs` in order, each tensor asked of `produce` when its turn
    comes; returns {name: `checksum` of its bytes}. Every produced tensor must match its spec."""
    checksums = {}
    header, _ = header_bytes(specs, metadata or {"format": "pt"})
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for spec in specs:
            t = produce(spec)
            if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                raise VerificationError(f"internal: {spec.name} produced {t.dtype}{tuple(t.shape)}, "
                                        f"planned {spec.dtype}{spec.shape}")
            data = tensor_bytes(t)
            fh.write(data)
            checksums[spec.name] = checksum(data)
            if on_tensor:
                on_tensor(spec)
    return checksums


def write_index(out_dir: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def verify_written(out_dir: Path, specs: Iterable[TensorSpec], checksums: dict[str, str]) -> None:
    """Re-read every written tensor with the safetensors library; shape, dtype and `checksum` must match."""
    src = SourceCheckpoint(out_dir)
    wanted = {s.name: s for s in specs}
    extra = set(src.specs) - set(wanted)
    missing = set(wanted) - set(src.specs)
    if extra or missing:
        raise VerificationError(f"{out_dir}: written tensors differ from the plan "
                                f"(missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
    for name, spec in wanted.items():
        if src.specs[name] != spec:
            raise VerificationError(f"{out_dir}: {name} reads back as {src.specs[name]}, planned {spec}")

    # hashing and reads release the GIL: the tensors are hashed on several cores, each thread
    # reading into one buffer of its own (2.3 GB of int8 Mixtral with SHA-256: 3.1 s one tensor
    # at a time into fresh memory, 1.3 s on 2 cores; fresh pages cost more to fault in than to hash)
    local = threading.local()

    def digest(name: str) -> str:
        if not hasattr(local, "buf"):
            local.buf = bytearray(16 * 2**20)
        return src.checksum(name, local.buf)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="moeconv-verify") as pool:
        for name, got in zip(wanted, pool.map(digest, wanted)):
            if got != checksums[name]:
                raise VerificationError(f"{out_dir}: {name} checksum mismatch on reload")
