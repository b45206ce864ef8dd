"""A model skeleton over a safetensors checkpoint: parameters on `meta`, read one submodule at a time.

Promise: `materialize(path)` gives the submodule exactly the tensors `moeconv.load` would give it
(the same checkpoint tensor, cast to the dtype the in-memory loader holds it in: the checkpoint's
float dtype, routers of linearised MoE blocks in fp32), and `release(path)` returns its
parameters to `meta`, so peak memory is the largest submodule materialised at once, whatever the
model's depth. Native MoE blocks (Mixtral, Qwen-MoE) are linearised on `meta` as `moeconv.load`
does, and each of their parameters is read from the per-expert tensor the family stores.

Device: parts are materialised on `Skeleton.device` (`on(device)`): the CPU by default, or one
CUDA GPU, which then holds the part being worked on and nothing else of the weights (the rest
stays on disk; each tensor is read into CPU memory and copied over). The values are the same
checkpoint tensors, cast the same way, wherever they land.
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moeconv.calibrate import decoder_layers
from moeconv.errors import ConfigError, InputError, UnsupportedError
from moeconv.formats.hf import hf_config, plain_hf_config
from moeconv.formats.hf_moe import MoeFormat, family_for_config, gated_rename
from moeconv.io.json_files import read_json_object
from moeconv.io.load import refuse_nonfinite
from moeconv.io.safetensors_io import SourceCheckpoint, validate_checkpoint
from moeconv.io.transformers_io import model_class
from moeconv.nn.native_moe import linearise_native_moe
from moeconv.nn.quantized import rebuild
from moeconv.state import ModelState, SourceInfo
from moeconv.stream.allocator import untouched_allocations_mapped


@contextmanager
def parameters_on_meta():
    """Build modules with every parameter on `meta` and every buffer real (non-persistent buffers
    such as rotary frequency tables are computed by constructors, never stored in checkpoints).
    A constructor still allocates each parameter before it is moved to `meta`; those blocks are
    never touched and are mapped on their own (`untouched_allocations_mapped`), so building a
    skeleton leaves no heap behind, whatever the model's size."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)
    nn.Module.register_parameter = on_meta
    try:
        with untouched_allocations_mapped():
            yield
    finally:
        nn.Module.register_parameter = register


DEVICES = ("cpu", "cuda")


def stream_device(name: str | torch.device = "cpu") -> torch.device:
    """The device a streamed run materialises its parts on: "cpu" (the default) or "cuda" (the
    current GPU). Any other name, or "cuda" where torch sees no GPU, is a `ConfigError` in one
    line naming the fix (the CLI's `--device`, checked before any tensor is read)."""
    text = str(name)
    if text not in DEVICES:
        raise ConfigError(f"--device must be cpu or cuda, not {text[:40]!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                          "False); use --device cpu (the default), or a machine with a GPU and a CUDA build of torch")
    return torch.device(text)


def streamable(path: Path) -> str | None:
    """Why the directory `path` cannot be streamed (None when it can): a Hugging Face checkpoint
    in safetensors, not quantized, of a family transformers builds."""
    if not (path / "config.json").is_file():
        return "not a checkpoint directory"
    raw = read_json_object(path / "config.json")
    if not plain_hf_config(raw):
        return "a moeconv-format or quantized checkpoint"
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return "no safetensors weights"
    return None


@dataclass
class Skeleton:
    """The model of checkpoint `path` with parameters on `meta`; see the module docstring."""

    path: Path
    ckpt: SourceCheckpoint
    config: object
    module: nn.Module
    family: MoeFormat | None
    prefix: str               # the decoder layer stack, e.g. "model.layers"
    num_layers: int
    tensor_of: dict[str, str] = field(default_factory=dict)  # parameter name → checkpoint tensor name
    quantized: dict[str, dict] = field(default_factory=dict)  # layer path → bitsandbytes record (see `reading`)
    _float_layers: dict[str, nn.Module] = field(default_factory=dict)  # meta layers a quantized one stands in for
    _loaded: dict[str | None, list] = field(default_factory=dict)  # part → (owner module, name) read by load_part
    _alias_map: dict[str, list[str]] | None = None  # see `_aliases`
    _quant_index: _QuantIndex | None = None  # see `_quant`
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where parts are materialised

    @classmethod
    def open(cls, path: Path, *, config=None, dtype: torch.dtype | None = None,
             quantized: dict[str, dict] | None = None, device: str | torch.device | None = None) -> Skeleton:
        """The skeleton of checkpoint `path`. `config` (a transformers config) and `dtype` build
        the model when the directory's own config.json does not describe the float model (a
        quantized output); `quantized` (layer path → bitsandbytes record) names the layers stored
        as bitsandbytes tensors under `{path}.{name}`, rebuilt by `load_part`; `device`: see `on`
        (None: the CPU)."""
        path = Path(path)
        if config is None:
            why = streamable(path)
            if why is not None:
                raise UnsupportedError(f"{path}: cannot be streamed ({why})")
            config = hf_config(path, read_json_object(path / "config.json"))
        ckpt = validate_checkpoint(path)
        with parameters_on_meta():
            with _default_dtype(dtype or _float_dtype(ckpt)):  # what the in-memory loader (dtype="auto") holds
                module = model_class(config)(config)
            linearised = linearise_native_moe(module)  # routers in fp32, as `moeconv.load` has them
        family = family_for_config(getattr(config, "model_type", None)) if linearised else None
        prefix, layers = decoder_layers(module)
        skel = cls(path, ckpt, config, module.eval(), family, prefix, len(layers), quantized=dict(quantized or {}))
        skel.tensor_of = skel._map_tensors(linearised)
        return skel.on(device) if device is not None else skel

    def on(self, device: str | torch.device) -> Skeleton:
        """This skeleton, its parts materialised on `device` from now on (`stream_device`: cpu or
        cuda) and its real buffers (rotary tables, computed by constructors) moved there, so a
        part runs where it is read to. Call it while no part is loaded."""
        self.device = stream_device(device)
        for m in self.module.modules():
            for key, b in m._buffers.items():
                if b is not None and b.device != self.device:
                    m._buffers[key] = b.to(self.device)
        return self

    def dtype(self) -> torch.dtype:
        """The dtype the model's float weights are held in (routers of linearised blocks aside)."""
        floats = [p.dtype for p in self.module.parameters() if p.is_floating_point() and p.dtype != torch.float32]
        return floats[0] if floats else torch.float32

    def _map_tensors(self, moe_paths: list[str]) -> dict[str, str]:
        """Each parameter's checkpoint tensor (under the module's own name, else the family's),
        checked from the headers before anything is read: every parameter has one (tied ones
        share; quantized layers are read whole) of its shape, float for a float parameter, and
        every stored tensor belongs to a parameter (or is one the class declares ignorable)."""
        out, missing = {}, []
        tied = tied_parameter_names(self.module)
        for name, p in self.module.named_parameters():
            if self._in_quantized(name):
                continue
            stored = name if name in self.ckpt.specs or not self.family else gated_rename(self.family, moe_paths, name)
            spec = self.ckpt.specs.get(stored)
            if spec is None:
                if name not in tied:
                    missing.append(name)
                continue
            if tuple(spec.shape) != tuple(p.shape) or (p.is_floating_point() and not spec.dtype.is_floating_point):
                raise InputError(f"{self.path}: tensor {stored} is {spec.dtype} {list(spec.shape)}, the config implies "
                                 f"a float {list(p.shape)}")
            out[name] = stored
        if missing:
            raise InputError(f"{self.path}: {len(missing)} weights missing from the checkpoint (e.g. {missing[0]})")
        self._refuse_strays(set(out.values()) | {n for n in self.ckpt.names() if self._in_quantized(n)})
        return out

    def _refuse_strays(self, used: set[str]) -> None:
        """No weight is lost silently: a stored tensor no parameter reads is refused (one rule
        with the in-memory loader), unless the class declares it ignorable on load."""
        ignorable = list(getattr(self.module, "_keys_to_ignore_on_load_unexpected", None) or [])
        for name in self.ckpt.names():
            if name not in used and not any(re.search(p, name) for p in ignorable):
                raise InputError(f"{self.path}: weights do not match the config: tensor {name} is not a parameter "
                                 f"of {type(self.module).__name__}")

    def read(self, stored: str) -> torch.Tensor:
        """One stored tensor, refused when it holds NaN or Inf (converting them only spreads them).
        Mapped, not copied (`SourceCheckpoint.mapped`: a private mapping, so writing to it never
        reaches the file): copying into fresh memory cost 3x the mapping (431 MB of a Mixtral's
        layers read and checked: 0.70 s copied, 0.25 s mapped), and the pages are freed with the
        tensor either way. The file must not be truncated while the run reads it."""
        return refuse_nonfinite(self.path, stored, self.ckpt.mapped(stored))

    def state(self) -> ModelState:
        """The skeleton as a `ModelState` (facts and module groups are read from its structure)."""
        return ModelState(self.module, self.config, SourceInfo("hf", self.path, tokenizer_dir=self.path))

    def block_of(self, path: str) -> str | None:
        """The decoder layer `path` is in (e.g. "model.layers.3"); None outside the layers."""
        if not path.startswith(self.prefix + "."):
            return None
        return f"{self.prefix}.{path[len(self.prefix) + 1:].split('.', 1)[0]}"

    def layer_paths(self) -> list[str]:
        return [f"{self.prefix}.{i}" for i in range(self.num_layers)]

    def outer_parameters(self) -> list[str]:
        """Parameters outside the decoder layers (embeddings, final norm, head)."""
        return [n for n, _ in self.module.named_parameters() if not n.startswith(self.prefix + ".")]

    @torch.no_grad()
    def materialize(self, names: list[str]) -> None:
        """Read the parameters `names` from the checkpoint into the module (cast to its dtypes, on
        `self.device`); a parameter tied to one of them (lm_head to the embeddings) gets the same
        tensor."""
        for name in names:
            p = self._parameter(name)
            t = nn.Parameter(self.read(self.tensor_of[name]).to(device=self.device, dtype=p.dtype),
                             requires_grad=False)
            for n in [name, *self._aliases().get(name, [])]:
                _set_parameter(self.module, n, t)

    def release(self, names: list[str]) -> None:
        """Give the parameters `names` (and what is tied to them) back to `meta` (their memory is freed)."""
        for name in names:
            p = self._parameter(name)
            t = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            for n in [name, *self._aliases().get(name, [])]:
                _set_parameter(self.module, n, t)

    def names_under(self, path: str) -> list[str]:
        """Parameters under `path`, a parameter tied to an earlier one left out (as the whole
        model's `named_parameters` leaves it out)."""
        tied = {n for names in self._aliases().values() for n in names}
        return [n for n, _ in self.module.get_submodule(path).named_parameters(prefix=path) if n not in tied]

    def _parameter(self, name: str) -> nn.Parameter:
        owner, _, leaf = name.rpartition(".")
        return self.module.get_submodule(owner)._parameters[leaf]

    def _aliases(self) -> dict[str, list[str]]:
        """`_aliases` of the module, found once: ties are structural (embeddings and head), and
        walking every parameter of a deep model on each read cost more than the reading (a
        32-layer Mixtral quantized tensor by tensor: 30 s of 77)."""
        if self._alias_map is None:
            self._alias_map = _aliases(self.module)
        return self._alias_map

    # -- the same architecture read from a written output ---------------------------------------
    def reading(self, out_dir: Path, quantized: dict[str, dict] | None = None) -> Skeleton:
        """A skeleton of the same model over `out_dir`, a checkpoint written from this one under
        the module's own parameter names (or the family's, as this one reads them), with the
        layers `quantized` (path → record) stored as bitsandbytes tensors under `{path}.{name}`."""
        return Skeleton.open(out_dir, config=copy.deepcopy(self.config), dtype=self.dtype(), quantized=quantized,
                             device=self.device)

    def load_part(self, path: str | None) -> None:
        """Materialise every parameter under `path` (None: everything outside the decoder layers)
        on `self.device`, quantized layers rebuilt there from their stored tensors."""
        names = self._part(path)
        floats = [n for n in names if not self._in_quantized(n)]
        self.materialize(floats)
        # the owners, so `drop_part` frees what it read even from modules a pass has since taken
        # out of the model (experts prune-experts dropped), whatever still references them
        self._loaded[path] = [(self.module.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in floats]
        for lp in self._quantized_in(path):
            rel = {n[len(lp) + 1:]: n for n in self._quant().stored[lp]}
            tensors = {r: self.ckpt.mapped(n).to(self.device) for r, n in rel.items()}
            self._float_layers[lp] = self.module.get_submodule(lp)
            self.module.set_submodule(lp, rebuild(self.quantized[lp], tensors, where=f"{self.path}: {lp}"))

    def drop_part(self, path: str | None) -> None:
        """Undo `load_part(path)`: every parameter back on `meta`."""
        for lp in self._quantized_in(path):
            self.module.set_submodule(lp, self._float_layers.pop(lp))
        self.release([n for n in self._part(path) if not self._in_quantized(n)])
        for owner, leaf in self._loaded.pop(path, []):
            p = owner._parameters.get(leaf)
            if p is not None and p.device.type != "meta":
                owner._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                       requires_grad=False)

    def _part(self, path: str | None) -> list[str]:
        return self.outer_parameters() if path is None else self.names_under(path)

    def _in_quantized(self, name: str) -> bool:
        """Whether `name` lies under a quantized layer (`name.startswith(lp + ".")` for one)."""
        layers = self._quant().layers
        return any(p in layers for p in _dotted_prefixes(name))

    def _quantized_in(self, path: str | None) -> list[str]:
        """The quantized layers under `path` (None: outside the decoder layers), in `quantized` order."""
        index = self._quant()
        return list(index.outside if path is None else index.under.get(path, ()))

    def _quant(self) -> _QuantIndex:
        """`quantized` (set when the skeleton is opened, never changed) and the checkpoint's names
        indexed by layer, built once: scanning every layer for every name cost seconds on a
        32-layer Mixtral (2.8M prefix tests)."""
        if self._quant_index is None:
            self._quant_index = _QuantIndex.build(self.quantized, self.ckpt.names(), self.prefix)
        return self._quant_index


def _dotted_prefixes(name: str):
    """Every `p` with `name.startswith(p + ".")`: `name` cut before each of its dots."""
    dot = name.find(".")
    while dot != -1:
        yield name[:dot]
        dot = name.find(".", dot + 1)


@dataclass
class _QuantIndex:
    """The quantized layers of a skeleton, indexed for `_in_quantized`, `_quantized_in`, `load_part`."""

    layers: frozenset[str]
    under: dict[str, list[str]]   # module path → quantized layers strictly under it, in order
    outside: list[str]            # quantized layers outside the decoder stack, in order
    stored: dict[str, list[str]]  # quantized layer → checkpoint names under it, in checkpoint order

    @classmethod
    def build(cls, quantized: dict, names: list[str], prefix: str) -> _QuantIndex:
        layers = frozenset(quantized)
        under: dict[str, list[str]] = {}
        for lp in quantized:
            for p in _dotted_prefixes(lp):
                under.setdefault(p, []).append(lp)
        outside = [lp for lp in quantized if not lp.startswith(prefix + ".")]
        stored: dict[str, list[str]] = {lp: [] for lp in quantized}
        for n in names:
            for p in _dotted_prefixes(n):
                if p in layers:
                    stored[p].append(n)
        return cls(layers, under, outside, stored)


def _set_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    module.get_submodule(owner)._parameters[leaf] = param


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """{first name of a shared parameter: the other names of it} (tied embeddings). Replacing a
    parameter under one name would otherwise leave the others on the old (meta) tensor, and a tied
    head would compute with uninitialised memory."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.setdefault(first[id(p)], []).append(name)
        else:
            first[id(p)] = name
    return out


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Parameter names that share their tensor with an earlier one (tied embeddings)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


def _float_dtype(ckpt: SourceCheckpoint) -> torch.dtype:
    """The dtype most of the checkpoint's floating-point bytes are in (what `dtype="auto"` keeps)."""
    totals: dict[torch.dtype, int] = {}
    for spec in ckpt.specs.values():
        if spec.dtype.is_floating_point:
            totals[spec.dtype] = totals.get(spec.dtype, 0) + spec.nbytes
    return max(totals, key=totals.get) if totals else torch.float32


@contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
