"""Logit contributors: sources of additive (B, T, n', E) logits that the model sums over what is
configured (`PredictorConfig.contributors`), plus two without state: the skip tables, and the
cross-layer gate's picks for a predictor that reads them (`GatePicks`).

A contributor sees, for the T tokens of one call:
  ctx     the trunk's `Context` (c_t, token ids, the previous token's experts, positions)
  routed  (B, T, n, k): the current tokens' experts it may read (layer_ahead: layers <= stop-1-h;
          token_ahead: none); the model slices them, so no contributor can read further
  layers  the slice of MoE layers to predict
  part    its own serving state (None in whole-sequence calls)
and owns its state: `init_state` makes it, `append` stores tokens once their routing is complete.
A contributor may also feed the depth transformer (`depth_input`, layer_ahead).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PredictorConfig
from .embeddings import ExpertSetEmbedding, expert_multi_hot
from .state import Context, Routed


class Contributor(nn.Module):
    def init_state(self, batch_size: int, device: torch.device):
        """This contributor's serving state for a new sequence (None: it keeps none)."""
        return None

    def append(self, part, routed: Routed) -> None:
        """Store tokens whose routing is now complete (serving)."""

    def depth_input(self, ctx: Context, routed: torch.Tensor, stop: int, part) -> torch.Tensor | None:
        """(B, T, stop, W) added to the depth transformer's inputs at layers [0, stop), or None."""
        return None

    def logits(self, ctx: Context, routed: torch.Tensor, layers: slice, part) -> torch.Tensor:
        """(B, T, n', E) logits for `layers`."""
        raise NotImplementedError


class SkipTables(Contributor):
    """Learned linear paths straight to the logits: the previous token's experts at every layer ->
    every layer's logits, and (layer_ahead) the current token's layers l' <= l - h -> layer l.
    Reading all earlier layers rather than only the same one is what lifts layer_ahead."""

    def __init__(self, c: PredictorConfig):
        super().__init__()
        L, E = c.num_layers, c.num_experts
        self.L, self.E = L, E
        self.prev = ExpertSetEmbedding(L, E, L * E)
        nn.init.zeros_(self.prev.weight)  # start from the transformer alone
        self.cur = None
        if c.ahead is not None:
            self.cur = ExpertSetEmbedding(L, E, L * E)
            nn.init.zeros_(self.cur.weight)
            src, tgt = torch.arange(L)[:, None], torch.arange(L)[None, :]
            causal = (src <= tgt - c.ahead).to(torch.float32)  # (L_src, L_tgt)
            self.register_buffer("cur_mask", causal[:, None, :, None], persistent=False)

    def logits(self, ctx: Context, routed: torch.Tensor, layers: slice, part) -> torch.Tensor:
        if "skip_prev" not in ctx.memo:  # the previous token's part is the call's: once for all its layers
            ctx.memo["skip_prev"] = self.prev(ctx.prev).unflatten(-1, (self.L, self.E))  # (B, T, L, E)
        out = ctx.memo["skip_prev"][..., layers, :]  # (B, T, n', E)
        n = routed.shape[-2]
        if self.cur is None or n == 0:
            return out
        hot = expert_multi_hot(routed, self.E, self.cur.weight.dtype).flatten(-2)  # (B, T, n*E)
        table = self.cur.weight[:n].unflatten(-1, (self.L, self.E))[:, :, layers]
        table = table * self.cur_mask[:n, :, layers]  # (n, E, n', E): zero where l' > l - h
        return out + (hot @ table.flatten(0, 1).flatten(-2)).unflatten(-1, (-1, self.E))


class GatePicks(Contributor):
    """The cross-layer gate's top-G picks (`ctx.gate` (B, T, L, G), -1 = none): MoE layer l's router on
    the hidden state leaving the layer before it (integrate/runtime/gate.py), known once layer l - 1 has
    run. Depth position l gets the sum of learned (layer, rank, expert) embeddings of layer l's picks,
    and each pick adds a learned logit per layer and rank to its expert (its calibration, as the
    gate_ahead baseline fits it). Layer l reads layer l's picks only (and, through the depth
    transformer, those of the layers below)."""

    def __init__(self, c: PredictorConfig):
        super().__init__()
        L, E, G = c.num_layers, c.num_experts, c.gate_inputs
        self.E, self.G = E, G
        self.emb = nn.Parameter(torch.empty(L, G, E, c.depth_width))
        nn.init.normal_(self.emb, std=0.02)
        self.rank_logit = nn.Parameter(torch.zeros(L, G))
        # each (layer, rank)'s first row in the flattened embedding table (L * G * E rows)
        self.register_buffer("base", (torch.arange(L)[:, None] * G + torch.arange(G)) * E, persistent=False)

    def _picks(self, ctx: Context, layers: slice) -> torch.Tensor:
        if ctx.gate is None or ctx.gate.shape[2] < layers.stop:
            got = None if ctx.gate is None else tuple(ctx.gate.shape)
            raise ValueError(f"this predictor reads the cross-layer gate's {self.G} picks per layer (gate_inputs): "
                             f"pass gate (B, T, L, >= {self.G}) covering layers < {layers.stop}, got {got}")
        return ctx.gate[:, :, layers, : self.G]  # (B, T, n', G)

    def depth_input(self, ctx: Context, routed: torch.Tensor, stop: int, part) -> torch.Tensor:
        g = self._picks(ctx, slice(0, stop))  # (B, T, stop, G)
        rows = nn.functional.embedding(self.base[:stop] + g.clamp_min(0), self.emb[:stop].flatten(0, 2))  # (B, T, stop, G, W)
        return (rows * (g >= 0).unsqueeze(-1)).sum(-2)  # (B, T, stop, W)

    def logits(self, ctx: Context, routed: torch.Tensor, layers: slice, part) -> torch.Tensor:
        g = self._picks(ctx, layers)  # (B, T, n', G)
        w = self.rank_logit[layers].expand(g.shape) * (g >= 0)
        out = torch.zeros(*g.shape[:-1], self.E + 1, dtype=w.dtype, device=g.device)
        return out.scatter_add_(-1, torch.where(g >= 0, g, self.E), w)[..., : self.E]  # (B, T, n', E)
