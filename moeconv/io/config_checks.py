"""Checks on a model's configuration made before anything is built from it.

A `config.json` is input like any other: a negative width, a layer count of a million or a
vocabulary of ten million must be refused in one line, before transformers or torch allocate
gigabytes, loop for minutes or print warnings. Three checks, cheapest first:

- `check_config_values`: every size field is a positive integer within a plausible bound, and a
  token is routed to no more experts than exist;
- `check_layers_present`: the config describes no more layers than the checkpoint holds weights for
  (a meta-device skeleton of a million layers alone takes minutes);
- `check_fits_memory`: the weights the model will hold (the checkpoint's bytes, or a lower bound
  from the config) fit the memory this machine has available.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from moeconv.errors import InputError, UnsupportedError

# Sizes that shape weight tensors. 2**20 is far above any released model (vocabularies reach
# ~262k, widths ~30k, depths ~130, expert counts ~512).
SIZE_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim",
               "num_local_experts", "num_experts", "num_experts_per_tok", "n_embd", "n_layer", "n_head", "n_inner",
               "ffn_dim", "d_model", "num_layers", "n_positions", "max_position_embeddings", "type_vocab_size")
MAX_SIZE = 2**20
# Context lengths legitimately exceed MAX_SIZE (10M-token models exist); only their sign and
# machine-integer range are checked.
LONG_FIELDS = {"max_position_embeddings", "n_positions"}
# 0 is how some configs say "none" or "derive it" (dense layers, token types, head_dim).
ZERO_MEANS_NONE = {"type_vocab_size", "head_dim", "num_experts", "num_local_experts", "num_experts_per_tok",
                   "shared_expert_intermediate_size", "moe_intermediate_size"}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


def check_config_values(where, config: dict) -> None:
    """Raise `InputError` naming the first size field that is not a positive integer in range."""
    for key in SIZE_FIELDS:
        value = config.get(key)
        if value is None or isinstance(value, (list, dict)):  # per-stage lists (vision models): their own
            continue
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: {key} must be an integer, not {_short(value)}")
        bound = 2**31 - 1 if key in LONG_FIELDS else MAX_SIZE
        if value < (0 if key in ZERO_MEANS_NONE else 1):
            raise InputError(f"{where}: {key} must be positive, not {_short(value)}")
        if value > bound:
            raise InputError(f"{where}: {key} {_short(value)} is beyond any real model (at most {bound})")
    experts = config.get("num_local_experts") or config.get("num_experts")
    k = config.get("num_experts_per_tok")
    if isinstance(experts, int) and isinstance(k, int) and k > experts:
        raise InputError(f"{where}: num_experts_per_tok ({k}) exceeds the number of experts ({experts})")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:12]}…({len(text)} characters)"


def check_layers_present(where, config: dict, tensor_names) -> None:
    """Refuse a config that describes more layers than the checkpoint has weights for."""
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
    if not isinstance(layers, int):
        return
    present = {int(m.group(1)) for name in tensor_names for m in [_LAYER_INDEX.search(name)] if m}
    if present and layers > max(present) + 1:
        raise InputError(f"{where}: the config describes {layers} layers but the weights hold {max(present) + 1}")


_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def _cgroup_limit() -> int | None:
    """The container's memory limit in bytes, if one is set."""
    for f in _CGROUP_LIMITS:
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None


def total_memory() -> int:
    """This machine's physical memory, or the container's limit when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 32 * 2**30
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, capped by what the container's limit
    leaves."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_limit()
    if limit:
        try:
            avail = min(avail, limit - int(Path("/sys/fs/cgroup/memory.current").read_text()))
        except (OSError, ValueError):
            avail = min(avail, limit)
    return max(avail, 0)


def estimate_parameters(config: dict) -> int:
    """A lower bound on the parameter count a config describes (embeddings, and per layer two
    attention and two FFN matrices): a model this big certainly needs this much memory."""
    def num(*keys, default=0):
        for k in keys:
            v = config.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return default
    hidden = num("hidden_size", "n_embd", "d_model")
    layers = num("num_hidden_layers", "n_layer", "num_layers")
    vocab = num("vocab_size")
    inter = num("intermediate_size", "n_inner", "ffn_dim", default=hidden)
    experts = num("num_local_experts", "num_experts", default=1)
    expert_inter = num("moe_intermediate_size", default=inter)
    ffn = min(inter, expert_inter * experts) if experts > 1 else inter
    return vocab * hidden + layers * (2 * hidden * hidden + 2 * hidden * ffn)


def check_fits_memory(where, need_bytes: int, what: str = "its weights") -> None:
    """Refuse, before allocating, a model whose weights alone exceed the memory available."""
    have = available_memory()
    if need_bytes > have:
        raise UnsupportedError(f"{where}: {what} need at least {format_bytes(need_bytes)} of memory and "
                               f"{format_bytes(have)} is available; refused before allocating it")


def check_fits_disk(directory: Path, need_bytes: int) -> None:
    """Refuse, before writing, an output larger than the free space where it goes."""
    import shutil
    free = shutil.disk_usage(directory).free
    if need_bytes > free:
        raise UnsupportedError(f"{directory.parent}: the output needs {format_bytes(need_bytes)} and {format_bytes(free)} is free "
                               "there; nothing was written")


def format_bytes(n: int) -> str:
    """`n` bytes for a message: one decimal in the largest binary unit that fits."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
