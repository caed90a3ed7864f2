"""Routing memory: attention from (token t, layer l) over the earlier tokens s of the same sequence,
reading how each of them routed at layer l.

Why: tokens of one prompt that were in a similar situation tend to route alike, and a single context
vector c_t forgets which earlier token routed where (docs/RESULTS.md shows the signal). This module
learns that lookup:

    q[t, l] = Wq_l c_t + sum_{l' <= l-h} Q[l', experts[t, l']]       (routing part: layer_ahead only)
    k[s, l] = Wk_l c_s + sum_{l' <= l-h} K[l', experts[s, l']]
    v[s, l] = multi-hot of experts[s, l]                               (E,)
    r[t, l, head] = sum_s softmax_s(q . k) v[s, l]        over t - M <= s < t, plus a "sink"
    logits[t, l] += sum_head a[l, head] * r + b[l, head] * log(r + eps)

The sink is a learned key with a zero value: attending to it means "nothing earlier applies" (and it
keeps t = 0 well defined). M (`size`) bounds the memory, so serving keeps a fixed-size ring buffer
(`MemoryRing`, CUDA-graph friendly). One attention (`_attend`) serves both: the keys are the ring's
(serving) followed by this call's earlier tokens, masked by position; a long call runs in blocks of M
queries, each reading only the keys its band can reach.

Causality: r[t, l] reads c_s and experts[s] for s < t only (both known once token s is routed),
c_t, and token t's experts at layers <= l - h. In token_ahead mode (lookahead None) queries and keys
carry no routing part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .contributors import Contributor
from .embeddings import ExpertSetEmbedding, expert_multi_hot
from .state import Context, Routed

EPS = 0.02  # floor inside log(r + eps): a vote share of 0 still ranks, and the gradient stays bounded


def shifted_cumsum(per_layer: torch.Tensor, lookahead: int, n_out: int) -> torch.Tensor:
    """per_layer (..., n, W) -> (..., n_out, W) whose row l sums rows l' <= l - lookahead (zero if none)."""
    cum = per_layer.cumsum(-2)
    out = per_layer.new_zeros(*per_layer.shape[:-2], n_out, per_layer.shape[-1])
    m = min(n_out - lookahead, cum.shape[-2])
    if m > 0:
        out[..., lookahead : lookahead + m, :] = cum[..., :m, :]
    return out


EMPTY = -(2**40)  # position of an empty ring slot: outside every band


@dataclass
class MemoryRing:
    """Serving-side memory of the last `size` routed tokens, fixed shapes: keys (B, M, L, H, dh),
    values (B, M, L, E) multi-hot, positions (B, M) (EMPTY = unused); `written` counts appends."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    written: int = 0


class RoutingMemory(Contributor):
    def __init__(self, num_layers: int, num_experts: int, d_model: int, heads: int, head_dim: int, size: int,
                 lookahead: int | None):
        super().__init__()
        L, H, dh = num_layers, heads, head_dim
        self.L, self.E, self.H, self.dh, self.size, self.lookahead = L, num_experts, H, dh, size, lookahead
        self.q_ctx = nn.Linear(d_model, L * H * dh)
        self.k_ctx = nn.Linear(d_model, L * H * dh)
        if lookahead is not None:
            self.q_route = ExpertSetEmbedding(L, num_experts, H * dh)
            self.k_route = ExpertSetEmbedding(L, num_experts, H * dh)
        self.sink = nn.Parameter(torch.zeros(L, H, dh))
        self.gain_lin = nn.Parameter(torch.zeros(L, H))  # zero: training starts from the model without memory
        self.gain_log = nn.Parameter(torch.zeros(L, H))

    def _route(self, emb, experts: torch.Tensor, n_out: int) -> torch.Tensor:
        """experts (..., n, k) -> (..., n_out, H*dh): routing code of layers <= l - h for each l < n_out."""
        return shifted_cumsum(emb.per_layer(experts), self.lookahead, n_out)

    def _ctx_proj(self, linear: nn.Linear, c: torch.Tensor, layers: slice) -> torch.Tensor:
        """c (..., D) -> (..., n', H*dh) for the MoE layers in `layers`."""
        w = linear.weight.view(self.L, -1, linear.in_features)[layers]  # (n', H*dh, D)
        b = linear.bias.view(self.L, -1)[layers]
        return torch.einsum("...d,lwd->...lw", c, w) + b

    def keys(self, c: torch.Tensor, experts: torch.Tensor, layers: slice) -> torch.Tensor:
        """Keys of routed tokens: c (..., D), experts (..., L, k) -> (..., n', H, dh) for `layers`."""
        k = self._ctx_proj(self.k_ctx, c, layers)
        if self.lookahead is not None:
            k = k + self._route(self.k_route, experts, layers.stop)[..., layers, :]
        return k.unflatten(-1, (self.H, self.dh))

    def queries(self, c: torch.Tensor, routed: torch.Tensor, layers: slice) -> torch.Tensor:
        """c (..., D), routed (..., n, k) (layer_ahead) -> (..., n', H, dh) for `layers`."""
        q = self._ctx_proj(self.q_ctx, c, layers)
        if self.lookahead is not None:
            q = q + self._route(self.q_route, routed, layers.stop)[..., layers, :]
        return q.unflatten(-1, (self.H, self.dh))

    def _readout(self, r: torch.Tensor, layers: slice) -> torch.Tensor:
        """r (..., n', H, E) vote shares -> (..., n', E) logits."""
        a = self.gain_lin[layers, :, None]
        b = self.gain_log[layers, :, None]
        return (a * r + b * torch.log(r + EPS)).sum(-2)

    # ------------------------------------------------------------------ contributor

    def init_state(self, batch_size: int, device) -> MemoryRing:
        M, dtype = self.size, self.q_ctx.weight.dtype
        return MemoryRing(
            keys=torch.zeros(batch_size, M, self.L, self.H, self.dh, device=device, dtype=dtype),
            values=torch.zeros(batch_size, M, self.L, self.E, device=device, dtype=dtype),
            positions=torch.full((batch_size, M), EMPTY, dtype=torch.long, device=device),
        )

    @torch.no_grad()
    def append(self, ring: MemoryRing, routed: Routed) -> None:
        n = min(routed.token_ids.shape[1], self.size)
        h, experts = routed.h[:, -n:], routed.experts[:, -n:]
        slots = (ring.written + torch.arange(n, device=h.device)) % self.size
        ring.keys[:, slots] = self.keys(h, experts, slice(0, self.L)).to(ring.keys.dtype)
        ring.values[:, slots] = expert_multi_hot(experts, self.E, ring.values.dtype)
        real = routed.token_ids[:, -n:] >= 0  # padding stays out of reach, as `ctx.real` keeps it in one call
        ring.positions[:, slots] = routed.positions[:, -n:].masked_fill(~real, EMPTY)
        ring.written += n

    def logits(self, ctx: Context, routed: torch.Tensor, layers: slice, ring: MemoryRing | None) -> torch.Tensor:
        q = self.queries(ctx.h, routed, layers)  # (B, T, n', H, dh)
        T, M = q.shape[1], self.size
        keys, values, pos, ok = [], [], [], []
        if ring is not None:
            keys.append(ring.keys[:, :, layers]), values.append(ring.values[:, :, layers])
            pos.append(ring.positions), ok.append(ring.positions > EMPTY)
        if T > 1 or ring is None:  # this call's tokens (one decode token never reads its own key)
            done = ctx.completed()  # this call's tokens as later ones see them
            keys.append(self.keys(ctx.h, done, layers)), values.append(expert_multi_hot(done, self.E, q.dtype)[:, :, layers])
            pos.append(ctx.positions), ok.append(ctx.real)
        k, v, pos, ok = (x[0] if len(x) == 1 else torch.cat(x, 1) for x in (keys, values, pos, ok))
        if T <= M:  # every key is within every query's band (or masked by position)
            return self._readout(self._attend(q, ctx.positions, k, v, pos, ok, layers), layers)
        past = 0 if ring is None else M
        out = []
        for a in range(0, T, M):  # blocks of M queries; a query's band reaches M tokens back
            near = past + torch.arange(max(0, a - M), min(T, a + M), device=q.device)
            reach = torch.cat([torch.arange(past, device=q.device), near])  # the ring, then this call's band
            k_, v_, pos_, ok_ = (x.index_select(1, reach) for x in (k, v, pos, ok))
            out.append(self._attend(q[:, a : a + M], ctx.positions[:, a : a + M], k_, v_, pos_, ok_, layers))
        return self._readout(torch.cat(out, 1), layers)  # (B, T, n', E)

    def _attend(self, q, qpos, k, v, kpos, kok, layers: slice) -> torch.Tensor:
        """q (B, t, n', H, dh) at positions qpos (B, t) over keys k (B, s, n', H, dh), values v (B, s, n', E)
        at kpos (B, s), usable where kok -> vote shares (B, t, n', H, E)."""
        B, s = k.shape[:2]
        dist = qpos[:, :, None] - kpos[:, None, :]  # (B, t, s)
        allowed = kok[:, None, :] & (dist > 0) & (dist <= self.size)
        allowed = torch.cat([allowed.new_ones(*allowed.shape[:2], 1), allowed], -1)  # the sink, always
        sink = self.sink[layers].expand(B, 1, -1, -1, -1)
        k = torch.cat([sink.to(k.dtype), k], 1).permute(0, 2, 3, 1, 4)  # (B, n', H, 1+s, dh)
        v = torch.cat([v.new_zeros(B, 1, *v.shape[2:]), v], 1).permute(0, 2, 1, 3)[:, :, None]  # (B, n', 1, 1+s, E)
        r = F.scaled_dot_product_attention(
            q.permute(0, 2, 3, 1, 4), k, v.expand(-1, -1, self.H, -1, -1), attn_mask=allowed[:, None, None]
        )  # (B, n', H, t, E)
        return r.permute(0, 3, 1, 2, 4)
