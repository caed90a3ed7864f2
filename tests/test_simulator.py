"""Cache simulator: every policy on small traces with known answers, and the time model by hand.

Time units in the comments are ms. `MS` copies one expert in 1 ms and spends 0.5 ms per layer's
fixed part, no GPU time per expert and no host costs: with it, a demand miss always waits for its
copy, so the engine's hits are exactly the cache's hits and the plain-Python references apply.
"""


import numpy as np
import pytest

from predictor.evaluation import add_gap_closed
from predictor.metrics import ExpertMetrics
from predictor.simulate import (
    ActivationMatrixScorer,
    CoOccurrenceScorer,
    OracleScorer,
    Policy,
    Predictions,
    TimeModel,
    build_accesses,
    lower_bound,
    pinning,
    simulate,
    slots_for,
    top_budget,
)
from predictor.simulate.evict import new_order
from predictor.simulate.layout import _NEG
from predictor.simulate.lfu import SCAN_MAX, lfu_fix, lfu_victim
from predictor.simulate.policy import (
    ReuseHazard,
    cpu_is_faster,
    expected_distance,
    prefetch_value,
    reuse_hazard,
)
from predictor.simulate.reference import brute_optimum
from predictor.simulate.run import first_use
from predictor.traces import TraceRecord

# 1 ms per copy; every queued prefetch may go on the link at once (the default commits one at a time)
MS = TimeModel(expert_bytes=1_000_000, bandwidth_GBps=1.0, compute_ms_per_layer=0.5, max_inflight=10**6)
ZERO = TimeModel(1, 1.0, 0.0, zero_latency=True)


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


def random_seqs(rng, L, E, k, T, S):
    return [[[sorted(rng.choice(E, k, replace=False).tolist()) for _ in range(L)] for _ in range(T)] for _ in range(S)]


def preds(rows, probs=None, mode="token_ahead", lookahead=None):
    """One sequence's (T, L, B) predicted ids (and probabilities) -> Predictions."""
    p = None if probs is None else [np.asarray(probs, dtype=np.float32)]
    return Predictions.from_sequences([np.asarray(rows, dtype=np.int64)], p, mode, lookahead)


def random_preds(rng, seqs, E, B):
    ids = [np.argsort(rng.random((len(s), len(s[0]), E)), axis=-1)[..., :B] for s in seqs]
    return Predictions.from_sequences(ids, [rng.random(i.shape) for i in ids], "token_ahead")


def ms(seconds):
    return seconds * 1e3


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
    """Counts kept across evictions; ties go to the least recently used. As the engine, it never
    evicts a key of the running row, and within a row it uses the hits first, then the misses."""
    count, last, cache, hits, stamp = {}, {}, set(), 0, 0
    for row in rows:
        missed = []
        for key in row:
            count[key] = count.get(key, 0) + 1
            if key in cache:
                hits += 1
                last[key] = stamp
                stamp += 1
            else:
                missed.append(key)
        for key in missed:
            if len(cache) >= slots:
                cache.remove(min(cache - set(row), key=lambda x: (count[x], last[x])))
            cache.add(key)
            last[key] = stamp
            stamp += 1
    return hits


def layer_rows(acc, layer):
    return [tuple(r) for r in acc.keys[layer :: acc.num_layers].tolist()]


# -- 1. LRU and LFU against plain-Python references ------------------------------------------------


def test_lru_and_lfu_hand_sequences():
    # A B A C B A with 2 slots: only the second A hits
    assert simulate(single_layer([0, 1, 0, 2, 1, 0]), MS, "lru", 2 / 5).hits == 1
    # A B A B C A B with 3 slots: A, B hit twice each
    assert simulate(single_layer([0, 1, 0, 1, 2, 0, 1]), MS, "lru", 3 / 5).hits == 4
    # LFU, A A B C B C A with 2 slots, counts kept across evictions, ties to the least recently used:
    # A m, A h, B m, C m (evict B: 1 < 2), B m (evict C: 1 < A 2), C m (A, B tie at 2: evict A), A m
    assert simulate(single_layer([0, 0, 1, 2, 1, 2, 0]), MS, "lfu", 2 / 5).hits == 1


@pytest.mark.parametrize("seed", range(4))
def test_lru_lfu_match_reference_on_random_rows(seed):
    rng = np.random.default_rng(seed)
    L, E, k = 2, 6, 2
    _, acc = make(random_seqs(rng, L, E, k, 25, 2), E)
    rows = [tuple(r) for r in acc.keys.tolist()]
    for slots in (2, 3, 5, 8):  # global: one pool of `slots`
        res_lru = simulate(acc, MS, "lru", slots / (L * E))
        res_lfu = simulate(acc, MS, "lfu", slots / (L * E))
        assert res_lru.slots == slots
        assert res_lru.hits == ref_lru(rows, slots)
        assert res_lfu.hits == ref_lfu(rows, slots)
        assert res_lru.demand_loads == acc.num_accesses - res_lru.hits
    for slots in (2, 3, 4):  # per layer: each layer's rows through its own pool
        res_lru = simulate(acc, MS, "lru", slots / E, "per_layer")
        res_lfu = simulate(acc, MS, "lfu", slots / E, "per_layer")
        assert res_lru.slots == slots * L
        assert res_lru.hits_per_layer == [ref_lru(layer_rows(acc, layer), slots) for layer in range(L)]
        assert res_lfu.hits_per_layer == [ref_lfu(layer_rows(acc, layer), slots) for layer in range(L)]


@pytest.mark.parametrize("seed", range(2))
def test_lfu_heap_matches_reference_on_large_pools(seed):
    # pools of more than SCAN_MAX slots keep LFU's order in a lazily kept heap (lfu.py), not a scan
    rng = np.random.default_rng(seed)
    L, E, k = 2, 96, 6
    _, acc = make(random_seqs(rng, L, E, k, 60, 2), E)
    rows = [tuple(r) for r in acc.keys.tolist()]
    for slots in (SCAN_MAX + 1, 80, 130):
        res = simulate(acc, MS, "lfu", slots / (L * E))
        assert res.slots == slots and res.hits == ref_lfu(rows, slots)
    slots = SCAN_MAX + 12
    res = simulate(acc, MS, "lfu", slots / E, "per_layer")
    assert res.hits_per_layer == [ref_lfu(layer_rows(acc, layer), slots) for layer in range(L)]


def scan_lfu(lo, hi, r, for_prefetch, slot_key, pend, last_use, cnt, cur_mark, prot_row):
    """The LFU victim by a scan of every slot, as evict._victim rates small groups."""
    best, best_score, best_age = -1, _NEG, _NEG
    prot, prot_score, prot_age = -1, _NEG, _NEG
    for s in range(lo, hi):
        if cur_mark[slot_key[s]] == r:
            continue
        score, age = -float(cnt[slot_key[s]]), -last_use[s]
        if pend[s] >= prot_row:
            if for_prefetch:
                continue
            if score > prot_score or (score == prot_score and age > prot_age):
                prot, prot_score, prot_age = s, score, age
        elif score > best_score or (score == best_score and age > best_age):
            best, best_score, best_age = s, score, age
    return (best, best_score) if best >= 0 else (prot, prot_score)


def test_lfu_heap_victim_equals_the_scan():
    # tied counts and last uses (cold ones too), uses the heap is not told of, keys of the running
    # row, slots kept for rows to come (some, or all: a demand load then takes the first of them)
    rng = np.random.default_rng(0)
    G, P, K = 2, 60, 160  # groups, slots per group, keys
    lst, grp = new_order(G * P, G)
    slot_key = rng.permutation(K)[: G * P]
    cnt = rng.integers(0, 3, K)
    last_use = rng.integers(0, 4, G * P).astype(np.float64)
    pend, cur_mark = np.full(G * P, -1), np.full(K, -1)
    for s in range(G * P):
        lfu_fix(s, P, cnt[slot_key[s]], last_use[s], lst, grp)
    stamp, queries, fallbacks = 10.0, 0, 0
    for step in range(4000):
        s, op = int(rng.integers(G * P)), rng.integers(5)
        if op <= 1:  # a use: its count and (mostly) its last use rise, the heap is not told
            cnt[slot_key[s]] += 1
            if op == 0:
                last_use[s], stamp = stamp, stamp + 1
        elif op == 2:  # turned cold, or a new key: told
            if rng.random() < 0.5:
                last_use[s], stamp = _NEG + stamp, stamp + 1
            else:
                slot_key[s] = rng.choice(np.setdiff1d(np.arange(K), slot_key))
            lfu_fix(s, P, cnt[slot_key[s]], last_use[s], lst, grp)
        else:
            g = int(rng.integers(G))
            lo, hi = g * P, (g + 1) * P
            cur_mark[rng.choice(slot_key[lo:hi], int(rng.integers(0, 8)), replace=False)] = step
            pend[:] = -1
            kept = rng.choice(np.arange(lo, hi), int(rng.choice([0, 5, P - 3, P])), replace=False)
            pend[kept] = step + 1
            for_prefetch = bool(rng.integers(2))
            args = (lo, hi, step, for_prefetch, slot_key, pend, last_use, cnt, cur_mark, step + 1)
            want = scan_lfu(*args)
            assert lfu_victim(*args, lst, grp) == want, (step, want)
            queries += 1
            fallbacks += want[0] >= 0 and pend[want[0]] >= 0
    assert queries > 1000 and fallbacks > 50


def test_per_layer_pools_are_separate_and_slots_for():
    # L=2, 1 slot per layer; layer 0 alternates A B, layer 1 always the same expert
    _, acc = make([[[[0], [3]], [[1], [3]], [[0], [3]]]], 4)
    assert simulate(acc, MS, "lru", 0.25, "per_layer").hits_per_layer == [0, 2]
    assert simulate(acc, MS, "lru", 1 / 8, "global").hits_per_layer == [0, 0]  # one shared slot: thrashes
    assert slots_for(0.25, acc, "per_layer") == (1, 2)
    assert slots_for(0.25, acc, "global") == (2, 2)
    # each key's first and second use packed as first * (R + 2) + second, R + 1 = 7 for none
    first, second = divmod(first_use(acc), 8)
    assert first.tolist() == [0, 2, 7, 7, 7, 7, 7, 1] and second.tolist() == [4, 7, 7, 7, 7, 7, 7, 3]
    nxt, base = acc.next_uses()
    assert base == 8 and (nxt // base).tolist() == [[4], [3], [7], [5], [7], [7]]  # the next row, per access
    assert (nxt % base).tolist() == [[7], [5], [7], [7], [7], [7]]  # and the one after it


def test_pinning_hits_only_pinned():
    _, acc = make([[[[0], [1]], [[2], [1]], [[0], [3]]]], 4)
    freq = np.array([[5, 0, 1, 0], [0, 9, 0, 2]], dtype=float)
    res = pinning(acc, MS, 0.25, "per_layer", freq)  # pins (0,0) and (1,1)
    assert res.hits_per_layer == [2, 2] and res.demand_loads == 2
    assert ms(res.stall_s) == pytest.approx(2.0)  # 2 misses x 1 ms
    assert pinning(acc, MS, 1 / 8, "global", freq).hits_per_layer == [0, 2]  # pins (1,1) only
    with pytest.raises(ValueError, match="train_freq"):
        pinning(acc, MS, 0.25, "global", freq[:1])
    # the closed form has nothing to overlap a copy with: GPU time per expert or host costs are refused
    for other in (MS.with_overrides(expert_ms=0.5), MS.with_overrides(host_expert_ms=0.1)):
        with pytest.raises(ValueError, match="plain time model"):
            pinning(acc, other, 0.25, "per_layer", freq)


# -- 2. Belady, the oracle schedule and its horizon ---------------------------------------------------


def test_belady_hand_sequence():
    # A B C A B with 2 slots: bypass C and A, B both hit; without bypass C must enter (evict B)
    acc = single_layer([0, 1, 2, 0, 1])
    assert simulate(acc, MS, "belady", 2 / 5).hits == 2
    assert simulate(acc, MS, Policy("belady"), 2 / 5).hits == 1


@pytest.mark.parametrize("seed", range(24))
def test_belady_equals_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    seq = [[sorted(rng.choice(5, 2, replace=False).tolist())] for _ in range(8)]  # L=1, k=2
    _, acc = make([seq], 5)
    rows = [tuple(r) for r in acc.keys.tolist()]
    for slots in (2, 3):
        best = brute_optimum(rows, slots)
        assert simulate(acc, MS, "belady", slots / 5).hits == best
        assert simulate(acc, MS, Policy("belady"), slots / 5).hits <= best  # no bypass
        assert simulate(acc, MS, "lru", slots / 5).hits <= best
        assert simulate(acc, MS, "lfu", slots / 5).hits <= best
        # evicting a key of the running row (after its use) can do better; the engine never does
        assert best <= brute_optimum(rows, slots, keep_row=False)


def test_belady_keeps_the_running_row():
    # A B, C B, C A with 2 slots: the optimum evicts B after its use in row 1 (never used again) for
    # C, and both hit in row 2 (3 hits); the engine keeps the running row's experts: C is bypassed
    # (its next use is not before A's), 2 hits
    _, acc = make([[[[1, 2]], [[0, 2]], [[0, 1]]]], 3)
    rows = [tuple(r) for r in acc.keys.tolist()]
    assert brute_optimum(rows, 2, keep_row=False) == 3 and brute_optimum(rows, 2) == 2
    assert simulate(acc, MS, "belady", 2 / 3).hits == 2


def test_belady_breaks_next_use_ties_optimally():
    # B C, A C, A B, A C with 2 slots (rows of expert ids). Row 1: A misses; the victim B and A are
    # both next used in row 2. Ranked by row alone the tie went to bypass A (3 hits in all). The use
    # after row 2 breaks it: A's is row 3, B has none, so A is cached and B bypassed in row 2; A hits
    # in rows 2 and 3 and C in 1 and 3: 4 hits.
    _, acc = make([[[[1, 2]], [[0, 2]], [[0, 1]], [[0, 2]]]], 3)
    rows = [tuple(r) for r in acc.keys.tolist()]
    assert brute_optimum(rows, 2) == 4
    assert simulate(acc, MS, "belady", 2 / 3).hits == 4


def test_belady_gives_a_free_slot_to_the_miss_needed_soonest():
    # A B, C D, D E, A B with 3 slots. Row 1 misses C (never used again) and D (used in row 2). Taken
    # in the row's order, C filled the free slot and D then evicted A or B: 2 hits. Belady takes the
    # misses soonest needed first: D gets the slot and C is bypassed: D hits in row 2, A and B in 3.
    _, acc = make([[[[0, 1]], [[2, 3]], [[3, 4]], [[0, 1]]]], 5)
    rows = [tuple(r) for r in acc.keys.tolist()]
    assert brute_optimum(rows, 3) == 3
    assert simulate(acc, MS, "belady", 3 / 5).hits == 3


@pytest.mark.parametrize("seed", range(4))
def test_oracle_schedule_beats_belady_demand_and_horizon_only_costs(seed):
    rng = np.random.default_rng(seed)
    L, E, k = 3, 6, 2
    _, acc = make(random_seqs(rng, L, E, k, 20, 2), E)
    tm = MS.with_overrides(expert_ms=0.2)
    for cap in (0.2, 0.4, 0.7):
        for scope in ("global", "per_layer"):
            bel = simulate(acc, tm, "belady", cap, scope)
            orc = simulate(acc, tm, "belady", cap, scope, oracle=True)
            h1 = simulate(acc, tm, "belady", cap, scope, oracle=True, horizon=1)
            assert orc.stall_s <= bel.stall_s + 1e-12
            assert h1.stall_s >= orc.stall_s - 1e-12
            assert orc.prefetch_issued == 0 and orc.demand_loads >= bel.demand_loads  # copies, not prefetches


def test_oracle_schedule_hand_case():
    # L=2, k=1, tokens routing (0), (1) then (2), (3); 8 slots; 1.5 ms copies, 1 ms per layer's fixed
    # part, 1 ms per expert.
    # Belady (demand): every layer runs its fixed part (1), copies (1.5, a stall) and runs its
    #   expert (1): 3.5 ms per layer, 14 ms, stall 6
    # oracle: copies back to back from t=0: 0-1.5, 1.5-3, 3-4.5, 4.5-6. GPU: layer 0 0-1, waits to
    #   1.5 (stall 0.5), expert 1.5-2.5; layer 1 2.5-3.5 (landed at 3: hit), expert 3.5-4.5; token 1
    #   4.5-5.5 (landed 4.5), 5.5-6.5, 6.5-7.5 (landed 6), 7.5-8.5: stall 0.5, elapsed 8.5
    # horizon 1: token 1's copies wait for its start (4.5): 4.5-6 and 6-7.5: its layer 0 waits
    #   5.5-6 (stall 0.5 more), runs 6-7; layer 1 7-8 (landed 7.5), 8-9: stall 1, elapsed 9
    tm = TimeModel(1_500_000, 1.0, 1.0, expert_ms=1.0)
    _, acc = make([[[[0], [1]], [[2], [3]]]], 4)
    bel = simulate(acc, tm, "belady", 1.0)
    assert ms(bel.stall_s) == pytest.approx(6.0) and ms(bel.elapsed_s) == pytest.approx(14.0)
    orc = simulate(acc, tm, "belady", 1.0, oracle=True)
    assert ms(orc.stall_s) == pytest.approx(0.5) and ms(orc.elapsed_s) == pytest.approx(8.5)
    assert orc.hits == 3 and orc.demand_loads == 4
    h1 = simulate(acc, tm, "belady", 1.0, oracle=True, horizon=1)
    assert ms(h1.stall_s) == pytest.approx(1.0) and ms(h1.elapsed_s) == pytest.approx(9.0)
    assert h1.hits == 2
    h2 = simulate(acc, tm, "belady", 1.0, oracle=True, horizon=2)  # the whole trace is 2 tokens
    assert h2.stall_s == pytest.approx(orc.stall_s)


def test_oracle_schedule_with_a_horizon_evicts_by_what_it_may_know():
    # one layer, 2 slots; tokens route A, B, C, A, B (E = 5). At C, full Belady evicts B (next use at
    # row 4, A's at 3) and keeps A: 4 copies. Knowing only the running token (horizon 1), neither next
    # use is known: both rank by the hazard's expected distance, and this hazard makes a gap of 2
    # tokens likely (0.9) and of 3 unlikely (0.1), so it evicts A (gap 3 at the next token), copies A
    # again evicting B by the same rule (C's gap 2 beats B's 3), and copies B again: 5 copies. Knowing
    # two tokens (horizon 2), A's use at row 3 is inside the window and B's is not: B goes, as in Belady.
    acc = single_layer([0, 1, 2, 0, 1])
    hazard = np.array([[0.5, 0.5, 0.9, 0.1]])
    copies = {h: simulate(acc, MS, "belady", 0.4, oracle=True, horizon=h, hazard=hazard).demand_loads for h in (0, 1, 2)}
    assert copies == {0: 4, 1: 5, 2: 4}
    # the reverse hazard ranks as Belady does here: A (gap 3) now the likelier, B goes
    assert simulate(acc, MS, "belady", 0.4, oracle=True, horizon=1, hazard=hazard[:, [0, 1, 3, 2]]).demand_loads == 4
    # never past its sequence: requests A B C, then B. At C, Belady keeps B for the next request (3 copies);
    # knowing two tokens does not reach into another request, so it ranks by the hazard as with one (4)
    _, two = make([[[[0]], [[1]], [[2]]], [[[1]]]], 5)
    reverse = hazard[:, [0, 1, 3, 2]]  # the gap of 2 tokens (B's) now the unlikely one: B goes
    copies = {h: simulate(two, MS, "belady", 0.4, oracle=True, horizon=h, hazard=reverse).demand_loads for h in (0, 1, 2)}
    assert copies == {0: 3, 1: 4, 2: 4}
    # the window is the running token's rows, from its first layer: L = 2, E = 2, 2 slots; tokens route
    # (a, c), (a, d), (a, d) (a, b: layer 0; c, d: layer 1). At d's miss (token 1, layer 1) a is next used at
    # token 2, outside the running token, so horizon 1 ranks a and c by the hazard (a's gap of 1 token at
    # 0.05, c's gap of 2 at 0.9) and evicts a: 4 copies. A window counted from the miss's row (rows 3-4)
    # would have seen a's use at row 4 and kept it (3 copies, as Belady and horizon 2 do).
    _, acc2 = make([[[[0], [0]], [[0], [1]], [[0], [1]]]], 2)
    hz2 = np.full((2, 4), 0.5)
    hz2[0, 1], hz2[1, 2] = 0.05, 0.9
    copies = {h: simulate(acc2, MS, "belady", 0.5, oracle=True, horizon=h, hazard=hz2).demand_loads for h in (0, 1, 2)}
    assert copies == {0: 3, 1: 4, 2: 3}


# -- 3. the lower bound -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_lower_bound_is_below_every_copy_only_policy(seed):
    rng = np.random.default_rng(seed)
    L, E, k = 3, 8, 2
    seqs = random_seqs(rng, L, E, k, 20, 2)
    _, acc = make(seqs, E)
    tm = TimeModel(1_000_000, 1.0, 0.3, expert_ms=0.1)  # copies dominate: the bound is not 0
    if seed >= 4:  # host costs, the time to issue each copy among them (it hides copies too)
        tm = tm.with_overrides(host_layer_ms=rng.random() * 0.3, host_expert_ms=rng.random() * 0.1,
                               host_route_ms=rng.random() * 0.1, copy_issue_ms=rng.random() * 0.6,
                               max_inflight=int(rng.integers(1, 4)))  # fmt: skip
    rand = random_preds(rng, seqs, E, 3)
    gate = Predictions(rand.ids, rand.probs, "layer_output")
    hazard = reuse_hazard(acc)
    for cap in (0.15, 0.3, 0.6):
        for scope in ("global", "per_layer"):
            lb = lower_bound(acc, tm, cap, scope)
            runs = [
                simulate(acc, tm, "lru", cap, scope),
                simulate(acc, tm, "lfu", cap, scope),
                simulate(acc, tm, "belady", cap, scope),
                simulate(acc, tm, "naive", cap, scope, rand),
                simulate(acc, tm, "scheduler", cap, scope, rand, hazard=hazard),
                simulate(acc, tm, "scheduler", cap, scope, gate, hazard=hazard),
                simulate(acc, tm, "belady", cap, scope, oracle=True),
            ]
            for r in runs:
                assert lb.stall_s <= r.stall_s + 1e-12, (r.policy, cap, scope)
                assert lb.elapsed_s <= r.elapsed_s + 1e-12, (r.policy, cap, scope)
            if cap == 0.15:
                assert lb.stall_s > 0  # a real bound, not the trivial 0


def test_lower_bound_holds_with_fewer_slots_than_a_row_routes():
    """One slot, two experts per row: Belady's ties no longer pick the optimum (8 copies against LRU's 7, the
    brute force's 7), so the bound counts what no schedule avoids: every key once, and k - slots a row."""
    from predictor.simulate.accesses import Accesses
    from predictor.simulate.reference import brute_optimum
    from predictor.simulate.run import fewest_loads

    rows = [[1, 0], [2, 3], [1, 2], [1, 2], [3, 2]]
    acc = Accesses(1, 4, 2, np.array(rows, np.int32), np.array([5]))
    tm = TimeModel(1_000_000, 1.0, 0.0)  # 1 ms copies, nothing to hide them behind
    lru, belady = simulate(acc, tm, "lru", 0.25), simulate(acc, tm, "belady", 0.25)
    assert (lru.demand_loads, belady.demand_loads) == (7, 8) and 10 - brute_optimum([tuple(r) for r in rows], 1) == 7
    assert fewest_loads(acc, 1) == 5  # a copy a row (2 keys, 1 slot), and 4 keys once each: max(5, 4)
    lb = lower_bound(acc, tm, 0.25)
    assert ms(lb.stall_s) == pytest.approx(5.0) and lb.stall_s <= lru.stall_s
    assert lb.hits + lb.demand_loads == lb.accesses and lb.to_dict()["hit_rate_per_layer"] == []  # consistent
    rng = np.random.default_rng(7)
    for _ in range(30):  # per-layer pools of 1-2 slots against k = 3
        seqs = random_seqs(rng, 2, 6, 3, 12, 2)
        _, acc = make(seqs, 6)
        for cap in (0.17, 0.34):
            lb = lower_bound(acc, tm, cap, "per_layer")
            for policy in ("lru", "lfu", "belady"):
                assert lb.stall_s <= simulate(acc, tm, policy, cap, "per_layer").stall_s + 1e-12


def test_lower_bound_hand_case():
    # A B C A B, 2 slots: Belady makes 3 copies (3 ms on the link) against 5 x 0.5 ms compute
    acc = single_layer([0, 1, 2, 0, 1])
    lb = lower_bound(acc, MS, 2 / 5)
    assert lb.demand_loads == 3 and lb.hits == 2
    assert ms(lb.stall_s) == pytest.approx(0.5) and ms(lb.elapsed_s) == pytest.approx(3.0)
    # issuing a copy takes the host 0.1 ms, time the link moves on: 3 x (1 - 0.1) - 2.5 = 0.2 ms
    assert ms(lower_bound(acc, MS.with_overrides(copy_issue_ms=0.1), 2 / 5).stall_s) == pytest.approx(0.2)
    # one layer, both experts miss; 1 ms copies, 0.5 ms fixed part, 2 ms to issue each: LRU stalls 0
    _, two = make([[[[0, 1]]]], 4)
    slow_issue = TimeModel(1_000_000, 1.0, 0.5, copy_issue_ms=2.0)
    assert simulate(two, slow_issue, "lru", 1.0).stall_s == 0.0 and lower_bound(two, slow_issue, 1.0).stall_s == 0.0


# -- 4. the time model by hand ------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_all_resident_runs_at_compute_speed(scope):
    # GPU-bound, L=2, k=2, 3 tokens: each layer 1 ms fixed + 2 x 0.5 ms experts = 2 ms; 6 layers = 12 ms
    tm = TimeModel(1_000_000, 1.0, 1.0, expert_ms=0.5)
    _, acc = make([[[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[3, 0], [1, 2]]]], 4)
    res = simulate(acc, tm, "lru", 1.0, scope, warm_all=True)
    assert res.hits == 12 and res.demand_loads == 0 and res.stall_s == 0.0
    assert ms(res.elapsed_s) == pytest.approx(12.0) and ms(res.compute_s) == pytest.approx(12.0)
    assert res.tokens_per_s == pytest.approx(3 / 12e-3)
    # any trace: elapsed = tokens * L * (compute + k * expert)
    rng = np.random.default_rng(0)
    for L, E, k in ((1, 4, 1), (3, 8, 2), (4, 6, 3)):
        _, acc = make(random_seqs(rng, L, E, k, 7, 2), E)
        res = simulate(acc, tm, "belady", 1.0, scope, warm_all=True)
        assert res.stall_s == 0.0 and res.hits == acc.num_accesses
        assert ms(res.elapsed_s) == pytest.approx(14 * L * (1.0 + k * 0.5))


def test_host_bound_layer_and_expert_costs():
    # L=2, k=2, all resident; GPU 1 ms per layer + 0.5 per expert; host 2 ms per layer + 1 per expert.
    # token 0, layer 0: host issues the layer 0-2, GPU runs it 0-1, router read back at 2;
    #   experts launched at 3 and 4, run 3-3.5 and 4-4.5
    # layer 1: host issues 4-6, GPU runs it 4.5-5.5, readback at 6; experts at 7, 8: GPU 7-7.5, 8-8.5
    # token 1 starts when the logits are read (8.5): 8.5 ms per token, 17 ms for two
    tm = TimeModel(1_000_000, 1.0, 1.0, expert_ms=0.5, host_layer_ms=2.0, host_expert_ms=1.0)
    _, acc = make([[[[0, 1], [2, 3]], [[0, 1], [2, 3]]]], 4)
    res = simulate(acc, tm, "lru", 1.0, warm_all=True)
    assert res.stall_s == 0.0 and res.hits == 8
    assert ms(res.elapsed_s) == pytest.approx(17.0)
    assert ms(res.host_s) == pytest.approx(2 * 2 * (2.0 + 2 * 1.0))
    assert ms(res.compute_s) == pytest.approx(2 * 2 * (1.0 + 2 * 0.5))
    # tokens_per_s is from the elapsed time, not stall + GPU time (which would give 2 / 8 ms)
    assert res.tokens_per_s == pytest.approx(2 / 17e-3)


def test_host_route_cost_waits_for_the_fixed_part():
    # the same as above with the host's 2 ms per layer after the router readback instead of before:
    # layer 0: GPU fixed part 0-1, readback at 1, routing work 1-3, experts launched at 4 and 5 (GPU
    # 4-4.5, 5-5.5); layer 1: fixed part issued at 5, runs 5.5-6.5, readback 6.5, routing work to 8.5,
    # experts at 9.5 and 10.5, done at 11: 11 ms per token (8.5 when the same work overlaps the fixed part)
    tm = TimeModel(1_000_000, 1.0, 1.0, expert_ms=0.5, host_route_ms=2.0, host_expert_ms=1.0)
    _, acc = make([[[[0, 1], [2, 3]], [[0, 1], [2, 3]]]], 4)
    res = simulate(acc, tm, "lru", 1.0, warm_all=True)
    assert ms(res.elapsed_s) == pytest.approx(22.0)
    assert ms(res.host_s) == pytest.approx(2 * 2 * (2.0 + 2 * 1.0))


def test_copy_issue_cost_delays_the_next_copy():
    # L=1, k=2, both experts miss; 1 ms copies, 0.5 ms per layer, 2 ms of host time per copy started.
    # readback at 0.5; copy of 0 runs 0.5-1.5 while the host issues it (0.5-2.5); copy of 1 starts
    # at 2.5 (host), lands 3.5, its issue ends at 4.5. The GPU reaches expert 0 at 2.5 (landed: no
    # wait) and expert 1 at 4.5 (landed): no stall, elapsed 4.5 (2.5 without the issue cost)
    tm = MS.with_overrides(copy_issue_ms=2.0)
    _, acc = make([[[[0, 1]]]], 4)
    res = simulate(acc, tm, "lru", 1.0)
    assert res.demand_loads == 2 and res.stall_s == 0.0
    assert res.hits == 2  # on the device when the GPU reached them
    assert ms(res.elapsed_s) == pytest.approx(4.5) and ms(res.host_s) == pytest.approx(4.0)
    plain = simulate(acc, MS, "lru", 1.0)  # copies 0.5-1.5, 1.5-2.5: stall 1 + 1
    assert ms(plain.elapsed_s) == pytest.approx(2.5) and ms(plain.stall_s) == pytest.approx(2.0)
    assert plain.hits == 0


def test_predict_step_cost_per_token():
    # token_ahead, all resident: each token first runs the predictor step on the host (0.75 ms, the
    # GPU waits), then L=2 layers of 1 + 0.5 ms: 3.75 ms per token, 7.5 for two
    tm = TimeModel(1_000_000, 1.0, 1.0, expert_ms=0.5, predict_step_ms=0.75, predict_layer_ms=9.0)
    _, acc = make([[[[0], [1]], [[2], [3]]]], 4)
    p = preds([[[0], [1]], [[2], [3]]])
    res = simulate(acc, tm, "naive", 1.0, predictions=p, warm_all=True)
    assert res.stall_s == 0.0 and res.prefetch_issued == 0
    assert ms(res.elapsed_s) == pytest.approx(7.5) and ms(res.host_s) == pytest.approx(1.5)
    assert ms(simulate(acc, tm, "lru", 1.0, warm_all=True).elapsed_s) == pytest.approx(6.0)  # no predictor


def test_predict_layer_cost_per_layer():
    # layer_ahead h=1, L=3, all resident; 1 ms per layer + 0.5 per expert, 0.25 ms per prediction.
    # token start: predict layer 0 (0-0.25); layer 0 runs 0.25-1.25, then layer 1 is predicted
    # (1.25-1.5, the GPU waits), its expert 1.5-2; layer 1 2-3, predict layer 2 3-3.25, expert
    # 3.25-3.75; layer 2 3.75-4.75, expert 4.75-5.25 (nothing left to predict): 5.25 ms per token
    tm = TimeModel(1_000_000, 1.0, 1.0, expert_ms=0.5, predict_layer_ms=0.25, predict_step_ms=9.0)
    seq = [[[0], [1], [2]], [[3], [0], [1]]]
    _, acc = make([seq], 4)
    res = simulate(acc, tm, "naive", 1.0, predictions=preds(seq, mode="layer_ahead", lookahead=1), warm_all=True)
    assert res.stall_s == 0.0
    assert ms(res.elapsed_s) == pytest.approx(10.5) and ms(res.host_s) == pytest.approx(1.5)
    # h=2: two predictions at the token start, one after layer 0: the same 3 per token
    res = simulate(acc, tm, "naive", 1.0, predictions=preds(seq, mode="layer_ahead", lookahead=2), warm_all=True)
    assert ms(res.elapsed_s) == pytest.approx(10.5) and ms(res.host_s) == pytest.approx(1.5)


def _link_case():
    # L=2, k=1, one token routing (0) then (0); 2 ms copies, 1 ms per layer, 8 slots. Layer 1 is
    # predicted after layer 0 routes (layer_ahead h=1) as experts 1, 2, 3: all wrong. Layer 0's
    # prediction has probability 0, below min_prob: never copied.
    tm = TimeModel(2_000_000, 1.0, 1.0)
    _, acc = make([[[[0], [0]]]], 4)
    p = preds([[[1, 2, 3], [1, 2, 3]]], [[[0, 0, 0], [1, 1, 1]]], "layer_ahead", 1)
    return tm, acc, p


def test_demand_miss_waits_behind_prefetches_in_flight():
    tm, acc, p = _link_case()
    # no prefetch: layer 0 copies 1-3 (stall 2), runs to 3; layer 1's fixed part 3-4, copy 4-6 (stall 2)
    plain = simulate(acc, tm, "lru", 1.0)
    assert ms(plain.stall_s) == pytest.approx(4.0) and ms(plain.elapsed_s) == pytest.approx(6.0)
    # max_inflight 1: layer 0's demand copy 1-3, then one prefetch 3-5 is committed; layer 1's demand
    # copy waits for it: 5-7 (stall 3); the other two stay on the host
    one = simulate(acc, tm, Policy("lru", "all", min_prob=0.5, max_inflight=1), 1.0, predictions=p)
    assert (one.prefetch_issued, one.demand_loads, one.prefetch_wasted) == (1, 2, 1)
    assert ms(one.stall_s) == pytest.approx(5.0) and ms(one.elapsed_s) == pytest.approx(7.0)
    # the time model's max_inflight when the policy has none
    tm1 = tm.with_overrides(max_inflight=1)
    same = simulate(acc, tm1, Policy("lru", "all", min_prob=0.5), 1.0, predictions=p)
    assert (same.prefetch_issued, same.stall_s) == (1, one.stall_s)
    # unlimited: all three go (3-5, 5-7, 7-9) and layer 1's copy runs 9-11 (stall 7)
    many = simulate(acc, tm.with_overrides(max_inflight=10**6), Policy("lru", "all", min_prob=0.5), 1.0, predictions=p)
    assert (many.prefetch_issued, many.demand_loads, many.prefetch_wasted) == (3, 2, 3)
    assert ms(many.stall_s) == pytest.approx(9.0) and ms(many.elapsed_s) == pytest.approx(11.0)


def test_layer_ahead_prefetch_and_demand_first():
    # L=2, k=1, routing (0) then (1); 1 ms copies, 2 ms per layer; layer 1 predicted right after
    # layer 0 routes (h=1); layer 0's prediction is below min_prob.
    tm = TimeModel(1_000_000, 1.0, 2.0)
    _, acc = make([[[[0], [1]]]], 4)
    p = preds([[[0], [1]]], [[[0.0], [1.0]]], "layer_ahead", 1)
    # demand first: layer 0's copy 2-3 (stall 1), the prefetch 3-4; layer 1 runs 3-5: a hit
    res = simulate(acc, tm, Policy("lru", "all", min_prob=0.5), 1.0, predictions=p)
    assert (res.hits, res.demand_loads, res.prefetch_issued, res.prefetch_used, res.prefetch_late) == (1, 1, 1, 1, 0)
    assert ms(res.stall_s) == pytest.approx(1.0) and ms(res.elapsed_s) == pytest.approx(5.0)
    # naive order with the host committing prefetches (max_inflight 8, as the runtime): the prefetch
    # 2-3 goes first, layer 0's copy 3-4 (stall 2); layer 1 4-6: a hit
    host = tm.with_overrides(max_inflight=8)
    res = simulate(acc, host, Policy("lru", "all", min_prob=0.5, demand_first=False), 1.0, predictions=p)
    assert (res.hits, res.demand_loads, res.prefetch_used) == (1, 1, 1)
    assert ms(res.stall_s) == pytest.approx(2.0) and ms(res.elapsed_s) == pytest.approx(6.0)
    # the ideal engine (no max_inflight) starts no prefetch ahead of a demand copy: as demand first
    res = simulate(acc, tm, Policy("lru", "all", min_prob=0.5, demand_first=False), 1.0, predictions=p)
    assert ms(res.stall_s) == pytest.approx(1.0) and ms(res.elapsed_s) == pytest.approx(5.0)


def test_layer_output_prediction_is_known_once_the_layer_before_has_run():
    # L=2, k=1, routing (0) then (1), both predicted exactly; 2 ms copies, 1 ms fixed part and 2 ms per
    # expert. Layer 0's prediction is known at the token's start either way: its copy 0-2, the fixed part
    # 0-1, the expert waits until 2 (late) and runs 2-4.
    tm = TimeModel(2_000_000, 1.0, 1.0, expert_ms=2.0)
    _, acc = make([[[[0], [1]]]], 4)
    # layer_ahead h=1: layer 1's prediction comes with layer 0's routing (at 1); its copy 2-4 follows
    # the first; layer 1's fixed part 4-5, its expert a hit, 5-7
    ahead = simulate(acc, tm, "naive", 1.0, predictions=preds([[[0], [1]]], mode="layer_ahead", lookahead=1))
    assert (ahead.hits, ahead.prefetch_late, ahead.demand_loads) == (1, 1, 0)
    assert ms(ahead.stall_s) == pytest.approx(1.0) and ms(ahead.elapsed_s) == pytest.approx(7.0)
    # layer_output (the cross-layer gate): known when layer 0 has run (4): copy 4-6, fixed part 4-5,
    # the expert waits until 6 (late) and runs 6-8
    gate = simulate(acc, tm, "naive", 1.0, predictions=preds([[[0], [1]]], mode="layer_output"))
    assert (gate.hits, gate.prefetch_late, gate.demand_loads) == (0, 2, 0)
    assert ms(gate.stall_s) == pytest.approx(2.0) and ms(gate.elapsed_s) == pytest.approx(8.0)
    # its readback costs the host predict_layer_ms after the layer (0.5: everything after 4 shifts by 0.5)
    slow = simulate(acc, tm.with_overrides(predict_layer_ms=0.5), "naive", 1.0,
                    predictions=preds([[[0], [1]]], mode="layer_output"))  # fmt: skip
    assert ms(slow.host_s) == pytest.approx(1.0)  # layer 0's at the token start, layer 1's after layer 0
    assert ms(slow.elapsed_s) == pytest.approx(9.0)


def test_late_prefetch_is_a_miss():
    # as above but 3 ms copies: the prefetch runs 5-8 after layer 0's copy 2-5 (stall 3); layer 1's
    # fixed part ends at 7, its expert waits until 8 (stall 1): late, not a hit
    tm = TimeModel(3_000_000, 1.0, 2.0)
    _, acc = make([[[[0], [1]]]], 4)
    p = preds([[[0], [1]]], [[[0.0], [1.0]]], "layer_ahead", 1)
    res = simulate(acc, tm, Policy("lru", "all", min_prob=0.5), 1.0, predictions=p)
    assert (res.hits, res.prefetch_used, res.prefetch_late, res.demand_loads) == (0, 1, 1, 1)
    assert ms(res.stall_s) == pytest.approx(4.0) and ms(res.elapsed_s) == pytest.approx(8.0)


def test_a_prediction_back_after_its_layer_routed_is_dropped():
    # as above, 3 ms copies and 2 ms per layer, layer_ahead h = 1 picks made prediction_ms after their
    # inputs: layer 0's at the token start, layer 1's when layer 0's routing is read (2). Layer 0's
    # routing is read at 2, layer 1's at 7 (its fixed part 5-7, after layer 0's demand copy 2-5).
    # 5.1 ms: both picks are back after their layer's routing (5.1 > 2, 7.1 > 7): dropped, as the
    # runtime's worker driver drops them; two demand copies (stall 3 + 3).
    _, acc = make([[[[0], [1]]]], 4)
    p = preds([[[0], [1]]], None, "layer_ahead", 1)
    late = simulate(acc, TimeModel(3_000_000, 1.0, 2.0, prediction_ms=5.1), "naive", 1.0, predictions=p)
    assert (late.prefetch_issued, late.prefetch_cancelled, late.demand_loads) == (0, 2, 2)
    assert ms(late.stall_s) == pytest.approx(6.0) and ms(late.elapsed_s) == pytest.approx(10.0)
    # 4.9 ms: layer 1's pick is back at 6.9, before its routing: its copy starts then (6.9-9.9)
    early = simulate(acc, TimeModel(3_000_000, 1.0, 2.0, prediction_ms=4.9), "naive", 1.0, predictions=p)
    assert (early.prefetch_issued, early.prefetch_cancelled, early.demand_loads) == (1, 1, 1)
    assert ms(early.elapsed_s) == pytest.approx(9.9)


def test_a_worker_serves_the_step_and_the_calls_in_order():
    # as above (3 ms copies, 2 ms per layer, layer_ahead h = 1), the predictor in a worker: its trunk step
    # (prediction_step_ms) at the token start, then layer 0's call, then layer 1's once layer 0's routing
    # (read at 2) is sent, each call prediction_ms, each starting when the worker is free.
    _, acc = make([[[[0], [1]]]], 4)
    p = preds([[[0], [1]]], None, "layer_ahead", 1)
    tm = TimeModel(3_000_000, 1.0, 2.0)
    # calls of no time: layer 0's pick is back at the step's end. 1.9 ms: before its routing (2): its copy
    # runs 1.9-4.9, the expert waits for it, no demand copy; layer 1's follows, 4.9-7.9, and its layer
    # (fixed part 4.9-6.9) waits to 7.9. 2.1 ms: after the routing, dropped; layer 0's demand copy runs
    # 2-5, layer 1's prefetch 5-8.
    on_time = simulate(acc, tm.with_overrides(prediction_step_ms=1.9), "naive", 1.0, predictions=p)
    assert (on_time.prefetch_issued, on_time.prefetch_cancelled, on_time.demand_loads) == (2, 0, 0)
    assert ms(on_time.elapsed_s) == pytest.approx(7.9)
    late = simulate(acc, tm.with_overrides(prediction_step_ms=2.1), "naive", 1.0, predictions=p)
    assert (late.prefetch_issued, late.prefetch_cancelled, late.demand_loads) == (1, 1, 1)
    assert ms(late.elapsed_s) == pytest.approx(8.0)
    # a 0.5 ms step and 2.5 ms calls: layer 0's pick at 3 (late, dropped; demand copy 2-5); layer 1's call
    # waits for the worker until 3 and ends at 5.5 (not 2 + 2.5): its copy 5.5-8.5, the layer waits to 8.5
    busy = simulate(acc, tm.with_overrides(prediction_step_ms=0.5, prediction_ms=2.5), "naive", 1.0, predictions=p)
    assert (busy.prefetch_issued, busy.prefetch_cancelled, busy.demand_loads) == (1, 1, 1)
    assert ms(busy.elapsed_s) == pytest.approx(8.5)
    in_process = simulate(acc, tm.with_overrides(prediction_ms=2.5), "naive", 1.0, predictions=p)  # no queue: 5-8
    assert ms(in_process.elapsed_s) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="prediction_step_ms models a token_ahead or layer_ahead"):
        simulate(acc, tm.with_overrides(prediction_step_ms=1.0), "naive", 1.0,
                 predictions=preds([[[0], [1]]], mode="layer_output"))


def test_token_start_prediction_is_copied_at_the_token_start():
    # L=1, k=1, one token routing (0), predicted exactly (token_ahead); 1 ms copies, 0.5 ms per layer.
    # The prediction is known at t=0: its copy runs 0-1, the layer's fixed part 0-0.5, the expert
    # waits 0.5 ms for it (a late prefetch), no demand copy.
    _, acc = make([[[[0]]]], 4)
    res = simulate(acc, MS, "naive", 1.0, predictions=preds([[[0]]]))
    assert (res.prefetch_issued, res.prefetch_used, res.prefetch_late) == (1, 1, 1)
    assert (res.demand_loads, res.prefetch_cancelled) == (0, 0)
    assert ms(res.stall_s) == pytest.approx(0.5) and ms(res.elapsed_s) == pytest.approx(1.0)


def test_hybrid_runs_a_miss_on_the_cpu_when_it_is_done_first():
    # L=1, k=2, both experts miss; 2 ms copies, 1 ms per layer, 0.5 ms per expert on the GPU, 1.5 ms
    # on the CPU. Readback at 1. Expert 0: copy would land at 3, the CPU is done at 2.5: CPU.
    # Expert 1: the CPU is busy until 2.5, would finish at 4; the copy lands at 3: copy.
    # GPU: expert 1 waits 1-3 (stall 2), runs 3-3.5; the CPU's output (2.5) is ready by then.
    tm = TimeModel(2_000_000, 1.0, 1.0, expert_ms=0.5, cpu_expert_ms=1.5)
    _, acc = make([[[[0, 1]]]], 4)
    res = simulate(acc, tm, "hybrid", 1.0)
    assert (res.cpu_experts, res.demand_loads, res.hits) == (1, 1, 0) and ms(res.cpu_s) == pytest.approx(1.5)
    assert ms(res.stall_s) == pytest.approx(2.0) and ms(res.elapsed_s) == pytest.approx(3.5)
    # LRU copies both: 1-3 and 3-5; GPU waits 1-3, runs 3-3.5, waits to 5, runs 5-5.5
    lru = simulate(acc, tm, "lru", 1.0)
    assert ms(lru.stall_s) == pytest.approx(3.5) and ms(lru.elapsed_s) == pytest.approx(5.5)
    # k=1: the CPU runs it 1-2.5 and the layer waits for its output (stall 1.5)
    _, acc1 = make([[[[0]]]], 4)
    one = simulate(acc1, tm, "hybrid", 1.0)
    assert (one.cpu_experts, one.demand_loads) == (1, 0)
    assert ms(one.stall_s) == pytest.approx(1.5) and ms(one.elapsed_s) == pytest.approx(2.5)
    # a CPU slower than the copy (3 ms: done at 4 > 3) is never used
    slow = simulate(acc1, tm.with_overrides(cpu_expert_ms=3.0), "hybrid", 1.0)
    assert (slow.cpu_experts, slow.demand_loads) == (0, 1)
    assert ms(slow.stall_s) == pytest.approx(2.0) and ms(slow.elapsed_s) == pytest.approx(3.5)
    assert cpu_is_faster(3.0, 2.5) and not cpu_is_faster(3.0, 3.0)


def test_hybrid_cpu_experts_take_the_host_thread_unless_async():
    # L=1, k=1, 4 tokens, each a new expert; 10 ms copies (the CPU is always sooner), 0.1 ms fixed part,
    # 1 ms of host time per routed expert, 0.5 ms per expert on the CPU. All resident: 1.1 ms a token.
    _, acc = make([[[[t]] for t in range(4)]], 8)
    tm = TimeModel(10_000_000, 1.0, 0.1, host_expert_ms=1.0, cpu_expert_ms=0.5)
    resident = simulate(acc, tm, "lru", 1.0, warm_all=True)
    assert ms(resident.elapsed_s) == pytest.approx(4.4) and resident.stall_s == 0.0
    # the runtime's way: the host thread has launched the expert at 1.1, then computes it 1.1-1.6 and
    # launches nothing meanwhile; the GPU, free since 0.1, waits for the host until 1.1 (not stall),
    # then for the CPU (stall 0.5): 1.6 ms a token
    blocking = simulate(acc, tm, "hybrid_lru", 1.0)
    assert blocking.cpu_experts == 4 and blocking.demand_loads == 0
    assert ms(blocking.elapsed_s) == pytest.approx(6.4) and ms(blocking.stall_s) == pytest.approx(2.0)
    # a CPU pool of its own starts at the readback (0.1) and is done at 0.6, before the host has
    # launched the layer: no stall, the all-resident time
    pool = simulate(acc, tm.with_overrides(cpu_async=True), "hybrid_lru", 1.0)
    assert pool.cpu_experts == 4 and pool.stall_s == 0.0 and ms(pool.elapsed_s) == pytest.approx(4.4)
    # the pool's round trip (0.8 ms): its output joins at 1.4, the host launched at 1.1: 0.3 ms of stall a
    # token; on the host thread there is no round trip to pay
    slow = tm.with_overrides(cpu_handoff_ms=0.8)
    handoff = simulate(acc, slow.with_overrides(cpu_async=True), "hybrid_lru", 1.0)
    assert ms(handoff.elapsed_s) == pytest.approx(5.6) and ms(handoff.stall_s) == pytest.approx(1.2)
    on_thread = simulate(acc, slow, "hybrid_lru", 1.0)
    assert (on_thread.elapsed_s, on_thread.stall_s) == (blocking.elapsed_s, blocking.stall_s)
    # the host thread losing half the pool's CPU time to it (cpu_host_share): 0.25 ms more host time a token,
    # 1.35 ms a token; all of it, and the host pays what it would computing them itself (not as stall)
    for share, per_token in ((0.5, 1.35), (1.0, 1.6)):
        shared = simulate(acc, tm.with_overrides(cpu_async=True, cpu_host_share=share), "hybrid_lru", 1.0)
        assert ms(shared.elapsed_s) == pytest.approx(4 * per_token) and shared.stall_s == 0.0
    assert simulate(acc, tm.with_overrides(cpu_host_share=1.0), "hybrid_lru", 1.0).elapsed_s == blocking.elapsed_s
    with pytest.raises(ValueError, match=r"sim.cpu_host_share must be in \[0, 1\], got 1.5"):
        tm.with_overrides(cpu_host_share=1.5)


# -- 5. the admission and the learned eviction's distance ------------------------------------------


def test_prefetch_value_never_exceeds_its_probability():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        p, p_victim = rng.random(), rng.random() * rng.integers(0, 2)
        w = rng.choice([0.0, rng.random(), 10 * rng.random()])
        copy = rng.choice([0.0, rng.random()])
        land, deadline = rng.random() * 3, rng.random() * 3
        v = prefetch_value(p, p_victim, w, land, deadline, copy)
        assert v <= p + 1e-12
        assert v <= p - p_victim - w * (1 - p) + 1e-12  # hidden <= 1
        if v > 0:  # admitted: it is likely, and its gain beats what the victim and the link cost
            assert p > p_victim and p > 0
    # by hand: a copy landing by its deadline hides a whole copy; one landing half a copy late, half
    assert prefetch_value(0.8, 0.1, 0.5, 1.0, 1.0, 1.0) == pytest.approx(0.8 - 0.1 - 0.5 * 0.2)
    assert prefetch_value(0.8, 0.0, 0.0, 1.5, 1.0, 1.0) == pytest.approx(0.4)
    assert prefetch_value(0.8, 0.0, 0.0, 3.0, 1.0, 1.0) == pytest.approx(0.0)  # lands after the need


def test_value_admission_rejects_every_copy_at_a_huge_link_weight():
    rng = np.random.default_rng(1)
    L, E, k = 2, 6, 2
    seqs = random_seqs(rng, L, E, k, 15, 1)
    _, acc = make(seqs, E)
    ids = [np.asarray(s) for s in seqs]  # the right experts, but only 90 % sure
    p = Predictions.from_sequences(ids, [np.full(i.shape, 0.9) for i in ids], "token_ahead")
    res = simulate(acc, MS, Policy("lru", "value", link_weight=1e6), 0.5, predictions=p)
    assert res.prefetch_issued == 0 and res.prefetch_rejected > 0
    assert res.demand_loads == acc.num_accesses - res.hits  # every miss a demand copy
    sure = Predictions.from_sequences(ids, None, "token_ahead")  # p = 1: nothing to lose on the link
    res = simulate(acc, MS, Policy("lru", "value", link_weight=1e6), 0.5, predictions=sure)
    assert res.prefetch_issued > 0


def test_expected_distance_orders_keys():
    # L=4, seen from row 10 at layer 1: an expert of layer 3 is next usable 2 rows ahead (row 12)
    L, q, qmin = 4, 0.25, 0.01
    known = lambda p: expected_distance(3, 1, 10, L, 12, p, -1, 0.0, q, qmin)
    assert known(1.0) == pytest.approx(2.0)
    assert known(0.0) == pytest.approx(2 + 4 / 0.25)
    assert known(1.0) < known(0.5) < known(0.0)
    unknown = lambda rate: expected_distance(3, 1, 10, L, -1, 0.0, -1, 0.0, rate, qmin)
    assert unknown(0.5) == pytest.approx(2 + 4 * 0.5 / 0.5)
    assert unknown(0.5) < unknown(0.25) < unknown(0.05)
    # the layer's prediction is known but the expert is not in it: the floor probability
    assert expected_distance(3, 1, 10, L, -1, 0.0, 12, 0.1, q, qmin) == pytest.approx(2 + 4 * 0.9 / 0.25)
    # its own layer runs again a whole token later; an earlier layer wraps around
    assert expected_distance(1, 1, 10, L, 14, 1.0, -1, 0.0, q, qmin) == pytest.approx(4.0)
    assert expected_distance(0, 1, 10, L, 13, 1.0, -1, 0.0, q, qmin) == pytest.approx(3.0)
    # qmin floors the rate
    assert unknown(0.0) == pytest.approx(2 + 4 / qmin)


def test_an_unlisted_expert_gets_the_probability_the_list_leaves():
    # E = 8 experts, k = 2 routed per row. A list of 3 at 0.9 / 0.6 / 0.3 expects 1.8 of the 2 routed:
    # the other 0.2 falls on the 5 unlisted experts, 0.04 each; a certain list leaves nothing.
    from predictor.simulate.layout import K_COLS, K_ROW
    from predictor.simulate.prefetch import _learn

    L, E, k = 2, 8, 2
    kp, kt = np.zeros(L * E, np.float32), np.zeros((L * E, K_COLS), np.int64)
    lknown, lfloor = np.full(L, -1, np.int64), np.zeros(L, np.float32)
    ids, probs = np.array([[5, 1, 2]]), np.array([[0.9, 0.6, 0.3]], np.float32)
    _learn(0, 1, E, 3, k, ids, probs, kp, kt, lknown, lfloor)
    assert lknown[1] == 0 and lfloor[1] == pytest.approx(0.2 / 5)
    assert kp[E + 5] == pytest.approx(0.9) and kt[E + 2, K_ROW] == 0
    _learn(0, 0, E, 2, k, np.array([[3, 4]]), np.ones((1, 2), np.float32), kp, kt, lknown, lfloor)
    assert lfloor[0] == 0.0
    _learn(0, 0, E, 2, k, np.array([[3, 4]]), np.full((1, 2), 0.5, np.float32), kp, kt, lknown, lfloor)
    assert lfloor[0] == pytest.approx(1.0 / 6)


# -- 6. the reuse hazard -----------------------------------------------------------------------------


def test_reuse_hazard_hand_counts():
    # L=2, E=2, k=1. seq 0 (4 tokens): layer 0 routes 0 0 1 0, layer 1 0 0 0 0; seq 1 (2 tokens):
    # layer 0 1 1, layer 1 1 0.
    # layer 0: reuses at gap 1 (seq 0 t1, seq 1 t1) and gap 2 (seq 0 t3); at risk at gap 1: 0 after
    #   t0 and t1, 1 after t2 (never back), 1 in seq 1 after t0 = 4; at gap 2: 0 after t1 = 1
    #   rate = (reused + 1) / (at risk + E / k): gap 1 3/6, gap 2 2/3, gap 3 (none) 1/2
    # layer 1: reuses at gap 1 three times (seq 0); at risk at gap 1 3 (seq 0) + 1 (seq 1's expert 1)
    #   gap 1 4/6, gap 2 (0 + 1) / (0 + 2), gap 3 the same
    # gap 0, first uses: layer 0 three (expert 0 in seq 0, expert 1 in both) over 1 + 2 + 3 + 1 tokens at
    #   risk (up to and including the first use, or the whole sequence): 4/9; layer 1 three over 3 + 5: 4/10
    seqs = [
        [[[0], [0]], [[0], [0]], [[1], [0]], [[0], [0]]],
        [[[1], [1]], [[1], [0]]],
    ]
    _, acc = make(seqs, 2)
    h = reuse_hazard(acc, max_gap=4)
    assert h.rate.shape == (2, 4) and h.factor.shape == (2, 2)
    assert h.rate[0].tolist() == pytest.approx([4 / 9, 3 / 6, 2 / 3, 1 / 2])
    assert h.rate[1].tolist() == pytest.approx([4 / 10, 4 / 6, 1 / 2, 1 / 2])
    # factor = (uses + 2) / (expected + 2), expected = sum over the tokens at risk of the rate there:
    # layer 0, expert 0: 3 uses; at risk of a first use 3 tokens, at gap 1 2, at gap 2 1:
    #   expected 3 * 4/9 + 2 * 1/2 + 1 * 2/3 = 3; expert 1: 3 uses; 4 tokens, gap 1 2: 16/9 + 1
    # layer 1, expert 0: 5 uses; 3, gap 1 3: 1.2 + 2; expert 1: 1 use; 5, gap 1 1: 2 + 2/3
    assert h.factor[0].tolist() == pytest.approx([1.0, 5 / (25 / 9 + 2)])
    assert h.factor[1].tolist() == pytest.approx([7 / 5.2, 3 / (2 + 2 / 3 + 2)])
    # a gap past the last column is pooled there, each token at risk counted: L=1, E=2, routes 0 1 1 1 0
    # expert 0: first use at t0 (1 token at risk), then at risk 4 tokens (gap 1, then 3 pooled in
    # column 2) and reused; expert 1: first use at t1 (2 tokens), reused at gap 1 twice, then 1 token
    _, one = make([[[[0]], [[1]], [[1]], [[1]], [[0]]]], 2)
    h = reuse_hazard(one, max_gap=3)
    assert h.rate[0].tolist() == pytest.approx([(2 + 1) / (3 + 2), (2 + 1) / (4 + 2), (1 + 1) / (3 + 2)])
    assert h.factor[0].tolist() == pytest.approx([4 / (0.6 + 0.5 + 3 * 0.4 + 2), 5 / (2 * 0.6 + 3 * 0.5 + 2)])
    with pytest.raises(ValueError, match="max_gap"):
        reuse_hazard(one, max_gap=1)


def test_reuse_hazard_factor_ranks_experts_of_one_layer():
    # 3 slots, E=4, k=1, one layer, routes 0 1 0 2 3 0. At the miss on expert 3 (t4) the candidates are
    # expert 0 (its next run 3 tokens after its last use), 1 (4) and 2 (2). This rate table makes a gap
    # of 3 the least likely: the learned eviction takes expert 0, missed again at t5; with expert 0's
    # factor 4 its rate (0.4) beats expert 1's (0.3), which goes instead, and t5 hits
    _, acc = make([[[[0]], [[1]], [[0]], [[2]], [[3]], [[0]]]], 4)
    rate = np.array([[0.25, 0.5, 0.5, 0.1, 0.3]])
    learned = Policy("learned")
    assert simulate(acc, MS, learned, 0.75, hazard=rate).hits == 1
    assert simulate(acc, MS, learned, 0.75, hazard=ReuseHazard(rate, np.array([[4.0, 1.0, 1.0, 1.0]]))).hits == 2
    with pytest.raises(ValueError, match="factor"):
        simulate(acc, MS, learned, 0.75, hazard=ReuseHazard(rate, np.ones((1, 3))))


# -- 7. naive prefetch --------------------------------------------------------------------------------


def test_exact_zero_latency_predictions_hit_everything():
    # 1 slot; tokens route A B C A: exact predictions are inserted before each access
    _, acc = make([[[[0]], [[1]], [[2]], [[0]]]], 4)
    res = simulate(acc, ZERO, "naive", 0.25, predictions=preds([[[0]], [[1]], [[2]], [[0]]]))
    assert res.hits == 4 and res.stall_s == 0.0 and res.prefetch_used == 4 and res.demand_loads == 0
    # more layers and experts, slots >= k
    rng = np.random.default_rng(2)
    L, E, k = 3, 8, 2
    seqs = random_seqs(rng, L, E, k, 20, 2)
    _, acc = make(seqs, E)
    exact = Predictions.from_sequences([np.asarray(s) for s in seqs], None, "token_ahead")
    for cap, scope in ((k / (L * E), "global"), (k / E, "per_layer"), (0.5, "global")):
        res = simulate(acc, ZERO, "naive", cap, scope, exact)
        assert res.hits == acc.num_accesses and res.demand_loads == 0, (cap, scope)


def test_zero_latency_lru_counts_misses():
    # 1 slot, A B C A: LRU never hits, wrong predictions never hit
    _, acc = make([[[[0]], [[1]], [[2]], [[0]]]], 4)
    assert simulate(acc, ZERO, "lru", 0.25).hits == 0
    assert simulate(acc, ZERO, "naive", 0.25, predictions=preds([[[1]], [[2]], [[3]], [[1]]])).hits == 0


def test_zero_latency_prediction_evicts_before_the_routing_is_known():
    # 1 slot, L=1, tokens route A then A; predictions A then B. Token 1: B is inserted before the access
    # and takes A's only slot, so A is copied back on demand
    _, acc = make([[[[0]], [[0]]]], 4)
    res = simulate(acc, ZERO, "naive", 0.25, predictions=preds([[[0]], [[1]]]))
    assert (res.prefetch_issued, res.demand_loads, res.prefetch_wasted) == (2, 1, 1)


def test_zero_latency_predictions_are_never_late_whatever_the_host_costs():
    # a zero-latency prediction is inserted just before use: host time after the router readback
    # (host_route_ms) must not make it count as back after its layer's routing
    seq = [[[t % 4], [(t + 1) % 4]] for t in range(6)]
    _, acc = make([seq], 4)
    plain = simulate(acc, ZERO, "naive", 0.5, predictions=preds(seq))
    costly = simulate(acc, ZERO.with_overrides(host_route_ms=0.1, host_layer_ms=0.2), "naive", 0.5,
                      predictions=preds(seq))
    assert costly.prefetch_cancelled == plain.prefetch_cancelled == 0
    assert costly.prefetch_issued == plain.prefetch_issued > 0 and costly.hits == plain.hits


def test_zero_latency_hit_rate_equals_recall_when_slots_equal_budget():
    rng = np.random.default_rng(0)
    L, E, k, B = 3, 8, 2, 3
    seqs = random_seqs(rng, L, E, k, 40, 3)
    recs, acc = make(seqs, E)
    scores = [rng.random((40, L, E)) + 0.8 * np.eye(E)[np.asarray(s)].sum(2) for s in seqs]
    metrics = ExpertMetrics(L, E, k, ks=(B,))
    for s, r in zip(scores, recs):
        metrics.update(np.asarray(s, dtype=np.float32), r.experts, np.arange(40))
    p = Predictions.from_sequences([top_budget(s, B) for s in scores], None, "token_ahead")
    res = simulate(acc, ZERO, "naive", B / E, "per_layer", p)
    assert res.hit_rate == pytest.approx(metrics.compute()[f"recall@{B}"])


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_naive_without_predictions_is_lru(scope):
    rng = np.random.default_rng(3)
    _, acc = make(random_seqs(rng, 3, 8, 2, 30, 2), 8)
    for cap in (0.1, 0.25, 0.5):
        a = simulate(acc, MS, "lru", cap, scope)
        b = simulate(acc, MS, "naive", cap, scope)
        assert (a.hits, a.demand_loads) == (b.hits, b.demand_loads)
        assert a.stall_s == pytest.approx(b.stall_s) and a.elapsed_s == pytest.approx(b.elapsed_s)


# -- 8. errors ----------------------------------------------------------------------------------------


def test_errors_are_clear():
    acc = single_layer([0, 1, 0])
    for cap in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="capacity"):
            simulate(acc, MS, "lru", cap)
    with pytest.raises(ValueError, match="scope"):
        simulate(acc, MS, "lru", 0.5, "per_token")
    with pytest.raises(ValueError, match="cpu_expert_ms"):
        simulate(acc, MS, "hybrid", 0.5)
    with pytest.raises(ValueError, match="rows"):
        simulate(acc, MS, "naive", 0.5, predictions=preds([[[0]], [[1]]]))
    with pytest.raises(ValueError, match="outside"):
        simulate(acc, MS, "naive", 0.5, predictions=preds([[[0]], [[5]], [[1]]]))
    with pytest.raises(ValueError, match="outside"):
        simulate(acc, MS, "naive", 0.5, predictions=preds([[[0]], [[-1]], [[1]]]))
    with pytest.raises(ValueError, match="horizon"):
        simulate(acc, MS, "belady", 0.5, horizon=1)
    with pytest.raises(ValueError, match="horizon"):
        simulate(acc, MS, "belady", 0.5, oracle=True, horizon=-1)
    with pytest.raises(ValueError, match="oracle"):
        simulate(acc, MS, "belady", 0.5, predictions=preds([[[0]], [[1]], [[0]]]), oracle=True)
    with pytest.raises(ValueError, match="window"):
        simulate(acc, MS, "naive", 0.5, predictions=preds([[[0]], [[1]], [[0]]]), window=0)
    with pytest.raises(ValueError, match="hazard"):
        simulate(acc, MS, "scheduler", 0.5, hazard=np.ones((2, 4)))
    with pytest.raises(ValueError, match="evict='fifo'"):
        Policy("fifo")
    with pytest.raises(ValueError, match="admit='some'"):
        Policy("lru", "some")
    with pytest.raises(ValueError, match="min_prob"):
        Policy(min_prob=1.0)
    with pytest.raises(ValueError, match="max_inflight"):
        Policy(max_inflight=0)
    for bad in (dict(link_weight=float("nan")), dict(qmin=float("nan")), dict(qmin=5.0), dict(max_inflight=2.5),
                dict(sample=0)):  # NaN compares false everywhere: it would have passed every check
        with pytest.raises(ValueError, match="policy"):
            Policy("learned", "value", **bad)
    for bad in (dict(bandwidth_GBps=float("nan")), dict(compute_ms_per_layer=float("inf")), dict(max_inflight=2.5),
                dict(max_inflight=float("inf")), dict(max_inflight=float("nan"))):  # fmt: skip
        with pytest.raises(ValueError, match="finite|whole number"):
            MS.with_overrides(**bad)
    with pytest.raises(ValueError, match="mode"):
        Predictions.from_sequences([np.zeros((3, 1, 1))], None, "token_behind")
    with pytest.raises(ValueError, match="lookahead"):
        Predictions.from_sequences([np.zeros((3, 1, 1))], None, "layer_ahead", 0)
    with pytest.raises(ValueError, match="probs"):
        Predictions.from_sequences([np.zeros((3, 1, 2))], [np.zeros((3, 1, 1))], "token_ahead")


@pytest.mark.parametrize(
    "key",
    ["compute_ms_per_layer", "prediction_ms", "expert_ms", "host_layer_ms", "host_expert_ms", "copy_issue_ms",
     "predict_step_ms", "predict_layer_ms", "cpu_expert_ms"],
)  # fmt: skip
def test_time_model_refuses_negative_costs(key):
    base = dict(expert_bytes=1, bandwidth_GBps=1.0, compute_ms_per_layer=0.5)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=key):
            TimeModel(**{**base, key: bad})


def test_an_expert_shape_with_recorded_bytes_is_charged_them():
    """A recorded shape carries its tensors' own size (GPT-OSS: biases too), which the matrices alone miss."""
    from predictor.simulate.timing import shape_bytes

    shape = {"hidden": 4, "intermediate": 3, "num_matrices": 3, "dtype_bytes": 2}
    assert shape_bytes(shape) == 3 * 4 * 3 * 2
    assert shape_bytes({**shape, "bytes": 3 * 4 * 3 * 2 + 20}) == 92


def test_time_model_refuses_bad_link():
    with pytest.raises(ValueError, match="expert_bytes"):
        TimeModel(0, 1.0, 0.5)
    with pytest.raises(ValueError, match="bandwidth"):
        TimeModel(1, 0.0, 0.5)
    with pytest.raises(ValueError, match="max_inflight"):
        TimeModel(1, 1.0, 0.5, max_inflight=0)


# -- 9. gap closed ------------------------------------------------------------------------------------


def test_gap_closed():
    def run(policy, cap, stall, timing="timed", ms_per_token=None):  # time per token: stall + 10 ms unless given
        return {"policy": policy, "capacity": cap, "stall_ms_per_token": stall, "timing": timing,
                "tokens_per_s": 1e3 / (ms_per_token or stall + 10.0)}  # fmt: skip

    runs = [
        run("lru", 0.1, 10.0),
        run("oracle_schedule", 0.1, 2.0),
        run("scheduler", 0.1, 6.0, ms_per_token=22.0),  # its predictor's host time: 6 ms more a token
        run("naive", 0.1, 12.0),  # worse than LRU: negative
        run("naive", 0.1, 1.0, "zero_latency"),  # not a timed run
        run("lru", 0.2, 4.0),  # no oracle schedule at 0.2
        run("scheduler", 0.2, 3.0),
        run("lru", 0.3, 1.0),
        run("oracle_schedule", 0.3, 1.0),  # nothing to close
        run("scheduler", 0.3, 1.0),
    ]
    add_gap_closed(runs)
    assert [r["gap_closed"] for r in runs] == [0.0, 1.0, 0.5, -0.25, None, None, None, None, None, None]
    # in time per token: LRU 20 ms, the oracle 12; the scheduler's 22 ms is 2 ms worse than LRU's
    assert [r["time_gap_closed"] for r in runs][:4] == [0.0, 1.0, pytest.approx(-0.25), pytest.approx(-0.25)]


# -- scorers ------------------------------------------------------------------------------------------


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
    sc = CoOccurrenceScorer(4).fit(recs)
    assert (sc.mode, sc.lookahead) == ("layer_ahead", 1)
    s = sc.scores(TraceRecord(0, np.arange(2), np.asarray([[[1], [0]], [[0], [0]]]), 2))
    assert top_budget(s, 1)[:, 1, 0].tolist() == [3, 2]  # from layer 0 of the same token
    assert np.allclose(s[0, 0], s[1, 0])  # layer 0 has no earlier layer: frequency


def test_oracle_scorer_prefetches_every_access_without_transfer_time():
    rng = np.random.default_rng(1)
    recs, acc = make(random_seqs(rng, 3, 8, 2, 20, 1), 8)
    oracle = OracleScorer(8).fit(recs)
    p = Predictions.from_scores([oracle.scores(r) for r in recs], 2, oracle.mode, oracle.lookahead, "probs")
    assert set(np.unique(p.probs)) <= {0.0, 1.0}  # its 0 / 1 scores are the probabilities
    res = simulate(acc, ZERO, "naive", 2 / 24, "global", p)
    assert res.hit_rate == 1.0 and res.demand_loads == 0 and res.prefetch_wasted == 0


def test_top_budget_and_errors():
    s = np.array([[[0.1, 0.9, 0.5, 0.9]]])
    assert top_budget(s, 3).tolist() == [[[1, 3, 2]]]
    with pytest.raises(ValueError, match="budget"):
        top_budget(s, 5)
    with pytest.raises(ValueError, match="budget"):
        top_budget(s, 0)


def test_demand_first_still_prefetches_on_rows_without_misses():
    # L=2, k=1: layer 0 always routes expert 0 (resident after the first token), layer 1 cycles
    # 1, 2, 3; perfect layer_ahead h=1 predictions. Rows of layer 0 have no miss after the first
    # token: the prefetch of layer 1's expert must still go out there. Every expert is prefetched
    # (layer 0 of the first token at its start, each layer 1 from layer 0), none demand-loaded.
    seq = [[[0], [1 + t % 3]] for t in range(13)]
    _, acc = make([seq], 4)
    p = preds(seq, mode="layer_ahead", lookahead=1)
    first = simulate(acc, MS, Policy("lru", "all", demand_first=True), 0.25, "per_layer", predictions=p)
    naive = simulate(acc, MS, Policy("lru", "all", demand_first=False), 0.25, "per_layer", predictions=p)
    assert first.prefetch_issued == naive.prefetch_issued == 14
    assert first.demand_loads == naive.demand_loads == 0


def test_value_admission_counts_the_fixed_part_at_the_token_start():
    # L=2, k=1, perfect token_ahead predictions with p=1: at the token's start a copy (1 ms) lands
    # 0.5 ms after layer 0's fixed part (0.5 ms) ends, so it hides half a copy: value 0.5 > 0,
    # admitted; no demand load at all.
    seq = [[[t % 4], [(t + 1) % 4]] for t in range(4)]
    _, acc = make([seq], 4)
    res = simulate(acc, MS, Policy("lru", "value"), 1.0, predictions=preds(seq))
    assert res.demand_loads == 0 and res.prefetch_issued == 8 and res.prefetch_rejected == 0


def test_late_prefetch_is_counted_where_the_gpu_waits():
    # a prefetch that lands after the GPU reached its expert is late and a miss, never also a hit
    seq = [[[0, 1]]]
    _, acc = make([seq], 4)
    tm = TimeModel(1_000_000, 1.0, 0.0, expert_ms=1.0, max_inflight=10**6)
    res = simulate(acc, tm, "naive", 1.0, predictions=preds(seq))
    assert res.prefetch_used == 2
    assert res.hits + res.prefetch_late == 2  # each used prefetch is either a hit or late


def test_admission_threshold_is_where_prefetch_value_turns_positive():
    from integrate.runtime.drivers import schedule_settings
    from predictor.simulate.policy import POLICIES, Policy, admission_threshold

    for w in (0.0, 0.5, 2.0):
        p = admission_threshold(Policy("learned", "value", link_weight=w))
        assert prefetch_value(p, 0.0, w, 0.0, 0.0, 1.0) == pytest.approx(0.0)
        assert prefetch_value(p + 0.01, 0.0, w, 0.0, 0.0, 1.0) > 0 > prefetch_value(max(p - 0.01, 0), 0.0, w, 0.0, 0.0, 1.0) or p == 0
    assert admission_threshold(Policy("lru", "all", min_prob=0.2)) == 0.2  # naive: only the explicit cut
    assert schedule_settings("scheduler") == dict(policy="learned", threshold=pytest.approx(1 / 3),
                                                  max_inflight=POLICIES["scheduler"].max_inflight, hybrid=False)
    assert schedule_settings("naive") == dict(policy="predictor", threshold=0.0, max_inflight=None, hybrid=False)
    assert schedule_settings("hybrid_lru")["policy"] == "lru" and schedule_settings("hybrid_lru")["hybrid"]
    with pytest.raises(ValueError, match="true future"):
        schedule_settings("belady")
    with pytest.raises(ValueError, match="choose from"):
        schedule_settings("fifo")


def test_top_stable_equals_a_stable_argsort_on_ties():
    from predictor.simulate.top import top_stable

    rng = np.random.default_rng(0)
    for trial in range(100):
        E = int(rng.integers(1, 20))
        b = int(rng.integers(1, E + 1))
        s = rng.integers(0, 4, (3, 7, E)).astype(np.float32) if trial % 2 else rng.random((3, 7, E))
        assert np.array_equal(top_stable(s, b), np.argsort(-s, axis=-1, kind="stable")[..., :b]), (E, b)
    half = np.array([[1.0, 3.0, 2.0]], np.float16)
    assert top_stable(half, 2).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="NaN"):
        top_stable(np.array([[np.nan, 1.0, 2.0]]), 1)


def test_link_load_admission_follows_the_link_busy_share():
    """With `link_load` a wrong copy costs link_weight x the link's measured busy share: on a link that
    is nearly idle, predictions a fixed weight rejects are admitted; on a saturated one, the same cut."""
    rng = np.random.default_rng(2)
    L, E, k = 2, 8, 2
    seqs = random_seqs(rng, L, E, k, 40, 2)
    _, acc = make(seqs, E)
    ids = [np.asarray(s) for s in seqs]
    p = Predictions.from_sequences(ids, [np.full(i.shape, 0.2) for i in ids], "token_ahead")  # right, 20 % sure
    fixed = Policy("lru", "value", link_weight=0.5)  # admits at p >= 1/3: nothing
    loaded = Policy("lru", "value", link_weight=0.5, link_load=True)
    idle = TimeModel(1_000, 1e6, 1.0)  # a copy takes 1 ns: the link is idle
    assert simulate(acc, idle, fixed, 0.5, predictions=p).prefetch_issued == 0
    assert simulate(acc, idle, loaded, 0.5, predictions=p).prefetch_issued > 0
    busy = TimeModel(10**9, 1.0, 0.001)  # a copy takes a second, a layer a microsecond: always busy
    res = simulate(acc, busy, loaded, 0.5, predictions=p)
    assert res.prefetch_issued == 0 and res.prefetch_rejected > 0


def test_link_load_needs_value_admission():
    with pytest.raises(ValueError, match="link_load"):
        Policy("lru", "all", link_load=True)


def test_gate_ahead_scorer_calibrates_each_rank_on_the_train_rows():
    from predictor.simulate import GateAheadScorer
    from predictor.traces import TraceRecord

    E, T = 8, 40
    rng = np.random.default_rng(0)
    recs = []
    for i in range(4):
        order = np.argsort(rng.random((T, 2, E)), axis=-1)
        experts = order[..., :2]
        # rank 0: always routed; rank 1: never; rank 2: routed on the even tokens
        third = np.where((np.arange(T) % 2 == 0)[:, None], order[..., 1], order[..., 5])
        gate = np.stack([order[..., 0], order[..., 4], third], -1)
        recs.append(TraceRecord(i, np.zeros(T, np.int64), experts, T, gate_ahead=gate))
    sc = GateAheadScorer(E).fit(recs)
    np.testing.assert_allclose(sc.p, [[1 - 1e-4, 1e-4, 0.5]] * 2)
    np.testing.assert_allclose(sc.rest, [(2 - (1 - 1e-4) - 1e-4 - 0.5) / 5] * 2)
    s = sc.scores(recs[0])
    p = s / (1 + s)  # what the evaluation reads back
    assert s.shape == (T, 2, E)
    np.testing.assert_allclose(np.take_along_axis(p, recs[0].gate_ahead, -1), np.broadcast_to(sc.p, (T, 2, 3)))
    outside = np.ones((T, 2, E), bool)
    np.put_along_axis(outside, recs[0].gate_ahead, False, -1)
    np.testing.assert_allclose(p[outside], sc.rest[0])
    with pytest.raises(ValueError, match="record_gate_ahead"):
        GateAheadScorer(E).fit([TraceRecord(0, np.zeros(3, np.int64), recs[0].experts[:3], 3)])


def test_every_time_model_key_is_in_the_base_preset():
    """The plain presets inherit conf/sim/auto.yaml: a key missing there cannot be overridden as
    `sim.KEY=...` (Hydra's struct mode) in any of them."""
    from pathlib import Path

    import yaml

    from predictor.simulate.timing import _FIELDS

    auto = yaml.safe_load((Path(__file__).parents[1] / "conf/sim/auto.yaml").read_text())
    assert not [key for key in (*_FIELDS, "cpu_async", "max_inflight", "zero_latency") if key not in auto]

