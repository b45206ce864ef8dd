"""The bad-input corpus: ways a checkpoint directory can be broken, each a function that breaks a
copy in place, built from the good fixtures at test time (no checked-in binaries). Each case applies
to every source format (dense HF, Mixtral, moeconv's format, its quantized and compressed forms);
`SOURCE_NAMES` says what each error message must name."""
import json
import os
import pickle
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def copy_dir(good: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in good.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _corrupt_header(d):
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json at all" + raw[24:])


def _truncate(d):
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])


def _index_missing_tensor(d):
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    wm = {n: "model.safetensors" for n in names}
    wm["model.layers.9.mlp.up_proj.weight"] = "model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _edit_config(d, **fields):
    """Set model config fields: top level for HF checkpoints, the recorded source config for moeconv's format."""
    raw = json.loads((d / "config.json").read_text())
    if "moeconv_sparse" in raw:  # sparsify --compressed: the dense checkpoint's config is inside
        raw["moeconv_sparse"]["dense_config"].update(fields)
    else:
        (raw["moeconv"]["source"]["config"] if "moeconv" in raw else raw).update(fields)
    (d / "config.json").write_text(json.dumps(raw))


def _index_outside(d):
    """An index whose shard lies outside the checkpoint directory (a copy of the real one, so only the path is wrong)."""
    from safetensors import safe_open
    (d.parent / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        wm = {n: "../outside.safetensors" for n in f.keys()}
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _shape_mismatch(d):
    _edit_config(d, intermediate_size=48)


def _cut_tensor(d, suffix, cut):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    name = next(n for n in sorted(sd) if n.endswith(suffix))  # suffix: a str or a tuple
    sd[name] = cut(sd[name]).contiguous()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


# the FFN's up projection: Llama-style, Mixtral experts, and the kept values of a compressed 2:4 one
UP = ("up_proj.weight", ".w3.weight", ".w3.weight.sparse_values")
DOWN = ("down_proj.weight", ".w2.weight")


def _wrong_dtype(d):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    name = next(n for n in sorted(sd) if n.endswith(UP))
    sd[name] = sd[name].to(torch.int64)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _nan_weights(d):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    name = next((n for n in sorted(sd) if n.endswith(DOWN) and sd[n].is_floating_point()), None)
    name = name or next(n for n in sorted(sd) if n.endswith("norm.weight"))  # quantized: a float norm scale
    sd[name].view(-1)[0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MOECONV_EVIL_MARKER', '/tmp/moeconv-evil')}",))


def _malicious_pickle(d, protocol=pickle.DEFAULT_PROTOCOL):
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Evil()}, fh, protocol=protocol)


def _config_runs_code(d):
    """A moeconv-format config whose source is a Python file beside the checkpoint."""
    (d.parent / "payload.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ.get('MOECONV_EVIL_MARKER', '/tmp/moeconv-evil')).touch()\n"
        "def build_model():\n    import torch\n    return torch.nn.Linear(2, 2)\n")
    source = {"kind": "spec", "spec": f"{d.parent / 'payload.py'}:build_model"}
    raw = {"model_type": "moeconv", "moeconv": {"format_version": 1, "source": source, "sites": []}}
    (d / "config.json").write_text(json.dumps(raw))


def _empty_dir(d):
    for f in d.iterdir():
        f.unlink()


def _unknown_model_type(d):
    _edit_config(d, model_type="definitely-not-a-model")


def _config_not_json(d):
    (d / "config.json").write_text("{ this is : not json")


MODEL_CASES = {
    "corrupt-header": _corrupt_header,
    "truncated-shard": _truncate,
    "index-missing-tensor": _index_missing_tensor,
    "index-shard-outside": _index_outside,
    "shape-mismatch": _shape_mismatch,
    "attn-shape-mismatch": lambda d: _cut_tensor(d, "q_proj.weight", lambda t: t[: t.shape[0] // 2]),
    "ffn-shape-mismatch": lambda d: _cut_tensor(d, UP, lambda t: t[..., : t.shape[-1] // 2]),
    "wrong-dtype": _wrong_dtype,
    "nan-weights": _nan_weights,
    "malicious-pickle": _malicious_pickle,
    "malicious-pickle-p2": lambda d: _malicious_pickle(d, protocol=2),  # torch.load's own protocol: refused at the global
    "empty-dir": _empty_dir,
    "config-runs-code": _config_runs_code,
    "unknown-model-type": _unknown_model_type,
    "config-not-json": _config_not_json,
}

# What each case's message must name (besides the source path).
NAMES = {
    "corrupt-header": "model.safetensors", "truncated-shard": "truncated",
    "index-missing-tensor": "model.layers.9.mlp.up_proj.weight", "index-shard-outside": "../outside.safetensors", "shape-mismatch": "shape",
    "wrong-dtype": "int64", "nan-weights": "NaN", "malicious-pickle": "pytorch_model.bin",
    "malicious-pickle-p2": "pytorch_model.bin", "empty-dir": "config.json",
    "unknown-model-type": "definitely-not-a-model", "config-not-json": "config.json", "config-runs-code": "payload.py",
    "attn-shape-mismatch": "q_proj", "ffn-shape-mismatch": "up_proj",
}
# moeconv's formats (plain, quantized, compressed) read only safetensors: a pickle beside the config is never
# opened; Mixtral names its expert projections w1/w2/w3.
_SAFETENSORS_ONLY = {"malicious-pickle": "model.safetensors", "malicious-pickle-p2": "model.safetensors"}
SOURCE_NAMES = {
    "hf": NAMES,
    "mixtral": {**NAMES, "ffn-shape-mismatch": "w3", "wrong-dtype": "int64"},
    "moeconv-format": {**NAMES, **_SAFETENSORS_ONLY},
    "quantized": {**NAMES, **_SAFETENSORS_ONLY},
    "compressed": {**NAMES, **_SAFETENSORS_ONLY, "ffn-shape-mismatch": "w3", "wrong-dtype": "w3"},
}
