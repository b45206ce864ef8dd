"""How `MoEBlock`s become ONNX, with routing computed at run time.

Two lowerings, chosen per block (`plan_lowering`):

- **portable**: the block is exported as it is. Its forward (router → softmax → `TopK` →
  per-expert `NonZero` / `Gather` / expert MatMuls / `ScatterND(add)`) is made of standard ONNX
  ops whose sizes depend on the data, so no routing decision of the example input is baked in.
  Each expert keeps its own 2-D weight matrices (what int8/int4 weight quantizers can see).
- **fused**: the block is swapped, for the duration of the export only, for `FusedMoE`, which
  calls the custom op `moeconv::onnx_moe`; the exporter translates that op into onnxruntime's
  `com.microsoft.MoE` contrib operator. Weights take the layout the operator expects: fc1
  `(E, N, H)`, fc2 `(E, H, I)`; gated (SwiGLU) experts hold gate and up rows *interleaved*
  (`swiglu_fusion=1`), the one layout onnxruntime's CPU kernel computes correctly (FIELD.md).
  The router (fp32 `Linear`) and an optional sigmoid-gated shared expert stay ordinary ops. The
  operator always renormalises the top-k weights; blocks that do not (Qwen with
  `norm_topk_prob=False`) get its output scaled by their top-k probability mass.

Whether `fused` is exact for a block is *measured*, not assumed: `probe_fused` runs the operator
in onnxruntime on that block's own weights and compares it with the block in PyTorch. `auto`
picks `fused` for every block that passes and `portable` for the rest; `fused` refuses (naming
the block) when one does not. The eager model is never changed: the swap is undone on exit.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moeconv.errors import UnsupportedError
from moeconv.nn.linear_like import is_conv1d, is_linear_like, weight_out_in
from moeconv.nn.moe import MoEBlock, add_shared_expert

PROBE_TOKENS = 64
PROBE_RTOL = 1e-5   # relative max |Δ| of the probe: fp32 summation order, nothing more (erf vs tanh GELU is ~5e-5)

# Candidate onnxruntime activations per expert structure, tried in order.
GATED_ACTIVATIONS = ("swiglu",)
PLAIN_ACTIVATIONS = ("gelu", "silu", "relu", "identity")


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("moeconv::onnx_moe", mutates_args=())
def onnx_moe(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc1_bias: Optional[torch.Tensor],
             fc2: torch.Tensor, fc2_bias: Optional[torch.Tensor], k: int, activation: str) -> torch.Tensor:
    """Eager reference of `com.microsoft.MoE` with `normalize_routing_weights=1` (softmax → top-k
    → renormalise), the only mode used (see `FusedMoE`); used only outside export."""
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, idx = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(fc1.shape[0]):
        tok, slot = torch.where(idx == e)
        h = x[tok] @ fc1[e].t()
        if fc1_bias is not None:
            h = h + fc1_bias[e]
        h = _activate(h, activation)
        y = h @ fc2[e].t()
        if fc2_bias is not None:
            y = y + fc2_bias[e]
        out.index_add_(0, tok, y * weights[tok, slot].unsqueeze(-1).to(x.dtype))
    return out


@onnx_moe.register_fake
def _onnx_moe_fake(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, activation):
    return torch.empty_like(x)


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":  # interleaved (g0, u0, g1, u1, …), alpha 1, beta 0: silu(g) * u
        return F.silu(h[:, 0::2]) * h[:, 1::2]
    return {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "identity": lambda t: t}[activation](h)


def _moe_attributes(k: int, activation: str) -> dict:
    # normalize_routing_weights=0 is not used: onnxruntime 1.31's CPU kernel then accumulates into
    # an output buffer it does not clear (right as a graph output, garbage when the output is an
    # intermediate tensor in a reused arena buffer). Non-renormalising blocks are scaled outside.
    attrs = {"k": int(k), "normalize_routing_weights": 1, "activation_type": activation}
    if activation == "swiglu":
        attrs.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    return attrs


def _moe_schema():
    """An OpSchema for `com.microsoft.MoE` (onnx does not ship contrib schemas; onnxscript needs one)."""
    from onnx.defs import OpSchema
    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    inputs = [fp("input", "T"), fp("router_probs", "T"), fp("fc1_experts_weights", "T"),
              fp("fc1_experts_bias", "T", param_option=opt), fp("fc2_experts_weights", "T"),
              fp("fc2_experts_bias", "T", param_option=opt), fp("fc3_experts_weights", "T", param_option=opt),
              fp("fc3_experts_bias", "T", param_option=opt)]
    at = OpSchema.AttrType
    attrs = [OpSchema.Attribute(n, t, "", required=False) for n, t in (
        ("k", at.INT), ("activation_type", at.STRING), ("normalize_routing_weights", at.INT),
        ("swiglu_fusion", at.INT), ("activation_alpha", at.FLOAT), ("activation_beta", at.FLOAT),
        ("use_sparse_mixer", at.INT), ("swiglu_limit", at.FLOAT))]
    return OpSchema("MoE", "com.microsoft", 1, inputs=inputs, outputs=[fp("output", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
                    attributes=attrs)


_MOE_OP = None


def _onnx_moe_translation(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, activation):
    global _MOE_OP
    if _MOE_OP is None:
        import onnxscript
        _MOE_OP = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MoE", _moe_schema())
    return _MOE_OP(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, **_moe_attributes(k, activation))


def custom_translation_table() -> dict:
    return {torch.ops.moeconv.onnx_moe.default: _onnx_moe_translation}


# --------------------------------------------------------------------------- expert weights


@dataclass
class ExpertWeights:
    """One block's experts as stacked matrices (out, in): `fc1` is up, or gate+up for gated."""

    structure: str                  # gated | plain
    kind: str                       # where the weights came from, for the report
    gate: torch.Tensor | None       # (E, I, H)
    up: torch.Tensor                # (E, I, H)
    down: torch.Tensor              # (E, H, I)
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def fc1(self, activation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if activation != "swiglu":
            return self.up, self.up_bias
        e, i, h = self.up.shape
        w = torch.stack([self.gate, self.up], dim=2).reshape(e, 2 * i, h)  # rows g0, u0, g1, u1, …
        b = None
        if self.gate_bias is not None or self.up_bias is not None:
            gb = self.gate_bias if self.gate_bias is not None else torch.zeros(e, i, dtype=w.dtype)
            ub = self.up_bias if self.up_bias is not None else torch.zeros(e, i, dtype=w.dtype)
            b = torch.stack([gb, ub], dim=2).reshape(e, 2 * i)
        return w, b


def _proj(expert: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    m = expert.get_submodule(path)
    if not is_linear_like(m):
        raise TypeError(f"{path} is {type(m).__name__}, not a linear projection")
    bias = getattr(m, "bias", None)
    return weight_out_in(m).detach().float(), (bias.detach().float() if bias is not None else None)


def _roles(block: MoEBlock) -> tuple[str, dict[str, str]]:
    """(kind, role → projection path inside each expert)."""
    site = getattr(block, "source_site", None)
    if site is not None:
        from moeconv.sites import expert_rel_names
        return site.kind, expert_rel_names(site)
    ex = block.experts[0]
    names = dict(ex.named_modules())
    if all(n in names for n in ("gate_proj", "up_proj", "down_proj")):
        return "gated", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    if all(n in names for n in ("gate_up_proj", "down_proj")):
        return "fused_gated", {"gate_up": "gate_up_proj", "down": "down_proj"}
    # Structural fallback: two projections H → I → H (in registration order) form a plain FFN;
    # a third one named like a gate makes it gated. The probe then checks the guess numerically.
    from moeconv.nn.linear_like import in_out_features
    lin = [(n, in_out_features(m)) for n, m in names.items() if n and is_linear_like(m)]
    h = block.hidden_size
    if len(lin) == 2 and lin[0][1][0] == h and lin[1][1][1] == h and lin[0][1][1] == lin[1][1][0]:
        return "plain", {"up": lin[0][0], "down": lin[1][0]}
    gates = [n for n, _ in lin if "gate" in n.rsplit(".", 1)[-1]]
    if len(lin) == 3 and len(gates) == 1:
        rest = [n for n, _ in lin if n != gates[0]]
        up = [n for n in rest if dict(lin)[n][0] == h]
        down = [n for n in rest if dict(lin)[n][1] == h and n not in up]
        if len(up) == 1 and len(down) == 1:
            return "gated", {"gate": gates[0], "up": up[0], "down": down[0]}
    raise TypeError(f"unknown expert structure {type(ex).__name__}")


def expert_weights(block: MoEBlock) -> ExpertWeights:
    kind, roles = _roles(block)
    cols: dict[str, list] = {}
    for ex in block.experts:
        for role, path in roles.items():
            w, b = _proj(ex, path)
            cols.setdefault(role, []).append(w)
            cols.setdefault(role + ".bias", []).append(b)

    def stacked(key):
        vals = cols.get(key)
        if not vals or any(v is None for v in vals):
            return None
        return torch.stack(vals)

    if kind == "fused_gated":  # Phi-3: gate_up rows are [gate; up], chunked in forward
        gu, gub = stacked("gate_up"), stacked("gate_up.bias")
        i = gu.shape[1] // 2
        return ExpertWeights("gated", kind, gu[:, :i], gu[:, i:], stacked("down"),
                             gub[:, :i] if gub is not None else None, gub[:, i:] if gub is not None else None,
                             stacked("down.bias"))
    structure = "gated" if "gate" in roles else "plain"
    return ExpertWeights(structure, kind, stacked("gate"), stacked("up"), stacked("down"),
                         stacked("gate.bias"), stacked("up.bias"), stacked("down.bias"))


# --------------------------------------------------------------------------- lowering module


class FusedMoE(nn.Module):
    """Export-time stand-in for an `MoEBlock`: same router, same shared expert, experts fused."""

    def __init__(self, block: MoEBlock, weights: ExpertWeights, activation: str):
        super().__init__()
        self.router = block.router
        self.shared_expert = block.shared_expert
        self.shared_expert_gate = block.shared_expert_gate
        self.top_k = block.top_k
        self.renormalize = block.renormalize
        self.activation = activation
        fc1, fc1_bias = weights.fc1(activation)
        self.register_buffer("fc1", fc1.contiguous())
        self.register_buffer("fc2", weights.down.contiguous())
        self.register_buffer("fc1_bias", fc1_bias.contiguous() if fc1_bias is not None else None)
        self.register_buffer("fc2_bias", weights.down_bias.contiguous() if weights.down_bias is not None else None)

    def forward(self, x):
        shape = x.shape
        hidden = x.reshape(-1, shape[-1])
        logits = self.router(hidden.float())
        out = torch.ops.moeconv.onnx_moe(hidden, logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias,
                                         self.top_k, self.activation)
        if not self.renormalize:
            # Σ p_j E_j(x) = (Σ p_j) · Σ (p_j / Σ p_j) E_j(x): the renormalised op output scaled by
            # the top-k probability mass (standard Softmax / TopK / ReduceSum ops)
            mass = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1).values.sum(dim=-1, keepdim=True)
            out = out * mass.to(out.dtype)
        out = add_shared_expert(out, hidden, self.shared_expert, self.shared_expert_gate)
        return out.reshape(shape[:-1] + (out.shape[-1],))


# --------------------------------------------------------------------------- probe


@torch.no_grad()
def routed_reference(block: MoEBlock, x: torch.Tensor, *, renormalize: bool | None = None) -> torch.Tensor:
    """The routed part of `block(x)` (no shared expert), computed token by token in PyTorch;
    `renormalize=True` renormalises the top-k weights whatever the block does."""
    _, weights, idx = block.route(x)
    if renormalize and not block.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            out[t] += weights[t, j].to(x.dtype) * block.experts[e](x[t:t + 1])[0]
    return out


def _probe_model(weights: ExpertWeights, activation: str, block: MoEBlock):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    fc1, fc1_bias = weights.fc1(activation)
    inits = [numpy_helper.from_array(fc1.numpy(), "fc1"), numpy_helper.from_array(weights.down.numpy(), "fc2")]
    names = ["x", "logits", "fc1", "", "fc2", ""]
    if fc1_bias is not None:
        inits.append(numpy_helper.from_array(fc1_bias.numpy(), "fc1_bias"))
        names[3] = "fc1_bias"
    if weights.down_bias is not None:
        inits.append(numpy_helper.from_array(weights.down_bias.numpy(), "fc2_bias"))
        names[5] = "fc2_bias"
    while names[-1] == "":
        names.pop()
    h, e = block.hidden_size, block.num_experts
    node = helper.make_node("MoE", names, ["y"], domain="com.microsoft",
                            **_moe_attributes(block.top_k, activation))
    graph = helper.make_graph([node], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", h]),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["t", e])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # onnxruntime 1.31 rejects newer IR versions (FIELD.md)
    return model


@dataclass
class ProbeResult:
    ok: bool
    activation: str | None
    rel_max_diff: float | None
    reason: str = ""
    tried: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def probe_fused(block: MoEBlock, seed: int = 0) -> ProbeResult:
    """Run `com.microsoft.MoE` in onnxruntime on this block's weights; pick the activation that
    reproduces the block (relative max |Δ| ≤ PROBE_RTOL), or say why none does."""
    import onnxruntime as ort
    try:
        weights = expert_weights(block)
    except (TypeError, KeyError, AttributeError) as exc:
        return ProbeResult(False, None, None, f"expert layout not recognised ({exc})")
    if block.router.weight.dtype != torch.float32:
        return ProbeResult(False, None, None, "router is not fp32")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(PROBE_TOKENS, block.hidden_size, generator=g)
    dtype = next(block.experts.parameters()).dtype
    ref = routed_reference(block, x.to(dtype), renormalize=True).float()  # the op always renormalises
    logits = block.router(x).float()
    scale = max(1.0, ref.abs().max().item())
    candidates = GATED_ACTIVATIONS if weights.structure == "gated" else PLAIN_ACTIVATIONS
    tried = {}
    for act in candidates:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(_probe_model(weights, act, block).SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
            y = sess.run(None, {"x": x.numpy(), "logits": logits.numpy()})[0]
        except Exception as exc:  # onnxruntime refuses this configuration: try the next one
            tried[act] = float("nan")
            last = f"onnxruntime refused activation {act!r}: {' '.join(str(exc).split())[:160]}"
            continue
        rel = float(np.abs(y - ref.numpy()).max() / scale)
        tried[act] = rel
        if rel <= PROBE_RTOL:
            return ProbeResult(True, act, rel, tried=tried)
        last = f"no onnxruntime activation reproduces the experts (best relative max |Δ| {min(tried.values()):.2g})"
    return ProbeResult(False, None, None, f"{weights.kind} experts: {last}", tried)


# --------------------------------------------------------------------------- planning


@dataclass
class BlockPlan:
    path: str
    num_experts: int
    top_k: int
    lowering: str                  # portable | fused
    activation: str | None = None  # onnxruntime activation, when fused
    reason: str = ""               # why portable, when fused was considered
    probe_rel_max_diff: float | None = None

    def row(self) -> dict:
        return {"block": self.path, "experts": self.num_experts, "top_k": self.top_k, "lowering": self.lowering,
                "activation": self.activation, "probe_rel_max_diff": self.probe_rel_max_diff,
                "note": self.reason}


def moe_blocks(model: nn.Module) -> list[tuple[str, MoEBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEBlock)]


def plan_lowering(model: nn.Module, strategy: str) -> list[BlockPlan]:
    """Per-block lowering for `strategy` (auto | portable | fused). `fused` raises
    `UnsupportedError` naming the first block onnxruntime's operator cannot reproduce."""
    plans = []
    probe_cache: dict[tuple, ProbeResult] = {}
    for path, block in moe_blocks(model):
        plan = BlockPlan(path, block.num_experts, block.top_k, "portable")
        if strategy != "portable":
            key = _structure_key(block)
            result = probe_cache.get(key)
            if result is None:
                result = probe_cache[key] = probe_fused(block)
            if result.ok:
                plan.lowering, plan.activation, plan.probe_rel_max_diff = "fused", result.activation, result.rel_max_diff
            elif strategy == "fused":
                raise UnsupportedError(f"{path}: onnxruntime's fused MoE operator cannot run this block exactly "
                                       f"({result.reason})", hint="use --strategy portable or auto")
            else:
                plan.reason = result.reason
        plans.append(plan)
    return plans


def _structure_key(block: MoEBlock) -> tuple:
    """Blocks with the same structure share a probe verdict (weights differ, semantics do not)."""
    ex = block.experts[0]
    site = getattr(block, "source_site", None)
    return (type(ex).__name__, site.kind if site else None, site.activation if site else None,
            tuple(type(m).__name__ for m in ex.modules()), block.top_k, block.renormalize,
            tuple((n, p.shape[1:] if p.dim() > 1 else p.shape) for n, p in ex.named_parameters()),
            any(is_conv1d(m) for m in ex.modules()))


@contextmanager
def lowered(model: nn.Module, plans: list[BlockPlan], after_fuse=None):
    """Swap the fused blocks for `FusedMoE` during export; always restored. `after_fuse(path, block)`
    is called once a block's experts are stacked: the caller may set aside weights it can restore,
    so the stacked copy does not sit beside the per-expert one for the whole export."""
    swapped = []
    try:
        for plan in plans:
            if plan.lowering != "fused":
                continue
            block = model.get_submodule(plan.path)
            model.set_submodule(plan.path, FusedMoE(block, expert_weights(block), plan.activation))
            swapped.append((plan.path, block))
            if after_fuse is not None:
                after_fuse(plan.path, block)
        yield
    finally:
        for path, block in swapped:
            model.set_submodule(path, block)
