"""Cache simulator: every policy on small traces with known answers, and the time model by hand."""

from functools import cache

import numpy as np
import pytest

from predictor.metrics import ExpertMetrics
from predictor.simulate import (
    ActivationMatrixScorer,
    CoOccurrence,
    Oracle,
    TimeModel,
    build_accesses,
    policies,
    run_demand,
    run_prefetch,
    top_budget,
)
from predictor.simulate.prefetch import _Pool, simulate_prefetch
from predictor.traces import TraceRecord

MS = TimeModel(expert_bytes=1_000_000, bandwidth_GBps=1.0, compute_ms_per_layer=0.5)  # 1 ms per copy


def make(seqs, E):
    """seqs: list of (T, L, k) nested lists -> (records, Accesses)."""
    recs = [
        TraceRecord(prompt_id=i, token_ids=np.arange(len(s)), experts=np.asarray(s), num_prefill=len(s))
        for i, s in enumerate(seqs)
    ]
    _, L, k = np.asarray(seqs[0]).shape
    return recs, build_accesses(recs, L, E, k)


def single_layer(ids, E=5):
    return make([[[[e]] for e in ids]], E)[1]


def ref_lru(rows, slots):
    cache, hits = [], 0  # oldest first
    for row in rows:
        missed = [key for key in row if key not in cache]
        for key in row:
            if key in cache:
                hits += 1
                cache.remove(key)
                cache.append(key)
        for key in missed:
            if len(cache) >= slots:
                cache.pop(0)
            cache.append(key)
    return hits


def ref_lfu(rows, slots):
    count, last, cache, hits = {}, {}, set(), 0
    for r, row in enumerate(rows):
        missed = []
        for key in row:
            count[key] = count.get(key, 0) + 1
            if key in cache:
                hits += 1
                last[key] = r
            else:
                missed.append(key)
        for key in missed:
            if len(cache) >= slots:
                cache.remove(min(cache, key=lambda x: (count[x], last[x], x)))
            cache.add(key)
            last[key] = r
    return hits


def brute_optimum(rows, slots):
    """Max hits over every eviction / bypass choice."""

    @cache
    def best(i, resident):
        if i == len(rows):
            return 0
        row = rows[i]
        hits = sum(key in resident for key in row)
        states = {resident}
        for key in (x for x in row if x not in resident):
            nxt = set()
            for s in states:
                nxt.add(s)  # bypass
                if len(s) < slots:
                    nxt.add(s | {key})
                else:
                    nxt.update((s - {v}) | {key} for v in s)
            states = nxt
        return hits + max(best(i + 1, s) for s in states)

    return best(0, frozenset())


def test_lru_hand_sequence():
    # A B A C B A with 2 slots: only the second A hits
    acc = single_layer([0, 1, 0, 2, 1, 0])
    assert policies.lru(acc, 2, "global").tolist() == [1]
    # A B A B C A B with 3 slots: A, B hit twice each, final A B hit again
    acc = single_layer([0, 1, 0, 1, 2, 0, 1])
    assert policies.lru(acc, 3, "global").tolist() == [4]


@pytest.mark.parametrize("seed", range(5))
def test_lru_lfu_match_reference_on_random_rows(seed):
    rng = np.random.default_rng(seed)
    seqs = [rng.permuted(np.tile(np.arange(6), (20, 1)), axis=1)[:, None, :2].tolist() for _ in range(2)]
    _, acc = make(seqs, 6)
    rows = [tuple(r) for r in acc.keys.tolist()]
    for slots in (2, 3, 4):
        assert policies.lru(acc, slots, "global").sum() == ref_lru(rows, slots)
        assert policies.lfu(acc, slots, "global").sum() == ref_lfu(rows, slots)


def test_lfu_hand_sequence():
    # A A B C B C A, 2 slots, counts kept across evictions; ties go to the least recently used
    # A m, A h, B m, C m (evict B: 1 < 2), B m (evict C: 1 < A 2), C m (A, B tie at 2: evict A), A m
    acc = single_layer([0, 0, 1, 2, 1, 2, 0])
    assert policies.lfu(acc, 2, "global").tolist() == [1]
    # in-cache LFU forgets B's and C's counts on eviction: they keep evicting each other, A stays and hits
    assert policies.lfu(acc, 2, "global", keep_history=False).tolist() == [2]


@pytest.mark.parametrize("seed", range(6))
def test_belady_equals_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    seq = [[sorted(rng.choice(5, 2, replace=False).tolist())] for _ in range(7)]  # L=1, k=2
    _, acc = make([seq], 5)
    rows = [tuple(r) for r in acc.keys.tolist()]
    for slots in (2, 3):
        assert policies.belady(acc, slots, "global").sum() == brute_optimum(rows, slots)
        assert policies.belady(acc, slots, "global", bypass=False).sum() <= brute_optimum(rows, slots)
        assert policies.belady(acc, slots, "global").sum() >= policies.lru(acc, slots, "global").sum()


def test_belady_hand_sequence():
    # A B C A B with 2 slots: on C evict B? no, A is next at row 3, B at row 4 -> evict B ... or bypass C
    acc = single_layer([0, 1, 2, 0, 1])
    assert policies.belady(acc, 2, "global").tolist() == [2]  # bypass C: A and B both hit
    assert policies.belady(acc, 2, "global", bypass=False).tolist() == [1]  # C must enter: evict B


def test_per_layer_pools_are_separate():
    # L=2, 1 slot per layer; layer 0 alternates A B, layer 1 always the same expert
    _, acc = make([[[[0], [3]], [[1], [3]], [[0], [3]]]], 4)
    assert policies.lru(acc, 1, "per_layer").tolist() == [0, 2]
    assert policies.slots_for(0.25, acc, "per_layer") == (1, 2)
    assert policies.slots_for(0.25, acc, "global") == (2, 2)


def test_pinning_hits_only_pinned():
    _, acc = make([[[[0], [1]], [[2], [1]], [[0], [3]]]], 4)
    freq = np.array([[5, 0, 1, 0], [0, 9, 0, 2]], dtype=float)
    assert policies.pinning(acc, 1, "per_layer", freq).tolist() == [2, 2]  # pins (0,0) and (1,1)
    assert policies.pinning(acc, 1, "global", freq).tolist() == [0, 2]  # pins (1,1) only
    with pytest.raises(ValueError, match="train_freq"):
        policies.pinning(acc, 1, "global", freq[:1])


def test_demand_stall_is_misses_times_copy_time():
    acc = single_layer([0, 1, 0, 2, 1, 0])
    res = run_demand("lru", acc, 0.4, "global", MS)  # 2 slots
    assert res.hits == 1 and res.demand_loads == 5
    assert res.stall_ms_per_token == pytest.approx(5 * 1.0 / 6)
    assert res.bytes_moved == 5_000_000
    assert res.tokens_per_s == pytest.approx(6 / (5e-3 + 6 * 0.5e-3))


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_prefetch_loop_without_predictions_is_lru(scope):
    rng = np.random.default_rng(3)
    seqs = [
        [[sorted(rng.choice(8, 2, replace=False).tolist()) for _ in range(3)] for _ in range(30)]
        for _ in range(2)
    ]
    _, acc = make(seqs, 8)
    for cap in (0.1, 0.25, 0.5):
        a = run_demand("lru", acc, cap, scope, MS)
        b = run_prefetch("none", acc, cap, scope, MS, None, "token_ahead", None)
        assert (a.hits, a.demand_loads) == (b.hits, b.demand_loads)
        assert a.stall_s == pytest.approx(b.stall_s)


def _pred(rows):
    return [np.asarray(rows, dtype=np.int64)]  # one sequence of (T, L, B)


def test_token_ahead_copies_queue_on_one_engine():
    # L=2, 1 ms copies, 0.5 ms compute; token 0 routes (0, 1), token 1 the same
    _, acc = make([[[[0], [1]], [[0], [1]]]], 4)
    res = simulate_prefetch(acc, 8, "global", MS, _pred([[[0], [1]], [[0], [1]]]), "token_ahead")
    # t0: both issued at 0; layer 0 waits 1 ms for its copy, runs 1-1.5; layer 1's copy lands at 2: 0.5 ms
    # t1: both resident -> hits
    assert res.hits == 2 and res.prefetch_issued == 2 and res.prefetch_late == 2 and res.prefetch_used == 0
    assert res.stall_s == pytest.approx(1.5e-3)
    assert res.stall_ms_per_token == pytest.approx(0.75)
    assert res.demand_loads == 0 and res.bytes_moved == 2_000_000


def test_demand_load_goes_ahead_of_queued_prefetch():
    _, acc = make([[[[0], [1]]]], 4)
    res = simulate_prefetch(acc, 8, "global", MS, _pred([[[2], [1]]]), "token_ahead")
    # copy of expert 2 starts at 0 (lands 1); layer 1's prefetch is queued; layer 0 misses expert 0,
    # whose demand copy runs 1-2 ahead of the queued prefetch (2-3); layer 1 runs at 2.5, waits to 3
    assert res.hits == 0 and res.demand_loads == 1
    assert res.stall_s == pytest.approx(2.5e-3)
    assert res.prefetch_issued == 2 and res.prefetch_late == 1 and res.prefetch_wasted == 1


def test_layer_ahead_prefetch_lands_in_time():
    tm = TimeModel(expert_bytes=1_000_000, bandwidth_GBps=1.0, compute_ms_per_layer=2.0)
    _, acc = make([[[[0], [1]]]], 4)
    res = simulate_prefetch(acc, 8, "global", tm, _pred([[[0], [1]]]), "layer_ahead", 1)
    # layer 0 issued at token start, lands at 1 (late, stall 1); layer 1 issued at 1, lands at 2,
    # layer 1 starts at 3: a hit
    assert res.hits == 1 and res.prefetch_used == 1 and res.prefetch_late == 1
    assert res.stall_s == pytest.approx(1e-3)


def test_prediction_latency_delays_issue():
    tm = TimeModel(expert_bytes=1_000_000, bandwidth_GBps=1.0, compute_ms_per_layer=2.0, prediction_ms=1.5)
    _, acc = make([[[[0], [1]]]], 4)
    res = simulate_prefetch(acc, 8, "global", tm, _pred([[[0], [1]]]), "layer_ahead", 1)
    # layer 0's prediction is issued at 1.5, after the layer needs it at 0: demand-loaded 0-1 (stall 1);
    # layer 1: issued at 1 + 1.5, lands 3.5, the layer starts at 3: stall 0.5
    assert res.hits == 0 and res.demand_loads == 0 and res.prefetch_late == 2
    assert res.stall_s == pytest.approx(1.5e-3)


def test_prefetch_without_a_free_slot_waits_for_an_earlier_layer_to_release_one():
    tm = TimeModel(expert_bytes=1_000_000, bandwidth_GBps=1.0, compute_ms_per_layer=2.0)  # 1 ms copies
    _, acc = make([[[[0], [1], [2]]]], 4)  # L=3, one token, 2 slots
    res = simulate_prefetch(acc, 2, "global", tm, _pred([[[0], [1], [2]]]), "token_ahead")
    # layers 0 and 1 take both slots (protected); layer 2's prefetch waits. Layer 0: late (lands 1,
    # stall 1); layer 1 at 3: hit, and its start lets layer 2's copy evict layer 0's expert (3-4);
    # layer 2 at 5: hit
    assert res.hits == 2 and res.stall_s == pytest.approx(1e-3)
    assert (res.prefetch_issued, res.prefetch_used, res.prefetch_late, res.demand_loads) == (3, 2, 1, 0)


def test_token_ahead_window_issues_the_next_layers_as_layers_run():
    tm = TimeModel(expert_bytes=1_000_000, bandwidth_GBps=1.0, compute_ms_per_layer=2.0)  # 1 ms copies
    _, acc = make([[[[0], [1], [2]]]], 4)
    res = simulate_prefetch(acc, 8, "global", tm, _pred([[[0], [1], [2]]]), "token_ahead", window=1)
    # layer 0 issued at 0 (lands 1: late, stall 1); layer 1 issued when layer 0 starts at 1 (lands 2),
    # layer 1 runs at 3: hit, issues layer 2 (3-4); layer 2 runs at 5: hit
    assert res.hits == 2 and res.stall_s == pytest.approx(1e-3) and res.prefetch_issued == 3
    with pytest.raises(ValueError, match="window"):
        simulate_prefetch(acc, 8, "global", tm, None, "token_ahead", window=0)


def test_eviction_order_is_cold_then_lru_then_predicted():
    pool = _Pool(3)
    pool.put("p", pool.prot)
    pool.put("w", pool.warm)
    pool.put("c", pool.cold)
    assert pool.victim((), allow_prot=False) == "c"  # a prediction that proved wrong goes first
    assert pool.victim({"c"}, allow_prot=False) == "w"
    assert pool.victim({"c", "w"}, allow_prot=False) is None  # prefetches never evict predicted
    assert pool.victim({"c", "w"}, allow_prot=True) == "p"  # demand loads may


def test_exact_zero_latency_predictions_hit_everything():
    # 1 slot; tokens route A B C A: LRU never hits, exact predictions always do
    _, acc = make([[[[0]], [[1]], [[2]], [[0]]]], 4)
    zero = TimeModel(1, 1.0, 0.0, zero_latency=True)
    res = simulate_prefetch(acc, 1, "global", zero, _pred([[[0]], [[1]], [[2]], [[0]]]), "token_ahead")
    assert res.hits == 4 and res.stall_s == 0.0 and res.prefetch_used == 4
    assert run_demand("lru", acc, 0.25, "global", zero).hits == 0


def test_zero_latency_hit_rate_equals_recall_when_slots_equal_budget():
    rng = np.random.default_rng(0)
    L, E, k, B = 3, 8, 2, 3
    seqs = [
        [[sorted(rng.choice(E, k, replace=False).tolist()) for _ in range(L)] for _ in range(40)]
        for _ in range(3)
    ]
    recs, acc = make(seqs, E)
    scores = [rng.random((40, L, E)) + 0.8 * np.eye(E)[np.asarray(s)].sum(2) for s in seqs]
    metrics = ExpertMetrics(L, E, k, ks=(B,))
    for s, r in zip(scores, recs):
        metrics.update(np.asarray(s, dtype=np.float32), r.experts, np.arange(40))
    zero = TimeModel(1, 1.0, 0.0, zero_latency=True)
    res = run_prefetch(
        "p", acc, B / E, "per_layer", zero, [top_budget(s, B) for s in scores], "token_ahead", None
    )
    assert res.hit_rate == pytest.approx(metrics.compute()[f"recall@{B}"])


def test_activation_matrix_scorer_matches_most_similar_sequence():
    # two train sequences with disjoint habits; a test sequence that starts like the second
    a = [[[0, 1], [2, 3]]] * 4
    b = [[[4, 5], [6, 7]]] * 4
    recs, _ = make([a, b], 8)
    sc = ActivationMatrixScorer(8, mode="layer_ahead", lookahead=1).fit(recs)
    test = TraceRecord(0, np.arange(3), np.asarray([[[4, 5], [6, 7]]] * 3), 3)
    s = sc.scores(test)
    assert s.shape == (3, 2, 8)
    assert set(top_budget(s, 2)[1, 0].tolist()) == {4, 5}  # token 1 matches b
    assert set(top_budget(s, 2)[0, 1].tolist()) == {6, 7}  # layer-ahead: token 0's layer 0 already says b
    tok = ActivationMatrixScorer(8, mode="token_ahead").fit(recs)
    assert np.allclose(tok.scores(test)[0], 1e-3 * tok.freq)  # nothing routed yet: frequency only


def test_cooccurrence_scorer_follows_the_previous_layer():
    # layer 0 expert 0 is always followed by expert 2 at layer 1, expert 1 by expert 3
    recs, _ = make([[[[0], [2]], [[1], [3]]] * 5], 4)
    sc = CoOccurrence(4).fit(recs)
    assert (sc.mode, sc.lookahead) == ("layer_ahead", 1)
    s = sc.scores(TraceRecord(0, np.arange(2), np.asarray([[[1], [0]], [[0], [0]]]), 2))
    assert top_budget(s, 1)[:, 1, 0].tolist() == [3, 2]  # from layer 0 of the same token
    assert np.allclose(s[0, 0], s[1, 0])  # layer 0 has no earlier layer: frequency


def test_oracle_hits_everything_without_transfer_time():
    rng = np.random.default_rng(1)
    seqs = [[[sorted(rng.choice(8, 2, replace=False).tolist()) for _ in range(3)] for _ in range(20)]]
    recs, acc = make(seqs, 8)
    oracle = Oracle(8).fit(recs)
    preds = [top_budget(oracle.scores(r), 2) for r in recs]
    zero = TimeModel(1, 1.0, 0.0, zero_latency=True)
    assert (
        run_prefetch("oracle", acc, 2 / 24, "global", zero, preds, oracle.mode, oracle.lookahead).hit_rate
        == 1.0
    )


def test_top_budget_and_errors():
    s = np.array([[[0.1, 0.9, 0.5, 0.9]]])
    assert top_budget(s, 3).tolist() == [[[1, 3, 2]]]
    with pytest.raises(ValueError, match="budget"):
        top_budget(s, 5)
    acc = single_layer([0, 1])
    with pytest.raises(ValueError, match="capacity"):
        run_demand("lru", acc, 0.0, "global", MS)
    with pytest.raises(ValueError, match="unknown demand policy"):
        run_demand("fifo", acc, 0.5, "global", MS)
    with pytest.raises(ValueError, match="lookahead"):
        run_prefetch("p", acc, 0.5, "global", MS, None, "layer_ahead", 0)
