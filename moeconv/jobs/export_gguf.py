"""`moeconv export gguf SRC OUT`: OUT/model.gguf for llama.cpp / Ollama, with OUT/Modelfile,
report.json and report.html, published only after it was read back and checked.

Checks, in order:
1. `gguf_export.collect` refuses what llama.cpp would compute differently (one line, exit 2,
   nothing written);
2. the written file is read back with the gguf package's reader: every tensor present with the
   planned name, shape and type;
3. with llama.cpp's Python binding installed (`llama_cpp`), the same token ids are evaluated in
   llama.cpp and in PyTorch (the model as loaded, fp32): relative max |Δlogits| (max |Δ| over the
   largest |logit|) and top-1 agreement on several inputs; over `tolerance` (or top-1 under
   `min_top1`) the export fails, keeps its files in OUT.failed/ and exits 2. Without llama.cpp the
   report says the check was skipped, never that it passed.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from moeconv.errors import InputError, ReportedVerificationError, UnsupportedError
from moeconv.jobs.driver import JobResult, check_output, run_job

# Default gates per type: relative max |Δlogits| and top-1 agreement against PyTorch (fp32). A
# layout mistake gives O(1) errors and chance agreement (1/vocab). Lossy types are gated on top-1
# only: in an MoE a token whose top-k experts nearly tie is routed elsewhere by small rounding,
# and its logits then differ by O(1) (measured on a random 1-layer Mixtral: q8_0 0.45, bf16 0.52
# relative, top-1 96-97%; f32 7e-7, f16 1.4e-3 with 99%).
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 1.0, "q8_0": 1.0, "q5_0": 1.0, "q5_1": 1.0, "q4_0": 1.0, "q4_1": 1.0}
MIN_TOP1 = {"f32": 0.99, "f16": 0.95, "bf16": 0.9, "q8_0": 0.9, "q5_0": 0.5, "q5_1": 0.5, "q4_0": 0.3, "q4_1": 0.3}
CHECK_INPUTS = 4  # sequences of token ids evaluated in both engines
CHECK_LEN = 24


def export_gguf_to_dir(src, out, *, gguf_type: str = "f16", tolerance: float | None = None,
                       min_top1: float | None = None, force: bool = False, seed: int = 0) -> dict:
    """Write OUT (see module docstring); returns the report."""
    from moeconv.formats.gguf_export import TYPES
    if gguf_type not in TYPES:
        raise InputError(f"--type must be one of {', '.join(TYPES)}, not {gguf_type!r}")
    check_output(src, out, force=force)
    tol = TOLERANCE[gguf_type] if tolerance is None else tolerance
    top1 = MIN_TOP1[gguf_type] if min_top1 is None else min_top1
    recipe = [{"pass": "export-gguf", "type": gguf_type, "tolerance": tol, "min_top1": top1}]
    return run_job(src, out, force=force, recipe=recipe,
                   work=lambda tmp: _work(src, tmp, gguf_type, tol, top1, seed))


def _work(src, tmp: Path, gguf_type: str, tol: float, top1: float, seed: int) -> JobResult:
    from moeconv import load
    from moeconv.formats.gguf_export import collect, write_gguf
    state = load(src)
    if state.config is None or not hasattr(state.config, "num_hidden_layers"):
        raise UnsupportedError(f"export gguf: {src} is not a Hugging Face causal LM (Llama, Mistral, Mixtral, "
                               "Qwen2/3, Qwen2/3-MoE)")
    t0 = time.perf_counter()
    model = collect(state.module, state.config)
    vocab = _vocab(state, int(state.config.vocab_size))
    path = tmp / "model.gguf"
    written = write_gguf(path, model, gguf_type, vocab, name=Path(str(src)).name)
    read_back = _read_back(path, model, gguf_type)
    check = _llama_cpp_check(path, state.module, int(state.config.vocab_size), tol, top1, seed)
    (tmp / "Modelfile").write_text("FROM ./model.gguf\n")
    report = {"format": "gguf", "architecture": model.arch, "type": gguf_type, "written": written,
              "read_back": read_back, "tokenizer": {"kind": vocab.kind, "notes": vocab.notes},
              "verification": check}
    report["passes"] = [_pass_report(model.arch, gguf_type, written, check, time.perf_counter() - t0).to_dict()]
    warnings = list(written["notes"]) + list(vocab.notes)
    if check.get("status") == "skipped":
        warnings.append(check["detail"])
    if check.get("status") == "failed":
        exc = ReportedVerificationError(check["detail"], {"name": "export-gguf", "metrics": report})
        exc.what = "llama.cpp check"
        raise exc
    return JobResult(report, state.source, warnings=warnings)


def _pass_report(arch: str, gguf_type: str, written: dict, check: dict, seconds: float):
    """The export as one row of the report's pass table: llama.cpp's measured difference from
    PyTorch (none when the check was skipped) and the file written."""
    from moeconv.report import PassReport
    metrics = {"type": gguf_type, "bytes": written["bytes"], "files": ["model.gguf"]}
    if check.get("status") != "skipped":
        metrics.update(rel_max_diff=check["relative_max_abs_diff"], max_abs_diff=check["max_abs_diff"],
                       kl=check["kl"], top1_agreement=check["top1_agreement"])
    return PassReport("export-gguf", summary=f"{arch} → model.gguf ({gguf_type}); {check['detail']}",
                      metrics=metrics, seconds=round(seconds, 2))


def _vocab(state, n_vocab: int):
    from moeconv.formats import gguf_vocab
    src = state.source
    if src.kind == "gguf" and src.path is not None:
        return gguf_vocab.from_gguf(Path(src.path))
    tok_dir = src.tokenizer_dir or (src.path if src.path is not None and Path(src.path).is_dir() else None)
    if tok_dir is None:
        return gguf_vocab.GgufVocab("none", notes=["no tokenizer with the model: the GGUF evaluates token ids only"])
    return gguf_vocab.from_directory(Path(tok_dir), n_vocab)


def _read_back(path: Path, model, gguf_type: str) -> dict:
    """Every planned tensor in the file, with its name, shape (GGUF order: reversed) and type."""
    import gguf

    from moeconv.errors import VerificationError
    from moeconv.formats.gguf_export import qtype, tensor_type
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    for name, tensor in model.tensors:
        t = found.pop(name, None)
        want = qtype(tensor_type(name, tensor, gguf_type, model.routers)[0])
        if t is None:
            raise VerificationError(f"{path.name}: {name} is missing when read back")
        if tuple(int(d) for d in t.shape) != tuple(reversed(tensor.shape)) or t.tensor_type != want:
            raise VerificationError(f"{path.name}: {name} read back as {t.tensor_type.name}{list(t.shape)}, "
                                    f"written as {want.name}{list(reversed(tensor.shape))}")
    if found:
        raise VerificationError(f"{path.name}: unplanned tensors read back ({sorted(found)[:3]})")
    return {"tensors": len(model.tensors), "reader": f"gguf {getattr(gguf, '__version__', '')}".strip()}


def _llama_cpp_check(path: Path, module: torch.nn.Module, vocab: int, tol: float, min_top1: float, seed: int) -> dict:
    """llama.cpp against PyTorch on the same token ids (see module docstring)."""
    try:
        import llama_cpp
    except ImportError:
        return {"status": "skipped", "detail": "llama.cpp check skipped: llama_cpp (pip install llama-cpp-python) is "
                                               "not installed; the file was read back, not run"}
    import numpy as np
    g = torch.Generator().manual_seed(seed + 1)
    inputs = [torch.randint(0, vocab, (CHECK_LEN,), generator=g) for _ in range(CHECK_INPUTS)]
    # KV cache in F32 (llama.cpp defaults to F16): the check measures the file, not the cache's rounding
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CHECK_LEN + 8, logits_all=True, verbose=False,
                          n_threads=max(1, torch.get_num_threads()), seed=seed,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    worst, agree, total, biggest, kl = 0.0, 0, 0, 0.0, 0.0
    module = module.float().eval()
    try:
        for ids in inputs:
            llm.reset()
            llm.eval(ids.tolist())
            got = torch.from_numpy(np.array(llm.scores[:CHECK_LEN], dtype=np.float32))
            with torch.no_grad():
                out = module(input_ids=ids[None], use_cache=False)
            ref = (out.logits if hasattr(out, "logits") else out)[0].float()
            worst = max(worst, float((got - ref).abs().max()))
            biggest = max(biggest, float(ref.abs().max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            kl += float(torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                   reduction="sum"))
            total += CHECK_LEN
    finally:
        llm.close() if hasattr(llm, "close") else None
    rel = worst / max(biggest, 1e-30)
    top1 = agree / total
    ok = rel <= tol and top1 >= min_top1 and math.isfinite(rel)
    result = {"status": "passed" if ok else "failed", "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
              "inputs": CHECK_INPUTS, "tokens": total, "relative_max_abs_diff": rel, "max_abs_diff": worst,
              "top1_agreement": top1, "kl": max(kl / total, 0.0), "tolerance": tol, "min_top1": min_top1}
    result["detail"] = (f"llama.cpp vs PyTorch on {total} tokens: relative max |Δlogits| {rel:.3g} "
                        f"(bound {tol:g}), top-1 agreement {top1:.1%} (at least {min_top1:.0%})")
    return result
