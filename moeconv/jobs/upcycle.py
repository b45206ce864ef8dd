"""`upcycle_checkpoint`: the `moeconv upcycle SRC OUT` job — a dense checkpoint in, a verified MoE
checkpoint out, through the one job driver.

Two routes, same numbers for the same seed (both call `moeconv.expert_init`):
- **streaming** (HF family with safetensors → HF MoE family): the architecture is built on the
  `meta` device (no weights) to find the FFN sites; output tensors are planned up front and
  produced one at a time from the source shards (`moeconv.jobs.upcycle_stream`), so peak memory is
  about one layer's FFN plus one output tensor, whatever the model size or shard size.
- **in memory** (GGUF, built-in and other models, `router_init=hidden`, or `--format moeconv`):
  load → `Pipeline([Upcycle])` (its numeric check proves exactness) → write.

Either way every tensor is re-read and checked (checksummed; on the streaming route, compared
with the bytes produced, which are mostly source bytes copied by the kernel), the output is loaded
with the consumer users have (stock transformers or `moeconv.load`) and compared with the dense
model (`moeconv.verify`), and only then renamed into place.
"""
from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Literal

import torch

from moeconv.context import Context
from moeconv.errors import UnsupportedError, VerificationError
from moeconv.formats.hf import hf_config
from moeconv.formats.hf_moe import MoeFormat, check_representable, format_for, moe_config_dict, rename
from moeconv.formats.native import save_moeconv
from moeconv.formats.stream_writer import write_copying
from moeconv.formats.writer import module_source, write_checkpoint
from moeconv.io.config_checks import check_fits_disk, check_layers_present
from moeconv.io.json_files import read_json_object
from moeconv.io.load import load
from moeconv.io.safetensors_io import SourceCheckpoint
from moeconv.io.transformers_io import load_causal_lm, model_class
from moeconv.jobs.driver import JobResult, check_output, run_job
from moeconv.jobs.stream_report import upcycle_streamed_fields
from moeconv.jobs.upcycle_stream import streaming_source
from moeconv.patterns import find_ffn_sites
from moeconv.pipeline import Pipeline
from moeconv.sites import expert_rel_names, role_paths, select_sites
from moeconv.state import SourceInfo, model_outputs, vocab_size
from moeconv.stream.allocator import free_memory, module_bytes
from moeconv.summary import model_summary, summary_inputs
from moeconv.units import parse_size
from moeconv.verify import EXACT, check_inputs, compare_outputs, load_consumer
from passes.upcycle import Upcycle, UpcycleConfig

FormatChoice = Literal["auto", "hf", "moeconv"]
MAX_PLANNED_TENSORS = 2_000_000  # DeepSeek-V3 upcycled-size plans are ~50k
FULL_VERIFY_MAX_BYTES = 3 * 2**30  # functional check loads dense + MoE; above this, weights only


def upcycle_checkpoint(src, out, cfg: UpcycleConfig, *, fmt: FormatChoice = "auto", dtype: torch.dtype | None = None,
                       shard_size="5GB", force: bool = False, verify: Literal["auto", "full", "weights"] = "auto",
                       calibration: torch.Tensor | None = None, progress=None) -> dict:
    """Convert `src` to an MoE checkpoint at `out`; returns the report (also written as report.json)."""
    shard_bytes = parse_size(shard_size)
    src_path = Path(str(src)) if not str(src).startswith("builtin:") else None
    raw = None
    if src_path is not None and src_path.is_dir() and (src_path / "config.json").is_file():
        raw = read_json_object(src_path / "config.json")
    family = format_for(raw.get("model_type")) if raw and "moeconv" not in raw else None
    if fmt == "hf" and family is None:
        what = raw.get("model_type") if raw else str(src)
        raise UnsupportedError(f"--format hf: no Hugging Face MoE family for {what!r} (llama/mistral → Mixtral, "
                               "qwen2 → Qwen2-MoE, qwen3 → Qwen3-MoE); use --format moeconv")
    check_output(src, out, force=force)
    if family is not None and fmt != "moeconv":
        cfg = for_family(cfg, family)
    recipe = [{"pass": "upcycle", **cfg.model_dump()}]
    streaming = (family is not None and fmt != "moeconv" and cfg.router_init != "hidden"
                 and ((src_path / "model.safetensors").is_file() or (src_path / "model.safetensors.index.json").is_file()))

    def work(tmp: Path) -> JobResult:
        if streaming:
            return _stream_hf(src_path, raw, tmp, cfg, family, dtype, shard_bytes, verify, progress)
        return _in_memory(src, tmp, cfg, family if fmt != "moeconv" else None, dtype, shard_bytes,
                          calibration, progress, recipe)
    with _collector_paused() if streaming else contextlib.nullcontext():
        return run_job(src, out, force=force, recipe=recipe, work=work)


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off for a streamed job. The job imports transformers' modules
    and builds the skeleton and the plan (several hundred thousand objects that live to the end),
    then makes tensors that reference counting frees; left on, the collector walks all of those
    objects again at each full collection (0.8 s of the 14 s a 1.4 GB Llama to 8 experts took).
    The cycles made meanwhile (~40k objects, ~10 MB: mostly left by tracing the skeleton) are
    collected once it is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def for_family(cfg: UpcycleConfig, family: MoeFormat) -> UpcycleConfig:
    """`cfg` for writing `family`: an unset `shared_experts` follows it (`UpcycleConfig.for_family`);
    `--no-shared-experts` for a family that always has one is refused, with the way out."""
    if family.shared_expert and "shared_experts" in cfg.model_fields_set and not cfg.shared_experts:
        raise UnsupportedError(f"{family.architecture} always has a shared expert, so an MoE without one cannot be "
                               "written as it exactly: leave out --no-shared-experts (the shared expert is then added "
                               "by itself) or use --format moeconv")
    return cfg.for_family(family.shared_expert)


def shared_expert_note(cfg: UpcycleConfig, family: MoeFormat | None) -> str | None:
    """The summary's word on a shared expert the job chose (None when there is none)."""
    if not cfg.shared_experts:
        return None
    if family is not None and family.shared_expert:
        return (f"added by itself: {family.architecture} always has one; it copies the FFN behind a closed gate "
                "(sigmoid 0.5) and the routed experts are scaled by 0.5, so the sum is the dense FFN")
    return "as asked: a copy of the FFN behind a closed gate, the routed experts scaled by 0.5"


# ----------------------------------------------------------------------------- in memory


def _in_memory(src, tmp: Path, cfg: UpcycleConfig, family: MoeFormat | None, dtype, shard_bytes,
               calibration, progress, recipe: list[dict]) -> JobResult:
    state = load(src, dtype=dtype)
    if family is None and state.config is not None:
        family = format_for(getattr(state.config, "model_type", None)) if state.source.kind == "gguf" else None
        if family is not None:  # a GGUF's family is known once it is read: the recorded recipe follows
            cfg = for_family(cfg, family)
            recipe[0] = {"pass": "upcycle", **cfg.model_dump()}
    sites = find_ffn_sites(state.module)
    chosen = select_sites(sites, cfg.targets, cfg.ignore)
    if family is not None:
        _check_family(family, state.config.to_dict(), cfg, sites, chosen)
    source_info = state.source
    input_summary = model_summary(state, None)  # the dense model, before the pass changes it in place
    result = Pipeline([Upcycle(cfg)]).run(state, Context(calibration=calibration, seed=cfg.seed, progress=progress))
    state = result.state
    pass_report = result.report.passes[0]
    on_tensor = _tensor_progress(progress, len(state.module.state_dict()))
    if family is not None:
        stats = _write_family(state, tmp, cfg, family, sites, chosen, shard_bytes, on_tensor)
        consumer = f"transformers.AutoModelForCausalLM ({family.architecture})"
    else:
        stats = save_moeconv(state, tmp, shard_bytes=shard_bytes, on_tensor=on_tensor)
        consumer = "moeconv.load"
    report = {"route": "in-memory", "format": family.name if family else "moeconv", "consumer": consumer,
              "upcycle": pass_report.to_dict(), "written": stats, "shared_expert": shared_expert_note(cfg, family)}
    report["params"] = {"before": pass_report.metrics["params_before"], "after": pass_report.metrics["params_after"],
                        "active_after": pass_report.metrics["active_params_after"]}
    report.update(passes=[pass_report.to_dict()], input_model=input_summary,  # report.html's table and plots
                  model=model_summary(state, summary_inputs(state, cfg.seed, calibration)))
    # Reload with the consumer and compare against the in-memory MoE model (itself checked
    # against the dense model by the pass's numeric check). Its outputs are computed first and the
    # model is freed, so it is never in memory beside the reloaded copy (SmolLM2 as a 4-expert
    # MoE: 1.4 GB each, plus the pages of the file being read).
    vocab = vocab_size(state.module, state.config)
    reference = _reference_outputs(state.module, vocab, cfg.seed)
    held = module_bytes(state.module)
    del state, result
    free_memory(held)
    report["verification"] = _verify_reload(tmp, reference, family, cfg, vocab=vocab, exact=True, what="in-memory MoE")
    report["verification"]["dense_vs_moe_rel_max_diff"] = pass_report.metrics.get("rel_max_diff")
    return JobResult(report, source_info)


def _write_family(state, tmp: Path, cfg: UpcycleConfig, family: MoeFormat, sites, chosen, shard_bytes,
                  on_tensor) -> dict:
    dense = state.config.to_dict()
    config = moe_config_dict(family, dense, **_moe_args(cfg, sites, chosen, dense))
    site_paths = [s.path for _, s in chosen]
    roles = expert_rel_names(chosen[0][1])
    target_dtype = _config_dtype(config) or next(state.module.parameters()).dtype

    def cast(name, t):  # routers are fp32 in memory; HF families keep them in the model dtype
        return t.to(target_dtype) if t.is_floating_point() and t.dtype != target_dtype else t
    source = module_source(state.module, lambda n: rename(family, site_paths, roles, n), cast)
    stats = write_checkpoint(tmp, source, config, shard_bytes=shard_bytes, on_tensor=on_tensor)
    stats["notes"] = source.notes
    return stats


def _tensor_progress(progress, total: int | None = None):
    if progress is None:
        return None
    counter = {"n": 0}

    def on_tensor(spec):
        counter["n"] += 1
        progress("write tensors", counter["n"], total)
    return on_tensor


def _config_dtype(config: dict) -> torch.dtype | None:
    d = config.get("dtype") or config.get("torch_dtype")
    if isinstance(d, str) and hasattr(torch, d):
        return getattr(torch, d)
    return None


def _check_family(family: MoeFormat, dense: dict, cfg: UpcycleConfig, sites, chosen) -> None:
    check_representable(family, dense, layers_selected=len(chosen), layers_total=len(sites),
                        renormalize=cfg.renormalize, top_k=cfg.top_k, num_experts=cfg.num_experts,
                        router_bias=cfg.router_bias, shared_experts=cfg.shared_experts,
                        kinds={s.kind for _, s in chosen})


def _moe_args(cfg: UpcycleConfig, sites, chosen, dense: dict) -> dict:
    inter = chosen[0][1].intermediate_size
    chosen_idx = {i for i, _ in chosen}
    return {"num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "expert_intermediate": inter // cfg.num_experts if cfg.expert_init == "split" else inter,
            "dense_layers": [i for i in range(len(sites)) if i not in chosen_idx],
            "renormalize": cfg.renormalize, "shared_intermediate": inter if cfg.shared_experts else None}


# ----------------------------------------------------------------------------- streaming


def _stream_hf(src: Path, raw: dict, tmp: Path, cfg: UpcycleConfig, family: MoeFormat, dtype, shard_bytes,
               verify, progress) -> JobResult:
    ckpt = SourceCheckpoint(src)
    config = hf_config(src, raw)
    check_layers_present(src / "config.json", raw, ckpt.specs)  # before a skeleton of that many layers
    with torch.device("meta"):
        meta_model = model_class(config)(config)
    sites = find_ffn_sites(meta_model)
    chosen = select_sites(sites, cfg.targets, cfg.ignore)
    dense_dict = config.to_dict()
    _check_family(family, dense_dict, cfg, sites, chosen)
    _check_stream_plan(ckpt, tmp, cfg, chosen)
    if dtype is not None:
        dense_dict["dtype"] = str(dtype).replace("torch.", "")
    moe_cfg = moe_config_dict(family, dense_dict, **_moe_args(cfg, sites, chosen, dense_dict))
    source, accounting = streaming_source(ckpt, meta_model, chosen, cfg, family, dtype)
    stats = write_copying(tmp, source, moe_cfg, shard_bytes=shard_bytes,
                          on_tensor=_tensor_progress(progress, len(source.specs)))
    stats["notes"] = source.notes
    report = {"route": "streaming", "format": family.name,
              "consumer": f"transformers.AutoModelForCausalLM ({family.architecture})",
              "upcycle": {"sites_found": len(sites), "sites_converted": len(chosen),
                          "sites": [s.path for _, s in chosen]},
              "written": stats, "source_tensors": accounting, "shared_expert": shared_expert_note(cfg, family)}
    src_bytes = sum(s.nbytes for s in ckpt.specs.values())
    mode = verify if verify != "auto" else ("full" if stats["bytes"] + src_bytes <= FULL_VERIFY_MAX_BYTES else "weights")
    n_dense = None
    if mode == "full":
        # The reference is the dense model with its weights rounded to the output dtype (when
        # --dtype casts), so the check measures the upcycling, not the requested cast.
        dense = load_causal_lm(src, dtype=dtype or torch.float32).float().eval()
        report["verification"] = _verify_reload(tmp, dense, family, cfg, vocab=config.vocab_size,
                                                exact=cfg.is_exact(), what="dense source")
        n_dense = sum(p.numel() for p in dense.parameters())
        del dense
    else:
        report["verification"] = {"mode": "weights", "detail": "every tensor re-read and compared; functional "
                                  "check skipped above {:.1f} GiB (use --verify full)".format(FULL_VERIFY_MAX_BYTES / 2**30)}
    report["params"] = {"before": n_dense, "after": sum(int(torch.Size(s.shape).numel()) for s in source.specs)}
    report.update(upcycle_streamed_fields(report, tmp, cfg.seed))  # report.html's table and plots
    return JobResult(report, SourceInfo("hf", src, tokenizer_dir=src))


def _check_stream_plan(ckpt: SourceCheckpoint, tmp: Path, cfg: UpcycleConfig, chosen) -> None:
    """Refuse, from the headers alone, what would not fit on disk or in the plan."""
    if cfg.expert_init == "split":
        for _, s in chosen:
            if s.intermediate_size % cfg.num_experts:
                raise UnsupportedError(f"split needs num_experts to divide the intermediate size ({s.intermediate_size})")
    # The expert copies' bytes, from the headers alone: before planning millions of tensors.
    copies = (1 if cfg.expert_init == "split" else cfg.num_experts) + int(cfg.shared_experts)
    ffn_bytes = sum(ckpt.specs[f"{p}.weight"].nbytes for _, s in chosen for p in role_paths(s).values()
                    if f"{p}.weight" in ckpt.specs)
    check_fits_disk(tmp, sum(s.nbytes for s in ckpt.specs.values()) + ffn_bytes * (copies - 1))
    planned = len(ckpt.specs) + copies * sum(len(role_paths(s)) + 1 for _, s in chosen)
    if planned > MAX_PLANNED_TENSORS:  # each planned tensor costs memory before any byte moves
        raise UnsupportedError(f"upcycle: {cfg.num_experts} experts × {len(chosen)} FFNs would write {planned:,} "
                               f"tensors; at most {MAX_PLANNED_TENSORS:,} are planned in one run")


# ----------------------------------------------------------------------------- verification


def _reference_outputs(module: torch.nn.Module, vocab: int | None, seed: int) -> torch.Tensor:
    """The outputs `_verify_reload` compares the reloaded model with (in fp32; cast back after:
    bf16 → fp32 → bf16 is exact)."""
    if vocab is None:
        raise VerificationError("cannot find the vocabulary size to build check inputs")
    dtype = next(module.parameters()).dtype
    try:
        return model_outputs(module.float(), check_inputs(vocab, seed + 1)).float()
    finally:
        if dtype != torch.float32:
            module.to(dtype)


def _verify_reload(tmp: Path, reference: torch.nn.Module | torch.Tensor, family: MoeFormat | None,
                   cfg: UpcycleConfig, *, vocab: int | None, exact: bool, what: str) -> dict:
    """Load what was written with the consumer users have and compare outputs with `reference`
    (a model, or its `_reference_outputs`)."""
    if not isinstance(reference, torch.Tensor):
        reference = _reference_outputs(reference, vocab, cfg.seed)
    if family is not None:
        reloaded = load_consumer(tmp, "transformers", family.architecture)
    else:
        reloaded = load_consumer(tmp, "moeconv")
    result = compare_outputs(reference, reloaded.float(), check_inputs(vocab, cfg.seed + 1),
                             tolerance=EXACT if exact else None, what=what)
    return {"mode": "full", **result, "exact_promised": exact}
