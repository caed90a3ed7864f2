"""Prefetch drivers: decide which experts to copy ahead of use and hand them to the cache.

The step interface, the batch union and the recall bookkeeping are in prefetcher.py (`Prefetcher`);
the cross-layer gate is in gate.py. Drivers here:
    TokenAhead     one incremental predictor step per decode token, before the forward; prefetches
                   the top-`budget` experts of every layer (predictor mode token_ahead)
    LayerAhead     after layer l routes, predict layer l + h (predictor mode layer_ahead, lookahead h);
                   on CUDA from one captured graph per layer (integrate/runtime/graphed.py), elsewhere
                   from running sums when the predictor has no depth attention (predictor/layer_steps.py)
    CoOccurrencePrefetcher  baseline: after layer l routes, the experts that most often followed that
                   set at layer l + 1 (counts fitted on traces and/or learned online)
Prefill steps are not predicted (the whole prompt routes at once); their tokens are fed to the
predictor afterwards so that its state covers the prompt (padding enters it as -1, "no token").
With B sequences the predictor keeps one state of batch B; each row's top-`budget` picks go to
`prefetch_rows`, which prefetches their union.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from integrate.runtime.cache import ExpertCache
from integrate.runtime.graphed import GraphedLayerLogits
from integrate.runtime.prefetcher import Prefetcher, threshold_logit
from predictor.layer_steps import layer_logits
from predictor.routing_stats import cooccurrence_counts


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
        if not self.decoding or layer + 1 >= self.num_layers:
            return
        ids, scores = [], []
        for row in self.routed_now[:, 0, layer]:  # one row per sequence
            counts = self.counts[layer][row].sum(0)
            top = np.argsort(-counts, kind="stable")[: self.budget]
            ids.append(top)
            scores.append(counts[top] / max(counts.sum(), 1.0))  # shares: comparable across rows
        self.prefetch_rows(layer + 1, ids, scores)

    def end_step(self) -> None:
        self.fit(self.routed_now[self.real])  # learn online from what was just routed (padding left out)


class PredictorDriver(Prefetcher):
    """Shared state handling of the two predictor modes: one predictor state for the batch's sequences,
    advanced by `step` (the trunk, once per decode token); predictions come from `logits` (per layer)."""

    logit_scores = True

    def __init__(self, cache: ExpertCache, predictor, budget: int | None = None, threshold: float = 0.0):
        c = predictor.config
        super().__init__(cache, c.num_layers, c.top_k)
        self.predictor = predictor
        self.budget = budget or c.top_k
        # prefetch only experts predicted with probability >= threshold: a wasted prefetch costs bandwidth
        self.calibration = getattr(predictor, "calibration", None)
        self.min_logit = threshold_logit(threshold, self.calibration)
        self.device = next(predictor.parameters()).device
        self.state = None
        self.prev: torch.Tensor | None = None  # (B, L, k) experts of each sequence's previous token
        self.ctx = None  # the current decode token's Context

    def _top(self, logits: torch.Tensor, routing: torch.Tensor | None = None):
        """(R, E) logits -> per row the top-`budget` expert ids and their logits (prefetch_rows cuts them);
        with `routing` (R, k) on the same device, also its host copy (R, k) int64, read back with the picks."""
        top = logits.reshape(-1, logits.shape[-1]).topk(self.budget, dim=-1)
        parts = [top.values.float(), top.indices.float()] + ([routing.float()] if routing is not None else [])
        # SYNC POINT: one readback of the picks (and the routing they were predicted from); ids ride along
        # as floats: exact below 2**24 experts
        both = torch.cat(parts, -1).cpu().numpy()
        values, ids = both[:, : self.budget], both[:, self.budget : 2 * self.budget].astype(np.int64)
        picks = (ids, values)  # every pick: prefetch_rows cuts them at min_logit
        return picks if routing is None else (*picks, both[:, 2 * self.budget :].astype(np.int64))

    def reset(self, batch_size: int = 1) -> None:
        self.state, self.prev, self.ctx = self.predictor.init_state(batch_size), None, None

    @torch.no_grad()
    def begin_step(self, token_ids: torch.Tensor, padding: torch.Tensor | None = None) -> None:
        super().begin_step(token_ids, padding)
        self._tokens = token_ids.to(self.device)
        if not self.real.all():  # padding enters the predictor as -1 ("no token"), as in training batches
            self._tokens = self._tokens.masked_fill(torch.as_tensor(~self.real, device=self.device), -1)
        if self.state is None or not self.decoding or self.state.batch_size != len(token_ids):
            self.reset(len(token_ids))  # a prompt starts new sequences
        if not self.decoding:
            return
        self.cache.pool.predict((), replace=True)  # the previous token's predictions are spent
        self._predict_step(self._tokens[:, 0])
        self.cache.counters.predictor_steps += 1

    def _predict_step(self, tok: torch.Tensor) -> None:
        self.ctx = self._timed(lambda: self.predictor.step(self.state, tok, self.prev))

    @torch.no_grad()
    def end_step(self) -> None:
        routed = torch.as_tensor(self.routing_of_real(), device=self.device)  # (B, S, L, k)
        if not self.decoding:  # the prompts enter the predictor state in one trunk call (not timed: prefill)
            prev = torch.cat([torch.full_like(routed[:, :1], -1), routed[:, :-1]], dim=1)
            self.predictor.context(self._tokens, prev, self.state)
        self.prev = routed[:, -1]


class TokenAhead(PredictorDriver):
    def _predict_step(self, tok: torch.Tensor) -> None:
        super()._predict_step(tok)
        B, L = len(tok), self.num_layers
        none = torch.empty(B, 1, 0, self.top_k, dtype=torch.long, device=self.device)
        logits = lambda: self.predictor.logits(self.ctx, none, None, self.state)[:, 0]  # noqa: E731  (B, L, E)
        ids, scores = self._timed(lambda: self._top(logits()))  # B * L rows, row-major
        for layer in range(L):  # layer order: the copy queue serves early layers first
            self.prefetch_rows(layer, ids[layer::L], scores[layer::L])


class LayerAhead(PredictorDriver):
    def __init__(self, cache: ExpertCache, predictor, budget: int | None = None, threshold: float = 0.0):
        super().__init__(cache, predictor, budget, threshold)
        self.h = predictor.config.lookahead
        # on CUDA each per-layer call replays a captured graph: eager launches cost more than the math; on
        # the host a predictor without depth attention keeps running sums instead (a few operators a call)
        cuda = self.device.type == "cuda"
        self.layer_logits = GraphedLayerLogits(predictor) if cuda else layer_logits(predictor)

    def _predict_step(self, tok: torch.Tensor) -> None:
        super()._predict_step(tok)
        # (B, 1, L, k) this token's routing on the predictor's device, filled in as its layers route
        self._known = torch.full((len(tok), 1, self.num_layers, self.top_k), -1, dtype=torch.long, device=self.device)
        for layer in range(min(self.h, self.num_layers)):  # nothing of this token is known for l < h
            self.prefetch_rows(layer, *self._timed(partial(self._layer_top, self._known[:, :, :0], layer)))

    @torch.no_grad()
    def routed(self, layer: int, top_k_index: torch.Tensor) -> None:
        target = layer + self.h
        if not self.decoding or target >= self.num_layers:
            super().routed(layer, top_k_index)
            return
        logits = partial(self.layer_logits, self.ctx, self._known[:, :, : layer + 1], target, self.state)
        if self._beside(top_k_index):
            # predictor and routing on one device: predict from the routing where it is and read both back at
            # once, so the layer costs the host one sync, the routing's, not two (the predictor's timing then
            # includes the wait for the layer's routing too)
            routing = top_k_index.reshape(len(self._known), -1)  # (B, k)
            self._known[:, 0, layer] = routing
            ids, scores, host = self._timed(lambda: self._top(logits(), routing))
            self._record(layer, host.reshape(len(host), 1, -1))
        else:  # a predictor elsewhere (on the host): the routing read back on its own, then the picks
            super().routed(layer, top_k_index)
            self._known[:, 0, layer] = torch.as_tensor(self.routed_now[:, 0, layer], device=self.device)
            ids, scores = self._timed(lambda: self._top(logits()))
        self.prefetch_rows(target, ids, scores)

    def _beside(self, top_k_index: torch.Tensor) -> bool:
        """Whether the routing is where the predictor runs (then one readback carries routing and picks)."""
        return top_k_index.device == self.device

    def _layer_top(self, cur: torch.Tensor, layer: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self._top(self.layer_logits(self.ctx, cur, layer, self.state))
