"""The tokenizer embedded in a GGUF file, in the keys llama.cpp reads (`tokenizer.ggml.*`,
`tokenizer.chat_template`).

Sources, in order:
- a GGUF source file: its tokenizer fields, copied as they are (vocabulary, merges, token types,
  special ids, pre-tokenizer, chat template);
- a Hugging Face directory with a byte-level BPE `tokenizer.json`: the vocabulary the way
  llama.cpp's converter builds it (`get_vocab_base`: ids in order, `[PADi]` for ids the tokenizer
  lacks, special added tokens as CONTROL, other added tokens as USER_DEFINED), merges, special ids
  and chat template through `gguf.SpecialVocab`;
- anything else: no tokenizer (`tokenizer.ggml.model = "none"`): llama.cpp evaluates token ids but
  cannot turn text into them; said in `notes`.

The pre-tokenizer of a directory's BPE tokenizer is not named (llama.cpp's converter recognises it
by hashing the tokenisation of a test text against its own table): llama.cpp then uses its default
GPT-2 split, and the export says so (`notes`) and, with llama.cpp installed, compares the two
tokenisations of sample text (`moeconv.jobs.export_gguf`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

NORMAL, USER_DEFINED, CONTROL = 1, 4, 3  # gguf.TokenType values


@dataclass
class GgufVocab:
    """Fields to write: `copied` (key → (value, GGUFValueType, sub-type) from a GGUF source), or a
    vocabulary built from a directory (`tokens`, `types`, `special` = gguf.SpecialVocab), or none."""

    kind: str  # "copied" | "gpt2" | "none"
    copied: list = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    special: object = None
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer) -> None:
        if self.kind == "copied":
            for key, value, vtype, sub in self.copied:
                writer.add_key_value(key, value, vtype, sub_type=sub)
        elif self.kind == "gpt2":
            writer.add_tokenizer_model("gpt2")
            writer.add_token_list(self.tokens)
            writer.add_token_types(self.types)
            self.special.add_to_gguf(writer)
        else:
            writer.add_tokenizer_model("none")


def from_gguf(path: Path) -> GgufVocab:
    """The tokenizer fields of the GGUF file `path`, to copy."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    copied = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        copied.append((key, f.contents(), vtype, sub))
    if not copied:
        return GgufVocab("none", notes=[f"{path.name} holds no tokenizer: the GGUF evaluates token ids only"])
    return GgufVocab("copied", copied)


def from_directory(path: Path, n_vocab: int) -> GgufVocab:
    """The byte-level BPE tokenizer of the Hugging Face directory `path`, or none (with a note)."""
    import gguf
    tok_json = path / "tokenizer.json"
    try:
        spec = json.loads(tok_json.read_text(encoding="utf-8")) if tok_json.is_file() else None
    except (OSError, ValueError):
        spec = None
    model = (spec or {}).get("model") or {}
    decoder = (spec or {}).get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        what = model.get("type", "no tokenizer.json") if spec else "no tokenizer.json"
        return GgufVocab("none", notes=[f"tokenizer ({what}) is not a byte-level BPE llama.cpp reads: the GGUF holds "
                                        "no tokenizer and evaluates token ids only"])
    from moeconv.io.transformers_io import read_tokenizer
    tokenizer = read_tokenizer(path)  # never runs a tokenizer's custom code
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder_of = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(USER_DEFINED)
        elif token in added:
            special = decoder_of[i].special if i in decoder_of else False
            tokens.append(token)
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    special = gguf.SpecialVocab(path, load_merges=True, n_vocab=n_vocab)
    # Whether the tokenizer adds BOS / EOS around a text, measured rather than read from a config
    # field a tokenizer may not write: llama.cpp's default for a missing key may differ
    probe = tokenizer("a").input_ids
    for kind, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if tid is not None and kind not in special.add_special_token:
            special.add_special_token[kind] = bool(probe) and probe[0 if kind == "bos" else -1] == tid
    if not special.merges:
        return GgufVocab("none", notes=["the BPE tokenizer has no merges, which llama.cpp refuses: the GGUF holds "
                                        "no tokenizer and evaluates token ids only"])
    return GgufVocab("gpt2", tokens=tokens, types=types, special=special,
                     notes=["pre-tokenizer not named: llama.cpp splits text with its default GPT-2 rule"])
