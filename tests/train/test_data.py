"""Data: documents tokenized with the student's tokenizer, packed into full rows, held-out split,
token-id files, and the errors a user can hit."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "passes"))
from upcycle_helpers import tiny_tokenizer  # noqa: E402

from moeconv.errors import InputError  # noqa: E402
from moeconv.train.data import (fingerprint, load_token_data, pack, read_documents, rows_from_file,  # noqa: E402
                                split_holdout, tokenize_documents)


def test_text_documents_are_tokenized_with_eos_between_and_packed(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("w3 w4\n\nw5\n\n\n\nw6 w7 w8\n")
    tok = tiny_tokenizer()  # word-level: wN → id N, EOS = 2
    docs = read_documents(f)
    assert docs == ["w3 w4", "w5", "w6 w7 w8\n"]
    assert tokenize_documents(tok, docs).tolist() == [3, 4, 2, 5, 2, 6, 7, 8, 2]
    assert rows_from_file(f, 4, tok).tolist() == [[3, 4, 2, 5], [2, 6, 7, 8]]  # tail [2] dropped


def test_jsonl_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "w9 w10"}) + "\n\n" + json.dumps({"text": "w11", "id": 3}) + "\n")
    assert rows_from_file(f, 3, tiny_tokenizer()).tolist() == [[9, 10, 2]]
    f.write_text('{"txt": "w9"}\n')
    with pytest.raises(InputError, match=r"d.jsonl:1: expected a JSON object with a 'text' field"):
        read_documents(f)


def test_token_files_1d_2d_and_pt(tmp_path):
    from safetensors.torch import save_file
    stream = torch.arange(10)
    save_file({"ids": stream}, tmp_path / "s.safetensors")
    assert rows_from_file(tmp_path / "s.safetensors", 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    grid = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    torch.save(grid, tmp_path / "g.pt")
    assert torch.equal(rows_from_file(tmp_path / "g.pt", 4), grid.long())   # used as is
    assert rows_from_file(tmp_path / "g.pt", 6).tolist() == [list(range(6)), list(range(6, 12))]  # re-packed
    torch.save(torch.randn(3, 4), tmp_path / "f.pt")
    with pytest.raises(InputError, match="integer tensor"):
        rows_from_file(tmp_path / "f.pt", 4)


def test_holdout_is_the_contiguous_tail_and_disjoint():
    rows = torch.arange(40).reshape(10, 4)
    train, held = split_holdout(rows, 0.2)
    assert torch.equal(train, rows[:8]) and torch.equal(held, rows[8:])
    assert split_holdout(rows, 0.0)[1] is None
    with pytest.raises(InputError, match="too few"):
        split_holdout(rows[:1], 0.5)


def test_load_token_data_checks_vocab_and_length(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("w3 w4 w5")
    with pytest.raises(InputError, match="too little data"):
        load_token_data(f, seq_len=8, tokenizer=tiny_tokenizer())
    with pytest.raises(InputError, match="outside the vocabulary"):
        load_token_data(f, seq_len=2, tokenizer=tiny_tokenizer(), eval_fraction=0, vocab_size=5)
    with pytest.raises(InputError, match="needs the student's tokenizer"):
        load_token_data(f, seq_len=2, tokenizer=None)
    with pytest.raises(InputError, match="no such data file"):
        load_token_data(tmp_path / "missing.txt", seq_len=2, tokenizer=tiny_tokenizer())
    data = load_token_data(f, seq_len=2, tokenizer=tiny_tokenizer(), eval_path=f)
    assert data.train.tolist() == [[3, 4], [5, 2]] and data.eval.tolist() == [[3, 4], [5, 2]]


def test_pack_and_fingerprint():
    assert pack(torch.arange(7), 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    a, b = torch.arange(12).reshape(3, 4), torch.arange(12).reshape(3, 4)
    assert fingerprint(a) == fingerprint(b) != fingerprint(b.flip(0))
