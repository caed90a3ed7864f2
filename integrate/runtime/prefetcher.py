"""The prefetch driver interface, and what every driver shares: per-sequence predictions merged into
one prefetch list per layer, and the recall of those predictions against the routing that follows.

A driver sees one forward pass of the model (one "step") at a time, over a batch of B sequences:
    begin_step(token_ids, padding)  before the forward: token_ids (B, S); padding (B, S) bool or None
                                    (True = a padding position). S == 1 is a decode step (one new token
                                    per sequence); S > 1 a prefill step (the prompts, left-padded)
    routed(layer, top_k_index)      when MoE layer `layer` has routed, before its experts run: [B*S, k]
    layer_done(layer)               when the layer's experts have been issued (a driver whose predictions
                                    come back asynchronously prefetches what has arrived)
    end_step()                      after the forward
    close()                         detach what the driver hooked into the model (Runtime.uninstall)
Drivers predict decode steps only. `prefetch_rows` takes each sequence's picks for a layer and
prefetches their union, capped at the slots one layer can use (all of them, or the layer's share
when slots are split per layer), highest score first: an expert's score is its best over the rows,
so one sequence's sure pick goes before another's long shot.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from integrate.runtime.cache import ExpertCache


def threshold_logit(threshold: float, calibration=None) -> float:
    """The logit below which a predicted expert is not prefetched (probability `threshold`, after the
    predictor's `calibration` if it has one: predictor/calibration.py; -inf for 0, +inf if none reaches it)."""
    raw = calibration.min_raw(threshold) if calibration is not None and threshold > 0 else threshold
    if raw >= 1:
        warnings.warn(f"threshold {threshold}: above every calibrated probability of the predictor, so nothing "
                      "is prefetched", stacklevel=3)  # fmt: skip
        return float("inf")
    return float(torch.logit(torch.tensor(raw, dtype=torch.float64))) if raw > 0 else -float("inf")


def _best_scores(ids, scores) -> dict[int, float]:
    """expert -> its best score over the rows (scores None: minus its best rank)."""
    best: dict[int, float] = {}
    for r, row in enumerate(ids):
        for j, e in enumerate(row):
            s, e = (float(scores[r][j]) if scores is not None else -j), int(e)
            if e not in best or s > best[e]:
                best[e] = s
    return best


def kept_picks(values: np.ndarray, ids: np.ndarray, min_logit: float) -> tuple[list, list]:
    """Per row the picks (ids, best first) and their logits that clear `min_logit`: (R, budget) each."""
    keep = values >= min_logit
    return [i[k] for i, k in zip(ids, keep)], [v[k] for v, k in zip(values, keep)]


class Prefetcher:
    logit_scores = False  # prefetch_rows' scores are a predictor's logits: cut at min_logit, read as probabilities
    min_logit = -float("inf")
    calibration = None  # a predictor's map from its sigmoid to calibrated probabilities (predictor/calibration.py)
    scores_every_layer = False  # True: a decode layer without picks in time scores as predicting none of its experts

    def __init__(self, cache: ExpertCache, num_layers: int, top_k: int):
        self.cache = cache
        self.num_layers = num_layers
        self.top_k = top_k
        self.routed_now: np.ndarray | None = None  # (B, S, L, k) expert ids of the current step, -1 = not yet
        self.real: np.ndarray | None = None  # (B, S) bool: not padding
        self.decoding = False
        self._expected: dict[int, list[set[int]]] = {}  # layer -> each row's predicted experts (recall)

    def reset(self) -> None:
        """A new sequence starts (generate() with a fresh KV cache, or the next replayed sequence)."""

    def begin_step(self, token_ids: torch.Tensor, padding: torch.Tensor | None = None) -> None:
        B, S = token_ids.shape
        self.routed_now = np.full((B, S, self.num_layers, self.top_k), -1, dtype=np.int64)
        self.real = np.ones((B, S), dtype=bool) if padding is None else ~padding.cpu().numpy().astype(bool)
        self.decoding = S == 1
        self._expected.clear()

    def routed(self, layer: int, top_k_index: torch.Tensor) -> None:
        B, S = self.routed_now.shape[:2]
        # SYNC POINT (device -> host): the routing decision; the adapter reads it back anyway
        self._record(layer, top_k_index.reshape(B, S, -1).cpu().numpy())

    def _record(self, layer: int, host: np.ndarray) -> None:
        """Layer `layer`'s routing, read back: host (B, S, k) expert ids (guarded from eviction until the
        layer ends: the prefetches this driver issues now take other slots)."""
        self.routed_now[:, :, layer] = host
        self.cache.guard_routing(layer, host.reshape(-1).tolist())
        missing = [set()] * len(host) if self.scores_every_layer and self.decoding else None
        expected = self._expected.pop(layer, missing)
        if expected is not None:  # how much of this layer's routing the driver had predicted
            c = self.cache.counters
            for truth, predicted in zip(self.routed_now[:, -1, layer], expected):
                truth = set(truth.tolist())
                c.predicted_routed += len(truth & predicted)
                c.routed_scored += len(truth)

    def layer_done(self, layer: int) -> None:
        pass

    def end_step(self) -> None:
        pass

    def _timed(self, fn):
        """Run `fn`, counting its wall time as the predictor's host-thread time (`predictor_ms`)."""
        t0 = time.perf_counter()
        out = fn()
        self.cache.counters.predictor_ms += (time.perf_counter() - t0) * 1e3
        return out

    def routing_of_real(self) -> np.ndarray:
        """(B, S, L, k) the step's routing with padding positions' set to -1 (no token's routing)."""
        routed = self.routed_now.copy()
        routed[~self.real] = -1
        return routed

    def close(self) -> None:
        pass

    @property
    def layer_capacity(self) -> int:
        """Slots one layer's experts can occupy at once."""
        pool = self.cache.pool
        return pool.num_slots // self.num_layers if pool.per_layer else pool.num_slots

    def prefetch_rows(self, layer: int, ids, scores=None) -> None:
        """Prefetch MoE layer `layer`'s predicted experts: ids[r] are row r's picks, best first, and
        scores[r] their scores, comparable across rows (None: rank order). A predictor's (logits) are
        cut at `min_logit`; the union of what is left goes to the cache, capped at `layer_capacity`,
        best score first; each row's own picks after the cut count for its recall (before the cap: recall
        rates the prediction, the hit rate what was prefetched). The learned eviction reads
        every pick's probability, cut or not (as the simulator's does)."""
        if self.logit_scores and scores is not None:
            if self.cache.pool.expected is not None:  # only the learned eviction reads them
                self._learn(layer, ids, scores)
            ids, scores = kept_picks(np.asarray(scores), np.asarray(ids), self.min_logit)
        self._expected[layer] = [set(int(e) for e in row) for row in ids]
        best = _best_scores(ids, scores)
        keys = [(layer, e) for e in sorted(best, key=lambda e: -best[e])[: self.layer_capacity]]
        self.cache.pool.predict(keys)
        self.cache.prefetch(keys)

    def _learn(self, layer: int, ids, logits) -> None:
        """Every pick's probability (calibrated if the predictor is; its best over the rows) to the pool."""
        best = _best_scores(ids, logits)
        experts = list(best)
        p = 1.0 / (1.0 + np.exp(-np.array([best[e] for e in experts], dtype=np.float64)))
        self.cache.pool.learn(layer, experts, p if self.calibration is None else self.calibration(p))
