"""`top_stable(s, b)`: per row the `b` highest scores' indices, ties to the lower index, as
`np.argsort(-s, kind="stable")[..., :b]` gives, in one compiled pass without sorting whole rows (it runs
on every scorer's scores in an evaluation; `python -m benchmarks.metrics_speed` times the two)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _top(s, b):  # pragma: no cover  (compiled)
    R, E = s.shape
    out = np.empty((R, b), np.int64)
    vals = np.empty(b, s.dtype)
    for r in range(R):
        n = 0
        for e in range(E):
            v = s[r, e]
            if n == b and not v > vals[b - 1]:  # a tie with the last kept stays out: it came later
                continue
            pos = min(n, b - 1)
            while pos > 0 and vals[pos - 1] < v:  # after every kept score >= v
                vals[pos] = vals[pos - 1]
                out[r, pos] = out[r, pos - 1]
                pos -= 1
            vals[pos] = v
            out[r, pos] = e
            n = min(n + 1, b)
    return out


def top_stable(s: np.ndarray, b: int) -> np.ndarray:
    """(..., E) scores -> (..., min(b, E)) int64 indices, best first, ties to the lower index."""
    s = np.ascontiguousarray(s)
    if s.dtype == np.float16:  # numba has no float16 arithmetic; float32 holds every float16 exactly
        s = s.astype(np.float32)
    b = min(int(b), s.shape[-1])
    if b < 1:
        raise ValueError(f"top_stable: b must be >= 1, got {b}")
    if s.dtype.kind == "f" and np.isnan(s).any():  # a NaN compares false with everything: no order
        raise ValueError("top_stable: scores contain NaN")
    return _top(s.reshape(-1, s.shape[-1]), b).reshape(*s.shape[:-1], b)
