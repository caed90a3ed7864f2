"""Predictor prefetch with the predictor in a worker process (integrate/runtime/predictor_worker.py).

The same predictions as `TokenAhead` / `LayerAhead` (integrate/runtime/prefetch.py), made on another
core: the host thread sends the token and each layer's routing and prefetches the picks that have come
back whenever it passes a hook (a layer routed, a layer's experts issued), so a layer's picks wait
for the host no longer than one hook. Picks for a layer that has already routed are dropped
(`Counters.predictions_late`); replies the worker could not send, the host having left its reply ring
full, are counted each token (`Counters.predictions_dropped`). With `wait=True` the host instead waits
for each layer's picks where the in-process driver would have made them: the same prefetches at the same points (the tests check
this), the cost of the messages on top.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from integrate.runtime.cache import ExpertCache
from integrate.runtime.predictor_worker import PredictorWorker
from integrate.runtime.prefetcher import Prefetcher, threshold_logit


class AsyncPredictor(Prefetcher):
    logit_scores = True  # the worker's picks come with their logits
    scores_every_layer = True  # picks back after their layer routed: none of its experts predicted in time

    def __init__(self, cache: ExpertCache, predictor, budget: int | None = None, threshold: float = 0.0,
                 wait: bool = False, threads: int = 1):  # fmt: skip
        c = predictor.config
        super().__init__(cache, c.num_layers, c.top_k)
        self.h = c.lookahead if c.mode == "layer_ahead" else None
        self.budget = budget or c.top_k
        self.calibration = getattr(predictor, "calibration", None)
        self.min_logit = threshold_logit(threshold, self.calibration)
        self.wait = wait
        self.worker = PredictorWorker(predictor, self.budget, threads)
        self.step_no = 0  # decode tokens sent; replies name theirs, so a stale one is told apart
        self.first_step = 1  # this sequence's first token's step: replies before it are an earlier call's
        self.prev: np.ndarray | None = None  # (B, L, k) each sequence's previous token's routing
        self.next_layer = 0  # the first layer of the current token not routed yet (its picks still useful)
        self.dropped_seen = 0  # the worker's dropped replies already counted

    def _tokens(self, token_ids: torch.Tensor) -> np.ndarray:
        ids = token_ids.cpu().numpy().astype(np.int64)
        ids[~self.real] = -1  # padding enters the predictor as "no token", as in training batches
        return ids

    def reset(self) -> None:
        self.prev = None
        self.worker.replies()  # an earlier call's unread replies: frees their ring slots (first_step skips them)
        self.first_step = self.step_no + 1
        self.worker.send("reset")

    def begin_step(self, token_ids: torch.Tensor, padding: torch.Tensor | None = None) -> None:
        super().begin_step(token_ids, padding)
        self._ids = self._tokens(token_ids)
        if not self.decoding:
            return
        self.step_no += 1
        self.next_layer = 0
        self.count_dropped()
        self.cache.pool.predict((), replace=True)  # the previous token's predictions are spent
        B = len(self._ids)
        prev = self.prev if self.prev is not None and len(self.prev) == B else np.full(
            (B, self.num_layers, self.top_k), -1, dtype=np.int64)
        self._timed(lambda: self.worker.send("token", self.step_no, self._ids[:, 0], prev))
        self.cache.counters.predictor_steps += 1
        if self.wait:  # where the in-process driver predicts: every layer (token_ahead) or layers < h
            self._collect(min(self.h, self.num_layers) if self.h is not None else self.num_layers)

    def routed(self, layer: int, top_k_index: torch.Tensor) -> None:
        if self.decoding and not self.wait:  # before the readback below: picks back now copy while it waits
            self._collect(0)  # (next_layer is `layer`: the previous layer's routed set it)
        super().routed(layer, top_k_index)
        if not self.decoding:
            return
        self.next_layer = layer + 1
        if self.h is not None and layer + self.h < self.num_layers:
            self._timed(lambda: self.worker.send("routed", self.step_no, layer, self.routed_now[:, 0, layer]))
            if self.wait:
                self._collect(1)
                return
        self._collect(0)

    def layer_done(self, layer: int) -> None:
        if self.decoding and not self.wait:
            self._collect(0)

    def end_step(self) -> None:
        routed = self.routing_of_real()
        if not self.decoding:  # the prompts enter the predictor's state in one call
            self._timed(lambda: self.worker.send("prompt", self._ids, routed))
        self.prev = routed[:, -1]

    def close(self) -> None:
        self.count_dropped()
        self.worker.close()

    def count_dropped(self) -> None:
        """Add the replies the worker has dropped since the last count to the counters."""
        dropped = int(self.worker.dropped[0])
        self.cache.counters.predictions_dropped += dropped - self.dropped_seen
        self.dropped_seen = dropped

    def _collect(self, need: int) -> None:
        """Prefetch the picks that have come back (waiting for `need` of this token's first)."""
        got = 0
        while True:
            replies = self._timed(partial(self.worker.replies, wait=got < need))
            for _, step, layer, values, ids in replies:
                if step < self.first_step:  # an earlier call's, arriving after its end
                    continue
                if step != self.step_no or layer < self.next_layer:
                    self.cache.counters.predictions_late += 1  # its layer has routed: too late to help
                    continue
                got += 1
                self.prefetch_rows(layer, ids, values)  # cut at min_logit there
            if got >= need:
                return
