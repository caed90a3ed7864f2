"""integrate.demo_report.routing_figures on routing whose answers are known."""

import numpy as np

from integrate.demo_report import routing_figures


def test_token_determined_routing_is_learned_by_the_token_table():
    rng = np.random.default_rng(0)
    L, E, k, V = 3, 8, 2, 5
    route_of = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(V)])  # (V, L, k)
    ids = [rng.integers(0, V, 12) for _ in range(20)]
    experts = [route_of[t] for t in ids]  # each token id always routes the same way
    entropy = [np.full((len(t), L), 1.5) for t in ids]
    out = routing_figures(ids, experts, entropy, E, np.arange(20))
    assert np.allclose(out["recall_token_table"], 1.0)  # every held-out token id was seen in training
    assert all(0 < r < 1 for r in out["recall_frequency"])
    assert np.allclose(out["router_entropy_bits"], 1.5)
    assert all(0 < b <= 1 for b in out["load_balance"]) and len(out["prev_token_overlap"]) == L
