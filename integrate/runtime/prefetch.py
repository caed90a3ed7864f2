"""Prefetch drivers: decide which experts to copy ahead of use and hand them to the cache.

A driver sees one forward pass (one "step") at a time, batch size 1:
    begin_step(token_ids)      before the forward: the step's token ids (S,) (S > 1: prefill)
    routed(layer, top_k_index) when MoE layer `layer` has routed, before its experts run: [S, k]
    end_step()                 after the forward
Drivers:
    TokenAhead     one incremental predictor step per decode token, before the forward; prefetches
                   the top-`budget` experts of every layer (predictor mode token_ahead)
    LayerAhead     after layer l routes, predict layer l + h (predictor mode layer_ahead, lookahead h);
                   on CUDA from one captured graph per layer (integrate/runtime/graphed.py)
    CoOccurrencePrefetcher  baseline: after layer l routes, the experts that most often followed that
                   set at layer l + 1 (counts fitted on traces and/or learned online)
Prefill steps are not predicted (the whole prompt routes at once); their tokens are fed to the
predictor afterwards so that its state covers the prompt.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch

from integrate.runtime.cache import ExpertCache
from integrate.runtime.graphed import GraphedLayerLogits
from predictor.routing_stats import cooccurrence_counts


class Prefetcher:
    def __init__(self, cache: ExpertCache, num_layers: int, top_k: int):
        self.cache = cache
        self.num_layers = num_layers
        self.top_k = top_k
        self.routed_now: np.ndarray | None = None  # (S, L, k) expert ids of the current step, -1 = not yet

    def reset(self) -> None:
        """A new sequence starts (generate() with a fresh KV cache, or the next replayed sequence)."""

    def begin_step(self, token_ids: torch.Tensor) -> None:
        self.routed_now = np.full((len(token_ids), self.num_layers, self.top_k), -1, dtype=np.int64)

    def routed(self, layer: int, top_k_index: torch.Tensor) -> None:
        # SYNC POINT (device -> host): the routing decision; the adapter reads it back anyway
        self.routed_now[:, layer] = top_k_index.reshape(len(self.routed_now), -1).cpu().numpy()

    def end_step(self) -> None:
        pass


class CoOccurrencePrefetcher(Prefetcher):
    """After layer l routes, prefetch the `budget` experts that most often followed its set at layer l + 1.

    `counts` (L-1, E, E) starts at zero (or from `fit` on train rows) and learns online from every step."""

    def __init__(
        self, cache: ExpertCache, num_layers: int, num_experts: int, top_k: int, budget: int | None = None
    ):
        super().__init__(cache, num_layers, top_k)
        self.budget = budget or top_k
        self.num_experts = num_experts
        self.counts = np.zeros((max(num_layers - 1, 0), num_experts, num_experts), dtype=np.float64)

    def fit(self, experts: np.ndarray) -> CoOccurrencePrefetcher:
        """Add co-occurrence counts from (N, L, k) expert ids (e.g. the training split)."""
        experts = np.asarray(experts)
        experts = experts.reshape(-1, self.num_layers, experts.shape[-1])
        self.counts += cooccurrence_counts(experts, self.num_experts)
        return self

    def routed(self, layer: int, top_k_index: torch.Tensor) -> None:
        super().routed(layer, top_k_index)
        if len(self.routed_now) != 1 or layer + 1 >= self.num_layers:
            return
        scores = self.counts[layer][self.routed_now[0, layer]].sum(0)
        nxt = np.argsort(-scores, kind="stable")[: self.budget]
        keys = [(layer + 1, int(e)) for e in nxt]
        self.cache.pool.predict(keys)
        self.cache.prefetch(keys)

    def end_step(self) -> None:
        self.fit(self.routed_now)  # learn online from what was just routed


class PredictorDriver(Prefetcher):
    """Shared state handling of the two predictor modes: one predictor state per sequence, advanced
    by `step` (the trunk, once per decode token); predictions come from `logits` (per layer)."""

    def __init__(self, cache: ExpertCache, predictor, budget: int | None = None, threshold: float = 0.0):
        c = predictor.config
        super().__init__(cache, c.num_layers, c.top_k)
        self.predictor = predictor
        self.budget = budget or c.top_k
        # prefetch only experts predicted with probability >= threshold: a wasted prefetch costs bandwidth
        self.min_logit = float(torch.logit(torch.tensor(threshold))) if threshold > 0 else -float("inf")
        self.device = next(predictor.parameters()).device
        self.state = None
        self.prev: torch.Tensor | None = None  # (1, L, k) experts of the previous token
        self.ctx = None  # the current decode token's Context

    def _timed(self, fn):
        t0 = time.perf_counter()
        out = fn()
        c = self.cache.counters
        # wall time of the predictor alone (prefetch issue excluded); it includes the readback sync
        c.predictor_ms += (time.perf_counter() - t0) * 1e3
        return out

    def _top(self, logits: torch.Tensor) -> list[np.ndarray]:
        """(..., E) logits -> per row the top-`budget` expert ids that clear the threshold."""
        top = logits.topk(self.budget, dim=-1)
        ids = top.indices.cpu().numpy().reshape(-1, self.budget)  # SYNC POINT: ids to the host
        keep = top.values.float().cpu().numpy().reshape(-1, self.budget) >= self.min_logit
        return [i[k] for i, k in zip(ids, keep)]

    def reset(self) -> None:
        self.state, self.prev, self.ctx = self.predictor.init_state(1), None, None

    @torch.no_grad()
    def begin_step(self, token_ids: torch.Tensor) -> None:
        super().begin_step(token_ids)
        self._tokens = token_ids.to(self.device)
        self.decoding = len(token_ids) == 1
        if self.state is None or not self.decoding:  # a prompt starts a new sequence
            self.reset()
        if not self.decoding:
            return
        self.cache.pool.predict((), replace=True)  # the previous token's predictions are spent
        self._predict_step(self._tokens)
        self.cache.counters.predictor_steps += 1

    def _predict_step(self, tok: torch.Tensor) -> None:
        self.ctx = self._timed(lambda: self.predictor.step(self.state, tok, self.prev))

    def _predict(self, layer: int, experts: np.ndarray) -> None:
        keys = [(layer, int(e)) for e in experts]
        self.cache.pool.predict(keys)
        self.cache.prefetch(keys)

    @torch.no_grad()
    def end_step(self) -> None:
        routed = torch.as_tensor(self.routed_now, device=self.device)  # (S, L, k)
        if not self.decoding:  # the prompt enters the predictor state in one trunk call (not timed: prefill)
            prev = torch.cat([torch.full_like(routed[:1], -1), routed[:-1]])
            self.predictor.context(self._tokens[None], prev[None], self.state)
        self.prev = routed[-1:]


class TokenAhead(PredictorDriver):
    def _predict_step(self, tok: torch.Tensor) -> None:
        super()._predict_step(tok)
        none = torch.empty(1, 1, 0, self.top_k, dtype=torch.long, device=self.device)
        logits = lambda: self.predictor.logits(self.ctx, none, None, self.state)[0, 0]  # noqa: E731  (L, E)
        ids = self._timed(lambda: self._top(logits()))  # (L, budget)
        for layer in range(self.num_layers):  # layer order: the copy queue serves early layers first
            self._predict(layer, ids[layer])


class LayerAhead(PredictorDriver):
    def __init__(self, cache: ExpertCache, predictor, budget: int | None = None, threshold: float = 0.0):
        super().__init__(cache, predictor, budget, threshold)
        self.h = predictor.config.lookahead
        # on CUDA each per-layer call replays a captured graph: eager launches cost more than the math
        cuda = self.device.type == "cuda"
        self.layer_logits = GraphedLayerLogits(predictor) if cuda else self._eager

    def _eager(self, ctx, routed: torch.Tensor, layer: int, state) -> torch.Tensor:
        return self.predictor.logits(ctx, routed, slice(layer, layer + 1), state)[:, 0, 0]  # (1, E)

    def _predict_step(self, tok: torch.Tensor) -> None:
        super()._predict_step(tok)
        empty = torch.empty(1, 1, 0, self.top_k, dtype=torch.long, device=self.device)
        for layer in range(min(self.h, self.num_layers)):  # nothing of this token is known for l < h
            top = partial(self._layer_top, empty, layer)
            self._predict(layer, self._timed(top)[0])

    @torch.no_grad()
    def routed(self, layer: int, top_k_index: torch.Tensor) -> None:
        super().routed(layer, top_k_index)
        target = layer + self.h
        if not self.decoding or target >= self.num_layers:
            return
        cur = torch.as_tensor(self.routed_now[None, :, : layer + 1], device=self.device)  # (1, 1, l+1, k)
        self._predict(target, self._timed(partial(self._layer_top, cur, target))[0])

    def _layer_top(self, cur: torch.Tensor, layer: int) -> list[np.ndarray]:
        return self._top(self.layer_logits(self.ctx, cur, layer, self.state))
