"""The runtime's learned eviction (integrate/runtime/expected_use.py) against the simulator's: the same
decisions on a replayed trace, a hand case, and the reuse hazard travelling in the predictor file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from integrate.runtime.cache import ExpertCache
from integrate.runtime.expected_use import ExpectedUse
from integrate.runtime.slots import SlotPool
from integrate.runtime.store import ExpertStore
from predictor.simulate import Accesses, Predictions, simulate
from predictor.simulate.policy import Policy, ReuseHazard, learned_score, reuse_hazard
from predictor.simulate.timing import TimeModel


def random_accesses(rng, L, E, k, lengths) -> Accesses:
    """Sequences of `lengths` tokens; each layer routes k distinct experts, drawn with a skew (some
    experts far more often than others), so reuse and the per-expert hazard both matter."""
    weights = rng.dirichlet(np.full(E, 0.3), size=L)  # (L, E)
    rows = [rng.choice(E, k, replace=False, p=weights[layer]) + layer * E for _ in range(sum(lengths))
            for layer in range(L)]  # fmt: skip
    return Accesses(L, E, k, np.asarray(rows, np.int32), np.asarray(lengths, np.int64))


def store(L, E) -> ExpertStore:
    return ExpertStore.from_experts(lambda layer, e: {"w": torch.full((2,), 100.0 * layer + e)}, L, E)


def runtime_replay(acc: Accesses, pred: Predictions, slots: int, per_layer: bool, hazard: ReuseHazard) -> tuple:
    """Replay `acc` through the runtime's cache (CPU) with the learned eviction, demand loads only: at
    each token's start the picks for layer 0, once layer l has routed those for l + 1 (layer_ahead,
    h = 1), as the simulator learns them. Returns (hits per layer, demand loads)."""
    L, E, k = acc.num_layers, acc.num_experts, acc.top_k
    expected = ExpectedUse(L, E, k, hazard)
    cache = ExpertCache(store(L, E), slots, "cpu", "learned", per_layer, expected=expected)
    hits = np.zeros(L, np.int64)
    r = 0
    for T in acc.seq_tokens.tolist():
        cache.new_sequence()
        for _ in range(T):
            for layer in range(L):
                if layer == 0:
                    cache.pool.learn(0, pred.ids[r].tolist(), pred.probs[r])
                if layer + 1 < L:
                    cache.pool.learn(layer + 1, pred.ids[r + 1].tolist(), pred.probs[r + 1])
                experts = [int(key) - layer * E for key in acc.keys[r]]
                before = cache.counters.hits
                cache.fetch_group(layer, experts)
                hits[layer] += cache.counters.hits - before
                cache.end_layer(layer)
                r += 1
            cache.end_step()
    return hits, cache.counters.demand_loads


@pytest.mark.parametrize("per_layer, capacity", [(False, 0.2), (False, 0.4), (True, 0.25)])
def test_runtime_takes_the_simulators_learned_eviction_decisions(per_layer, capacity):
    """Same trace, same predictions (their probabilities below the admission cut, so nothing is
    prefetched and only eviction decides), same hazard: the runtime's pool and the replay engine hit
    exactly the same accesses, layer by layer."""
    rng = np.random.default_rng(0)
    L, E, k = 4, 16, 2
    acc = random_accesses(rng, L, E, k, [30, 5, 41, 12])
    hazard = reuse_hazard(random_accesses(np.random.default_rng(1), L, E, k, [60, 60]), max_gap=8)
    assert hazard.factor.std() > 0.05  # the per-expert factors differ: they take part in the decisions
    pred = Predictions.truth(acc, "layer_ahead", 1, recall=0.7, seed=2)
    pred.probs[:] = rng.uniform(0.05, 0.95, pred.probs.shape).astype(np.float32)  # informative, not certain
    pol = Policy("learned", "all", min_prob=0.99, sample=1 << 20)  # every slot rated, no copy admitted
    scope = "per_layer" if per_layer else "global"
    sim = simulate(acc, TimeModel(1_000_000, 25.0, 1.0), pol, capacity, scope, predictions=pred, hazard=hazard)
    assert sim.prefetch_issued == 0 and 0 < sim.hits < sim.accesses
    slots = sim.slots
    hits, demand = runtime_replay(acc, pred, slots, per_layer, hazard)
    assert hits.tolist() == sim.hits_per_layer
    assert demand == sim.demand_loads
    assert runtime_replay(acc, pred, slots, per_layer, None)[0].tolist() != hits.tolist()  # the hazard takes part
    # and the decisions matter: LRU on the same trace hits a different number
    assert simulate(acc, TimeModel(1_000_000, 25.0, 1.0), "lru", capacity, scope).hits != sim.hits


def test_the_victim_is_the_farthest_expected_use_by_hand():
    """Four resident experts of layer 1 (L = 2, E = 4, k = 1), used at token 0, seen from layer 0 of
    token 5 (row 10), whose layer 1 (row 11) the predictor has spoken about: (1, 0) at 0.9, the rest
    unlisted at the layer's floor f = (1 - 0.9) / 3. Each one's usage rate q (5 tokens since its use:
    the rate past every gap, 0.5) times its factor (2, 1, 0.5, 1); expected distance 1 + L (1 - p) / q."""
    L, E, k = 2, 4, 1
    factor = np.array([[1.0] * 4, [2.0, 1.0, 0.5, 1.0]])
    x = ExpectedUse(L, E, k, ReuseHazard(np.array([[0.25, 0.5], [0.25, 0.5]]), factor))
    for e in range(4):
        x.inserted((1, e))
        x.used((1, e))
    for _ in range(5):
        x.step_done()
    x.learn(1, [0], [0.9])
    f = (1 - 0.9) / 3
    score = lambda e: learned_score(4 + e, 1, x.layer, x.row, L, E, int(x.last_tok[4 + e]), x.tok, x.tok0,  # noqa: E731
                                    int(x.krow[4 + e]), float(x.kp[4 + e]), int(x.lknown[1]), float(x.lfloor[1]),
                                    x.hazard, x.qmin)  # fmt: skip
    hand = [1 + 2 * 0.1 / 1.0, 1 + 2 * (1 - f) / 0.5, 1 + 2 * (1 - f) / 0.25, 1 + 2 * (1 - f) / 0.5]
    assert [score(e) for e in range(4)] == pytest.approx(hand, rel=1e-6)
    everything = range(L * E)
    assert x.victim(everything, ()) == (1, 2)
    assert x.victim(everything, ({(1, 2)},)) == (1, 1)  # a tie with (1, 3): the least recently used
    assert x.victim(everything, ({(1, 2)}, {(1, 1), (1, 3)})) == (1, 0)
    assert x.victim(everything, ({(1, 0), (1, 1), (1, 2), (1, 3)},)) is None
    assert x.victim(range(0, E), ()) is None  # layer 0's keys: none resident
    # a token later the prediction is stale (it was for row 11; layer 1 runs next at row 13): p = q
    x.step_done()
    assert [score(e) for e in range(4)] == pytest.approx([1.0, 3.0, 7.0, 3.0])
    x.evicted((1, 2))
    assert x.victim(everything, ()) == (1, 1)


def test_pool_needs_expected_use_for_learned_only():
    with pytest.raises(ValueError, match="ExpectedUse"):
        SlotPool(4, 8, "cpu", "learned")
    with pytest.raises(ValueError, match="ExpectedUse"):
        SlotPool(4, 8, "cpu", "lru", expected=ExpectedUse(2, 2, 1))
    pool = SlotPool(4, 8, "cpu", "learned", expected=ExpectedUse(2, 4, 1))
    with pytest.raises(ValueError, match="as many probabilities"):
        pool.learn(0, [1, 2], [0.5])


def test_prefetch_rows_learns_every_pick_and_prefetches_those_above_the_cut():
    """A predictor's picks reach the learned eviction with their (calibrated) probabilities, the ones
    below the threshold too, as the simulator learns every pick; only those above it are prefetched."""
    from integrate.runtime.prefetcher import Prefetcher, threshold_logit
    from predictor.calibration import Calibration

    L, E, k = 2, 8, 2
    cache = ExpertCache(store(L, E), 8, "cpu", "learned", expected=ExpectedUse(L, E, k))
    driver = Prefetcher(cache, L, k)
    driver.logit_scores = True
    driver.calibration = Calibration(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0]))  # p 0.5 -> 0.8
    driver.min_logit = threshold_logit(0.6, driver.calibration)  # calibrated 0.6: raw 0.375
    assert 1 / (1 + np.exp(-driver.min_logit)) == pytest.approx(0.375)
    logits = np.array([[2.0, 0.0, -1.0], [0.0, -3.0, -4.0]])  # two rows (a batch of two), best first
    driver.prefetch_rows(1, np.array([[3, 5, 6], [5, 1, 7]]), logits)
    x = cache.pool.expected
    listed = {e: float(x.kp[E + e]) for e in range(E) if x.krow[E + e] == x.row + 1}
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    assert listed == pytest.approx({3: driver.calibration(sig(2.0)), 5: 0.8, 6: driver.calibration(sig(-1.0)),
                                    1: driver.calibration(sig(-3.0)), 7: driver.calibration(sig(-4.0))})  # fmt: skip
    assert x.lfloor[1] == pytest.approx(max(0.0, k - sum(listed.values())) / (E - 5))
    assert set(cache.pool.slot_of) == {(1, 3), (1, 5)} and cache.pool.predicted == {(1, 3), (1, 5)}
    assert driver._expected[1] == [{3, 5}, {5}]  # recall counts what was prefetched, as before
    from integrate.runtime.async_prefetch import AsyncPredictor
    from integrate.runtime.gate_inputs import GateInputsAhead
    from integrate.runtime.prefetch import LayerAhead, TokenAhead

    assert all(cls.logit_scores for cls in (TokenAhead, LayerAhead, GateInputsAhead, AsyncPredictor))
    with pytest.warns(UserWarning, match="nothing is prefetched"):
        assert threshold_logit(0.99, Calibration(np.array([0.0, 1.0]), np.array([0.0, 0.9]))) == float("inf")
