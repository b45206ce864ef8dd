"""Property tests: random bytes / random JSON / random YAML into the three readers must end in a
clean `MoeconvError` (or a valid result), never an uncaught exception."""
import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeconv.errors import MoeconvError
from moeconv.io.load import load
from moeconv.io.safetensors_io import SourceCheckpoint
from moeconv.recipe import build_passes, parse_recipe

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


safetensors_blobs = st.one_of(
    st.binary(max_size=256),
    st.builds(_safetensors_bytes, st.dictionaries(st.text(max_size=6), json_values, max_size=3), st.binary(max_size=64)),
    st.builds(lambda n, dt, shape, off, data: _safetensors_bytes({n: {"dtype": dt, "shape": shape, "data_offsets": off}}, data),
              st.text(min_size=1, max_size=4), st.sampled_from(["F32", "F16", "BF16", "I64", "XX", ""]),
              st.lists(st.integers(-2, 5), max_size=3), st.lists(st.integers(-4, 80), max_size=3), st.binary(max_size=80)),
)


def _read_every_tensor(directory: Path) -> None:
    """Open the checkpoint and read each tensor; a clean MoeconvError is the only allowed failure."""
    try:
        ckpt = SourceCheckpoint(directory)
        for name in ckpt.names():
            ckpt.get(name)
    except MoeconvError:
        pass


def _check_safetensors(blob: bytes):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.safetensors").write_bytes(blob)
        _read_every_tensor(Path(d))


index_values = st.one_of(
    json_values,
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["a", "b", "", "w.weight"]),
                                                         st.sampled_from(["model-1.safetensors", "missing.safetensors",
                                                                          "../x.safetensors", "", "/etc/passwd"])
                                                         | json_values, max_size=3)},
                          optional={"metadata": json_values}),
)


def _check_index(value):
    """A random index next to one valid shard holding tensor `a`."""
    import torch
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as d:
        save_file({"a": torch.zeros(2)}, str(Path(d) / "model-1.safetensors"))
        (Path(d) / "model.safetensors.index.json").write_text(json.dumps(value))
        _read_every_tensor(Path(d))


def _check_config(value):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(value) if not isinstance(value, bytes) else "")
        try:
            load(d)
        except MoeconvError:
            pass


def _check_recipe(text: str):
    try:
        build_passes(parse_recipe(text))
    except MoeconvError:
        pass


recipe_texts = st.one_of(
    st.text(max_size=120),
    st.builds(lambda steps: json.dumps({"steps": steps}), st.lists(
        st.dictionaries(st.sampled_from(["pass", "num_experts", "top_k", "router_init", "seed", "zz"]),
                        json_values, max_size=4), max_size=3)),
    st.builds(lambda v: "steps:\n  - pass: upcycle\n    num_experts: " + json.dumps(v), json_values),
)
# moeconv's own format: a `moeconv` section (plain or quantized) with random parts
moeconv_sections = st.fixed_dictionaries(
    {"format_version": st.sampled_from([1, 2, "1", None])},
    optional={"source": json_values | st.fixed_dictionaries({"kind": st.sampled_from(["hf", "spec", "x"])},
                                                            optional={"config": json_values, "spec": json_values}),
              "sites": json_values | st.lists(st.dictionaries(st.sampled_from(["site", "num_experts", "top_k"]),
                                                              json_values, max_size=3), max_size=2),
              "quantization": json_values})
configs = st.one_of(json_values, st.fixed_dictionaries({"model_type": st.sampled_from(["llama", "bert", "gpt2", "x", ""])},
                                                         optional={"hidden_size": json_values, "num_hidden_layers": json_values}),
                    st.fixed_dictionaries({"model_type": st.just("moeconv"), "moeconv": moeconv_sections}),
                    st.fixed_dictionaries({"moeconv_sparse": json_values}))


@FAST
@given(safetensors_blobs)
def test_safetensors_reader_fast(blob):
    _check_safetensors(blob)


@FAST
@given(index_values)
def test_index_reader_fast(value):
    _check_index(value)


@FAST
@given(configs)
def test_config_reader_fast(value):
    _check_config(value)


@FAST
@given(recipe_texts)
def test_recipe_reader_fast(text):
    _check_recipe(text)


@pytest.mark.slow
@SLOW
@given(safetensors_blobs)
def test_safetensors_reader_1000(blob):
    _check_safetensors(blob)


@pytest.mark.slow
@SLOW
@given(index_values)
def test_index_reader_1000(value):
    _check_index(value)


@pytest.mark.slow
@SLOW
@given(configs)
def test_config_reader_1000(value):
    _check_config(value)


@pytest.mark.slow
@SLOW
@given(recipe_texts)
def test_recipe_reader_1000(text):
    _check_recipe(text)
