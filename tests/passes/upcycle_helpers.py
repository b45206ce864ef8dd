"""Tiny dense models, checkpoints and checks shared by the upcycle tests (tests/passes/).

Self-contained on purpose (no dependency on other test helpers): every model is built from a
config in code (hidden 32, intermediate 64, vocab 128, 2 layers unless asked), with weights
re-drawn at O(1) output scale so that "logits match within 1e-5" is a real check, not a
comparison of near-zero numbers.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

HIDDEN, INTER, VOCAB, LAYERS, EXPERTS = 32, 64, 128, 2, 4
TMP_MARK = ".moeconv-tmp-"
EXACT = 1e-5

# Dense source kind → (transformers config class, extra config kwargs, model class name).
_DECODERS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
}
HF_FAMILY = {  # dense kind → (MoE architecture, config key for the number of experts)
    "llama": ("MixtralForCausalLM", "num_local_experts"),
    "mistral": ("MixtralForCausalLM", "num_local_experts"),
    "qwen2": ("Qwen2MoeForCausalLM", "num_experts"),
    "qwen3": ("Qwen3MoeForCausalLM", "num_experts"),
}


def randomise_(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Redraw every parameter: matrices N(0, std), norm scales 1 + N(0, 0.1), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name.lower() or ".ln_" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def build_dense(kind: str, *, layers: int = LAYERS, seed: int = 0) -> nn.Module:
    """A tiny randomised Hugging Face model of `kind` (llama, mistral, qwen2, qwen3, phi3, gpt2, bert)."""
    import transformers
    torch.manual_seed(seed)
    if kind in _DECODERS:
        cls_name, extra = _DECODERS[kind]
        cfg = getattr(transformers, cls_name)(
            hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
            **extra)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=HIDDEN, n_inner=INTER, n_layer=layers, n_head=2, n_positions=64,
                                      vocab_size=VOCAB)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = transformers.BertConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                                      num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
        model = transformers.BertModel(cfg)
    else:
        raise ValueError(kind)
    return randomise_(model, seed)


def tiny_tokenizer():
    """A real (fast) word-level tokenizer over VOCAB ids, so tokenizer files have something to carry."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def save_dense(model: nn.Module, path: Path, *, tokenizer: bool = False) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


def tokens(seed: int = 123, batch: int = 3, seq: int = 19, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (LMs), last hidden state (encoders) or the plain tensor a built-in model returns."""
    with torch.no_grad():
        try:
            out = model(input_ids=ids)
        except TypeError:
            out = model(ids)
    if isinstance(out, torch.Tensor):
        return out.float()
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key).float()
    return out[0].float()


def rel_max_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Δ| relative to max(1, max |ref|): the measure the exactness promise is stated in."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def assert_same_function(got_model, ref_model, *, vocab: int = VOCAB, seeds=(123, 7)) -> None:
    for s in seeds:
        ids = tokens(s, vocab=vocab)
        ref = outputs(ref_model, ids)
        assert ref.abs().max() > 0.5, "reference outputs are too small for a meaningful check"
        d = rel_max_diff(outputs(got_model, ids), ref)
        assert d <= EXACT, f"relative max |Δ| {d:.3g} > {EXACT}"


def run_cli(*args: str):
    """`moeconv upcycle ARGS` in process; returns click's Result (stdout and stderr kept apart)."""
    from typer.testing import CliRunner
    from moeconv.cli import app
    return CliRunner().invoke(app, ["upcycle", *map(str, args)])


def cli_ok(*args: str):
    r = run_cli(*args)
    assert r.exit_code == 0, f"exit {r.exit_code}: {r.stderr}\n{r.exception!r}"
    return r


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in Path(parent).iterdir() if TMP_MARK in p.name)


def safetensors_dict(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(tensors), f"tensor in two shards: {set(part) & set(tensors)}"
        tensors.update(part)
    return tensors


def moe_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from moeconv.nn.moe import MoEBlock
    return [(n, m) for n, m in module.named_modules() if isinstance(m, MoEBlock)]


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()
