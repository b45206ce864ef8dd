"""Carry bitsandbytes LLM.int8 weights into ONNX exactly: int8 initializer + per-row float scale
→ `DequantizeLinear` → the MatMul that used the float weight.

A `Linear8bitLt` stores its weight as int8 `CB` (out, in) and one absmax per output row `SCB`:
W = CB · SCB / 127. Here the scale is fixed once as `s = float32(SCB / 127)` and the layer's
float weight is *defined* as `float32(CB) · s` (one rounding, the arithmetic `DequantizeLinear`
performs), so the rewrite is exact by construction and checked bit for bit.

How (`dequantized` then `carry_int8`): for the export, every `Linear8bitLt` is swapped for an
`nn.Linear` holding that float weight, the float graph is exported as usual (any MoE lowering,
the exporter's constant-folded transposes and the fused operator's stacked expert tensors
included), then every float initializer whose rows (or, for a 2-D one, columns) are all rows of
those weights is replaced by the int8 rows and their scales behind a `DequantizeLinear`
(`axis` = the row axis; stacked 3-D tensors are dequantized flat and reshaped). Rows are found
by content, so no exporter naming is relied on; a layer none of whose rows is found is reported.

bitsandbytes' own forward (CPU) also quantizes activations to int8 per row, which the graph does
not: the parity promise is against the dequantized float model, and the distance to the
bitsandbytes model is measured and reported separately.

onnxruntime (1.31, default optimization level) fuses DequantizeLinear → MatMul into `MatMulNBits`
and, at its default accuracy level 4, quantizes the activations to int8 as well (measured on a
tiny Llama: ~2e-3 from the float-arithmetic graph, ~1.7e-3 from bitsandbytes). The graph's
promise is therefore checked in a session with `FLOAT_ARITHMETIC` (the weights stay int8 in
memory, the arithmetic is fp32); what a default session computes is measured and reported too.

4-bit layers (nf4 / fp4) are refused: their code books have no exact standard ONNX form
(`refuse_4bit`).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from moeconv.errors import UnsupportedError
from moeconv.nn.quantized import method_of, serialized

if TYPE_CHECKING:
    import onnx

FOURBIT_HINT = ("export the float model and let onnxruntime quantize it: `moeconv export onnx SRC OUT "
                "--quantize int4` (recipe: `quantize: int4` on export-onnx), or quantize with `method: int8`")


# onnxruntime session config: keep the int8 weights, compute in fp32 (accuracy level 1 = fp32).
FLOAT_ARITHMETIC = {"session.qdq_matmulnbits_accuracy_level": "1"}


@dataclass
class Int8Layer:
    path: str
    q: torch.Tensor       # int8 (out, in)
    scale: torch.Tensor   # float32 (out,): SCB / 127
    bias: torch.Tensor | None

    def weight(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def bnb_methods(model: nn.Module) -> dict[str, str]:
    """module path → int8 | nf4 | fp4, for every bitsandbytes layer."""
    return {p: m for p, m in ((p, method_of(mod)) for p, mod in model.named_modules()) if m is not None}


def refuse_4bit(model: nn.Module, who: str = "export-onnx") -> None:
    four = [(p, m) for p, m in bnb_methods(model).items() if m != "int8"]
    if four:
        raise UnsupportedError(f"{who}: {len(four)} layer(s) hold bitsandbytes {four[0][1]} weights "
                               f"({four[0][0]}, …), which have no exact ONNX form", hint=FOURBIT_HINT)


def int8_layers(model: nn.Module) -> list[Int8Layer]:
    out = []
    for path, m in model.named_modules():
        if method_of(m) != "int8":
            continue
        t = serialized(m)
        q, scb = t["weight"], t["SCB"]
        if q.dtype != torch.int8 or q.dim() != 2 or scb.shape != (q.shape[0],):
            raise UnsupportedError(f"{path}: unexpected LLM.int8 state (weight {q.dtype}{tuple(q.shape)}, "
                                   f"SCB {tuple(scb.shape)})")
        scale = (scb.float() / 127.0).contiguous()
        bias = t.get("bias")
        out.append(Int8Layer(path, q.contiguous(), scale, bias.detach().float() if bias is not None else None))
    return out


@contextmanager
def dequantized(model: nn.Module, layers: list[Int8Layer]):
    """Each `Linear8bitLt` swapped for an `nn.Linear` with weight `float32(CB) · s`; always
    restored. Yields a `Swap` whose `bnb()` context puts the bitsandbytes layers back for a while."""
    swap = Swap(model, layers)
    swap.to_float()
    try:
        yield swap
    finally:
        swap.to_bnb()


class Swap:
    """The two forms of every int8 layer. The float weights can be released while nothing reads
    them (a fused export reads its stacked copy; the ONNX rewrite reads the graph) and rebuilt
    bit for bit from the int8 rows: `release_under(prefix)`, then `rebuild()`."""

    def __init__(self, model: nn.Module, layers: list[Int8Layer]):
        self.model = model
        self.layers = {l.path: l for l in layers}
        self.released: set[str] = set()
        self.bnb_modules = {l.path: model.get_submodule(l.path) for l in layers}
        self.float_modules = {}
        for l in layers:
            lin = nn.Linear(l.q.shape[1], l.q.shape[0], bias=l.bias is not None, device="meta")
            lin.weight = nn.Parameter(l.weight(), requires_grad=False)
            if l.bias is not None:
                lin.bias = nn.Parameter(l.bias.clone(), requires_grad=False)
            self.float_modules[l.path] = lin.eval()

    def release_under(self, prefix: str) -> None:
        """Free the float weights of the int8 layers under module path `prefix`."""
        self._release(p for p in self.float_modules if p.startswith(prefix + "."))

    def release_all(self) -> None:
        """Free every float weight (nothing reads them while the bitsandbytes layers are in place)."""
        self._release(self.float_modules)

    def _release(self, paths) -> None:
        for path in paths:
            if path not in self.released:
                self.float_modules[path].weight = nn.Parameter(torch.empty(0), requires_grad=False)
                self.released.add(path)

    def rebuild(self) -> None:
        """The released float weights again, `float32(CB) · s` as before."""
        for path in sorted(self.released):
            self.float_modules[path].weight = nn.Parameter(self.layers[path].weight(), requires_grad=False)
        self.released.clear()

    def to_float(self):
        for p, m in self.float_modules.items():
            self.model.set_submodule(p, m)

    def to_bnb(self):
        for p, m in self.bnb_modules.items():
            self.model.set_submodule(p, m)

    @contextmanager
    def bnb(self):
        self.to_bnb()
        try:
            yield
        finally:
            self.to_float()


# --------------------------------------------------------------------------- the ONNX rewrite


def _key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=16).digest()


@dataclass
class CarryResult:
    initializers: int = 0           # float initializers replaced
    layers: int = 0                 # int8 layers given
    layers_carried: int = 0         # layers all of whose rows now come from int8
    missing: list[str] = field(default_factory=list)
    float_bytes: int = 0            # bytes of the replaced float initializers
    int8_bytes: int = 0             # bytes of their int8 + scale replacements

    def to_dict(self) -> dict:
        return {"initializers_rewritten": self.initializers, "int8_layers": self.layers,
                "int8_layers_carried": self.layers_carried, "layers_not_found": self.missing[:10],
                "float_bytes_replaced": self.float_bytes, "int8_bytes": self.int8_bytes}


def carry_int8(model: onnx.ModelProto, layers: list[Int8Layer], base_dir=None) -> CarryResult:
    """Replace, in place, every float initializer made of dequantized int8 rows (see module doc).
    `base_dir`: where the external data of a model loaded without it lies; each initializer is
    then read when it is examined, so the float weights are never all in memory at once."""
    import onnx  # here, not at the top: the pass registry imports this module for its checks
    from onnx import numpy_helper
    table, per_layer = _row_table(layers)
    widths = {l.q.shape[1] for l in layers}
    res = CarryResult(layers=len(layers))
    used: set[bytes] = set()
    new_nodes, new_inits, drop = [], [], []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
            continue
        dims = list(init.dims)
        if dims[-1] not in widths and not (len(dims) == 2 and dims[0] in widths):
            continue
        arr = numpy_helper.to_array(init, base_dir=str(base_dir) if base_dir is not None else "")
        found = _find_int8_rows(arr, dims, widths, table)
        if found is None:
            continue
        axis, rows, keys = found
        q = np.stack([table[k][0] for k in keys])
        s = np.array([table[k][1] for k in keys], dtype=np.float32)
        if not np.array_equal((q.astype(np.float32) * s[:, None]).view(np.uint32), np.ascontiguousarray(rows).view(np.uint32)):
            raise AssertionError(f"{init.name}: int8 · scale does not reproduce the float weight bit for bit")
        used.update(keys)
        res.initializers += 1
        res.float_bytes += arr.nbytes
        res.int8_bytes += q.nbytes + s.nbytes
        drop.append(init)
        inits, nodes = _dequantize_linear(init.name, q, s, dims, transposed=arr.ndim == 2 and axis == 0)
        new_inits += inits
        new_nodes += nodes
    for init in drop:
        model.graph.initializer.remove(init)
    model.graph.initializer.extend(new_inits)
    for i, node in enumerate(new_nodes):
        model.graph.node.insert(i, node)
    for path, keys in per_layer.items():
        if all(k in used for k in keys):
            res.layers_carried += 1
        else:
            res.missing.append(path)
    return res


def _row_table(layers: list[Int8Layer]) -> tuple[dict[bytes, tuple[np.ndarray, np.float32]], dict[str, list[bytes]]]:
    """(key of each dequantized float row → its int8 row and scale, layer path → its rows' keys)."""
    table: dict[bytes, tuple[np.ndarray, np.float32]] = {}
    per_layer: dict[str, list[bytes]] = {}
    for l in layers:
        w = l.weight().numpy()
        q = l.q.numpy()
        s = l.scale.numpy()
        keys = []
        for r in range(w.shape[0]):
            k = _key(w[r])
            table.setdefault(k, (q[r], s[r]))
            keys.append(k)
        per_layer[l.path] = keys
    return table, per_layer


def _find_int8_rows(arr: np.ndarray, dims: list[int], widths: set[int], table: dict):
    """(row axis, rows, their keys) when every row of `arr` (flattened along its last axis) or, for a
    2-D one, every column is a dequantized int8 row in `table`; else None."""
    for axis, rows in ((len(dims) - 1, arr.reshape(-1, dims[-1])), (0, arr.T if arr.ndim == 2 else None)):
        if rows is None or rows.shape[1] not in widths or not np.any(rows):
            continue
        keys = [_key(r) for r in rows]
        if all(k in table for k in keys):
            return axis, rows, keys
    return None


def _dequantize_linear(name: str, q: np.ndarray, s: np.ndarray, dims: list[int], *, transposed: bool):
    """(initializers, nodes) producing the float tensor `name` (shape `dims`) from int8 rows `q`
    and their scales `s`: one `DequantizeLinear`, plus a `Reshape` for stacked experts."""
    from onnx import helper, numpy_helper
    if transposed:  # 2-D stored (in, out): columns are the rows of W
        inits = [numpy_helper.from_array(np.ascontiguousarray(q.T), name + "_int8"),
                 numpy_helper.from_array(s, name + "_scale")]
        return inits, [helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale"], [name],
                                        name=name + "_dq", axis=1)]
    if len(dims) == 2:
        inits = [numpy_helper.from_array(q, name + "_int8"), numpy_helper.from_array(s, name + "_scale")]
        return inits, [helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale"], [name],
                                        name=name + "_dq", axis=0)]
    # stacked experts (E, N, K): dequantize (E·N, K) row-wise, then reshape
    inits = [numpy_helper.from_array(q, name + "_int8"), numpy_helper.from_array(s, name + "_scale"),
             numpy_helper.from_array(np.array(dims, dtype=np.int64), name + "_shape")]
    return inits, [helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale"], [name + "_rows"],
                                    name=name + "_dq", axis=0),
                   helper.make_node("Reshape", [name + "_rows", name + "_shape"], [name], name=name + "_reshape")]
