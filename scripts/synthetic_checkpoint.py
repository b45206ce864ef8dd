"""Synthetic Mixtral checkpoints written shard by shard: random bf16 weights, never the whole
model in memory.

    python scripts/synthetic_checkpoint.py OUT_DIR --layers 4 --hidden 1024 --intermediate 2816 \
        --experts 8 --vocab 32000 [--shard-size 256MB] [--seed 0]

    from scripts.synthetic_checkpoint import MixtralShape, write_checkpoint
    info = write_checkpoint(out_dir, MixtralShape(layers=2, hidden=64, intermediate=128, experts=4, vocab=512))

What is written is what a real Mixtral checkpoint holds:

- `config.json`: `transformers.MixtralConfig(...)` saved by transformers itself (model_type
  "mixtral", architectures ["MixtralForCausalLM"], dtype bfloat16);
- `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, with Mixtral's tensor names
  (`model.layers.{i}.block_sparse_moe.experts.{j}.w1|w2|w3.weight`, …), which transformers 5.x
  converts to its fused expert tensors when it loads them;
- a tokenizer (`tokenizer.json`, `tokenizer_config.json`): byte-level, 3 special tokens + 256 byte
  tokens, so any text (the benchmark's calibration text included) tokenizes to real, varied ids.

Weights: norms are ones, every other tensor (router included) is N(0, 0.02²), drawn from one
`torch.Generator` seeded with `seed`, tensor by tensor in file order: the same arguments give the
same bytes. Peak memory is one shard plus one float32 tensor, whatever the depth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: moeconv from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moeconv.units import parse_size  # noqa: E402  (the size grammar of moeconv's own --shard-size)

DTYPE = torch.bfloat16
INIT_STD = 0.02
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Mixtral's own tokenizer
TOKENIZER_SIZE = len(SPECIAL_TOKENS) + 256


@dataclass(frozen=True)
class MixtralShape:
    """The sizes of a synthetic Mixtral. `heads` must divide `hidden`; `kv_heads` must divide `heads`."""

    layers: int
    hidden: int = 1024
    intermediate: int = 2816
    experts: int = 8
    top_k: int = 2
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000
    max_positions: int = 32768

    def check(self) -> None:
        """Raise ValueError for sizes no Mixtral can have (or the tokenizer cannot fit)."""
        if min(self.layers, self.hidden, self.intermediate, self.experts, self.top_k, self.heads, self.kv_heads) < 1:
            raise ValueError(f"every size must be ≥ 1: {self}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden}) and kv_heads "
                             f"({self.kv_heads}) must divide heads")
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} > experts {self.experts}")
        if self.vocab < TOKENIZER_SIZE:
            raise ValueError(f"vocab {self.vocab} is smaller than the byte-level tokenizer ({TOKENIZER_SIZE})")


def hf_config(shape: MixtralShape):
    """The `transformers.MixtralConfig` of `shape` (untied lm_head, bf16, Mixtral's rope theta)."""
    from transformers import MixtralConfig
    return MixtralConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        num_local_experts=shape.experts, num_experts_per_tok=shape.top_k,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, dtype="bfloat16", architectures=["MixtralForCausalLM"])


def tensor_specs(shape: MixtralShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Mixtral checkpoint, in file order (embeddings, layer by
    layer, final norm, lm_head). Names are those of Mistral AI's published Mixtral checkpoints."""
    h, f = shape.hidden, shape.intermediate
    head_dim = h // shape.heads
    kv = shape.kv_heads * head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.input_layernorm.weight", (h,)),
                  (f"{p}.self_attn.q_proj.weight", (h, h)),
                  (f"{p}.self_attn.k_proj.weight", (kv, h)),
                  (f"{p}.self_attn.v_proj.weight", (kv, h)),
                  (f"{p}.self_attn.o_proj.weight", (h, h)),
                  (f"{p}.post_attention_layernorm.weight", (h,)),
                  (f"{p}.block_sparse_moe.gate.weight", (shape.experts, h))]
        for j in range(shape.experts):
            e = f"{p}.block_sparse_moe.experts.{j}"
            specs += [(f"{e}.w1.weight", (f, h)), (f"{e}.w2.weight", (h, f)), (f"{e}.w3.weight", (f, h))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return specs


def nbytes(dims: tuple[int, ...], dtype: torch.dtype = DTYPE) -> int:
    """Bytes of a tensor of `dims` in `dtype`."""
    n = 1
    for d in dims:
        n *= d
    return n * dtype.itemsize


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split `specs`, in order, into shards of at most `shard_bytes` each (a tensor larger than
    that gets a shard of its own). Every tensor lands in exactly one shard."""
    shards: list[list] = [[]]
    size = 0
    for name, dims in specs:
        b = nbytes(dims)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += b
    return shards


def random_tensor(name: str, dims: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Ones for norm weights, else N(0, INIT_STD²) from `gen`; bf16, contiguous."""
    if name.endswith("norm.weight"):
        return torch.ones(dims, dtype=DTYPE)
    t = torch.randn(dims, generator=gen, dtype=torch.float32)
    t.mul_(INIT_STD)
    return t.to(DTYPE)


def write_tokenizer(out_dir: Path) -> None:
    """Write a byte-level BPE tokenizer (no merges, TOKENIZER_SIZE ids) that transformers'
    `AutoTokenizer` loads without any code of the checkpoint's own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)


def write_checkpoint(out_dir: str | Path, shape: MixtralShape, *, shard_size: str | int = "256MB",
                     seed: int = 0, tokenizer: bool = True) -> dict:
    """Write a Mixtral checkpoint of `shape` to `out_dir` (created; must be empty or absent), shard
    by shard. Returns {path, shape, shards, tensors, parameters, weight_bytes, disk_bytes}."""
    shape.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty")
    from safetensors.torch import save_file
    hf_config(shape).save_pretrained(out)
    specs = tensor_specs(shape)
    shards = plan_shards(specs, parse_size(shard_size))
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, dims in shard:
            tensors[name] = random_tensor(name, dims, gen)
            weight_map[name] = fname
            total += nbytes(dims)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer:
        write_tokenizer(out)
    return {"path": str(out), "shape": asdict(shape), "shards": len(shards), "tensors": len(specs),
            "parameters": sum(nbytes(d) for _, d in specs) // DTYPE.itemsize,
            "weight_bytes": total, "disk_bytes": dir_bytes(out)}


def dir_bytes(path: str | Path) -> int:
    """Bytes of every regular file under `path` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="256MB")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    shape = MixtralShape(layers=a.layers, hidden=a.hidden, intermediate=a.intermediate, experts=a.experts,
                         top_k=a.top_k, heads=a.heads, kv_heads=a.kv_heads, vocab=a.vocab)
    print(json.dumps(write_checkpoint(a.out_dir, shape, shard_size=a.shard_size, seed=a.seed), indent=2))


if __name__ == "__main__":
    main()
