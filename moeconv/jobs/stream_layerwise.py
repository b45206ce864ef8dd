"""Calibrated passes streamed: disk → one decoder layer → disk, several passes in one sweep.

`run_streamed(src, out, passes)` runs `prune-experts` and `sparsify` (any chain of passes with a
`LayerJob`), optionally followed by a data-free `quantize`, on a safetensors checkpoint bigger than
memory. Without calibration data the recipe must be data-free (magnitude sparsify, quantize):
the sweep then reads, changes and writes each layer without running it.

1. The model is a skeleton on `meta` (`moeconv.stream.skeleton`); the recipe's contract is planned
   against its facts and every pass's `check` runs before any weight is read.
2. One sweep (`moeconv.calibrate.run_layerwise`) reads each decoder layer, runs every pass's
   per-layer step on it in recipe order (each sees the layer as the passes before it left it),
   feeds the next layer with the changed layer's outputs, checks each pass's promise on the final
   weights (`LayerJob.part_checks`), quantizes the layer when the recipe ends with `quantize`,
   writes it as its own shard (`moeconv.formats.part_writer`) and frees it. The source is read
   once and the output written once, however many passes the recipe chains. A pass that needs a
   sweep of its own first (`prune-experts --per-layer global`) is not streamed.
3. The output is re-read and checksummed tensor by tensor, then source and output run side by
   side on held-out tokens, one layer of each at a time (`moeconv.stream.compare`).

Peak memory: the embeddings and head, one decoder layer with its pass statistics, and the
calibration hidden states (in the model's dtype), whatever the depth. With `ctx.device` "cuda"
all of that is on the GPU (the skeleton materialises each part there, the calibration batches are
moved there, so the statistics are computed there); the CPU holds each tensor on its way from the
source to the GPU and from the GPU to the output shard.

For one pass, the layer-by-layer work is the pass's own (`Pass.run` runs the same `LayerJob`), so
the tensors equal the in-memory route's bit for bit. A chain differs from running its passes one
after another on the whole model in one way, on purpose: each pass calibrates on the hidden
states the whole chain produced upstream (a later pass's statistics see the earlier layers
already pruned *and* sparsified), which is the model that is written.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moeconv.calibrate import run_layerwise
from moeconv.context import Context
from moeconv.errors import ConfigError, PlanError, UnsupportedError
from moeconv.formats.part_writer import PartWriter
from moeconv.formats.quantized import write_generation_config
from moeconv.jobs.driver import JobResult, check_output, run_job
from moeconv.jobs.stream_output import StreamOutput
from moeconv.jobs.stream_quantize import group_bytes, measured
from moeconv.jobs.stream_report import compare_and_summarise
from moeconv.pass_base import Pass
from moeconv.pipeline import Pipeline
from moeconv.report_format import fmt_bytes
from moeconv.stream.activations import ActivationBudget
from moeconv.stream.allocator import prepare_streaming
from moeconv.stream.residency import StreamedLayers
from moeconv.stream.skeleton import Skeleton
from passes.quantize import Quantize


def why_not_streamed(passes: list[Pass], calibrated: bool) -> str | None:
    """Why `passes` cannot run as one streamed sweep (None when they can). Without calibration
    data the sweep runs no forward: data-free passes only (magnitude sparsify, a final quantize)."""
    if not passes:
        return "no pass"
    body = passes[:-1] if isinstance(passes[-1], Quantize) else passes
    if not calibrated and any("calibration" in p.contract().requires for p in body):
        return "the layer-by-layer passes need calibration data (--calib)"
    for p in body:
        if type(p).layer_job is Pass.layer_job:
            return f"{p.name} is not streamed (it works on the whole model)"
    if passes and isinstance(passes[-1], Quantize) and passes[-1].config.method not in ("int8", "nf4", "fp4"):
        return f"quantize {passes[-1].config.method} is not streamed"
    if any(getattr(p.config, "per_layer", None) == "global" for p in body):
        # scores every layer before pruning any: a second sweep; and refused anyway for the HF MoE
        # families a streamed source is (one expert count for every layer)
        return "prune-experts --per-layer global scores the whole model before pruning"
    return None


def run_streamed(src, out, passes: list[Pass], *, ctx: Context, force: bool = False,
                 extra_report: dict | None = None, extra_outputs=None, skeleton: Skeleton | None = None,
                 activation_budget: int | None = None, offload_dir: Path | None = None) -> dict:
    """Run `passes` on `src` (an HF safetensors checkpoint) in one streamed sweep into `out`;
    returns the report (each decoder layer is one shard). `extra_report`: more fields for
    report.json; `extra_outputs(state, tmp_dir) -> dict`: writes more files once the checkpoint is
    verified (e.g. a compressed form), its dict under report["extra_outputs"]; `skeleton`: `src`
    opened already (its config and headers checked before the calibration data was read);
    `ctx.device`: where each layer is calibrated, changed and compared (cpu, or cuda);
    `activation_budget`: bytes of calibration hidden states (the sweep's and the passes' copies) kept
    in memory, the rest written to `offload_dir` (default: inside the hidden temporary output
    directory) and read back a batch at a time (`moeconv.stream.activations`); None: no bound."""
    why = why_not_streamed(passes, ctx.calibration is not None)
    if why is not None:
        raise UnsupportedError(f"cannot stream this recipe: {why}")
    check_output(src, out, force=force)
    prepare_streaming()  # freed layers go back to the system, kernels kept bounded: memory flat with depth
    skel = (skeleton or Skeleton.open(Path(src))).on(ctx.device)
    body, quantize = (passes[:-1], passes[-1]) if isinstance(passes[-1], Quantize) else (passes, None)
    budget = ActivationBudget(activation_budget, offload_dir) if activation_budget is not None else None
    ctx = dataclasses.replace(ctx, activations=budget)
    _plan(skel, passes, ctx)
    jobs = [p.layer_job(skel.state(), ctx) for p in body]
    output = StreamOutput(skel, quantize.config if quantize else None)
    recipe = [{"pass": p.name, **p.config.model_dump()} for p in passes]

    def work(tmp: Path) -> JobResult:
        sweep = _Sweep(skel, jobs, output, PartWriter(tmp), ctx, names=[p.name for p in body])
        _run_sweep(sweep, budget, tmp)
        results = [sweep.timed(i, job.finish) for i, job in enumerate(jobs)]
        config, fmt, consumer = output.config()
        written = sweep.writer.finish(config)
        if consumer == "transformers":
            write_generation_config(skel.module, tmp)
        written.update({"format": fmt, "consumer": consumer, "route": "streaming",
                        "sharding": "one shard per decoder layer, the parts outside the layers in one more"})
        source = Skeleton.open(Path(src), device=ctx.device)
        compared = compare_and_summarise(source, output.reading(tmp), evaluation=ctx.evaluation,
                                         seed=ctx.seed, what="float source", progress=ctx.report_progress)
        reports = _pass_reports(results, quantize, skel, output, sweep.seconds)
        reports[-1].metrics.update(measured(compared["verification"]), model_bytes=written["bytes"])
        report = {"passes": [r.to_dict() for r in reports], "written": written, **compared, **(extra_report or {})}
        if budget is not None:  # (the budget itself is left out: it follows the memory free at the start)
            report["activations"] = {"spilled_peak_bytes": budget.spilled_bytes,
                                     "offload_dir": str(offload_dir) if offload_dir else "inside the temporary output"}
        if extra_outputs is not None:
            report["extra_outputs"] = extra_outputs(skel.state(), tmp)
        return JobResult(report, skel.state().source)
    return run_job(src, out, force=force, recipe=recipe, work=work)


def _run_sweep(sweep: _Sweep, budget: ActivationBudget | None, tmp: Path) -> None:
    """`sweep.run()`, its hidden states beyond `budget` in a directory of their own, removed after."""
    spill = _spill_dir(budget, tmp)
    try:
        sweep.run()
    finally:
        if spill is not None and spill.exists():
            shutil.rmtree(spill)  # the hidden states are deleted as the sweep goes; no stray file either


def _pass_reports(results, quantize: Quantize | None, skel: Skeleton, output: StreamOutput, seconds: list[float]):
    """Each pass's report (the final quantize's from what the sweep recorded), with its time.
    The passes share one sweep, so no pass has a wall time of its own: each row's time is what its
    own per-layer work took, summed over the layers (quantize: its selection and quantization of
    each final part); reading, writing and the comparison are in no row."""
    reports = [r.report for r in results]
    if quantize is not None:
        reports.append(_quantize_report(quantize, skel, output))
    for rep, spent in zip(reports, seconds + [output.quantize_seconds]):
        rep.metrics["route"] = "streaming"
        rep.seconds = round(spent, 4)
    return reports


def _spill_dir(budget: ActivationBudget | None, tmp: Path) -> Path | None:
    """Where the sweep writes hidden states beyond the budget: the user's `--offload-dir` (a
    directory of its own inside it, so nothing else there is touched), else inside the temporary
    output (removed with it if the run fails, and before it is published if it succeeds)."""
    if budget is None:
        return None
    base = budget.spill_dir if budget.spill_dir is not None else tmp
    budget.spill_dir = Path(tempfile.mkdtemp(prefix=".moeconv-activations-", dir=base))
    return budget.spill_dir


def _plan(skel: Skeleton, passes: list[Pass], ctx: Context) -> None:
    """The recipe's contract against the skeleton's facts, then each pass's `check` (the model
    as the recipe starts: the checks need only its structure and the calibration data)."""
    state = skel.state()
    plan = Pipeline(passes).plan(state.facts() | ctx.facts())
    if not plan.ok:
        raise PlanError(plan.problems)
    for p in passes:
        p.check(state, ctx)


class _Sweep:
    """One pass over the layers: every job's per-layer step, each final part checked and written."""

    TASK = "layers (read, changed, written)"

    def __init__(self, skel: Skeleton, jobs: list, output: StreamOutput, writer: PartWriter, ctx: Context,
                 names: list[str]):
        self.skel, self.jobs, self.output, self.writer, self.ctx = skel, jobs, output, writer, ctx
        self.names = names  # each job's pass, for progress
        self._index = 0  # the decoder layer being worked on
        sizes = {j.batch_size for j in jobs}
        if len(sizes) > 1:
            raise ConfigError("the streamed passes must share one batch_size (they run on the same batches)")
        # no calibration data: a data-free recipe, whose sweep reads, changes and writes each layer
        # without running it; the batches go where the layers are materialised
        self.batches = ([b.to(skel.device) for b in ctx.calibration.split(sizes.pop())]
                        if ctx.calibration is not None and sizes else [])
        self.seconds = [0.0] * len(jobs)  # each job's own time, summed over the layers (`timed`)

    def timed(self, i: int, step, *args):
        """`step(*args)`, its time added to job `i`'s."""
        t0 = time.perf_counter()
        try:
            return step(*args)
        finally:
            self.seconds[i] += time.perf_counter() - t0

    def run(self) -> None:
        if any(job.pre_sweeps() for job in self.jobs):
            raise UnsupportedError("internal: a pass that needs a sweep before its own is not streamed")
        run_layerwise(self.skel.module, self.batches, self._on_layer, after_layer=self._after_layer,
                      residency=StreamedLayers(self.skel, on_final=self._final),
                      progress=self._progress, activations=self.ctx.activations)

    def _progress(self, _task: str, done: int, total: int, now: str | None = None) -> None:
        """Layers done, with the pass at work (`now`; at a layer's start, its first pass) and the
        bytes written so far beside them. A log prints the first call of each layer."""
        now = now or (self.names[0] if done < total and self.names else None)
        written = f"{fmt_bytes(self.writer.bytes_written)} written"
        self.ctx.report_progress(self.TASK, done, total, detail=f"{now} · {written}" if now else written)

    def _on_layer(self, index, path, layer, forward) -> None:
        self._index = index
        for i, job in enumerate(self.jobs):
            self._progress(self.TASK, index, self.skel.num_layers, now=self.names[i])
            self.timed(i, job.on_layer, index, path, layer, forward)

    def _after_layer(self, index, path, layer, outputs) -> None:
        for i, job in enumerate(self.jobs):
            self.timed(i, job.after_layer, index, path, layer, outputs)

    @torch.no_grad()
    def _final(self, path: str | None, part) -> None:
        for i, job in enumerate(self.jobs):
            self.timed(i, job.part_checks, path, part)
        if path is not None:
            self._progress(self.TASK, self._index, self.skel.num_layers,
                           now="quantize and write" if self.output.quantized else "write")
        self.writer.write(self.output.tensors(path, part))


def _quantize_report(quantize: Quantize, skel: Skeleton, output: StreamOutput):
    """The quantize pass's report from the rows and sizes the sweep recorded."""
    rows = output.rows
    before = group_bytes(skel, output.groups, rows)
    after = group_bytes(skel, output.groups, rows, quantized=True)
    return quantize.build_report(rows, before, after, [], [], quantize.config.spec())
