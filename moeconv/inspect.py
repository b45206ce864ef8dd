"""What `moeconv inspect` reports about a model, as data."""
from __future__ import annotations

from collections import Counter

from moeconv.state import ModelState, native_moe_shape


def inspect_state(state: ModelState) -> dict:
    m = state.module
    dtypes = Counter(str(p.dtype).replace("torch.", "") for p in m.parameters())
    sites = state.ffn_sites()
    moe = []
    for path, block in state.moe_blocks():
        n, k = native_moe_shape(block)
        moe.append({"path": path, "class": type(block).__name__, "num_experts": n, "top_k": k,
                    "shared_expert": getattr(block, "shared_expert", None) is not None})
    from moeconv.formats.quantized import quantized_summary
    from moeconv.module_groups import group_bytes, module_groups
    groups = module_groups(state)
    storage = [{"group": g, **row} for g, row in group_bytes(m, groups).items()]
    return {
        "architecture": type(m).__name__,
        "model_type": getattr(state.config, "model_type", None),
        "source": state.source.kind,
        "parameters": state.parameter_count(),
        "active_parameters": state.active_parameter_count(),
        "dtypes": dict(dtypes),
        "ffn_sites": [s.to_dict() for s in sites],
        "moe_layers": moe,
        "facts": sorted(state.facts()),
        "storage": storage,  # per module group: parameters, stored bytes, dtype / quantization method
        "quantized_layers": quantized_summary(m, groups),  # per bitsandbytes layer: method, shape, bytes
    }
