"""Transformer pieces of the predictor: rotary position embedding, causal self-attention with an
optional KV cache, and the pre-norm block (plain torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) positions -> cos, sin of shape (T, head_dim)."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def append_kv(cache: dict, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append T positions (k, v: (B, H, T, hd)) to a KV cache and return all of it, (B, H, S, hd) views.

    The cache {"k", "v": (B, H, capacity, hd) buffers, "n": positions held} is written in place and
    doubles when full, so a decode step copies its own position, not the whole cache (a `torch.cat`
    per step costs O(S), O(S^2) over a sequence). A shallow copy of the dict (`dict(cache)`) runs
    positions it will not keep: it writes past the original's `n`, which the original never reads
    before writing there itself."""
    n, T = cache.get("n", 0), k.shape[2]
    buf = cache.get("k")
    if buf is None or n + T > buf.shape[2]:
        size = max(n + T, 2 * buf.shape[2] if buf is not None else 64)
        grown = [t.new_empty(*t.shape[:2], size, t.shape[3]) for t in (k, v)]
        if n:
            grown[0][:, :, :n], grown[1][:, :, :n] = cache["k"][:, :, :n], cache["v"][:, :, :n]
        cache["k"], cache["v"] = grown
    cache["k"][:, :, n : n + T], cache["v"][:, :, n : n + T] = k, v
    cache["n"] = n + T
    return cache["k"][:, :, : n + T], cache["v"][:, :, : n + T]


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float, rope_base: float | None):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout
        self.rope_base = rope_base

    def _rope(self, offset: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, hd) of positions offset .. offset + T - 1, sliced from a table grown on demand
        (serving asks for one position per step: recomputing the angles would cost more than the
        attention; a host-side offset keeps it free of device syncs)."""
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].shape[0] < offset + T or table[0].device != device:
            size = max(offset + T, 2 * (table[0].shape[0] if table is not None else 256))
            self._rope_table = table = rope_cos_sin(torch.arange(size, device=device), self.head_dim, self.rope_base)
        return table[0][offset : offset + T], table[1][offset : offset + T]

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        offset: int = 0,  # position of the first of the T tokens (RoPE)
        attn_mask: torch.Tensor | None = None,  # (B, 1, T, S) bool, True = attend; None = causal (after a cache)
        cache: dict | None = None,  # a KV cache (`append_kv`), appended in place
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # (B, H, T, hd)
        if self.rope_base is not None:
            cos, sin = self._rope(offset, T, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = append_kv(cache, k, v)
        p = self.dropout if self.training else 0.0
        S = k.shape[2]
        if attn_mask is not None:  # padding keys hidden (a cache's too: the mask is (B, 1, T, S))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        elif cache is not None and T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # one new query sees the whole cache
        elif S > T:  # T new queries after a cached prefix: causal, offset by S - T
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, mlp_ratio: int, dropout: float, rope_base: float | None):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_heads, dropout, rope_base)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, offset=0, attn_mask=None, cache=None):
        x = x + self.drop(self.attn(self.ln1(x), offset, attn_mask, cache))
        return x + self.drop(self.mlp(self.ln2(x)))


# --------------------------------------------------------------------------- the predictor
