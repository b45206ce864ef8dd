"""`sparsify --method magnitude` streamed: disk → one tensor → disk, for checkpoints bigger than memory.

Magnitude pruning needs no data, so every source tensor is read once, pruned when it is a
selected matrix (the same `magnitude` rule, in fp32, cast back to the stored dtype: the tensors
equal the in-memory route's bit for bit), and written straight to the output shards in the
source's own layout and names. Then the output is re-read and checksummed tensor by tensor, every
pruned matrix is checked against the pattern, and source and output are compared on held-out
tokens one decoder layer of each at a time (`moeconv.stream.compare`). Peak memory: one source
tensor and its pruned copy during the write, one decoder layer of each model during the check,
whatever the depth. With `ctx.device` "cuda", each selected matrix is pruned on the GPU (ties in
|w| may break otherwise than on the CPU) and copied back for writing, and the check runs there.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from moeconv.context import Context
from moeconv.errors import ConfigError
from moeconv.formats.compressed import compressed_nbytes, write_compressed
from moeconv.formats.writer import TensorSource, write_checkpoint
from moeconv.jobs.driver import JobResult, check_output, run_job
from moeconv.jobs.stream_quantize import measured
from moeconv.jobs.stream_report import compare_and_summarise
from moeconv.nn.linear_like import is_conv1d
from moeconv.report import PassReport
from moeconv.sparse_cuda import speed_note
from moeconv.sparsity import SparsityPattern, check_pattern, zero_count
from moeconv.stream.allocator import prepare_streaming, release_freed
from moeconv.stream.skeleton import Skeleton
from passes.sparsify import SparsifyConfig, select_targets
from passes.sparsify_methods import magnitude


def sparsify_streamed(src, out, cfg: SparsifyConfig, *, force: bool = False, shard_bytes: int = 5 * 10**9,
                      ctx: Context | None = None, compressed: bool = False, extra_report: dict | None = None) -> dict:
    """Prune `src` (an HF safetensors checkpoint) by magnitude into `out`; returns the report.
    `compressed`: also write `out/compressed/` (values + bitmask, `moeconv.formats.compressed`).
    `extra_report`: more fields for report.json (the memory plan, the route and why)."""
    if cfg.method != "magnitude":
        raise ConfigError(f"sparsify: the streamed route prunes by magnitude only, not {cfg.method}")
    ctx = ctx or Context()
    check_output(src, out, force=force)
    prepare_streaming()  # freed layers go back to the system, kernels kept bounded: memory flat with depth
    skel = Skeleton.open(Path(src), device=ctx.device)
    pat = cfg.sparsity_pattern()
    pruner = _Pruner(skel, cfg, pat, ctx)

    def work(tmp: Path) -> JobResult:
        used = set(skel.tensor_of.values())  # tensors the class ignores on load are dropped, as in memory
        source = TensorSource([skel.ckpt.specs[n] for n in skel.ckpt.names() if n in used], pruner.produce, [])
        written = write_checkpoint(tmp, source, skel.config.to_dict(), shard_bytes=shard_bytes,
                                   on_tensor=pruner.on_tensor)
        written.update({"format": skel.family.name if skel.family else "hf", "consumer": "transformers",
                        "route": "streaming"})
        compared = compare_and_summarise(skel, Skeleton.open(tmp), evaluation=ctx.evaluation, seed=ctx.seed,
                                         what="dense source")
        rep = pruner.report()
        # the change of the output, as measured, under the names the in-memory pass reports
        rep.metrics.update(measured(compared["verification"]), model_bytes=written["bytes"])
        # pruning happens inside the write, tensor by tensor: the pass's time is the pruning and
        # pattern checks summed over the matrices, not the reading and writing around them
        rep.seconds = round(pruner.seconds, 4)
        report = {"passes": [rep.to_dict()], "written": written, **compared, **(extra_report or {})}
        if compressed:
            report["extra_outputs"] = {"compressed": write_compressed(tmp, pattern=pat.label, shard_bytes=shard_bytes)}
        return JobResult(report, skel.state().source)
    return run_job(src, out, force=force, recipe=[{"pass": "sparsify", **cfg.model_dump()}], work=work)


class _Pruner:
    """Produces each output tensor; prunes the selected matrices and records a row for each."""

    def __init__(self, skel: Skeleton, cfg: SparsifyConfig, pat: SparsityPattern, ctx: Context):
        self.skel, self.cfg, self.pat, self.ctx = skel, cfg, pat, ctx
        targets = select_targets(skel.state(), cfg.targets, cfg.ignore)  # on the skeleton: no weight read
        self.targets = {skel.tensor_of[f"{n}.weight"]: (n, is_conv1d(m)) for n, m in targets.items()}
        for name, (path, conv) in self.targets.items():
            cols = skel.ckpt.specs[name].shape[0 if conv else 1]
            if pat.is_nm and cols % pat.m:
                raise ConfigError(f"sparsify: {path} has {cols} inputs, not a multiple of {pat.m}; "
                                  "leave it out with ignore")
        self.rows: dict[str, dict] = {}
        self.compressed = 0
        self.done = 0
        self.seconds = 0.0  # pruning and checking the selected matrices, summed (`produce`)

    def produce(self, spec) -> torch.Tensor:
        t = self.skel.read(spec.name)
        if spec.name not in self.targets:
            return t
        path, conv = self.targets[spec.name]
        t0 = time.perf_counter()
        w = (t.t() if conv else t).to(self.skel.device)
        stored = magnitude(w.float(), self.pat).to(t.dtype)
        sp = check_pattern(stored, self.pat, path)
        self.seconds += time.perf_counter() - t0
        self.rows[path] = {"matrix": path, "shape": list(stored.shape), "sparsity": round(sp, 4), "stats": "none",
                           "rel_error": None, "params": stored.numel(), "zeros": zero_count(stored)}
        self.compressed += compressed_nbytes(stored)
        return (stored.t() if conv else stored).contiguous().cpu()  # written from CPU memory

    def on_tensor(self, spec) -> None:
        if spec.name in self.targets:
            release_freed()  # the pruned matrix and its fp32 copy
        self.done += 1
        self.ctx.report_progress("sparsify (streamed)", self.done, len(self.skel.ckpt.specs))

    def report(self) -> PassReport:
        rows = list(self.rows.values())
        params, zeros = sum(r["params"] for r in rows), sum(r["zeros"] for r in rows)
        total = sum(p.numel() for p in self.skel.module.parameters())
        dense = sum(self.skel.ckpt.specs[n].nbytes for n in self.targets)
        metrics = {"pattern": self.pat.label, "method": "magnitude", "matrices_pruned": len(rows),
                   "target_params": params, "target_sparsity": round(zeros / max(1, params), 4),
                   "model_sparsity": round(zeros / max(1, total), 4), "calibration_tokens": 0,
                   "fallback_experts": 0, "rel_error_mean": None, "rel_error_max": None,
                   "target_dense_bytes": dense, "target_compressed_bytes": self.compressed,
                   "speed": speed_note(), "route": "streaming"}
        summary = (f"{len(rows)} matrices → {self.pat.label} by magnitude (streamed, no calibration data); "
                   f"{metrics['target_sparsity']:.1%} of their weights are zero")
        warnings = [] if torch.cuda.is_available() else [
            "2:4 on CPU saves storage, not time (no CPU sparse kernels); see metrics.speed"]
        return PassReport("sparsify", summary=summary, metrics=metrics,
                          tables={"layers": [], "experts": _expert_rows(self.skel, self.rows), "matrices": rows},
                          warnings=warnings)


def _expert_rows(skel: Skeleton, rows: dict[str, dict]) -> list[dict]:
    """One row per pruned expert of each MoE block: its sparsity over its matrices."""
    out = []
    for layer, (bpath, block) in enumerate(skel.state().moe_blocks()):
        for e in range(block.num_experts):
            mine = [r for n, r in rows.items() if n.startswith(f"{bpath}.experts.{e}.")]
            if mine:
                out.append({"layer": layer, "block": bpath, "expert": e, "tokens": None, "share": None,
                            "fallback": False, "stats": "none", "rel_error_max": None,
                            "sparsity": round(sum(r["zeros"] for r in mine) / sum(r["params"] for r in mine), 4)})
    return out
