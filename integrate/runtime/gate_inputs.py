"""Predictor prefetch fed the cross-layer gate's picks: the driver of a predictor with gate_inputs.

Such a predictor (timing layer_output, predictor/config.py) predicts MoE layer l from the routing of the
layers below and the gate's top-G picks for layer l: layer l's router on the hidden state entering its
decoder layer (gate.py), known once layer l - 1 has run. A forward pre-hook on that decoder layer
computes the picks, and the predictor's per-layer call turns them, with what the token routed so far,
into layer l's prefetches; the copies overlap layer l's attention, as the simulator's layer_output
timing has them. Calls are eager (the captured graphs of graphed.py take no picks), and each layer
costs two readbacks: its routing, then the picks. Decode steps only, like every driver.
"""

from __future__ import annotations

import torch

from integrate.runtime.cache import ExpertCache
from integrate.runtime.gate import GateHooks
from integrate.runtime.prefetch import PredictorDriver
from integrate.runtime.prefetcher import Prefetcher


class GateInputsAhead(GateHooks, PredictorDriver):
    def __init__(self, cache: ExpertCache, predictor, model, adapter, budget: int | None = None,
                 threshold: float = 0.0):  # fmt: skip
        super().__init__(cache, predictor, budget, threshold)
        self.G = predictor.config.gate_inputs
        self._hook_layers(model, adapter)

    def _predict_step(self, tok: torch.Tensor) -> None:
        super()._predict_step(tok)  # the trunk; layer 0 waits for its picks, as every layer does
        B, L = len(tok), self.num_layers
        self._known = torch.full((B, 1, L, self.top_k), -1, dtype=torch.long, device=self.device)
        self._seen = torch.full((B, 1, L, self.G), -1, dtype=torch.long, device=self.device)  # the gate's picks

    @torch.no_grad()
    def routed(self, layer: int, top_k_index: torch.Tensor) -> None:
        Prefetcher.routed(self, layer, top_k_index)  # read back and scored against the layer's picks
        if self.decoding:
            self._known[:, 0, layer] = torch.as_tensor(self.routed_now[:, 0, layer], device=self.device)

    @torch.no_grad()
    def _gate(self, i: int, layer: int, hidden: torch.Tensor) -> None:
        """Before decoder layer `layer` (MoE layer i) runs: its gate's picks, then the predictor's layer i."""
        if self.routed_now is None or not self.decoding:
            return

        def predict():
            self._seen[:, 0, i] = self._picks(layer, hidden, self.G)[0].to(self.device)
            logits = self.predictor.logits(self.ctx, self._known[:, :, :i], slice(i, i + 1), self.state,
                                           gate=self._seen[:, :, : i + 1])  # fmt: skip
            return self._top(logits[:, 0, 0])  # SYNC POINT: the picks' readback

        self.prefetch_rows(i, *self._timed(predict))

    def end_step(self) -> None:
        PredictorDriver.end_step(self)  # the token's routing enters the predictor's state
        GateHooks.end_step(self)
