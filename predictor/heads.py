"""Heads, chosen by `PredictorConfig.mode` through `HEADS`: the context of each token -> (B, T, n', E)
logits for the MoE layers in `layers`, before the contributors' logits are added.

* `TokenHead` (token_ahead): one linear map of c_t to every layer's logits: usable before token t's
  forward pass starts.
* `DepthHead` (layer_ahead, lookahead h): a small depth transformer over the L layer positions of
  token t. Position l gets c_t + embed_layer[l] + the sum over layers l' <= l - h of token t's
  routed-expert embeddings (plus, with `depth_last`, layer l - h alone: the sum dilutes the nearest
  layer, which tells the most) + what contributors feed it (the routing bank's vote), and attends
  causally over depth, so the output at l has seen token t's routing at layers <= l - h only.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block
from .config import PredictorConfig
from .embeddings import ExpertSetEmbedding
from .state import Context, extends


class TokenHead(nn.Module):
    takes_depth_input = False

    def __init__(self, c: PredictorConfig):
        super().__init__()
        self.L, self.E = c.num_layers, c.num_experts
        self.out = nn.Linear(c.d_model, c.num_layers * c.num_experts)

    def forward(self, ctx: Context, routed: torch.Tensor, layers: slice, depth_in=None) -> torch.Tensor:
        return self.out(ctx.h).unflatten(-1, (self.L, self.E))[..., layers, :]  # (B, T, n', E)


class DepthHead(nn.Module):
    takes_depth_input = True

    def __init__(self, c: PredictorConfig):
        super().__init__()
        L, E, W = c.num_layers, c.num_experts, c.depth_width
        self.h = c.lookahead
        self.ctx_proj = nn.Linear(c.d_model, W) if W != c.d_model else nn.Identity()
        self.layer_emb = nn.Parameter(torch.empty(L, W))
        self.cur_emb = ExpertSetEmbedding(L, E, W)  # the current token's experts, per layer
        self.last_emb = ExpertSetEmbedding(L, E, W) if c.depth_last else None  # layer l - h alone
        self.blocks = nn.ModuleList(Block(W, c.depth_heads, c.mlp_ratio, c.dropout, None) for _ in range(c.depth_blocks))
        self.ln = nn.LayerNorm(W)
        self.w = nn.Parameter(torch.empty(L, W, E))  # per-layer output maps
        self.b = nn.Parameter(torch.zeros(L, E))
        nn.init.normal_(self.layer_emb, std=0.02)
        nn.init.normal_(self.w, std=0.02)

    def forward(self, ctx: Context, routed: torch.Tensor, layers: slice, depth_in=None) -> torch.Tensor:
        B, T = ctx.h.shape[:2]
        if ctx.served:
            z = self._served_depth(ctx, routed, layers.stop, depth_in)
        else:
            z = self._inputs(ctx, routed, 0, layers.stop, depth_in).flatten(0, 1)  # (B*T, stop, W)
            for block in self.blocks:
                z = block(z)  # causal over depth
        z = self.ln(z[:, layers])
        out = torch.einsum("nlw,lwe->nle", z, self.w[layers]) + self.b[layers]
        return out.unflatten(0, (B, T))  # (B, T, n', E)

    def _inputs(self, ctx: Context, routed: torch.Tensor, lo: int, stop: int, depth_in) -> torch.Tensor:
        """The depth transformer's inputs at layer positions [lo, stop): (B, T, stop - lo, W)."""
        h = self.h
        z = self.ctx_proj(ctx.h)[:, :, None] + self.layer_emb[lo:stop]  # (B, T, stop - lo, W)
        m = min(stop - h, routed.shape[2])  # positions l >= h see layer l - h of the current token
        a, b = max(lo, h), h + m
        if b > a:
            cur = self.cur_emb.per_layer(routed[:, :, :m]).cumsum(2)  # (B, T, m, W): layers <= l - h
            if self.last_emb is not None:
                cur = cur + self.last_emb.per_layer(routed[:, :, :m])  # layer l - h alone
            z = torch.cat([z[:, :, : a - lo], z[:, :, a - lo : b - lo] + cur[:, :, a - h : b - h], z[:, :, b - lo :]],
                          dim=2)
        if depth_in is not None:
            z = z + depth_in[:, :, lo:stop]
        return z

    def _served_depth(self, ctx: Context, routed: torch.Tensor, stop: int, depth_in) -> torch.Tensor:
        """Serving: the depth transformer's outputs (B*T, >= stop, W), with a KV cache over depth kept in
        `ctx.memo` across one call's per-layer predictions. Position l reads the routing at layers
        <= l - h only, so once the call knows those layers it is final and stays valid while the known
        routing grows; each call runs only its new positions. Only final positions enter the cache (a
        caller may pass less routing than a target needs: those run on a copy of it); a routing that
        does not extend the kept one starts over."""
        st = ctx.memo.get("depth")
        gate = ctx.gate  # a predictor reading the gate's picks: position l is final once layer l's are known too
        if st is None or not extends(st["routed"], routed) or (gate is not None and not extends(st["gate"], gate)):
            st = {"caches": [{} for _ in self.blocks], "z": None}
        st["routed"], st["gate"] = routed, gate
        ctx.memo["depth"] = st
        done = 0 if st["z"] is None else st["z"].shape[1]
        known = routed.shape[2] + self.h if gate is None else min(routed.shape[2] + self.h, gate.shape[2])
        final = max(done, min(stop, known))  # positions l < n + h (and with gate picks for l) are final
        if final > done:
            st["z"] = self._run(ctx, routed, done, final, depth_in, st["caches"], st["z"])
        if stop <= final:
            return st["z"]
        return self._run(ctx, routed, final, stop, depth_in, [dict(c) for c in st["caches"]], st["z"])

    def _run(self, ctx, routed, lo: int, stop: int, depth_in, caches: list[dict], before) -> torch.Tensor:
        """Positions [lo, stop) through the blocks after the cached ones, appended to `before` (B*T, lo, W)."""
        z = self._inputs(ctx, routed, lo, stop, depth_in).flatten(0, 1)  # (B*T, stop - lo, W)
        for block, cache in zip(self.blocks, caches):
            z = block(z, cache=cache)  # causal over depth, after the cached positions
        return z if before is None else torch.cat([before, z], 1)


HEADS: dict[str, type[nn.Module]] = {"token_ahead": TokenHead, "layer_ahead": DepthHead}
