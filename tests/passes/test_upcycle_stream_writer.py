"""The streaming upcycle's writer (`moeconv.formats.stream_writer.write_copying`): the same files as
`moeconv.formats.writer.write_checkpoint` byte for byte, source bytes copied by the kernel, and
every tensor read back and compared with what was produced, so a wrong copy or a damaged file
fails the run with nothing published."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moeconv.errors import VerificationError
from moeconv.formats import stream_writer
from moeconv.formats.stream_writer import LocatedSource, write_copying
from moeconv.formats.writer import write_checkpoint
from moeconv.io.safetensors_io import TensorSpec
from upcycle_helpers import EXPERTS, cli_ok, leftovers, run_cli, safetensors_dict

BASE = ["--num-experts", str(EXPERTS), "--top-k", "2", "--router-init", "normal"]
MODEL_FILES = ("config.json", "model.safetensors.index.json")


def _model_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors" or p.name in MODEL_FILES}


def _with_main_writer(monkeypatch):
    """The job writes with `write_checkpoint` (checksummed, every byte from memory)."""
    import moeconv.jobs.upcycle as job

    def main_writer(out_dir, source, config, *, shard_bytes, on_tensor=None):
        return write_checkpoint(out_dir, source, config, shard_bytes=shard_bytes, on_tensor=on_tensor)
    monkeypatch.setattr(job, "write_copying", main_writer)


@pytest.mark.parametrize("kind, extra", [
    ("llama", []),
    ("llama", ["--shard-size", "60KB"]),
    ("qwen2", ["--shard-size", "60KB"]),  # a shared expert, routed experts scaled by 0.5
    ("qwen3", ["--dtype", "bfloat16"]),   # nothing left verbatim: every tensor written from memory
    ("llama", ["--expert-init", "split"]),
    ("mistral", ["--expert-init", "noise", "--seed", "3"]),
])
def test_files_are_byte_identical_to_write_checkpoints(kind, extra, dense_ckpt, tmp_path, monkeypatch):
    src = dense_ckpt(kind)
    cli_ok(src, tmp_path / "new", *BASE, *extra)
    with monkeypatch.context() as m:
        _with_main_writer(m)
        cli_ok(src, tmp_path / "main", *BASE, *extra)
    new, main = _model_files(tmp_path / "new"), _model_files(tmp_path / "main")
    assert sorted(new) == sorted(main) and any(n.endswith(".safetensors") for n in new)
    assert [n for n in new if new[n] != main[n]] == []


def test_exact_experts_are_copied_from_the_source_file(dense_ckpt, tmp_path, monkeypatch):
    """Copy init: every tensor but the routers is source bytes, copied by the kernel (while the
    garbage collector is paused: it is back on after the job)."""
    import gc
    copied, kernel_copy, collector = [], stream_writer._kernel_copy, []

    def record(fh, where, count):
        copied.append(where)
        collector.append(gc.isenabled())
        return kernel_copy(fh, where, count)
    monkeypatch.setattr(stream_writer, "_kernel_copy", record)
    cli_ok(dense_ckpt("llama"), tmp_path / "moe", *BASE)
    written = safetensors_dict(tmp_path / "moe")
    routers = [n for n in written if n.endswith("block_sparse_moe.gate.weight")]
    assert len(routers) == 2 and len(copied) == len(written) - len(routers)
    assert all(w[0].parent == dense_ckpt("llama") for w in copied)
    assert not any(collector) and gc.isenabled()


def test_without_kernel_copy_the_same_files_are_written(dense_ckpt, tmp_path, monkeypatch):
    """A kernel without copy_file_range (or a copy it refuses): everything goes through write()."""
    src = dense_ckpt("llama")
    cli_ok(src, tmp_path / "a", *BASE)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    cli_ok(src, tmp_path / "b", *BASE)
    assert _model_files(tmp_path / "a") == _model_files(tmp_path / "b")


def test_a_wrong_source_location_fails_the_run_with_nothing_published(dense_ckpt, tmp_path, monkeypatch):
    """What the kernel copies is compared with the produced tensor: two bytes off, the run fails
    (and the garbage collector, paused for the streamed job, is back on)."""
    import gc

    from moeconv.jobs import upcycle_stream
    locate = upcycle_stream._Producer.locate
    monkeypatch.setattr(upcycle_stream._Producer, "locate",
                        lambda self, s: None if (w := locate(self, s)) is None else (w[0], w[1] + 2))
    out = tmp_path / "moe"
    r = run_cli(dense_ckpt("llama"), out, *BASE)
    assert r.exit_code != 0 and "reads back different from what was produced" in " ".join(r.stderr.split())
    assert not out.exists() and leftovers(tmp_path) == []
    assert gc.isenabled()


def _source(tensors: dict[str, torch.Tensor]) -> LocatedSource:
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    return LocatedSource(specs, lambda s: tensors[s.name], [])


def test_writer_alone_matches_write_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 5, generator=g), "b": torch.arange(9), "c": torch.randn(64, 32, generator=g)
               .to(torch.bfloat16), "empty": torch.zeros(0, 3), "d": torch.randn(3000, generator=g)}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    small = dict(shard_bytes=10_000)
    assert write_copying(tmp_path / "a", _source(tensors), {"x": 1}, **small) == \
        write_checkpoint(tmp_path / "b", _source(tensors), {"x": 1}, **small)
    assert len(list((tmp_path / "a").glob("*.safetensors"))) >= 2
    assert _model_files(tmp_path / "a") == _model_files(tmp_path / "b")


def test_bytes_that_reach_the_file_altered_fail(tmp_path, monkeypatch):
    tensors = {"a": torch.ones(100), "b": torch.zeros(100)}
    write_all = stream_writer._write_all

    def faulty(fh, data):
        raw = bytes(memoryview(data).cast("B"))
        write_all(fh, raw[:-1] + b"\1" if raw == bytes(400) else raw)  # "b": its last byte altered
    monkeypatch.setattr(stream_writer, "_write_all", faulty)
    with pytest.raises(VerificationError, match="b reads back different"):
        write_copying(tmp_path, _source(tensors), {}, shard_bytes=10**6)


@pytest.mark.parametrize("where", ["header", "tail"])
def test_a_shard_that_is_not_what_was_written_fails(where, tmp_path, monkeypatch):
    """The header read back must be the one written; the file must end at its last tensor."""
    tensors = {"a": torch.ones(100), "b": torch.zeros(100)}
    produce = _source(tensors).produce

    def produce_then_alter(s):
        t = produce(s)
        if s.name == "b":  # damage the file as a faulty disk or another writer would
            path = tmp_path / "model.safetensors"
            with open(path, "r+b") as fh:
                if where == "header":
                    fh.seek(path.read_bytes().index(b'"format":"pt"'))
                    fh.write(b'"format":"PT"')
                else:
                    fh.seek(0, os.SEEK_END)
                    fh.write(bytes(800 + 8))  # past where "b" ends
        return t
    src = _source(tensors)
    src.produce = produce_then_alter
    with pytest.raises(VerificationError, match="header or size reads back different"):
        write_copying(tmp_path, src, {}, shard_bytes=10**6)


# ----------------------------------------------------------------------------- the fast paths' twins


def test_without_memcmp_the_same_files_are_written_and_checked(dense_ckpt, tmp_path, monkeypatch):
    """The read-back compares mapped pages with the C library's memcmp; where ctypes finds none it
    reads into a buffer: same files, same checks."""
    src = dense_ckpt("llama")
    cli_ok(src, tmp_path / "a", *BASE)
    monkeypatch.setattr(stream_writer, "_MEMCMP", None)
    cli_ok(src, tmp_path / "b", *BASE)
    assert _model_files(tmp_path / "a") == _model_files(tmp_path / "b")
    write_all = stream_writer._write_all
    monkeypatch.setattr(stream_writer, "_write_all",
                        lambda fh, data: write_all(fh, b"\1" * len(memoryview(data).cast("B"))))
    with pytest.raises(VerificationError, match="a reads back different"):
        write_copying(tmp_path, _source({"a": torch.zeros(10)}), {}, shard_bytes=10**6)


@pytest.mark.parametrize("at", [0, 4095, 4096, 9999, 19_999])
def test_a_byte_off_in_any_window_of_the_read_back_fails(at, tmp_path, monkeypatch):
    """The file is compared a mapped window at a time: a difference in the first, a later or the
    last window, at or off a page boundary, is found; so is a file that ends too soon."""
    monkeypatch.setattr(stream_writer, "WINDOW", 4096)
    data = bytes(range(256)) * 79  # 20,224 bytes: five windows
    path = tmp_path / "f"
    path.write_bytes(b"x" * 123 + data)
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(1 << 12)
        assert stream_writer._holds(fd, 123, memoryview(data), buf)
        os.pwrite(fd, bytes([data[at] ^ 1]), 123 + at)
        assert not stream_writer._holds(fd, 123, memoryview(data), buf)
        assert not stream_writer._holds(fd, 124, memoryview(data), buf)  # past the end of the file
    finally:
        os.close(fd)


def test_mapped_source_tensors_equal_the_ones_read(tmp_path):
    """`SourceCheckpoint.mapped` (the streaming upcycle's reads) gives what `get` gives, for every
    dtype, a scalar, an empty tensor and a tensor not aligned to its element size; and a shard cut
    short after it was opened is an error, not a crash."""
    from moeconv.errors import InputError
    from moeconv.io.safetensors_io import SourceCheckpoint
    g = torch.Generator().manual_seed(0)
    tensors = {"a_odd": torch.arange(3, dtype=torch.uint8), "b_f32": torch.randn(5, 7, generator=g),
               "c_bf16": torch.randn(300, generator=g).to(torch.bfloat16), "d_scalar": torch.tensor(2.5),
               "e_empty": torch.zeros(0, 4), "f_i64": torch.arange(6)}
    write_copying(tmp_path, _source(tensors), {}, shard_bytes=10**6)  # in this order: b_f32 starts at byte 3
    ckpt = SourceCheckpoint(tmp_path)
    assert ckpt.location("b_f32")[1] % 4 == 3
    for name in ckpt.names():
        got = ckpt.mapped(name)
        assert got.dtype == tensors[name].dtype and torch.equal(got, ckpt.get(name)), name
    got = ckpt.mapped("c_bf16")
    got.zero_()  # a private mapping: the file is not changed
    assert torch.equal(ckpt.mapped("c_bf16"), tensors["c_bf16"])
    size = (tmp_path / "model.safetensors").stat().st_size
    os.truncate(tmp_path / "model.safetensors", size - 8)
    last = max(ckpt.names(), key=lambda n: ckpt.location(n)[1] + ckpt.specs[n].nbytes)  # the file ends with it
    with pytest.raises(InputError, match="truncated"):
        ckpt.mapped(last)
