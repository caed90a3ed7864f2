"""Cross-layer gate prefetch: a training-free baseline after Fate, MoE layer i's own router applied to
the hidden state that leaves the decoder layer before it.

Which tensor, and why. The router of MoE layer i (decoder layer d) reads norm_d(h + attn_d(h)): h is the
residual stream entering decoder layer d, norm_d its `post_attention_layernorm`. When decoder layer
d - 1 finishes, h is known and attn_d(h) is not, so the gate feeds norm_d(h) to router_d. It is the
same RMSNorm instance, so the router sees inputs on the scale it was trained on; what is missing is
one attention update, which changes the residual stream little, and that is why the previous layer's
hidden state predicts the next layer's routing (Fate). h comes from a forward pre-hook on decoder
layer d (`adapter.layer_input_hook`): the output of decoder layer d - 1 (the embeddings when d = 0).
When d - 1 is itself an MoE layer, the common case, this is "as soon as MoE layer i - 1 finishes";
across a dense layer (DeepSeek's first layers, Qwen2-MoE's `mlp_only_layers`) it is still the layer
right before. The copies overlap decoder layer d's attention. `adapter.router_topk` runs the router
module itself, so on the router's true input its picks are the router's own (DeepSeek's group limits
and score correction included); a `budget` above k adds the next best experts by router affinity.

Decode steps only, like the other drivers (a prefill step routes every prompt token at once). One
prediction per sequence (row of the batch), merged by `Prefetcher.prefetch_rows`. Its router calls and
readbacks count as predictor time (`predictor_ms`, one `predictor_steps` per decode step).
"""

from __future__ import annotations

import time
from functools import partial

import torch

from integrate.runtime.cache import ExpertCache
from integrate.runtime.prefetcher import Prefetcher


class GateHooks:
    """A driver that acts before each MoE layer's decoder layer runs (`_gate(i, layer, hidden)`, from the
    hidden state entering it) on forwards the runtime drives: the hooks, and their removal."""

    def _hook_layers(self, model, adapter) -> None:
        self.model, self.adapter = model, adapter
        self._handles = [
            adapter.layer_input_hook(model, layer, partial(self._gate, i, layer))
            for i, layer in enumerate(adapter.moe_layers(model))
        ]

    def _picks(self, layer: int, hidden: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return layer_gate_picks(self.adapter, self.model, layer, hidden, n)

    def end_step(self) -> None:
        self.decoding = False  # a forward the runtime does not drive (no begin_step) predicts nothing

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class GatePrefetcher(GateHooks, Prefetcher):
    def __init__(self, cache: ExpertCache, model, adapter, top_k: int, budget: int | None = None):
        super().__init__(cache, len(adapter.moe_layers(model)), top_k)
        self.budget = budget or top_k
        self._hook_layers(model, adapter)

    def begin_step(self, token_ids: torch.Tensor, padding: torch.Tensor | None = None) -> None:
        super().begin_step(token_ids, padding)
        if self.decoding:
            self.cache.pool.predict((), replace=True)  # the previous token's predictions are spent
            self.cache.counters.predictor_steps += 1

    @torch.no_grad()
    def _gate(self, moe_layer: int, layer: int, hidden: torch.Tensor) -> None:
        if self.routed_now is None or not self.decoding:
            return
        t0 = time.perf_counter()
        ids, scores = self._picks(layer, hidden, self.budget)
        ids, scores = ids.cpu().numpy(), scores.float().cpu().numpy()  # SYNC POINT: the picks to the host
        self.cache.counters.predictor_ms += (time.perf_counter() - t0) * 1e3
        self.prefetch_rows(moe_layer, ids, scores)


def layer_gate_picks(adapter, model, layer: int, hidden: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-layer gate for decoder layer `layer`: from `hidden` [..., H] entering it, the n picks of its
    router (`gate_picks` order) and their affinities, [N, n] with N = hidden's rows (what collect records
    as `gate_ahead`, and what the gate drivers prefetch or feed a predictor)."""
    x = adapter.gate_input(model, layer, hidden)
    chosen, affinity = adapter.router_topk(model, layer, x.reshape(-1, x.shape[-1]))
    return gate_picks(chosen, affinity, n)


def gate_picks(chosen: torch.Tensor, affinity: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, affinities) [N, n]: the router's own picks `chosen` [N, k] first, best affinity first, then
    (n > k) the next best experts by `affinity` [N, E]."""
    ids = chosen.gather(1, affinity.gather(1, chosen).argsort(dim=1, descending=True, stable=True))
    n = min(n, affinity.shape[1])
    if n > ids.shape[1]:
        rest = affinity.scatter(1, chosen, -float("inf")).topk(n - ids.shape[1], dim=1).indices
        ids = torch.cat([ids, rest], dim=1)
    ids = ids[:, :n]
    return ids, affinity.gather(1, ids)
