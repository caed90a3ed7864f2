"""One entry point per kind of policy, timed, returning SimResult."""

from __future__ import annotations

import time

import numpy as np

from . import policies
from .accesses import Accesses
from .prefetch import simulate_prefetch
from .result import SimResult
from .timing import TimeModel

DEMAND_POLICIES = ("lru", "lfu", "pinning", "belady")


def run_demand(
    policy: str,
    acc: Accesses,
    capacity: float,
    scope: str,
    tm: TimeModel,
    train_freq: np.ndarray | None = None,
    **options,
) -> SimResult:
    """A demand-fetch policy. Without prefetches the copy engine is idle when a layer starts, so
    its misses load back to back: stall = misses x copy time, exactly what the event loop gives."""
    slots, total = policies.slots_for(capacity, acc, scope)
    t0 = time.perf_counter()
    if policy == "lru":
        hits = policies.lru(acc, slots, scope)
    elif policy == "lfu":
        hits = policies.lfu(acc, slots, scope, **options)
    elif policy == "belady":
        hits = policies.belady(acc, slots, scope, **options)
    elif policy == "pinning":
        if train_freq is None:
            raise ValueError("pinning needs train_freq: (L, E) expert frequencies of the train split")
        hits = policies.pinning(acc, slots, scope, train_freq)
    else:
        raise ValueError(f"unknown demand policy {policy!r}; choose from {DEMAND_POLICIES}")
    elapsed = time.perf_counter() - t0
    misses = acc.num_accesses - int(hits.sum())
    return SimResult(
        policy=policy,
        capacity=capacity,
        slots=total,
        scope=scope,
        tokens=acc.num_tokens,
        accesses=acc.num_accesses,
        hits=int(hits.sum()),
        stall_s=misses * tm.copy_s,
        compute_s=acc.num_tokens * acc.num_layers * tm.compute_s,
        demand_loads=misses,
        expert_bytes=tm.expert_bytes,
        hits_per_layer=hits.tolist(),
        accesses_per_layer=[acc.num_tokens * acc.top_k] * acc.num_layers,
        sim_seconds=elapsed,
    )


def run_prefetch(
    name: str,
    acc: Accesses,
    capacity: float,
    scope: str,
    tm: TimeModel,
    predictions: list[np.ndarray] | None,
    mode: str,
    lookahead: int | None,
    window: int | None = None,
) -> SimResult:
    """Prefetch the per-sequence (T, L, budget) predictions (see prefetch.py)."""
    slots, _ = policies.slots_for(capacity, acc, scope)
    t0 = time.perf_counter()
    result = simulate_prefetch(
        acc, slots, scope, tm, predictions, mode, lookahead, name=name, capacity=capacity, window=window
    )
    result.sim_seconds = time.perf_counter() - t0
    return result
