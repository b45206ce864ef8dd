"""BERT-like bidirectional encoder, laid out like Hugging Face ``BertModel``.

Promises, relied on by tests and by the MoE converter:

* ``Bert(config)(input_ids, attention_mask=None)`` maps int64 tokens ``(B, T)``
  with ``T <= max_position`` to last hidden states ``(B, T, hidden)``.
  ``attention_mask`` is an optional ``(B, T)`` tensor of 1 (attend) / 0 (padding).
* In eval mode the forward pass is deterministic.
* ``Layer``, ``Intermediate`` and ``Output`` are each traceable with
  ``torch.fx.symbolic_trace`` on their own, and the full model is
  ``torch.export.export``-able.
* As in HF BERT, the FFN is SPLIT across two sibling modules:
  ``Intermediate`` (dense -> GELU) and ``Output`` (dense -> dropout ->
  LayerNorm(x + residual)). Converters must handle this non-contiguous FFN.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    vocab_size: int = 256
    max_position: int = 64
    n_layer: int = 2
    n_head: int = 2
    hidden: int = 64
    intermediate: int = 128
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0  # hidden dropout; 0 keeps train and eval outputs equal


class Attention(nn.Module):
    """Bidirectional self-attention + output projection + post-LN residual."""

    def __init__(self, config: BertConfig):
        super().__init__()
        assert config.hidden % config.n_head == 0
        self.n_head = config.n_head
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q = self.query(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = self.key(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.value(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # attn_mask goes straight to SDPA (None is valid there): no Python branch on
        # it, so symbolic_trace records one graph that works with and without a mask.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.LayerNorm(self.dropout(self.dense(y)) + x)


class Intermediate(nn.Module):
    """First half of the FFN: ``GELU(dense(x))``, hidden -> intermediate."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.intermediate)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Output(nn.Module):
    """Second half of the FFN: ``LayerNorm(dropout(dense(x)) + residual)``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Layer(nn.Module):
    """Post-LN encoder layer: attention, then the split FFN."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Output(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attention(x, attn_mask)
        return self.output(self.intermediate(h), h)


class Bert(nn.Module):
    """Word + position embeddings with LayerNorm, then ``n_layer`` encoder layers."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_position, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.n_layer)])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids``: int64 ``(B, T)``; returns hidden states ``(B, T, hidden)``."""
        T = input_ids.size(1)
        if T > self.config.max_position:
            raise ValueError(f"sequence length {T} > max_position {self.config.max_position}")
        pos = torch.arange(T, dtype=torch.long, device=input_ids.device)
        x = self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)))
        attn_mask = None
        if attention_mask is not None:
            # (B, T) 1/0 -> boolean (B, 1, 1, T): True = key may be attended to.
            attn_mask = attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


def build_model(**config) -> Bert:
    """The default-size model in eval mode (what `moeconv inspect builtin:bert` shows)."""
    return Bert(BertConfig(**config)).eval()
