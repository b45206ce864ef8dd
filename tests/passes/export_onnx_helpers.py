"""Tiny models and checks shared by the ONNX export tests (tests/passes/test_export_onnx*.py).

Every model is built in code (hidden 32, intermediate 64, vocab 128, 2 layers) with weights
re-drawn at O(1) scale (`randomise_`), so experts are distinct and routing is not degenerate.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from upcycle_helpers import HIDDEN, INTER, VOCAB, build_dense, randomise_

TINY_MOE_FILE = '''
"""A tiny token-id → logits model with one MoE layer (for CLI tests): no transformers needed."""
import torch
from torch import nn
from moeconv.nn.moe import MoEBlock, RoutingConfig


class TinyMoeLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.norm = nn.LayerNorm(16)
        experts = [nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(4)]
        self.moe = MoEBlock(experts, 16, RoutingConfig(top_k=2))
        self.head = nn.Linear(16, 64)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.moe(self.norm(h))
        return torch.log_softmax(self.head(h), dim=-1)


def build_model():
    torch.manual_seed(0)
    m = TinyMoeLM()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m.eval()


class Branchy(nn.Module):
    """Data-dependent Python control flow inside a submodule: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.gatekeeper = Gatekeeper()

    def forward(self, idx):
        return self.gatekeeper(self.emb(idx))


class Gatekeeper(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def build_branchy():
    return Branchy().eval()


class ExportsDifferently(TinyMoeLM):
    """Adds 0.01 to its logits only while being exported: the graph is not the eager model."""

    def forward(self, idx):
        out = super().forward(idx)
        if torch.compiler.is_exporting():
            out = out + 0.01
        return out


def build_mismatch():
    m = ExportsDifferently()
    m.load_state_dict(build_model().state_dict())
    return m.eval()
'''


def write_tiny_moe_file(directory: Path) -> Path:
    path = Path(directory) / "tiny_moe_lm.py"
    path.write_text(TINY_MOE_FILE)
    return path


def upcycled(kind: str = "llama", *, experts: int = 4, top_k: int = 2):
    """A tiny dense model of `kind` upcycled with distinct experts (noise) and a random router."""
    from moeconv import Context, Pipeline, load
    from passes import Upcycle
    dense = build_dense(kind)
    dense.config.architectures = [type(dense).__name__]  # as a saved checkpoint records it
    state = load(dense)
    return Pipeline([Upcycle(num_experts=experts, top_k=top_k, router_init="normal", router_std=0.5,
                             expert_init="noise", noise_scale=0.5)]).run(state, Context()).state


def native_mixtral(seed: int = 0):
    import transformers
    cfg = transformers.MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                     max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                                     tie_word_embeddings=False)
    torch.manual_seed(seed)
    return randomise_(transformers.MixtralForCausalLM(cfg), seed)


def native_qwen3_moe(seed: int = 0):
    import transformers
    cfg = transformers.Qwen3MoeConfig(hidden_size=HIDDEN, intermediate_size=INTER, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      vocab_size=VOCAB, max_position_embeddings=64, num_experts=8,
                                      num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return randomise_(transformers.Qwen3MoeForCausalLM(cfg), seed)


def moeconv_roundtrip(state, path: Path):
    """Write `state` in moeconv's own format and load it back (the path users take)."""
    from moeconv import load
    from moeconv.io.save import save_checkpoint
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path, fmt="moeconv")
    return load(path)


def export(state, tmp: Path, *, example: torch.Tensor | None = None, **cfg):
    """Run the export pass into `tmp` (optionally on a chosen example input); returns (pass report, model path)."""
    from moeconv import Context, Pipeline
    from passes.export_onnx import ExportOnnx
    cfg.setdefault("latency_runs", 0)
    result = Pipeline([ExportOnnx(workdir=tmp, **cfg)]).run(state, Context(example_inputs=example))
    return result.report.passes[0], Path(tmp) / "model.onnx"


@torch.no_grad()
def narrow_example(model, *, seq: int = 3, candidates: int = 64, seed: int = 0) -> torch.Tensor:
    """A (2, seq) example input that leaves as many (layer, expert) pairs unused as possible, so
    the parity inputs can show routing the export never saw."""
    from moeconv.onnx.parity import record_routing
    ids = torch.randint(0, VOCAB, (candidates, seq), generator=torch.Generator().manual_seed(seed))
    with record_routing(model) as picks:
        try:
            model(input_ids=ids)
        except TypeError:
            model(ids)
    per_row = {p: torch.cat(v).reshape(candidates, -1) for p, v in picks.items()}

    def used(rows):
        return sum(len(set(per_row[p][list(rows)].flatten().tolist())) for p in per_row)
    best = min(((i, j) for i in range(candidates) for j in range(i + 1, candidates)), key=used)
    return ids[list(best)]


def ort_session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_logits(sess, ids: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    feed = {"input_ids": ids.numpy()}
    names = {i.name for i in sess.get_inputs()}
    if "attention_mask" in names:
        feed["attention_mask"] = (mask if mask is not None else torch.ones_like(ids)).numpy()
    return sess.run(None, feed)[0]


def clone(model):
    return copy.deepcopy(model).eval()
