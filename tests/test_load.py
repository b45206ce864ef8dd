"""`moeconv.io.load.load`: every way a source can be broken gives a `MoeconvError` naming the problem;
good checkpoints (single / sharded safetensors, pytorch_model.bin) load exactly; pickles never run."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch import nn

from moeconv.errors import InputError, MoeconvError, UnsupportedError
from moeconv.io.load import load
from moeconv.state import ModelState
from tests.tiny import tiny_hf

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 127]])


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.allclose(_out(a), _out(b), atol=1e-6, rtol=0)


def _raises(exc_type, source, *needles):
    with pytest.raises(exc_type) as ei:
        load(source)
    msg = ei.value.one_line()
    for n in needles:
        assert str(n) in msg, (n, msg)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- bad sources


def test_missing_path(tmp_path):
    _raises(InputError, tmp_path / "nope", "nope", "no such file")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    _raises(InputError, tmp_path, "config.json")


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe", ""], ids=["syntax", "binary", "empty"])
def test_invalid_json_config_names_the_file(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    _raises(InputError, tmp_path, str(tmp_path / "config.json"), "JSON")


def test_config_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    _raises(InputError, tmp_path, "config.json")


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32}))
    _raises(InputError, tmp_path, "model_type")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "definitely_not_a_model"}))
    with pytest.raises(MoeconvError) as ei:
        load(tmp_path)
    assert isinstance(ei.value, (UnsupportedError, InputError))
    assert "definitely_not_a_model" in ei.value.one_line()


def test_config_but_no_weights(tmp_path):
    tiny_hf("llama").config.save_pretrained(tmp_path)
    _raises(InputError, tmp_path, "no weights")


def test_plain_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    _raises(InputError, f, "weights.txt")


def test_unknown_builtin():
    _raises(InputError, "builtin:resnet", "resnet", "gpt")


def test_python_file_problems(tmp_path):
    _raises(InputError, tmp_path / "missing.py", "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    _raises(InputError, broken, "broken.py", "boom at import")
    nofactory = tmp_path / "nofactory.py"
    nofactory.write_text("x = 1\n")
    _raises(InputError, nofactory, "build_model")
    notmodule = tmp_path / "notmodule.py"
    notmodule.write_text("def build_model():\n    return 42\n")
    _raises(InputError, notmodule, "int")


def test_python_file_with_factory(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("from torch import nn\n"
                 "def make():\n    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).train()\n")
    state = load(f"{f}:make")
    assert isinstance(state, ModelState)
    assert isinstance(state.module, nn.Sequential) and not state.module.training
    assert state.source.spec.endswith("mine.py:make")


def test_builtin_and_module_sources():
    a, b = load("builtin:gpt"), load("builtin:gpt")
    assert a.source.kind == "builtin"
    _assert_same_model(a.module, b.module)  # built-in weights are reproducible
    m = nn.Linear(2, 2).train()
    state = load(m)
    assert state.module is m and not m.training
    assert load(state) is state


# ----------------------------------------------------------------------------- safetensors


def test_single_safetensors_loads_and_matches(tmp_path):
    model = tiny_hf("qwen2", tmp_path)
    state = load(tmp_path)
    assert type(state.module).__name__ == "Qwen2ForCausalLM"
    assert state.source.kind == "hf" and state.source.path == tmp_path
    assert state.config.model_type == "qwen2"
    assert not state.module.training
    _assert_same_model(model, state.module)


def test_dtype_argument(tmp_path):
    tiny_hf("llama", tmp_path)
    state = load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in state.module.parameters()} == {torch.bfloat16}


def _sharded(tmp_path, kind="llama"):
    model = tiny_hf(kind)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    return model, shards


def test_sharded_safetensors_loads_and_matches(tmp_path):
    model, _ = _sharded(tmp_path)
    _assert_same_model(model, load(tmp_path).module)


def test_index_naming_missing_shard(tmp_path):
    _, shards = _sharded(tmp_path)
    shards[1].unlink()
    _raises(InputError, tmp_path, shards[1].name, "missing")


def test_index_naming_unknown_shard_file(tmp_path):
    _sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-99999-of-99999.safetensors"
    index_path.write_text(json.dumps(index))
    _raises(InputError, tmp_path, "model-99999-of-99999.safetensors")


def test_index_naming_tensor_absent_from_shard(tmp_path):
    _, shards = _sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = shards[0].name
    index_path.write_text(json.dumps(index))
    _raises(InputError, tmp_path, "model.layers.0.mlp.extra.weight")


def test_invalid_index_json(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    _raises(InputError, tmp_path, "model.safetensors.index.json")


@pytest.mark.parametrize("keep", ["half", "header_len_only", "minus_one_byte"])
def test_truncated_shard(tmp_path, keep):
    _, shards = _sharded(tmp_path)
    data = shards[1].read_bytes()
    cut = {"half": len(data) // 2, "header_len_only": 8, "minus_one_byte": len(data) - 1}[keep]
    shards[1].write_bytes(data[:cut])
    _raises(InputError, tmp_path, shards[1].name)


def test_truncated_single_file(tmp_path):
    tiny_hf("gpt2", tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-16])
    _raises(InputError, tmp_path, "model.safetensors")


@pytest.mark.parametrize("change", [dict(num_hidden_layers=3), dict(num_hidden_layers=1), dict(intermediate_size=48)],
                         ids=["more_layers", "fewer_layers", "other_width"])
def test_weights_not_matching_config(tmp_path, change):
    tiny_hf("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _raises(InputError, tmp_path, str(tmp_path))


# ----------------------------------------------------------------------------- pytorch_model.bin


def _bin_checkpoint(tmp_path, kind="llama", state_dict=None, **overrides):
    """A HF directory with config.json and pytorch_model.bin (no safetensors)."""
    model = tiny_hf(kind, tmp_path, **overrides)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict() if state_dict is None else state_dict, tmp_path / "pytorch_model.bin")
    return model


class _Payload:
    """Unpickling this runs a shell command (the classic malicious-checkpoint trick)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_premise(tmp_path):
    # The payload really is live: an unrestricted unpickler runs it.
    marker = tmp_path / "premise-ran"
    pickle.loads(pickle.dumps({"w": _Payload(marker)}))
    assert marker.exists()


@pytest.mark.parametrize("where", ["alone", "inside_state_dict"])
def test_malicious_pickle_refused_and_not_executed(tmp_path, where):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    model = tiny_hf("llama")
    sd = {"evil": _Payload(marker)} if where == "alone" else {**model.state_dict(), "evil": _Payload(marker)}
    _bin_checkpoint(ckpt, state_dict=sd)
    _raises(InputError, ckpt, "pytorch_model.bin")
    assert not marker.exists(), "the pickle payload was executed"


def test_bin_not_a_state_dict(tmp_path):
    _bin_checkpoint(tmp_path, state_dict=[torch.zeros(2)])
    _raises(InputError, tmp_path, "pytorch_model.bin", "state dict")


def test_bin_garbage_bytes(tmp_path):
    _bin_checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x00garbage" * 10)
    _raises(InputError, tmp_path, "pytorch_model.bin")


def test_bin_with_wrong_keys(tmp_path):
    model = tiny_hf("llama")
    sd = dict(model.state_dict())
    sd["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    del sd["model.layers.1.mlp.up_proj.weight"]
    _bin_checkpoint(tmp_path, state_dict=sd)
    _raises(InputError, tmp_path, "missing", "unexpected")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bin_state_dict_loads(tmp_path, kind):
    model = _bin_checkpoint(tmp_path, kind)
    state = load(tmp_path)
    assert type(state.module) is type(model) and state.source.kind == "hf"
    loaded = state.module.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded[k]), k


def test_bin_gpt2_matches_model(tmp_path):
    model = _bin_checkpoint(tmp_path, "gpt2")
    state = load(tmp_path)
    _assert_same_model(model, state.module)
    assert state.module.lm_head.weight is state.module.transformer.wte.weight  # ties restored


@pytest.mark.parametrize("kind,overrides", [("llama", dict(rope_theta=12345.0)),
                                            ("bert", dict(max_position_embeddings=40))])
def test_bin_matches_model_including_buffers(tmp_path, kind, overrides):
    # Unusual rope_theta / max_position so no freed tensor elsewhere in the process holds the
    # exact buffer values that uninitialised memory could happen to reuse.
    model = _bin_checkpoint(tmp_path, kind, **overrides)
    loaded = load(tmp_path).module
    bufs = dict(loaded.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, bufs[name]), f"buffer {name} differs after loading pytorch_model.bin"
    _assert_same_model(model, loaded)


def test_safetensors_preferred_over_bin(tmp_path):
    model = tiny_hf("llama", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    _assert_same_model(model, load(tmp_path).module)


def test_load_does_not_write_into_checkpoint(tmp_path):
    # Loading never writes into the checkpoint directory.
    tiny_hf("gpt2", tmp_path / "a")
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    load(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before
