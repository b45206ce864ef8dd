"""Llama-like decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU).

Promises, relied on by tests and by the MoE converter:

* ``Llama(config)(tokens)`` maps int64 tokens ``(B, T)`` with
  ``T <= max_seq_len`` to logits ``(B, T, vocab_size)``; causal.
* In eval mode the forward pass is deterministic.
* ``Block`` and ``FeedForward`` are each traceable with
  ``torch.fx.symbolic_trace`` on their own, and the full model is
  ``torch.export.export``-able.
* The dense FFN is ``Block.feed_forward``:
  ``down_proj(silu(gate_proj(x)) * up_proj(x))`` with bias-free Linears.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    max_seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 2  # n_head must be a multiple; each k/v head serves n_head // n_kv_head q heads
    dim: int = 64
    intermediate_size: int = 172
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale and no bias or mean-centering."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 for stability, then cast back (matters for bf16).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables; ``forward(q_or_k)`` rotates a ``(B, H, T, D)`` tensor."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(max_seq_len).float(), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_seq_len, head_dim), HF "rotate_half" layout
        # Non-persistent: derived from the config, so kept out of state_dict.
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(-2)
        # narrow() rather than [:T]: under fx.symbolic_trace T is a Proxy, which a
        # Python slice rejects but a tensor method call records into the graph.
        cos, sin = self.cos.narrow(0, 0, T).to(x.dtype), self.sin.narrow(0, 0, T).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal grouped-query attention with rotary position embeddings."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        assert config.dim % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.dim // config.n_head
        self.q_proj = nn.Linear(config.dim, config.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * self.head_dim, config.dim, bias=False)
        # Each attention owns its (tiny) RoPE tables so a Block can be traced on its own.
        self.rotary = RotaryEmbedding(self.head_dim, config.max_seq_len, config.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        # Expand k/v heads to match q heads (explicit repeat works with every SDPA backend).
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, -1))


class FeedForward(nn.Module):
    """Gated SwiGLU FFN: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-RMSNorm transformer block with residual connections."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Token embeddings, ``n_layer`` blocks, final RMSNorm, untied output head."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: int64 ``(B, T)``; returns logits ``(B, T, vocab_size)``."""
        if tokens.size(1) > self.config.max_seq_len:
            raise ValueError(f"sequence length {tokens.size(1)} > max_seq_len {self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def build_model(**config) -> Llama:
    """The default-size model in eval mode (what `moeconv inspect builtin:llama` shows)."""
    return Llama(LlamaConfig(**config)).eval()
