"""Writing a checkpoint part by part (moeconv/formats/part_writer.py): each part one shard, named
and indexed at the end, every tensor re-read and checksummed; a name written twice is refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

from moeconv.errors import VerificationError
from moeconv.formats.part_writer import PartWriter
from moeconv.io.safetensors_io import SourceCheckpoint


def test_parts_become_indexed_shards_that_read_back_exactly(tmp_path):
    w = PartWriter(tmp_path)
    parts = [[("a.0.w", torch.randn(3, 4)), ("a.0.b", torch.arange(3))],
             [("a.1.w", torch.randn(2, 2, dtype=torch.bfloat16))], [],
             [("head", torch.ones(5, dtype=torch.float16))]]
    sizes = [w.write(p) for p in parts]
    assert sizes == [3 * 4 * 4 + 3 * 8, 2 * 2 * 2, 0, 5 * 2]
    stats = w.finish({"model_type": "x"})
    assert stats == {"tensors": 4, "bytes": sum(sizes), "shards": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["a.1.w"] == "model-00002-of-00003.safetensors"
    assert index["metadata"]["total_size"] == sum(sizes)
    ckpt = SourceCheckpoint(tmp_path)
    for name, t in (x for p in parts for x in p):
        assert torch.equal(ckpt.get(name), t)
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "x"}


def test_one_part_is_model_safetensors(tmp_path):
    w = PartWriter(tmp_path)
    w.write([("x", torch.zeros(2))])
    w.finish({})
    assert load_file(tmp_path / "model.safetensors")["x"].shape == (2,)
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_a_tensor_written_twice_or_changed_on_disk_is_refused(tmp_path):
    w = PartWriter(tmp_path / "a")
    (tmp_path / "a").mkdir()
    w.write([("x", torch.zeros(2))])
    with pytest.raises(VerificationError, match="written twice"):
        w.write([("x", torch.ones(2))])
    w2 = PartWriter(tmp_path / "b")
    (tmp_path / "b").mkdir()
    w2.write([("x", torch.zeros(4)), ("y", torch.zeros(4))])
    shard = next((tmp_path / "b").glob("*.tmp"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # flip a byte of y after it was written
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="checksum"):
        w2.finish({})
