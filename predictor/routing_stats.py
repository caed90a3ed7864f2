"""Routing statistics of expert-id arrays, in numpy: the one place they are counted.

Expert ids come as (..., k) int arrays, typically (N, L, k): N tokens, L MoE layers, k routed
experts each. `multi_hot` and `cooccurrence_counts` skip padding (-1); `layer_frequency` and
`previous_token_overlap` take unpadded rows (trace rows are). Used by the baselines
(predictor/baselines.py), the simulator's scorers (predictor/simulate/scorers.py), the routing
statistics (predictor/stats.py), the demo report (integrate/demo_report.py), the replay benchmark's
data and the runtime's co-occurrence prefetch (integrate/runtime/prefetch.py), so numpy only: no
torch. The torch counterpart of `multi_hot` is `predictor.embeddings.expert_multi_hot`.
"""

from __future__ import annotations

import numpy as np


def multi_hot(experts: np.ndarray, num_experts: int, dtype=np.float32) -> np.ndarray:
    """(..., k) expert ids, -1 = padding -> (..., E) `dtype` with 1 at each routed expert."""
    experts = np.asarray(experts, dtype=np.int64)
    if experts.size == 0 or experts.min() >= 0:
        out = np.zeros((*experts.shape[:-1], num_experts), dtype=dtype)
        np.put_along_axis(out, experts, 1, axis=-1)
        return out
    # padding lands in a spare last column that is then dropped
    out = np.zeros((*experts.shape[:-1], num_experts + 1), dtype=dtype)
    np.put_along_axis(out, np.where(experts >= 0, experts, num_experts), 1, axis=-1)
    return np.ascontiguousarray(out[..., :num_experts])


def layer_counts(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, L, k) -> (L, E) int64: how many of the N tokens route to expert e at layer l."""
    L = experts.shape[1]
    flat = (np.arange(L)[None, :, None] * num_experts + experts).ravel()
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def layer_frequency(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, L, k) -> (L, E) float32: share of the N tokens that route to expert e at layer l."""
    return (layer_counts(experts, num_experts) / experts.shape[0]).astype(np.float32)


def cooccurrence_counts(experts: np.ndarray, num_experts: int, lookahead: int = 1) -> np.ndarray:
    """(N, L, k) expert ids -> (max(L - h, 0), E, E) int64 counts, h = `lookahead`:
    [l, i, j] = tokens routed to expert i at layer l and to expert j at layer l + h (all k x k pairs).

    Pairs with a padding id (-1) are not counted."""
    experts = np.asarray(experts)
    E, h = num_experts, lookahead
    L = experts.shape[1]
    padded = experts.size > 0 and experts.min() < 0
    counts = np.empty((max(L - h, 0), E, E), dtype=np.int64)
    for layer in range(L - h):  # one layer at a time keeps the index arrays at N * k * k
        a, b = experts[:, layer, :, None].astype(np.int64), experts[:, layer + h, None, :].astype(np.int64)
        pairs = a * E + b
        if padded:
            pairs = pairs[(a >= 0) & (b >= 0)]
        counts[layer] = np.bincount(pairs.ravel(), minlength=E * E).reshape(E, E)
    return counts


def previous_token_overlap(experts: np.ndarray, lengths: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Mean |S_t ∩ S_t-1| / k per layer over tokens that have a predecessor in their row -> (L,)."""
    total, pairs = previous_token_overlap_sums(experts, lengths, chunk)
    return total / max(pairs, 1) / experts.shape[-1]


def previous_token_overlap_sums(experts: np.ndarray, lengths: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, int]:
    """(sum of |S_t ∩ S_t-1| per layer (L,), number of tokens with a predecessor in their row): sums
    over chunks of whole rows add up to the sums over all rows (predictor/stats.py streams them)."""
    N, L, k = experts.shape
    has_prev = np.ones(N, dtype=bool)
    has_prev[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = False  # first token of every row
    total = np.zeros(L)
    # chunks overlap by one token so every (t - 1, t) pair is seen once; (chunk, L, k, k) stays small
    for lo in range(1, N, chunk):
        hi = min(lo + chunk, N)
        cur, prev = experts[lo:hi], experts[lo - 1 : hi - 1]
        inter = (cur[:, :, :, None] == prev[:, :, None, :]).any(-1).sum(-1)  # (n, L)
        total += (inter * has_prev[lo:hi, None]).sum(0)
    return total, int(has_prev.sum())
