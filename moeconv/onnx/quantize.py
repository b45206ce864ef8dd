"""ONNX-level quantization with onnxruntime's own tools; routers stay float.

- `int8`: block-wise int8 weights with activations quantized to int8 at run time
  (`MatMulNBitsQuantizer`, 8 bits, accuracy level 4), or per-tensor `quantize_dynamic`.
- `int4`: `MatMulNBitsQuantizer` (block-wise int4 `MatMulNBits`; HQQ float zero points by
  default, or round-to-nearest; block size and accuracy level configurable).
See `quantize_model` for the measured reasons behind the defaults.

Both only see 2-D constant `MatMul` weights. The exporter writes the expert projections of the
portable lowering as `Gemm(x, Wᵀ)` (their inputs are 2-D token lists), so `gemm_to_matmul` first
rewrites every `Gemm` with a constant weight into `MatMul` (+ `Add` for the bias), exactly: one
2-D MatMul per expert projection. Fused blocks (`com.microsoft.MoE`) become `com.microsoft.QMoE`
with the experts quantized block-wise by onnxruntime's own kernels (`quantize_matmul_4bits` /
`quantize_matmul_8bits`, the functions `MatMulNBitsQuantizer` calls).

Never quantized: router weights and shared-expert gates (routing must not degrade, FIELD.md),
and any weight the caller lists in `keep_float`.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moeconv.errors import ConfigError
from moeconv.onnx.graph import EXTERNAL_DATA_BYTES

ROUTER_MARKERS = (".router.weight", ".router.bias", ".shared_expert_gate.weight")


@dataclass
class QuantResult:
    mode: str
    quantized_nodes: int
    kept_float: list[str] = field(default_factory=list)
    qmoe_blocks: int = 0
    notes: list[str] = field(default_factory=list)
    scheme: str = ""

    def to_dict(self) -> dict:
        return {"mode": self.mode, "scheme": self.scheme, "quantized_nodes": self.quantized_nodes,
                "kept_float": self.kept_float, "qmoe_blocks": self.qmoe_blocks, "notes": self.notes}


# --------------------------------------------------------------------------- library hygiene


@contextmanager
def _ort_quantization():
    """Import onnxruntime's quantizers and run them without their logging side effects:
    `matmul_nbits_quantizer` calls `logging.basicConfig(level=INFO)` at import (root logger, for
    the whole process) and both quantizers log every node. A pass never prints."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import onnxruntime.quantization  # noqa: F401
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. HQQ's "non-writable NumPy array" notice
            yield
    finally:
        logging.disable(previous)


# --------------------------------------------------------------------------- graph rewrites


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite `Gemm(A, B[, C])` with constant B (transA=0, alpha=beta=1) as `MatMul(A, B')` +
    `Add(C)`; B' is B transposed when transB=1. Exact. Returns the number of rewritten nodes."""
    inits = _initializers(model)
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes, count = [], 0
    for node in model.graph.node:
        ok = (node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and len(node.input) >= 2
              and node.input[1] in inits and _attr(node, "transA", 0) == 0
              and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0)
        if not ok:
            new_nodes.append(node)
            continue
        b_name = node.input[1]
        weight = inits[b_name]
        if _attr(node, "transB", 0):
            arr = numpy_helper.to_array(weight).T.copy()
            new_name = b_name + ".T"
            if new_name not in inits:
                t = numpy_helper.from_array(arr, new_name)
                model.graph.initializer.append(t)
                inits[new_name] = t
            users[b_name] -= 1
            if users[b_name] == 0:
                model.graph.initializer.remove(weight)
                del inits[b_name]
            b_name = new_name
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=node.name + "_matmul"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return count


def float_nodes(model: onnx.ModelProto, keep_float: set[str] = frozenset()) -> list[str]:
    """Names of MatMul/Gemm nodes whose constant weight is a router (or listed in `keep_float`)."""
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = node.input[1].removesuffix(".T")
        if w.endswith(ROUTER_MARKERS) or w in keep_float or node.input[1] in keep_float:
            out.append(node.name)
    return out


def lm_head_weight(model: onnx.ModelProto, output: str = "logits") -> str | None:
    """The constant weight of the MatMul that produces the `logits` output, if there is one."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = _initializers(model)
    node = producers.get(output)
    while node is not None and node.op_type in ("Reshape", "Identity", "Cast"):
        node = producers.get(node.input[0])
    if node is not None and node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
        return node.input[1]
    return None


def untie_output_projection(model: onnx.ModelProto, output: str = "logits") -> str | None:
    """When the logits come from `MatMul(h, Transpose(E))` with `E` the embedding matrix (tied
    weights), give the MatMul its own constant `Eᵀ` so weight quantizers can see it; the
    embedding keeps `E`. Exact. Returns the new initializer's name, or None if nothing to do."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = _initializers(model)
    node = producers.get(output)
    while node is not None and node.op_type in ("Reshape", "Identity", "Cast"):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMul" or node.input[1] in inits:
        return None
    tr = producers.get(node.input[1])
    if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits or _attr(tr, "perm", [1, 0]) != [1, 0]:
        return None
    name = tr.input[0] + ".T"
    if name not in inits:
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[tr.input[0]]).T.copy(), name))
    node.input[1] = name
    if not any(tr.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(tr)
    return name


def _ensure_names(model: onnx.ModelProto) -> None:
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


# --------------------------------------------------------------------------- QMoE


def _block_quant(w_out_in: np.ndarray, bits: int, block: int,
                 symmetric: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """onnxruntime's own block quantizer on a (N, K) weight: packed (N, K·bits/8), scales
    (N, K/block) and, asymmetric, packed zero points (N, ⌈K/block·bits/8⌉)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    n, k = w_out_in.shape
    kb = k // block
    blob = block * bits // 8
    packed = np.zeros((n, kb, blob), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    zp = np.zeros((n, (kb + (8 // bits) - 1) // (8 // bits)), dtype=np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w_out_in.T.astype(np.float32)), scales, zp, block, n, k, symmetric)
    return packed.reshape(n, kb * blob), scales, None if symmetric else zp


def _qmoe_block(requested: int, widths: tuple[int, ...]) -> int | None:
    """The largest power-of-two block ≤ `requested` (and ≥ 16, onnxruntime's minimum) dividing every width."""
    b = requested
    while b >= 16:
        if all(w % b == 0 for w in widths):
            return b
        b //= 2
    return None


def fused_to_qmoe(model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int,
                  symmetric: bool = True, base_dir: Path | None = None) -> tuple[int, list[str]]:
    """Replace every `com.microsoft.MoE` with `QMoE` holding block-quantized expert weights.
    Returns (blocks converted, notes on blocks left float because no block size fits).
    `base_dir`: where the external data of a model loaded without it lies; each block's float
    experts are then read when it is converted, and dropped after."""
    where = str(base_dir) if base_dir is not None else ""
    inits = _initializers(model)
    count, notes = 0, []
    for idx, node in enumerate(list(model.graph.node)):
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        ins = list(node.input) + [""] * (6 - len(node.input))
        fc1, fc2 = numpy_helper.to_array(inits[ins[2]], where), numpy_helper.to_array(inits[ins[4]], where)
        block = _qmoe_block(block_size, (fc1.shape[2], fc2.shape[2]))
        if block is None:
            notes.append(f"{node.name}: experts kept float (widths {fc1.shape[2]}, {fc2.shape[2]} have no "
                         "power-of-two block ≥ 16)")
            continue
        new_inputs, zero_points = [ins[0], ins[1]], []
        for pos, (w, bias) in enumerate(((fc1, ins[3]), (fc2, ins[5])), start=1):
            q, s, z = zip(*(_block_quant(w[e], bits, block, symmetric) for e in range(w.shape[0])))
            qn, sn, zn = f"{ins[2 * pos]}_q{bits}", f"{ins[2 * pos]}_scales", f"{ins[2 * pos]}_zero_points"
            model.graph.initializer.extend([numpy_helper.from_array(np.stack(q), qn),
                                            numpy_helper.from_array(np.stack(s), sn)])
            if not symmetric:
                model.graph.initializer.append(numpy_helper.from_array(np.stack(z), zn))
            zero_points.append(zn if not symmetric else "")
            new_inputs += [qn, sn, bias]
        if not symmetric:  # fc3 weights, scales, bias unused (gate and up are fused in fc1)
            new_inputs += ["", "", ""] + zero_points
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs.update(expert_weight_bits=bits, block_size=block, weights_prepacked=0)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        while new_inputs and new_inputs[-1] == "":
            new_inputs.pop()
        q_node = helper.make_node("QMoE", new_inputs, list(node.output), name=(node.name or f"MoE_{idx}") + "_q",
                                  domain="com.microsoft", **attrs)
        model.graph.node.insert(list(model.graph.node).index(node), q_node)
        model.graph.node.remove(node)
        for name in (ins[2], ins[4]):
            if not any(name in n.input for n in model.graph.node) and name in inits:
                model.graph.initializer.remove(inits.pop(name))
        count += 1
    return count, notes


# --------------------------------------------------------------------------- entry points

SCHEMES = {"int8": ("block", "tensor"), "int4": ("hqq", "rtn", "rtn-asym")}


def quantize_model(model: onnx.ModelProto, mode: str, *, scheme: str | None = None, block_size: int = 32,
                   accuracy_level: int = 4, keep_float: set[str] = frozenset(), quantize_head: bool = True,
                   head_bits: int = 8, work_dir: Path | None = None,
                   base_dir: Path | None = None) -> tuple[onnx.ModelProto, QuantResult]:
    """Quantize a float model (in memory) to `mode`; the input proto is modified. `base_dir`: the
    model was loaded without its external data, which lies there: the fused experts (most of an
    MoE's bytes) are read block by block as they are quantized, the rest is loaded after, so the
    float model is never in memory whole.

    Schemes (first is the default):
    - int8 `block`: `MatMulNBits` 8-bit, block-wise symmetric weights; with `accuracy_level=4`
      the activations are quantized to int8 at run time per block (dynamic quantization).
      `tensor`: `quantize_dynamic` (per-tensor weight and activation scales) — measured on
      SmolLM2: +3.7% perplexity, almost all from q/k/v, whose normalised inputs have outlier
      channels that one per-tensor activation scale cannot hold; `block` costs +0.5%.
    - int4 `hqq`: `MatMulNBits` 4-bit with HQQ-optimised scales and float zero points
      (onnxruntime's `HQQWeightOnlyQuantConfig`); `rtn`: round-to-nearest, symmetric; `rtn-asym`:
      round-to-nearest with integer zero points (4-bit packed, the layout onnxruntime's fast CPU
      kernels read; float zero points take its dequantize-every-call fallback).
    Fused MoE blocks become `QMoE` (8 or 4 bits, block-wise RTN: QMoE's zero points are integers).
    With `quantize_head`, an output projection tied to the embedding is untied and quantized; in
    int4 the embedding table becomes `GatherBlockQuantized` (RTN: it has no float zero points).
    `head_bits`: the output projection's bits (default: 8 in both modes — measured on SmolLM2,
    a 4-bit head alone costs +10% perplexity while 4-bit experts and attention cost <1%).
    """
    if mode not in SCHEMES:
        raise ConfigError(f"quantize must be int8 or int4, not {mode!r}")
    scheme = scheme or SCHEMES[mode][0]
    if scheme not in SCHEMES[mode]:
        raise ConfigError(f"{mode} scheme must be one of {', '.join(SCHEMES[mode])}, not {scheme!r}")
    _ensure_names(model)
    qmoe, notes = fused_to_qmoe(model, 8 if mode == "int8" else 4, block_size, accuracy_level, base_dir=base_dir)
    if base_dir is not None:
        from moeconv.onnx.graph import load_remaining_external_data
        load_remaining_external_data(model, base_dir)
    gemm_to_matmul(model)  # Gemm nodes only: independent of the MoE blocks converted above
    if qmoe and mode == "int4":
        notes.append(f"{qmoe} fused MoE blocks hold round-to-nearest int4 experts (QMoE has integer zero "
                     "points); the portable strategy quantizes experts with HQQ, more accurately")
    notes += _tied_head_notes(model, mode, quantize_head)
    exclude = float_nodes(model, set(keep_float))
    bits = 8 if mode == "int8" else 4
    # the output projection at its own bit width: held out of the main pass, quantized after it
    head = _head_node(model) if scheme != "tensor" and head_bits != bits else None
    if head in exclude:
        head = None
    before = sum(1 for n in model.graph.node if n.op_type == "MatMul")
    with _ort_quantization():
        if scheme == "tensor":
            out = _int8_tensor(model, exclude, work_dir)
        else:
            out = _nbits(model, exclude + [head] if head else exclude, bits, block_size, accuracy_level, scheme=scheme)
        if head is not None:
            others = [n.name for n in out.graph.node if n.op_type in ("MatMul", "Gemm") and n.name != head]
            out = _nbits(out, others, head_bits, block_size, accuracy_level, scheme="rtn")
            notes.append(f"output projection quantized to {head_bits} bits (block-wise, symmetric)")
        if mode == "int4" and quantize_head:
            out = _gather4(out, block_size)
    after = sum(1 for n in out.graph.node if n.op_type == "MatMul")
    return out, QuantResult(mode, before - after, sorted(exclude), qmoe, notes, scheme)


def _tied_head_notes(model: onnx.ModelProto, mode: str, quantize_head: bool) -> list[str]:
    """An output projection tied to the embedding is untied (and quantized) with `quantize_head`;
    the note says which happened (none when the head is not tied)."""
    if not (model.graph.output and model.graph.output[0].name == "logits" and lm_head_weight(model) is None):
        return []
    if quantize_head and untie_output_projection(model):
        return ["tied embedding / output projection untied: the projection is quantized"
                + ("; the embedding table too (GatherBlockQuantized, int4 round-to-nearest)"
                   if mode == "int4" else "; the embedding table stays float")]
    return ["the output projection shares the embedding matrix (tied weights): it stays float, stored once"]


def _int8_tensor(model: onnx.ModelProto, exclude: list[str], work_dir: Path | None) -> onnx.ModelProto:
    import tempfile
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        big = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
        onnx.save_model(model, str(src), save_as_external_data=big, all_tensors_to_one_file=True,
                        location="float.onnx.data")
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         per_channel=False, reduce_range=False, nodes_to_exclude=exclude,
                         use_external_data_format=big, extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(dst), load_external_data=True)


def _gather4(model: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    """Embedding tables (constant `Gather` data, 2-D) → int4 `GatherBlockQuantized` (blocks along the hidden axis)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    inits = _initializers(model)
    tables = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].dims[0] > 1024]
    if not tables:
        return model
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False, nodes_to_include=tables,
                             op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    q.process()
    return q.model.model


def _head_node(model: onnx.ModelProto) -> str | None:
    weight = lm_head_weight(model)
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] == weight:
            return node.name
    return None


def _nbits(model: onnx.ModelProto, exclude: list[str], bits: int, block_size: int, accuracy_level: int,
           *, scheme: str) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    hqq = scheme == "hqq"
    if hqq:
        cfg = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
        q = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=cfg)
    else:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=scheme != "rtn-asym",
                                 accuracy_level=accuracy_level or None, nodes_to_exclude=exclude,
                                 op_types_to_quantize=("MatMul",))
    q.process()
    out = q.model.model
    if hqq and accuracy_level:  # the HQQ config has no accuracy level; set it on the nodes it wrote
        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    return out
