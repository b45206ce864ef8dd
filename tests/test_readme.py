"""The README's examples run as written: every ```python block (its placeholder paths pointed at
a tiny Llama with a tokenizer and a calibration text), and the onnxruntime generation loop of the
`export onnx` section, which must produce PyTorch's greedy tokens."""
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT / "tests" / "formats"))
from gguf_models import bpe_tokenizer, native  # noqa: E402

VOCAB = 300  # the byte-level BPE tokenizer's size: "Hello" and the calibration text tokenize for real


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def bullet_block(marker: str) -> str:
    """The ```py block of a README bullet that contains `marker`, with the bullet's indent removed."""
    block = next(b for b in re.findall(r"```py\n(.*?)```", README.read_text(), re.S) if marker in b)
    return "\n".join(line[2:] if line.startswith("  ") else line for line in block.splitlines())


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks()
    assert blocks, "README has no Python example"
    llama = native("llama", tmp_path / "llama", vocab=VOCAB)
    bpe_tokenizer(llama, VOCAB)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    paths = {'"path/to/llama"': llama, '"calib.txt"': tmp_path / "calib.txt",
             '"llama-moe"': tmp_path / "llama-moe"}
    ran_chain = False
    for code in blocks:
        for placeholder, path in paths.items():
            code = code.replace(placeholder, repr(str(path)))
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
        if "calibration_tokens" in code:  # the load → every pass → save → reload block
            ran_chain = True
            from moeconv import ModelState
            assert isinstance(scope["state"], ModelState) and isinstance(scope["moe"], ModelState)
            assert scope["calib"].shape == (8, 32)
            assert [p["pass_name"] for p in scope["report"]["passes"]] == [
                "upcycle", "prune-experts", "sparsify", "quantize"]
            assert (tmp_path / "llama-moe" / "report.json").is_file()
    assert ran_chain, "README has no calibrated pass chain example"


@pytest.fixture(scope="module")
def exported_with_past(tmp_path_factory):
    """A tiny grouped-query Mixtral (4 heads, 2 KV heads: optimum's #21 case) with a byte-level BPE
    tokenizer, exported with `--with-past` as the CLI does."""
    from moeconv.jobs.export_onnx import export_onnx_to_dir
    from passes.export_onnx import ExportOnnxConfig
    root = tmp_path_factory.mktemp("readme-onnx")
    src = native("mixtral", root / "mixtral", vocab=VOCAB)
    bpe_tokenizer(src, VOCAB)
    export_onnx_to_dir(src, root / "onnx", ExportOnnxConfig(with_past=True, latency_runs=0))
    return src, root / "onnx"


def torch_greedy(src: Path, prompt: list[int], n: int, eos: int) -> list[int]:
    """transformers' greedy tokens (no cache: every step recomputes the whole sequence), up to
    and including the first `eos`."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    seq, out = torch.tensor([prompt]), []
    with torch.no_grad():
        while len(out) < n and (not out or out[-1] != eos):
            out.append(int(model(input_ids=seq, use_cache=False).logits[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[out[-1]]])], dim=1)
    return out


def test_the_readme_onnxruntime_loop_generates_pytorchs_greedy_tokens(exported_with_past, capsys):
    src, out = exported_with_past
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    code = bullet_block("onnxruntime as ort").replace('"OUT', '"' + str(out))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    tok, tokens = scope["tok"], scope["tokens"]
    prompt = tok("Hello").input_ids
    assert tokens == torch_greedy(src, prompt, 20, tok.eos_token_id)
    assert capsys.readouterr().out.strip() == tok.decode(tokens).strip()
