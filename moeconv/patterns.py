"""FFN discovery by graph structure.

An FFN is found by its *shape in the graph*, never by module names:

- plain       `down(act(up(x)))`                       (nn.Linear)
- conv1d      the same with GPT-2 `Conv1D` projections
- gated       `down(act(gate(x)) * up(x))`             (Llama, Mistral, Qwen …)
- fused_gated `g, u = gate_up(x).chunk(2); down(act(g) * u)`   (Phi-3)
- split       a plain FFN whose `up → act` lives in one module and `down` in the next (BERT's
              Intermediate/Output): the first module is replaced by the MoE, `down` by Identity.

Pass-through nodes (dropout, identity, dtype casts) may sit anywhere in the chain. A match becomes
an `FfnSite` only when the chain is self-contained (no intermediate value used elsewhere) and the
module to replace computes exactly the chain, which is confirmed by tracing that module alone.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from moeconv.errors import NoFfnFoundError
from moeconv.nn.linear_like import in_out_features, is_conv1d, is_linear_like
from moeconv.trace import TracedIsland, trace_forest, trace_module

FfnKind = Literal["plain", "conv1d", "gated", "fused_gated", "split"]

_ACT_FUNCTIONS = {
    F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", F.relu6: "relu6",
    F.mish: "mish", F.elu: "elu", F.selu: "selu", F.leaky_relu: "leaky_relu", torch.tanh: "tanh",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardswish: "hardswish",
}
_ACT_METHODS = {"relu", "sigmoid", "tanh"}
_PASSTHROUGH_METHODS = {"contiguous", "to", "type", "float", "half", "bfloat16"}


@dataclass(frozen=True)
class FfnSite:
    """One FFN found in a model. Paths are full module paths from the model root.

    `path` is the module a pass replaces with an MoE block; for `split` sites `down` is replaced by
    `nn.Identity` as well. `members` maps role → path relative to `path` (the names experts keep).
    """

    path: str
    kind: FfnKind
    up: str
    down: str
    gate: str | None
    activation: str
    hidden_size: int
    intermediate_size: int
    output_size: int
    bias: bool
    act_path: str | None = None  # activation module, when the model applies one as a module

    def members(self) -> dict[str, str]:
        """Role → path of the projection, relative to `path` (split sites: relative to the root)."""
        roles = {"up": self.up, "down": self.down}
        if self.gate is not None:
            roles["gate"] = self.gate
        if self.kind == "split":
            return roles
        return {r: p[len(self.path) + 1:] if self.path else p for r, p in roles.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def find_ffn_sites(model: nn.Module, *, require: bool = True, skip: Iterable[str] = ()) -> list[FfnSite]:
    """Every FFN of `model`, in module order. Raises `NoFfnFoundError` if none and `require`.
    `skip`: paths of modules not looked into (each is one opaque call where it is used): no site
    is found inside them."""
    sites: dict[str, FfnSite] = {}
    for island in trace_forest(model, opaque=skip):
        for site in _match_island(model, island):
            sites.setdefault(site.path, site)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    found = sorted(sites.values(), key=lambda s: order.get(s.path, 0))
    if require and not found:
        raise NoFfnFoundError(
            f"no FFN found in {type(model).__name__}: looked for down(act(up(x))), "
            "down(act(gate(x))*up(x)), chunked gate_up, GPT-2 Conv1D and split intermediate/output "
            "patterns built from nn.Linear/Conv1D modules"
        )
    return found


# ----------------------------------------------------------------------------- matching


def _match_island(model: nn.Module, island: TracedIsland) -> list[FfnSite]:
    gm = island.graph_module
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_linear_like(gm.get_submodule(node.target)):
            site = _match_down(model, island, node)
            if site is not None:
                out.append(site)
    return out


def _full(island: TracedIsland, target: str) -> str:
    return f"{island.path}.{target}" if island.path else target


def _module(island: TracedIsland, node: fx.Node) -> nn.Module:
    return island.graph_module.get_submodule(node.target)


def _back(island: TracedIsland, node: fx.Node) -> fx.Node:
    """Walk back through pass-through nodes (dropout, identity, casts)."""
    while True:
        if node.op == "call_module" and _is_passthrough_module(_module(island, node)):
            node = node.args[0]
        elif node.op == "call_method" and node.target in _PASSTHROUGH_METHODS:
            node = node.args[0]
        else:
            return node


def _is_passthrough_module(m: nn.Module) -> bool:
    return isinstance(m, (nn.Dropout, nn.Identity)) or (
        type(m).__name__.endswith("Dropout") and not any(True for _ in m.parameters())
    )


def _activation(island: TracedIsland, node: fx.Node) -> str | None:
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return node.target
    if node.op == "call_module":
        m = _module(island, node)
        if _is_elementwise_nonlinearity(m):
            return type(m).__name__
    return None


def _is_elementwise_nonlinearity(m: nn.Module) -> bool:
    """Probe a parameter-free module: same shape out, commutes with permutations, not identity."""
    if any(True for _ in m.parameters()) or list(m.children()) or is_linear_like(m):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=gen)
    perm = torch.randperm(16, generator=gen)
    try:
        with torch.no_grad():
            y = m(x)
            y_perm = m(x[:, perm])
    except Exception:
        return False
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return False
    return bool(torch.allclose(y[:, perm], y_perm)) and not bool(torch.allclose(y, x))


def _users_ok(node: fx.Node, allowed: set[fx.Node]) -> bool:
    return all(u in allowed for u in node.users)


def _match_down(model: nn.Module, island: TracedIsland, down: fx.Node) -> FfnSite | None:
    mid = _back(island, down.args[0]) if down.args else None
    if not isinstance(mid, fx.Node):
        return None
    act_name = _activation(island, mid)
    if act_name is not None:  # plain: down(act(up(x)))
        up = _back(island, mid.args[0])
        if up.op != "call_module" or not is_linear_like(_module(island, up)):
            return None
        return _make_site(model, island, "plain", up=up, gate=None, down=down, act=act_name, chain=[up, mid],
                          act_node=mid)
    if mid.op == "call_function" and mid.target in (operator.mul, torch.mul) and len(mid.args) == 2:
        return _match_gated(model, island, down, mid)
    return None


def _match_gated(model, island, down, mul) -> FfnSite | None:
    for a, b in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        a = _back(island, a)
        act_name = _activation(island, a)
        if act_name is None:
            continue
        g = _back(island, a.args[0])
        u = _back(island, b)
        if g.op == "call_module" and u.op == "call_module":
            gm_, um_ = _module(island, g), _module(island, u)
            if is_linear_like(gm_) and is_linear_like(um_) and _back(island, g.args[0]) is _back(island, u.args[0]):
                return _make_site(model, island, "gated", up=u, gate=g, down=down, act=act_name, chain=[g, u, a, mul])
        # fused: getitem(chunk(gate_up(x)), 0/1)
        if (g.op == "call_function" and g.target is operator.getitem and u.op == "call_function"
                and u.target is operator.getitem and g.args[0] is u.args[0]):
            chunk = g.args[0]
            if (chunk.op == "call_method" and chunk.target == "chunk" and _chunk_two_last(chunk)
                    and g.args[1] == 0 and u.args[1] == 1):
                fused = _back(island, chunk.args[0])
                if fused.op == "call_module" and is_linear_like(_module(island, fused)):
                    return _make_site(model, island, "fused_gated", up=fused, gate=None, down=down,
                                      act=act_name, chain=[fused, chunk, g, u, a, mul])
    return None


def _chunk_two_last(chunk: fx.Node) -> bool:
    chunks = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    return chunks == 2 and dim in (-1,)


def _make_site(model, island, kind, *, up, gate, down, act, chain, act_node=None) -> FfnSite | None:
    # Self-contained: every intermediate value feeds only the chain (walk through pass-throughs).
    members = set(chain) | {down}
    for n in chain:
        if not _users_ok_through(island, n, members):
            return None
    up_path, down_path = _full(island, up.target), _full(island, down.target)
    gate_path = _full(island, gate.target) if gate is not None else None
    up_mod, down_mod = model.get_submodule(up_path), model.get_submodule(down_path)
    h, i_up = in_out_features(up_mod)
    i_down, out = in_out_features(down_mod)
    intermediate = i_up // 2 if kind == "fused_gated" else i_up
    if i_down != intermediate:
        return None
    if gate_path is not None and in_out_features(model.get_submodule(gate_path)) != (h, intermediate):
        return None  # a narrower gate would broadcast; it is not this FFN's gate
    if kind == "plain" and is_conv1d(up_mod) and is_conv1d(down_mod):
        kind = "conv1d"
    bias = any(getattr(model.get_submodule(p), "bias", None) is not None for p in (up_path, down_path, gate_path) if p)
    paths = [p for p in (up_path, gate_path, down_path) if p]
    lca = _common_prefix(paths)
    site_path = _confirm_whole_module(model, lca, paths)
    if site_path is not None:
        return FfnSite(site_path, kind, up_path, down_path, gate_path, act, h, intermediate, out, bias)
    if kind in ("plain", "conv1d"):
        split_path = _confirm_split(model, up_path, down_path)
        act_path = _full(island, act_node.target) if act_node is not None and act_node.op == "call_module" else None
        if split_path is not None:
            return FfnSite(split_path, "split", up_path, down_path, None, act, h, intermediate, out, bias, act_path)
    return None


def _users_ok_through(island, node, members) -> bool:
    for u in node.users:
        if u in members:
            continue
        if (u.op == "call_module" and _is_passthrough_module(_module(island, u))) or (
                u.op == "call_method" and u.target in _PASSTHROUGH_METHODS):
            if not _users_ok_through(island, u, members):
                return False
            continue
        return False
    return True


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _chain_graph_ok(module: nn.Module, rel_paths: set[str], end_is_down: bool) -> bool:
    """Trace `module` alone and check its forward is exactly the FFN chain (one input used)."""
    gm, _ = trace_module(module)
    if gm is None:
        return False
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders or any(len(p.users) > 0 for p in placeholders[1:]):
        return False
    module_targets = {n.target for n in gm.graph.nodes if n.op == "call_module"
                      and is_linear_like(gm.get_submodule(n.target))}
    if module_targets != rel_paths:
        return False
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        return False
    ret = outputs[0].args[0]
    if not isinstance(ret, fx.Node):
        return False
    island = TracedIsland("", gm)
    ret = _back(island, ret)
    if end_is_down:
        return ret.op == "call_module" and is_linear_like(gm.get_submodule(ret.target))
    return _activation(island, ret) is not None


def _confirm_whole_module(model: nn.Module, lca: str, paths: list[str]) -> str | None:
    """The LCA module computes exactly x → FFN(x): it can be swapped for an MoE block whole."""
    mod = model.get_submodule(lca) if lca else model
    if mod is model and lca == "":
        return None  # never replace the whole model
    rel = {p[len(lca) + 1:] if lca else p for p in paths}
    return lca if _chain_graph_ok(mod, rel, end_is_down=True) else None


def _confirm_split(model: nn.Module, up_path: str, down_path: str) -> str | None:
    """The innermost module holding `up` but not `down` computes exactly act(up(x))."""
    parts = up_path.split(".")[:-1]
    while parts:
        cand = ".".join(parts)
        if not down_path.startswith(cand + "."):
            rel = up_path[len(cand) + 1:]
            if _chain_graph_ok(model.get_submodule(cand), {rel}, end_is_down=False):
                return cand
            return None
        parts.pop()
    return None
