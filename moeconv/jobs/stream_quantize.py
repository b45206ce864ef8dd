"""`quantize` streamed: disk → one layer → disk, for checkpoints bigger than memory.

bitsandbytes quantization (int8 / nf4 / fp4) needs no data. The output is planned from the
checkpoint headers: which layers are quantized is decided on the meta-device skeleton by the
pass's own selection, and each quantized layer's stored tensors (names, dtypes, shapes) come from
quantizing one zero matrix of its shape with bitsandbytes itself. Then every output tensor is
produced in order: float tensors read from the source (cast as `moeconv.load` holds them: routers
in fp32), each quantized layer's weight read, quantized and written. The file layout is the one the
in-memory route writes (`moeconv.formats.quantized`: the bitsandbytes layout transformers reads
for dense models, moeconv's format with a `quantization` section for MoE models), and the tensors
are equal to it bit for bit. Verification: every tensor re-read and checksummed; source and output
run side by side on held-out tokens, one decoder layer of each at a time (the output's layers
rebuilt from the written tensors), and the measured change reported.

With `ctx.device` "cuda", each quantized layer's float weight is read onto the GPU and quantized
there by bitsandbytes (its CUDA kernels: the values may differ from the CPU's in the last bit of a
scale), its stored tensors copied back to the CPU for writing; float tensors go from source to
output without visiting the GPU; the comparison runs one layer of each model at a time on the GPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from moeconv.context import Context
from moeconv.errors import UnsupportedError
from moeconv.formats.quantized import bnb_hf_config, bnb_hf_obstacle, moeconv_quantized_config, write_generation_config
from moeconv.formats.writer import TensorSource, write_checkpoint
from moeconv.io.safetensors_io import TensorSpec
from moeconv.jobs.driver import JobResult, check_output, run_job
from moeconv.jobs.stream_report import compare_and_summarise
from moeconv.module_groups import GROUPS, module_groups
from moeconv.nn.linear_like import in_out_features, is_conv1d
from moeconv.nn.quantized import QuantSpec, layer_record, quantize_linear, serialized
from moeconv.report_format import fmt_bytes
from moeconv.stream.allocator import prepare_streaming, release_freed
from moeconv.stream.compare import check_batches
from moeconv.stream.skeleton import Skeleton
from moeconv.stream.sweep_check import SweepCheck, visits_layers_in_order
from moeconv.summary import LayerFacts
from passes.quantize import Quantize, QuantizeConfig


def quantize_streamed(src, out, cfg: QuantizeConfig, *, force: bool = False, shard_bytes: int = 5 * 10**9,
                      ctx: Context | None = None, extra_report: dict | None = None,
                      skeleton: Skeleton | None = None) -> dict:
    """Quantize `src` (an HF safetensors checkpoint) into `out` one layer at a time; returns the
    report. `extra_report`: more fields for report.json (the memory plan, the route and why);
    `skeleton`: `src` opened already (its config and headers checked before other inputs are read);
    `ctx.device`: where each layer is quantized and compared (cpu, or cuda: one layer at a time)."""
    ctx = ctx or Context()
    check_output(src, out, force=force)
    # one matrix is in memory at a time, so its temporaries are served from the heap and reused
    # rather than mapped and faulted in afresh for every matrix (see QUANTIZE_MMAP_THRESHOLD)
    prepare_streaming(mmap_threshold=QUANTIZE_MMAP_THRESHOLD, trim_threshold=QUANTIZE_TRIM_THRESHOLD)
    skel = (skeleton or Skeleton.open(Path(src))).on(ctx.device)
    plan = _Plan(skel, cfg, ctx)

    def work(tmp: Path) -> JobResult:
        try:
            written = write_checkpoint(tmp, TensorSource(plan.specs, plan.produce, []), plan.config,
                                       shard_bytes=shard_bytes, on_tensor=plan.on_tensor(ctx))
            # the check's layers too come from the heap under the same thresholds, and go back at
            # each layer's end (`release_freed` in its step): 3-5 s less system time, same peak
            reference = plan.check.logits() if plan.check is not None else None
        finally:
            if plan.check is not None:
                plan.check.close()
        release_freed()
        if plan.consumer == "transformers":
            write_generation_config(skel.module, tmp)
        written.update({"format": plan.format, "consumer": plan.consumer, "route": "streaming"})
        if plan.consumer == "transformers":
            written["expected_class"] = type(skel.module).__name__
        compared = compare_and_summarise(skel, skel.reading(tmp, plan.records), evaluation=ctx.evaluation,
                                         seed=ctx.seed, what="float source", reference=reference,
                                         before=plan.source_facts)
        verification = compared["verification"]
        rep = plan.report()
        rep.metrics.update(measured(verification), model_bytes=written["bytes"])
        # quantizing happens inside the write, tensor by tensor: the pass's time is its own work
        # (`_Plan.seconds`, summed over the layers), not the reading and writing around it
        rep.seconds = round(plan.seconds, 4)
        report = {"passes": [rep.to_dict()], "written": written, **compared, **(extra_report or {})}
        return JobResult(report, skel.state().source)
    return run_job(src, out, force=force, recipe=[{"pass": "quantize", **cfg.model_dump()}], work=work)


# bitsandbytes' int8 quantization of a 2816x1024 expert matrix makes its fp16 copy (5.8 MB) and
# float32 temporaries (11.5 MB); mapped on their own under an 8 MB threshold, and with the top
# of the heap handed back at frees (glibc's trim threshold), each was faulted in again for
# every matrix: 15-22 s of system time in the 32-layer run. Served from the heap, kept until
# the layer ends (`release_freed`): the 32-layer bench quantize (4.7 GB bf16 Mixtral) took
# 31.9-34.7 s against 37.4-43.1 s, at the same ~840 MB peak (3 runs each, alternated).
QUANTIZE_MMAP_THRESHOLD = 32 * 2**20
QUANTIZE_TRIM_THRESHOLD = 64 * 2**20


class _Plan:
    """The output's tensors in the in-memory writer's order, and how to make each one; with the
    source side of the check run during the sweep (`check`) when the order allows it."""

    def __init__(self, skel: Skeleton, cfg: QuantizeConfig, ctx: Context):
        t0 = time.perf_counter()
        self.skel, self.cfg, self.spec = skel, cfg, cfg.spec()
        state = skel.state()
        self.groups = module_groups(state)
        self.rows, todo = Quantize(cfg).select_layers(skel.module, self.groups, self.spec)
        if not todo:
            raise UnsupportedError("quantize: no layer to quantize ("
                                   + "; ".join(sorted({r["reason"] for r in self.rows}))[:300] + ")")
        self.layers = {path: skel.module.get_submodule(path) for path, _ in todo}
        probes = _probes(self.layers, self.spec)
        self.records = {path: rec for path, (rec, _) in probes.items()}
        self.stored = {path: specs for path, (_, specs) in probes.items()}
        for path, row in todo:
            row["bytes_after"] = sum(s.nbytes for s in self.stored[path].values())
        why_not_hf = bnb_hf_obstacle(state, self.records)
        if why_not_hf is None:
            self.format, self.consumer, self.config = "hf-bitsandbytes", "transformers", bnb_hf_config(state, self.records)
        else:
            self.format, self.consumer = "moeconv-quantized", "moeconv"
            self.config = moeconv_quantized_config(state, self.records)
        self.specs, self.how = self._order()
        self.block = {s.name: skel.block_of(self._module_of(s.name)) for s in self.specs}
        self.source_facts = LayerFacts()
        self.check = (SweepCheck(skel, check_batches(skel, ctx.evaluation, ctx.seed), self.source_facts)
                      if visits_layers_in_order([self.block[s.name] for s in self.specs], skel.layer_paths())
                      else None)
        self._cache: tuple[str | None, dict] = (None, {})
        self._block: str | None = None  # the decoder layer of the tensor produced last
        # the pass's own work: this plan (selection, probes), then each layer's quantization (`_quantize`)
        self.seconds = time.perf_counter() - t0

    def _order(self) -> tuple[list[TensorSpec], dict[str, tuple]]:
        """`moeconv.formats.quantized`'s order: modules in order, each module's own tensors; a
        parameter shared by two modules (tied embeddings) is written once."""
        specs, how, seen = [], {}, set()
        for path, m in self.skel.module.named_modules(remove_duplicate=False):
            if path in self.layers:
                for rel, spec in self.stored[path].items():
                    name = f"{path}.{rel}"
                    specs.append(TensorSpec(name, spec.dtype, spec.shape))
                    how[name] = ("quantized", path, rel)
                continue
            for rel, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                name = f"{path}.{rel}" if path else rel
                specs.append(TensorSpec(name, p.dtype, tuple(p.shape)))
                how[name] = ("float", name)
        return specs, how

    def _module_of(self, name: str) -> str:
        how = self.how[name]
        return how[1] if how[0] == "quantized" else how[1].rpartition(".")[0]

    def produce(self, spec: TensorSpec) -> torch.Tensor:
        self._enter(self.block[spec.name])
        how = self.how[spec.name]
        if how[0] == "float":
            held = self.skel._parameter(how[1]) if self.check is not None else None
            if held is not None and held.device.type != "meta":  # the sweep holds it: not read again
                return held.detach().to("cpu", spec.dtype)
            return self.skel.read(self.skel.tensor_of[how[1]]).to(spec.dtype)
        _, path, rel = how
        if self._cache[0] != path:
            self._cache = (None, {})
            self._cache = (path, self._quantize(path))
        return self._cache[1][rel]

    def _enter(self, block: str | None) -> None:
        """The sweep reaches `block`: with the check, the layer is materialised whole and run;
        without, the previous layer's copies go back to the system."""
        if self.check is not None:
            self.check.enter(block)
        elif block != self._block:
            # the previous decoder layer's float and quantized copies go back to the system;
            # per layer, not per matrix: each trim made the next matrix fault its pages in
            # again (measured: 60 s -> 50 s for a 32-layer bf16 Mixtral, flat RSS)
            release_freed()
        self._block = block

    def _quantize(self, path: str) -> dict[str, torch.Tensor]:
        # with the check, the sweep holds the layer's weights already (`SweepCheck.enter`)
        names = [] if self.check is not None else self.skel.names_under(path)
        self.skel.materialize(names)
        try:
            t0 = time.perf_counter()
            stored = serialized(quantize_linear(self.skel.module.get_submodule(path), self.spec))
            stored = {rel: t.cpu() for rel, t in stored.items()}  # written from CPU memory
            self.seconds += time.perf_counter() - t0
            return stored
        finally:
            self.skel.release(names)

    def on_tensor(self, ctx: Context):
        done, written = [0], [0]

        def step(spec):
            done[0] += 1
            written[0] += spec.nbytes
            ctx.report_progress("quantize (streamed)", done[0], len(self.specs), detail=f"{fmt_bytes(written[0])} written")
        return step

    def report(self):
        before, after = group_bytes(self.skel, self.groups, self.rows), group_bytes(self.skel, self.groups, self.rows,
                                                                                        quantized=True)
        rep = Quantize(self.cfg).build_report(self.rows, before, after, [], [], self.spec)
        rep.metrics["route"] = "streaming"
        return rep


def _probes(layers: dict[str, nn.Module], spec: QuantSpec) -> dict[str, tuple[dict, dict[str, TensorSpec]]]:
    """`_probe` of every layer, bitsandbytes run once per distinct (shape, dtype, bias, kind):
    a Mixtral has four such kinds however many layers and experts it has."""
    seen: dict[tuple, tuple[dict, dict[str, TensorSpec]]] = {}
    out = {}
    for path, m in layers.items():
        key = (in_out_features(m), m.weight.dtype, m.bias is not None, is_conv1d(m))
        if key not in seen:
            seen[key] = _probe(m, spec)
        record, specs = seen[key]
        out[path] = (dict(record), specs)
    return out


def _probe(m: nn.Module, spec: QuantSpec) -> tuple[dict, dict[str, TensorSpec]]:
    """(record, {stored name: spec}) of `m` quantized: bitsandbytes run on a zero matrix of its
    shape and dtype (the stored layout depends on the shape, never on the values)."""
    in_f, out_f = in_out_features(m)
    dtype = m.weight.dtype
    zero = nn.Linear(in_f, out_f, bias=m.bias is not None, dtype=dtype, device="cpu")
    with torch.no_grad():
        zero.weight.zero_()
        if zero.bias is not None:
            zero.bias.zero_()
    q = quantize_linear(zero, spec)
    record = layer_record(q)
    record["source_class"] = "Conv1D" if is_conv1d(m) else "Linear"
    return record, {rel: TensorSpec(rel, t.dtype, tuple(t.shape)) for rel, t in serialized(q).items()}


def group_bytes(skel: Skeleton, groups: dict[str, str], rows: list[dict], quantized: bool = False) -> dict:
    """group → {"params", "bytes"} from the skeleton's shapes (and the planned quantized sizes)."""
    after = {r["module"]: r["bytes_after"] for r in rows if r["action"] != "kept"} if quantized else {}
    out: dict[str, dict] = {}
    seen: set[int] = set()
    for path, m in skel.module.named_modules():
        if path not in groups:
            continue
        own = [p for p in m._parameters.values() if p is not None and id(p) not in seen]
        seen.update(id(p) for p in own)
        if not own:
            continue
        row = out.setdefault(groups[path], {"params": 0, "bytes": 0})
        row["params"] += sum(p.numel() for p in own)
        row["bytes"] += after[path] if path in after else sum(p.numel() * p.element_size() for p in own)
    return {g: out[g] for g in GROUPS if g in out}


def measured(v: dict) -> dict:
    """The streamed check's numbers under the names the in-memory pass reports them by."""
    out = {"logits_max_abs_diff": v["max_abs_diff"], "kl": v["kl"], "top1_agreement": v["top1_agreement"],
           "error_inputs": v["inputs"], "logits_scale": v["ref_max_abs"],
           "max_abs_diff": v["max_abs_diff"], "rel_max_diff": v["rel_max_diff"]}  # as the numeric check reports them
    if "ppl_before" in v:
        out.update({"ppl_before": v["ppl_before"], "ppl_after": v["ppl_after"],
                    "ppl_ratio": v["ppl_after"] / v["ppl_before"]})
    return out
