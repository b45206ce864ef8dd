"""The streaming shard writer and its read-back (moeconv/io/safetensors_io.py): the file is what
`safetensors` reads, the checksums are each tensor's XXH3-128, the read-back hashes what is on disk
(in pieces, on several threads) and catches a flipped byte or a truncated file."""
import pytest
import torch
import xxhash
from safetensors.torch import load_file

from moeconv.errors import VerificationError
from moeconv.io.safetensors_io import TensorSpec, tensor_bytes, verify_written, write_shard


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(64, 32, generator=g), "b": torch.randint(-128, 127, (7,), dtype=torch.int8),
            "empty": torch.zeros(0, dtype=torch.bfloat16), "c": torch.randn(5, 3, generator=g).to(torch.bfloat16)}


def test_written_shard_reads_back_with_checksums_of_each_tensor(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    sums = write_shard(tmp_path / "model.safetensors", specs, lambda s: tensors[s.name])
    got = load_file(tmp_path / "model.safetensors")
    assert list(got) == list(tensors)  # nothing lost, nothing added
    for n, t in tensors.items():
        assert torch.equal(got[n], t)
        assert sums[n] == xxhash.xxh3_128_hexdigest(tensor_bytes(t))  # the library's own digest
    verify_written(tmp_path, specs, sums)


def test_verification_reads_every_tensor_through_reused_buffers(tmp_path):
    """A tensor larger than the read buffer is hashed in pieces; a truncated file is an error."""
    from moeconv.errors import InputError
    from moeconv.io.safetensors_io import SourceCheckpoint
    tensors = {"big": torch.randn(1000, 100), "small": torch.arange(5)}
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    sums = write_shard(tmp_path / "model.safetensors", specs, lambda s: tensors[s.name])
    ckpt = SourceCheckpoint(tmp_path)
    assert ckpt.checksum("big", bytearray(4096)) == sums["big"]  # 400 kB through a 4 kB buffer
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[:-100])
    with pytest.raises(InputError, match="truncated"):
        ckpt.checksum("small", bytearray(4096))


def test_wrong_tensor_is_refused_and_a_corrupted_file_fails_verification(tmp_path):
    tensors = _tensors()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with pytest.raises(VerificationError, match="planned"):
        write_shard(tmp_path / "model.safetensors", specs, lambda s: tensors[s.name].float())
    sums = write_shard(tmp_path / "model.safetensors", specs, lambda s: tensors[s.name])
    raw = bytearray((tmp_path / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF  # a flipped byte in the last tensor
    (tmp_path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(VerificationError, match="checksum mismatch"):
        verify_written(tmp_path, specs, sums)
