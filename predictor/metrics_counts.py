"""The per-cell counting behind ExpertMetrics.update: where each true expert ranks in its row, and the
histograms of the probabilities that PR-AUC is read from.

`rank_counts` takes (N, L, E) scores and probabilities, (N, L, k) true expert ids with a `keep` mask
(not padding, not a repeat), and returns per true expert how many experts score above it and how many
tie with it (itself included), plus per probability bin the positives and all cells of valid rows.
On CPU one compiled pass does it (numba, no (N, L, k, E) temporaries; `python -m benchmarks.metrics_speed`
times it against the torch broadcast); elsewhere (a GPU under Lightning) the torch broadcast below,
which the tests hold equal to it.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(cache=True, nogil=True)
def _counts_cpu(scores, probs, ids, keep, valid, nb):  # pragma: no cover  (compiled)
    N, L, E = scores.shape
    K = ids.shape[2]
    above = np.zeros((N, L, K), np.int32)
    tied = np.zeros((N, L, K), np.int32)
    pos = np.zeros(nb + 1, np.int64)
    cells = np.zeros(nb + 1, np.int64)
    scale = np.float32(nb)
    for n in range(N):
        for layer in range(L):
            if not valid[n, layer]:
                continue
            row = scores[n, layer]
            for e in range(E):  # the bin of (probs.clamp(0, 1) * nb).long() in float32, as torch does
                p = min(max(probs[n, layer, e], np.float32(0.0)), np.float32(1.0))
                cells[min(np.int64(p * scale), nb - 1)] += 1
            for j in range(K):
                if not keep[n, layer, j]:
                    continue
                e = ids[n, layer, j]
                s = row[e]
                a = 0
                t = 0
                for x in range(E):
                    a += row[x] > s
                    t += row[x] == s
                above[n, layer, j] = a
                tied[n, layer, j] = t
                p = min(max(probs[n, layer, e], np.float32(0.0)), np.float32(1.0))
                pos[min(np.int64(p * scale), nb - 1)] += 1
    return above, tied, pos[:nb], cells[:nb]


def _counts_torch(scores, probs, ids, keep, valid, nb):
    true_scores = scores.gather(-1, ids).unsqueeze(-1)  # (N, L, k, 1)
    row = scores.unsqueeze(-2)  # (N, L, 1, E)
    above = (row > true_scores).sum(-1, dtype=torch.int32) * keep
    tied = (row == true_scores).sum(-1, dtype=torch.int32) * keep
    b = (probs.clamp(0.0, 1.0) * nb).long().clamp_(max=nb - 1)  # (N, L, E)
    pos = torch.bincount(torch.where(keep, b.gather(-1, ids), nb).flatten(), minlength=nb + 1)[:nb]
    cells = torch.bincount(torch.where(valid.unsqueeze(-1), b, nb).flatten(), minlength=nb + 1)[:nb]
    return above, tied, pos, cells


def rank_counts(scores, probs, ids, keep, valid, nb: int, compiled: bool | None = None):
    """scores, probs (N, L, E) float32; ids (N, L, k) long in [0, E); keep (N, L, k) and valid (N, L) bool
    -> above, tied (N, L, k) int32 (0 where not kept), pos, cells (nb,) per-bin counts of the true and of
    all cells of valid rows. `compiled` (default: on CPU) picks the numba pass."""
    if compiled is None:
        compiled = scores.device.type == "cpu"
    if bool(torch.isnan(probs).any()):  # no bin to put it in (the compiled pass would index out of bounds)
        raise ValueError("probabilities contain NaN: the scores they come from are not numbers")
    if bool(torch.isnan(scores).any()):  # it would tie with nothing and rank first
        raise ValueError("scores contain NaN")
    if not compiled:
        return _counts_torch(scores, probs, ids, keep, valid, nb)
    arrays = (t.contiguous().numpy() for t in (scores, probs, ids, keep, valid))
    return tuple(torch.from_numpy(a) for a in _counts_cpu(*arrays, nb))
