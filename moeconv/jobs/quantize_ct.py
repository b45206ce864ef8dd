"""`moeconv quantize SRC OUT --method w4a16|w8a16|fp8`: a compressed-tensors checkpoint (the format
vLLM, SGLang and transformers load), published only after stock transformers reloaded it.

Checks, in order: the source is a float Hugging Face causal LM (dense, or an MoE family
transformers has: Mixtral, Qwen2-MoE, Qwen3-MoE) and not already quantized; every targeted
matrix's width fits the group. Then round-to-nearest in memory (`compressed_tensors_io`), the
output error against the float model measured (relative max |Δlogits|, KL, top-1), the compressed
tensors written under the family's own names and re-read and checksummed, and the directory loaded
with `transformers.AutoModelForCausalLM.from_pretrained`: no missing or unexpected weight, its
logits equal to the in-memory quantized model's (relative ≤ 1e-5), its routers bit-identical to
the source's. vLLM (GPU) is the serving engine the format is for; it is not run here.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from moeconv.errors import InputError, UnsupportedError, VerificationError
from moeconv.jobs.driver import JobResult, check_output, run_job
from moeconv.state import model_outputs
from moeconv.summary import model_summary, summary_inputs

EXACT = 1e-5
DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# Copies of the weights the in-memory route holds at its peak, × the float32 weights: the loaded model,
# the copy compressed-tensors compresses, transformers' reload and its decompression buffers (not
# measured; an upper bound from what is held).
HELD_COPIES = 4.0


def plan(src, max_memory: str | None = None):
    """The estimated peak memory, refused over `--max-memory` (or the memory available) before
    any weight is read (`moeconv.memory_plan`)."""
    from moeconv.memory_plan import CHECK, RUNTIME, RUNTIME_BYTES, WEIGHTS, MemoryPlan, refuse_over, source_size
    size = source_size(src)
    f32 = size.model.float32_bytes
    parts = {RUNTIME: RUNTIME_BYTES, WEIGHTS: f32, "compressed copy": f32, CHECK: int((HELD_COPIES - 2) * f32)}
    memory = MemoryPlan(total=sum(parts.values()), parts=parts, peak="during the reload check", source=size.name,
                        fixes=["a machine with more memory (this route holds the whole model)"])
    return refuse_over(memory, max_memory)


def quantize_ct_to_dir(src, out, *, method: str, group_size: int | None = None, symmetric: bool | None = None,
                       algorithm: str = "rtn", calibration: torch.Tensor | None = None, force: bool = False,
                       seed: int = 0, shard_bytes: int = 5 * 10**9, max_memory: str | None = None,
                       progress=None) -> dict:
    """`calibration`: (rows, seq) token ids, needed by `algorithm="gptq"`."""
    from moeconv.errors import ConfigError
    from moeconv.formats.compressed_tensors_io import weight_args
    args = weight_args(method, group_size, symmetric)  # refused before anything is read
    if algorithm not in ("rtn", "gptq"):
        raise ConfigError(f"quantize: --algorithm must be rtn or gptq, not {algorithm!r}")
    if algorithm == "gptq" and calibration is None:
        raise ConfigError("quantize --algorithm gptq needs calibration text: --calib FILE")
    check_output(src, out, force=force)
    memory = plan(src, max_memory)
    recipe = [{"pass": "quantize", "method": method, "algorithm": algorithm, "format": "compressed-tensors",
               "weights": args.model_dump(exclude_none=True, mode="json")}]
    return run_job(src, out, force=force, recipe=recipe,
                   work=lambda tmp: _with_plan(_work(src, tmp, method, args, seed, shard_bytes, algorithm, calibration,
                                                     progress), memory))


def _with_plan(result: JobResult, memory) -> JobResult:
    result.report["memory_plan"] = memory.to_dict()
    return result


def _work(src, tmp: Path, method: str, args, seed: int, shard_bytes: int, algorithm: str = "rtn",
          calibration: torch.Tensor | None = None, progress=None) -> JobResult:
    from moeconv import load
    from moeconv.formats.compressed_tensors_io import compressed_state_dict, quantize_rtn
    from moeconv.formats.quantized import write_generation_config
    from moeconv.formats.writer import TensorSource, write_checkpoint
    from moeconv.io.safetensors_io import TensorSpec
    from moeconv.stream.compare import compare_logits
    from moeconv.verify import check_inputs
    state = load(src)
    rename, family = _names(state)
    module = state.module.eval()
    inputs = check_inputs(int(state.config.vocab_size), seed + 1)
    routers = _routers(module, rename)
    load_inputs = summary_inputs(state, seed, calibration)
    input_summary = model_summary(state, load_inputs)  # quantization changes the module in place
    t0 = time.perf_counter()
    with torch.no_grad():
        float_logits = model_outputs(module, inputs).float()
    if algorithm == "gptq":
        from moeconv.gptq import quantize_gptq
        q = quantize_gptq(module, method, args, calibration, progress=progress)
    else:
        q = quantize_rtn(module, method, args)
    with torch.no_grad():
        quant_logits = model_outputs(module, inputs).float()
    error = {**compare_logits([float_logits], [quant_logits], tolerance=None, what="float model"),
             "mode": "in memory, before writing"}
    tensors, qconfig = compressed_state_dict(module, q)
    tensors = {rename(k): v for k, v in tensors.items()}
    config = state.config.to_dict()
    config["quantization_config"] = qconfig
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    written = write_checkpoint(tmp, TensorSource(specs, lambda s: tensors[s.name], []), config, shard_bytes=shard_bytes)
    write_generation_config(module, tmp)
    reload = _reload(tmp, inputs, quant_logits, routers)
    report = {"format": "compressed-tensors", "consumer": "transformers.AutoModelForCausalLM; served by vLLM "
              "(not run here: no GPU)", "family": family, "method": method, "algorithm": algorithm,
              "weights": args.model_dump(exclude_none=True, mode="json"),
              "quantized_modules": len(q.qparams), "float_modules": q.ignored,
              "zeros": {"before": q.zeros_before, "kept": q.zeros_after_of_those},
              "error_vs_float": error, "written": written, "verification": reload,
              "input_model": input_summary, "model": model_summary(state, load_inputs)}
    report["passes"] = [_pass_report(report, method, algorithm, time.perf_counter() - t0).to_dict()]
    if q.zeros_after_of_those != q.zeros_before:  # symmetric schemes map 0 to 0: a 2:4 pattern must survive
        raise VerificationError(f"{q.zeros_before - q.zeros_after_of_those} of {q.zeros_before} exact zeros became "
                                "non-zero under a symmetric scheme")
    warnings = []
    if algorithm == "gptq":
        from moeconv.gptq import MIN_TOKENS
        report["gptq"] = {"calibration_tokens": int(calibration.numel()), "seconds": round(q.seconds, 2),
                          "fallback": q.fallback, "min_tokens": MIN_TOKENS}
        if q.fallback:
            warnings.append(f"{len(q.fallback)} expert matrices received too few calibration tokens and were "
                            f"calibrated on their MoE block's inputs (first: {q.fallback[0]})")
    return JobResult(report, state.source, warnings=warnings)


def _pass_report(report: dict, method: str, algorithm: str, seconds: float):
    """The job as one row of the report's pass table: the error against the float model, measured in
    memory before writing, and the bytes written."""
    from moeconv.report import PassReport
    e = report["error_vs_float"]
    metrics = {"method": method, "algorithm": algorithm, "max_abs_diff": e["max_abs_diff"],
               "rel_max_diff": e["rel_max_diff"], "kl": e["kl"], "top1_agreement": e["top1_agreement"],
               "model_bytes": report["written"]["bytes"]}
    summary = (f"{report['quantized_modules']} matrices → {method} ({algorithm}, compressed-tensors), "
               f"{len(report['float_modules'])} left in float")
    return PassReport("quantize", summary=summary, metrics=metrics, seconds=round(seconds, 2))


def _names(state):
    """(module name → the family's on-disk name, family name): an MoE family transformers has, or a
    dense model whose names are its own."""
    from moeconv.formats.hf_moe import FAMILIES, gated_rename
    from moeconv.nn.moe import MoEBlock
    if "quantized" in state.facts() or getattr(state.config, "quantization_config", None):
        raise InputError("quantize: the model is already quantized; start from its float checkpoint")
    cfg = state.config
    model_type = getattr(cfg, "model_type", None)
    moe_paths = [p for p, m in state.module.named_modules() if isinstance(m, MoEBlock)]
    if not moe_paths:
        if model_type not in DENSE_TYPES:
            raise UnsupportedError(f"quantize --method w4a16|w8a16|fp8: {model_type or 'this model'} is not one of "
                                   f"{', '.join(DENSE_TYPES)} or an MoE family transformers has")
        return (lambda n: n), model_type
    fmt = next((f for f in FAMILIES.values() if f.target_type == model_type), None)
    if fmt is None:
        raise UnsupportedError(f"quantize --method w4a16|w8a16|fp8: an MoE of type {model_type!r} has no "
                               "transformers family to write compressed-tensors for (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    return (lambda n: gated_rename(fmt, moe_paths, n)), fmt.name


def _routers(module, rename) -> dict[str, torch.Tensor]:
    """The source's router weights under their on-disk names (bit-identity is checked on reload)."""
    from moeconv.nn.moe import MoEBlock
    return {rename(f"{p}.router.weight"): m.router.weight.detach().clone()
            for p, m in module.named_modules() if isinstance(m, MoEBlock)}


def _reload(out: Path, inputs, quant_logits, routers: dict[str, torch.Tensor]) -> dict:
    from moeconv.io.transformers_io import load_causal_lm_with_info
    from moeconv.stream.compare import compare_logits
    try:
        model, info = load_causal_lm_with_info(out)
    except Exception as exc:  # the consumer cannot load what was written: nothing is published
        raise VerificationError(f"stock transformers could not load the compressed-tensors output "
                                f"({exc.__class__.__name__}: {' '.join(str(exc).split())[:160]})") from None
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    if missing or unexpected:
        raise VerificationError(f"transformers reloaded {out.name} with missing weights {missing[:3]} and unexpected "
                                f"{unexpected[:3]}")
    with torch.no_grad():
        got = model_outputs(model.eval(), inputs).float()
    result = {**compare_logits([quant_logits], [got], tolerance=EXACT, what="in-memory quantized model"),
              "mode": "the written directory loaded by stock transformers"}
    from safetensors import safe_open
    bit_identical = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for name in fh.keys():
                if name in routers:
                    if not torch.equal(fh.get_tensor(name), routers[name].to(fh.get_tensor(name).dtype)):
                        raise VerificationError(f"{name}: the written router differs from the source's")
                    bit_identical += 1
    if bit_identical != len(routers):
        raise VerificationError(f"{len(routers) - bit_identical} router(s) not found in the written files")
    return {**result, "consumer_class": type(model).__name__, "missing": 0, "unexpected": 0,
            "routers_bit_identical": bit_identical}
