"""Logit contributors: sources of additive (B, T, n', E) logits that the model sums over what is
configured (`PredictorConfig.contributors`), plus the one without state, the skip tables.

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
