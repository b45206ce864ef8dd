"""ONNX-file chores: provenance, IR version, readable dynamic axes, external data, sizes.

Models whose weights exceed `EXTERNAL_DATA_BYTES` are written with their tensors in one
`NAME.onnx.data` file next to `NAME.onnx` (protobuf cannot hold a single message over 2 GB).
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from moeconv.errors import UnsupportedError

MAX_IR_VERSION = 10          # onnxruntime 1.31 rejects newer IR versions (FIELD.md)
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB limit with room for the graph
EXTERNAL_LISTING_BYTES = 64 * 2**20  # a graph file without its weights stays far below this


def provenance(extra: dict) -> dict[str, str]:
    """metadata_props entries: moeconv version, the recipe, and anything else given (as JSON)."""
    from moeconv.version import __version__
    props = {"moeconv.version": __version__}
    for key, value in extra.items():
        props[f"moeconv.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    return props


def initializer_bytes_ir(ir_model) -> int:
    total = 0
    for init in ir_model.graph.initializers.values():
        const = init.const_value
        if const is not None:
            total += const.nbytes
    return total


def finish_exported(program, sig, props: dict[str, str]) -> None:
    """Name dynamic axes, refuse silently specialised ones, cap the IR version, add provenance."""
    import onnx_ir as ir
    model = program.model
    rename: dict[str, str] = {}
    by_name = {v.name: v for v in model.graph.inputs}
    for name, axes in sig.dynamic_axes.items():
        value = by_name.get(name)
        if value is None:
            continue
        for axis, label in axes.items():
            dim = value.shape[axis]
            if isinstance(dim, int):
                raise UnsupportedError(f"the exporter fixed axis {axis} ({label}) of `{name}` to {dim}: the model "
                                       "has shape-dependent Python code there, so the graph would not be dynamic")
            if dim.value is not None:
                rename.setdefault(dim.value, label)
    values = list(model.graph.inputs) + list(model.graph.outputs)
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        values.extend(node.outputs)
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        # The exporter's stack traces name process-global FX keys (`<eval_with_key>.67`): two
        # exports of the same model in two processes would differ. Debug text only; dropped so
        # the same recipe and seed give a byte-identical file.
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    # The exporter names a present.* length by its sum (`s15 + s70`), a different sum per output;
    # it is the mask's length (past + new tokens), so it gets that axis's name.
    total = sig.dynamic_axes.get("attention_mask", {}).get(1) if sig.with_past else None
    present = {v.name for v in model.graph.outputs if v.name.startswith("present.")}
    for v in values:
        shape = v.shape
        if shape is None:
            continue
        dims = [ir.SymbolicDim(rename[d.value]) if not isinstance(d, int) and d.value in rename else d for d in shape]
        if total and v.name in present and len(dims) == 4 and not isinstance(dims[2], int):
            dims[2] = ir.SymbolicDim(total)
        if dims != list(shape):
            v.shape = ir.Shape(dims)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    for key, value in props.items():
        model.metadata_props[key] = value


def save_program(program, path: Path, *, external: bool | None = None) -> bool:
    """Write the exported program; returns whether external data was used. By default, weights go
    to external data only above protobuf's limit; `external=True` forces it for a file that is
    rewritten next (the int8 rewrite, a quantizer): inline, the writer first serializes every
    weight into one in-memory message and then into bytes, two extra copies of the model (2.8 GB
    for SmolLM2 upcycled to 4 experts), where external data is written tensor by tensor."""
    if external is None:
        external = initializer_bytes_ir(program.model) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    return external


def data_files(path: Path) -> list[Path]:
    """`path` and every external-data file it references."""
    path = Path(path)
    if path.stat().st_size > EXTERNAL_LISTING_BYTES:
        # a graph this big holds its weights itself (moeconv writes all of them inline or all of them
        # external); parsing it would read every weight into memory just to find none is external
        return [path]
    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sorted(files)


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in data_files(path) if f.exists())


def load_model(path: Path, *, external_data: bool = True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=external_data)


def load_remaining_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read into `model` every initializer still stored as external data (after a rewrite that
    replaced the others), so the model can be saved on its own."""
    from onnx.external_data_helper import load_external_data_for_model
    load_external_data_for_model(model, str(base_dir))


def save_model(model: onnx.ModelProto, path: Path, props: dict[str, str] | None = None) -> bool:
    """Save a ModelProto (quantizer output) with provenance, IR version capped, external data if big."""
    if props:
        existing = {p.key: p for p in model.metadata_props}
        for key, value in props.items():
            if key in existing:
                existing[key].value = value
            else:
                model.metadata_props.add(key=key, value=value)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > EXTERNAL_DATA_BYTES
    path = Path(path)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return external


def metadata(path: Path) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
