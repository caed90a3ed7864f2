"""What one forward call hands its head and contributors (`Context`), and what incremental serving
keeps between calls (`PredictorState`).

Shapes: B = batch, T = tokens of this call, L = MoE layers, k = top_k, D = d_model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    """The trunk's output for the T tokens of one call, with what the contributors read besides it.

    h          (B, T, D)     context vector c_t of each token (sees ids <= t and experts < t)
    token_ids  (B, T)        -1 = padding
    prev       (B, T, L, k)  the previous token's routed experts (-1 = none / padding)
    positions  (B, T)        each token's index in its sequence as this model counts it (band masks)
    exclude    (B,) or None  training: each row's prompt id, whose own rows the routing bank must skip
    sample_positions (B, T) or None: training: each token's position in its prompt (the bank's memo key)
    gate       (B, T, L, G) or None: the cross-layer gate's picks per layer (-1 = none), for a predictor
               with gate_inputs; layer l's may be read for layer l only (contributors.GatePicks)
    memo       per-call cache a contributor may use to share work between its depth input and logits
    """

    h: torch.Tensor
    token_ids: torch.Tensor
    prev: torch.Tensor
    positions: torch.Tensor
    exclude: torch.Tensor | None = None
    sample_positions: torch.Tensor | None = None
    served: bool = False  # a serving state holds the earlier tokens (rows are gathered, shapes fixed)
    gate: torch.Tensor | None = None
    memo: dict = field(default_factory=dict)

    @property
    def real(self) -> torch.Tensor:
        """(B, T) bool: not padding."""
        return self.token_ids >= 0

    def completed(self) -> torch.Tensor:
        """(B, T, L, k): each token's routing as later tokens of this call see it (read from the next
        token's `prev`); the last token's is not complete yet (-1), and no token of this call reads it."""
        return torch.cat([self.prev[:, 1:], torch.full_like(self.prev[:, :1], -1)], dim=1)


@dataclass
class PredictorState:
    """Incremental-serving state, on the predictor's device. `version` changes with every `context`
    call, so a consumer holding static copies (CUDA graphs) knows when to refresh them.

    caches     one KV cache per context block
    position   tokens seen so far
    last_ids / last_experts  (B,) / (B, L, k): the last token of the previous call (the start vector
               and the previous-token embedding of the next call read them)
    pending    the previous call's tokens, waiting for their routing to complete before the
               contributors store them: h (B, n, D), ids (B, n), experts of all but the last (B, n-1, L, k),
               positions (B, n)
    parts      each contributor's own state (None for a contributor that keeps none)
    """

    batch_size: int
    caches: list[dict]
    parts: dict[str, object]
    position: int = 0
    version: int = 0
    last_ids: torch.Tensor | None = None
    last_experts: torch.Tensor | None = None
    pending: tuple | None = None
    ctx: Context | None = None  # the last call's context (a runtime predicts its layers from it)
    pad: torch.Tensor | None = None  # (B, position) bool once a call of several tokens held padding (-1 tokens):
    # which cached positions are padding (later calls are masked); None before


@dataclass
class Routed:
    """Tokens whose routing is complete, handed to each contributor's `append`:
    h (B, n, D), token_ids (B, n), experts (B, n, L, k), positions (B, n)."""

    h: torch.Tensor
    token_ids: torch.Tensor
    experts: torch.Tensor
    positions: torch.Tensor


def extends(kept: torch.Tensor, routed: torch.Tensor) -> bool:
    """Does routing `routed` (B, T, n, k) continue `kept` (B, T, n0, k), i.e. hold the same first n0 layers?
    (Serving state kept across one call's per-layer predictions stays valid only while it does.)"""
    n0 = kept.shape[2]
    return n0 <= routed.shape[2] and torch.equal(kept, routed[:, :, :n0])
