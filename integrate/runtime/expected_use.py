"""The learned eviction in the runtime: evict the resident expert whose next use is expected farthest.

The score is the simulator's (predictor.simulate.policy: `learned_ranking` rates each key with
`learned_score`, the code the replay engine ranks slots with), fed by what the runtime knows:
  * a clock: the step (one token per sequence; a prefill step counts as one), the layer running, and
    the step at which the running sequences started (`new_sequence`);
  * per key (layer * E + expert): the step of its last use, a stamp of its last use or fill (ties go
    to the least recent), and its latest predicted probability with the row (step * L + layer) it
    was predicted for; per layer the row of its latest prediction and the chance left to experts
    outside that list, (k - sum p) / (E - listed) (as the engine's prefetch._learn);
  * the reuse hazard, fitted on the predictor's train split and shipped in its file
    (predictor/export.py, `reuse_hazard`): the usage rate of what the predictor has not spoken about.
Without one it uses the mean rate k / E everywhere (`make_prefetcher` warns when a predictor has none).

With a batch, a step's predictions are the union of its sequences' picks, each at its best
probability; the floor, like the hazard's rates (fitted per sequence), still assumes one sequence.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

import numpy as np

from predictor.simulate.policy import Policy, ReuseHazard, learned_ranking

RANKED = 16  # victims one pass ranks: more than the protected ones it usually meets first

Key = tuple[int, int]


class ExpectedUse:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, hazard: ReuseHazard | None = None,
                 qmin: float = Policy.qmin):  # fmt: skip
        self.L, self.E, self.k = num_layers, num_experts, top_k
        self.qmin = qmin
        self.hazard: np.ndarray = np.empty(0)
        self.use_hazard(hazard)
        n = num_layers * num_experts
        self.resident = np.zeros(n, np.bool_)
        self._ranked = np.empty(RANKED, np.int64)
        self.last_tok = np.full(n, -1, np.int64)
        self.stamp = np.zeros(n, np.float64)
        self.krow = np.full(n, -1, np.int64)
        self.kp = np.zeros(n, np.float32)
        self.lknown = np.full(num_layers, -1, np.int64)
        self.lfloor = np.zeros(num_layers, np.float32)
        self.tok, self.tok0, self.layer, self._clock = 0, 0, 0, 0.0
        self.victim(range(0), ())  # load the compiled ranking now, not inside the first timed step

    def use_hazard(self, hazard: ReuseHazard | None) -> None:
        """Rate unpredicted experts by `hazard` (a ReuseHazard for this L, E; None: the mean rate k / E)."""
        self.hazard = ReuseHazard.of(hazard, self.L, self.E, self.k).packed()

    def key(self, key: Key) -> int:
        return key[0] * self.E + key[1]

    # -- the clock ---------------------------------------------------------------------------------
    @property
    def row(self) -> int:
        return self.tok * self.L + self.layer

    def layer_done(self, layer: int) -> None:
        """Layer `layer` has run: the next one runs now (the last stays current until the step ends)."""
        self.layer = min(layer + 1, self.L - 1)

    def step_done(self) -> None:
        self.tok, self.layer = self.tok + 1, 0

    def new_sequence(self) -> None:
        """New sequences start with the next step: uses before it no longer count as reuses."""
        self.tok0 = self.tok

    # -- what happens to keys ---------------------------------------------------------------------
    def learn(self, layer: int, experts: Iterable[int], probs: Iterable[float]) -> None:
        """The predictor's picks for `layer` in this step, with their probabilities (NaN read as 0)."""
        experts, probs = list(experts), np.nan_to_num(np.asarray(probs, np.float64), nan=0.0).clip(0.0, 1.0)
        if len(experts) != len(probs):
            raise ValueError(f"learn: {len(experts)} experts need as many probabilities, got {len(probs)}")
        row = self.tok * self.L + layer
        listed, n = 0.0, 0
        for e, p in zip(experts, probs.tolist()):
            kk = layer * self.E + int(e)
            self.kp[kk], self.krow[kk] = p, row
            listed, n = listed + p, n + 1
        self.lknown[layer] = row
        self.lfloor[layer] = max(0.0, self.k - listed) / max(1, self.E - n)

    def _touch(self, kk: int) -> None:
        self.stamp[kk] = self._clock
        self._clock += 1.0

    def inserted(self, key: Key) -> None:
        kk = self.key(key)
        self.resident[kk] = True
        self._touch(kk)

    def used(self, key: Key) -> None:
        kk = self.key(key)
        self.last_tok[kk] = self.tok
        self._touch(kk)

    def used_on_host(self, key: Key) -> None:
        """`key` ran on the host CPU (hybrid execution), not from a slot: a use all the same."""
        self.last_tok[self.key(key)] = self.tok

    def evicted(self, key: Key) -> None:
        self.resident[self.key(key)] = False

    def victim(self, keys: range, protected: tuple[Container[Key], ...]) -> Key | None:
        """The resident key in `keys` (a range of layer * E + expert) expected to be used last, outside
        every `protected` container; None when every resident one is protected. One compiled pass ranks
        the best RANKED; the first of them not protected is the victim (a full ranking if all are)."""
        args = (self.row, self.layer, self.L, self.E, self.tok, self.tok0, self.last_tok, self.stamp, self.krow,
                self.kp, self.lknown, self.lfloor, self.hazard, self.qmin)  # fmt: skip
        out = self._ranked
        for _ in range(2):
            n = learned_ranking(self.resident, keys.start, keys.stop, *args, out)
            for kk in out[:n].tolist():
                key = divmod(kk, self.E)
                if not any(key in p for p in protected):
                    return key
            if n < len(out):
                return None
            out = np.empty(keys.stop - keys.start, np.int64)  # more protected than ranked: rank them all
        return None
