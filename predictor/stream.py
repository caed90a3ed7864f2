"""PredictionStream: expert predictions for a server that decodes one sequence, one token at a time.

Feed it what the server learns as decoding proceeds; it keeps the predictor's state and answers with
the top-`budget` experts of every layer as soon as that layer can be predicted:

    stream = model.stream(budget=6)                 # or PredictionStream(model, budget=6)
    for token_id in tokens:                         # every token: the prompt's, then generated ones
        ahead = stream.token(token_id)              # {layer: (budget,) expert ids}
        for layer in range(L):                      # the MoE layers, in order
            experts = router(layer)                 # the k ids the router picked for this token
            ahead.update(stream.routed(layer, experts))

token_ahead: `token()` predicts all L layers of the token before its forward pass, `routed()` returns {}.
layer_ahead with lookahead h: `token()` predicts layers 0 .. h-1 (they read none of the token's own
routing) and `routed(l, ...)` predicts layer l + h (when l + h < L).
A predictor with gate_inputs (timing layer_output) predicts layer l from the cross-layer gate's picks
for it, known once layer l - 1 has run: `gate(l, picks)` (before `routed(l, ...)`) returns {l: ids};
`token()` and `routed()` return {}.

Built on `model.step(state, token_ids, prev_experts)` (the trunk, once per token) and
`model.logits(ctx, routed, slice(l, l + 1), state)` (one layer from the routing known so far), so its
picks are the top-k of the whole-sequence forward's logits (tests/test_stream.py). Batch size 1: one
stream per sequence (a batched server keeps one per request, or calls step/logits on a batch itself).
`prefill(token_ids, experts)` takes a whole prompt whose routing the server already has, in one call.
"""

from __future__ import annotations

import torch

from .layer_steps import LayerSteps, supports


class PredictionStream:
    """Per-sequence serving state around an ExpertPredictor (in eval mode; its device is used)."""

    def __init__(self, model, budget: int | None = None):
        c = model.config
        self.model = model.eval()
        self.budget = c.top_k if budget is None else int(budget)
        if not 1 <= self.budget <= c.num_experts:
            raise ValueError(f"budget={budget}: must lie in [1, num_experts={c.num_experts}]")
        self.num_layers, self.top_k, self.num_experts = c.num_layers, c.top_k, c.num_experts
        self.lookahead = c.ahead  # None: token_ahead
        self.gate_inputs = c.gate_inputs  # > 0: layer l is predicted by gate(l, picks)
        self.device = next(model.parameters()).device
        # one layer at a time from running sums when the predictor allows it (predictor/layer_steps.py)
        self.layer_steps = LayerSteps(model) if supports(model) else None
        self.reset()

    def reset(self) -> None:
        """Start a new sequence."""
        self.state = self.model.init_state(1)
        self.ctx = None
        self.position = 0  # tokens fed so far
        self.current = torch.full((1, 1, self.num_layers, self.top_k), -1, dtype=torch.long, device=self.device)
        self.picks = torch.full((1, 1, self.num_layers, max(self.gate_inputs, 1)), -1, dtype=torch.long,
                                device=self.device)  # fmt: skip
        self.gated = 0  # layers of the current token whose gate picks were fed
        self.next_layer = self.num_layers  # the layer routed() expects next (L: the token is complete)
        self.predictions: dict[int, torch.Tensor] = {}  # the current token's picks so far, by layer
        self.logits: dict[int, torch.Tensor] = {}  # and their (E,) logits (sigmoid: probabilities)

    @torch.no_grad()
    def token(self, token_id: int) -> dict[int, torch.Tensor]:
        """The next token's id -> {layer: (budget,) expert ids} for the layers predictable now."""
        if self.ctx is not None and self.next_layer < self.num_layers:
            raise ValueError(f"token {self.position - 1}: layers {self.next_layer}..{self.num_layers - 1} were not "
                             "routed yet; call routed(layer, experts) for every layer before the next token")  # fmt: skip
        prev = None if self.position == 0 else self.current[0]  # (1, L, k): the previous token's routing
        ids = torch.tensor([int(token_id)], dtype=torch.long, device=self.device)
        self.ctx = self.model.step(self.state, ids, prev)
        self._begin_token()
        first = self.num_layers if self.lookahead is None else 0 if self.gate_inputs else self.lookahead
        return self._predict(0, first)

    @torch.no_grad()
    def routed(self, layer: int, experts) -> dict[int, torch.Tensor]:
        """The router's choice for the current token at `layer` (up to k ids) -> {layer + h: ids} in
        layer_ahead mode (when layer + h < L), else {}. Layers must come in order 0, 1, ..., L-1."""
        if self.ctx is None:
            raise ValueError("routed() before token(): feed the token id first")
        if layer != self.next_layer:
            raise ValueError(f"routed(layer={layer}): expected layer {self.next_layer} (layers come in order, "
                             f"each once per token)")  # fmt: skip
        ids = torch.as_tensor(experts, dtype=torch.long, device=self.device).flatten()
        if (len(ids) > self.top_k or len(set(ids.tolist())) < len(ids)
                or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts))):
            raise ValueError(f"routed(layer={layer}): expected at most k={self.top_k} distinct expert ids in "
                             f"[0, {self.num_experts}), got {ids.tolist()}")  # fmt: skip
        if self.gate_inputs and self.gated <= layer:
            raise ValueError(f"routed(layer={layer}) before gate(layer={layer}): this predictor reads the gate's "
                             "picks for a layer before the layer routes")  # fmt: skip
        self.current[0, 0, layer] = -1
        self.current[0, 0, layer, : len(ids)] = ids
        self.next_layer += 1
        if self.lookahead is None or self.gate_inputs or layer + self.lookahead >= self.num_layers:
            return {}
        return self._predict(layer + self.lookahead, layer + self.lookahead + 1)

    @torch.no_grad()
    def gate(self, layer: int, picks) -> dict[int, torch.Tensor]:
        """The cross-layer gate's picks for `layer` (its router on the hidden state leaving the layer
        before; at least gate_inputs ids, best first), once layer - 1 has routed -> {layer: ids}."""
        if not self.gate_inputs:
            raise ValueError("gate(): this predictor reads no gate picks (gate_inputs = 0)")
        if self.ctx is None or layer != self.next_layer or self.gated != layer:
            raise ValueError(f"gate(layer={layer}): expected layer {self.next_layer} after token() and the "
                             "routing of the layers below it, each layer once")  # fmt: skip
        ids = torch.as_tensor(picks, dtype=torch.long, device=self.device).flatten()
        if len(ids) < self.gate_inputs or int(ids.min()) < 0 or int(ids.max()) >= self.num_experts:
            raise ValueError(f"gate(layer={layer}): expected at least {self.gate_inputs} expert ids in "
                             f"[0, {self.num_experts}), got {ids.tolist()}")  # fmt: skip
        self.picks[0, 0, layer] = ids[: self.gate_inputs]
        self.gated += 1
        return self._predict(layer, layer + 1)

    @torch.no_grad()
    def prefill(self, token_ids, experts, gate=None) -> None:
        """A prompt of T tokens whose routing is known (T,), (T, L, k) in one call (and the gate's picks
        (T, L, G) for a predictor that reads them); the stream then goes on with `token()` for the next
        token (its first predictions read the prompt's last routing)."""
        if self.ctx is not None and self.next_layer < self.num_layers:
            raise ValueError("prefill() while the current token is not routed through every layer")
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)[None]
        ex = torch.as_tensor(experts, dtype=torch.long, device=self.device)[None]
        if self.position:  # continuing: the previous token's routing is this call's `prev`
            self.state.last_experts = self.current[:, 0]
        picks = None if gate is None else torch.as_tensor(gate, dtype=torch.long, device=self.device)[None]
        self.model(ids, ex, self.state, gate=picks)
        self.ctx = self.state.ctx
        self.position += ids.shape[1]
        self.current = ex[:, -1:].clone()
        self.next_layer = self.num_layers
        self.predictions, self.logits = {}, {}

    # ---------------------------------------------------------------- internals

    def _begin_token(self) -> None:
        self.position += 1
        self.current = torch.full_like(self.current, -1)
        self.next_layer = 0
        self.picks.fill_(-1)
        self.gated = 0
        self.predictions, self.logits = {}, {}

    def _predict(self, start: int, stop: int) -> dict[int, torch.Tensor]:
        if start >= stop:
            return {}
        gate = self.picks[:, :, :stop] if self.gate_inputs else None
        if self.layer_steps is not None and stop == start + 1:
            out = self.layer_steps(self.ctx, self.current.clone(), start, self.state)  # (1, E)
        else:
            out = self.model.logits(self.ctx, self.current.clone(), slice(start, stop), self.state, gate=gate)[0, 0]
        top = out.topk(self.budget, dim=-1).indices
        picks = {}
        for i, layer in enumerate(range(start, stop)):
            self.logits[layer], self.predictions[layer] = out[i], top[i]
            picks[layer] = top[i]
        return picks
