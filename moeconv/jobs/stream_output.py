"""What a streamed sweep writes for each final part, and the output's config and reader.

Float outputs are written as the in-memory formats write them: a native MoE family under the
family's own tensor names (`moeconv.formats.hf_moe`, routers cast to the model dtype as the family
stores them), a dense model under its module names. When the recipe ends with `quantize`
(bitsandbytes, no data needed), the part's selected linears are quantized the moment the part is
final, with the pass's own selection and `quantize_linear`, and written in the layout of
`moeconv.formats.quantized` (module names; hf-bitsandbytes for dense models, moeconv-quantized for
MoE models), the same tensors `quantize_streamed` writes.

The tensors are on the device the sweep runs on (`Skeleton.device`; a part quantized on a GPU is
quantized by bitsandbytes' CUDA kernels); the writer copies each to CPU memory as it writes it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from moeconv.errors import UnsupportedError
from moeconv.formats.hf import hf_moe_config
from moeconv.formats.hf_moe import gated_rename
from moeconv.formats.quantized import bnb_hf_config, bnb_hf_obstacle, moeconv_quantized_config
from moeconv.module_groups import module_groups
from moeconv.nn.moe import MoEBlock
from moeconv.nn.quantized import layer_record, quantize_linear, serialized
from moeconv.nn.linear_like import is_conv1d
from moeconv.stream.skeleton import Skeleton, tied_parameter_names
from passes.quantize import Quantize, QuantizeConfig


class StreamOutput:
    """Turns each final part of `skel` into output tensors; see the module docstring."""

    def __init__(self, skel: Skeleton, quantize: QuantizeConfig | None = None):
        self.skel, self.qcfg = skel, quantize
        self.tied = tied_parameter_names(skel.module)
        self.target_dtype = skel.dtype()
        self.rows: list[dict] = []  # quantize's per-module rows, in model order
        self.records: dict[str, dict] = {}  # quantized layer → bitsandbytes record
        self.groups = module_groups(skel.state()) if quantize else {}
        self.quantize_seconds = 0.0  # selection and quantization, summed over the final parts
        if quantize is not None:
            _, todo = Quantize(quantize).select_layers(skel.module, self.groups, quantize.spec())
            if not todo:
                raise UnsupportedError("quantize: no layer to quantize (see `moeconv quantize --help` for targets)")

    @property
    def quantized(self) -> bool:
        return self.qcfg is not None

    def tensors(self, path: str | None, part: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The output tensors of the final part `path` (None: outside the decoder layers, `part`
        the whole model), in module order; a parameter shared by two modules is written once."""
        t0 = time.perf_counter()
        todo = self._select_in(path, part) if self.quantized else set()
        self.quantize_seconds += time.perf_counter() - t0
        out, seen = [], set()
        for rel, m in part.named_modules(remove_duplicate=False):
            full = ".".join(x for x in (path, rel) if x)
            if path is None and (full == self.skel.prefix or full.startswith(self.skel.prefix + ".")):
                continue
            if full in todo:
                out.extend(self._quantized(full, m))
                continue
            own = [(k, p) for k, p in m._parameters.items() if p is not None]
            own += [(k, b) for k, b in m._buffers.items() if b is not None and k not in m._non_persistent_buffers_set]
            for leaf, t in own:
                name = f"{full}.{leaf}" if full else leaf
                if id(t) in seen or name in self.tied:
                    continue
                seen.add(id(t))
                out.append(self._float(name, t.detach()))
        return out

    def _float(self, name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        if self.quantized or self.skel.family is None:
            return name, t
        if t.is_floating_point() and t.dtype != self.target_dtype:
            t = t.to(self.target_dtype)
        return gated_rename(self.skel.family, self._moe_paths(), name), t

    def _moe_paths(self) -> list[str]:
        return [p for p, m in self.skel.module.named_modules() if isinstance(m, MoEBlock)]

    def _select_in(self, path: str | None, part: nn.Module) -> set[str]:
        """The linears of the part quantize selects (its rows recorded for the report)."""
        pre = f"{path}." if path else ""
        groups = {p[len(pre):]: g for p, g in self.groups.items() if p.startswith(pre)}
        if path is None:
            groups = {p: g for p, g in groups.items() if not p.startswith(self.skel.prefix + ".")}
        rows, todo = Quantize(self.qcfg).select_layers(part, groups, self.qcfg.spec())
        for row in rows:
            row["module"] = pre + row["module"]
        self.rows.extend(rows)
        return {pre + p for p, _ in todo}

    def _quantized(self, full: str, m: nn.Module) -> list[tuple[str, torch.Tensor]]:
        t0 = time.perf_counter()
        q = quantize_linear(m, self.qcfg.spec())
        self.quantize_seconds += time.perf_counter() - t0
        record = layer_record(q)
        record["source_class"] = "Conv1D" if is_conv1d(m) else "Linear"
        self.records[full] = record
        tensors = serialized(q)
        row = next(r for r in self.rows if r["module"] == full)
        row["bytes_after"] = sum(t.numel() * t.element_size() for t in tensors.values())
        return [(f"{full}.{rel}", t) for rel, t in tensors.items()]

    # -- after the sweep --------------------------------------------------------------------
    def config(self) -> tuple[dict, str, str]:
        """(config.json, format name, consumer) of the output, from the final model's structure."""
        state = self.skel.state()
        if self.quantized:
            if bnb_hf_obstacle(state, self.records) is None:
                return bnb_hf_config(state, self.records), "hf-bitsandbytes", "transformers"
            return moeconv_quantized_config(state, self.records), "moeconv-quantized", "moeconv"
        if self.skel.family is not None:
            return hf_moe_config(state), self.skel.family.name, "transformers"
        return self.skel.config.to_dict(), "hf", "transformers"

    def reading(self, out_dir: Path) -> Skeleton:
        """The written output as a skeleton (quantized layers rebuilt from their stored tensors)."""
        if self.quantized:
            return self.skel.reading(out_dir, self.records)
        return Skeleton.open(out_dir, device=self.skel.device)
