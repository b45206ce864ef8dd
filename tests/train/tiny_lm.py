"""A tiny causal-LM-shaped model in plain PyTorch (no transformers): embedding → residual layers
whose FFN is an `MoEBlock` (or a dense FFN) → head. Fast enough to train for tens of steps in a
test; layers sit in a `ModuleList` so `decoder_layers` finds them like in an HF model."""
from __future__ import annotations

import torch
from torch import nn

from moeconv.nn.moe import MoEBlock, RoutingConfig

VOCAB = 32


def ffn(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))


class Layer(nn.Module):
    def __init__(self, hidden: int, moe: bool, experts: int, top_k: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = MoEBlock([ffn(hidden) for _ in range(experts)], hidden, RoutingConfig(top_k)) if moe else ffn(hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TinyLM(nn.Module):
    def __init__(self, *, hidden: int = 16, layers: int = 2, moe: bool = True, experts: int = 4, top_k: int = 2,
                 vocab: int = VOCAB, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(hidden, moe, experts, top_k) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, MoEBlock):
                    m.router.weight.normal_(0, 0.5)
        self.eval()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **_):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def rows(n: int = 24, seq: int = 12, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
