"""Demand-fetch policies (no prefetch): LRU, LFU, static frequency pinning, Belady's optimum.

Each returns hits per MoE layer. A row's resident experts are hits and are touched first; then
its misses are loaded one by one, each evicting per policy (the runtime uses a layer's experts in
turn, so with fewer slots than top_k a miss may evict an expert of the same row already used).
Caches are one pool shared by all layers (`scope="global"`) or one per layer, and stay warm
across sequences. Tight plain-Python loops over C-implemented containers: the inner work per
access is one dict lookup, so ~1-3 M accesses/s on one core.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import numpy as np

from .accesses import Accesses


def slots_for(capacity: float, acc: Accesses, scope: str) -> tuple[int, int]:
    """(slots per pool, total slots) for a capacity fraction of all L * E routed experts."""
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity is a fraction of all routed experts in (0, 1], got {capacity}")
    L, E = acc.num_layers, acc.num_experts
    if scope == "global":
        n = max(1, round(capacity * L * E))
        return n, n
    if scope == "per_layer":
        n = max(1, round(capacity * E))
        return n, n * L
    raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")


def _pools(factory, acc: Accesses, scope: str) -> list:
    if scope == "global":
        shared = factory()
        return [shared] * acc.num_layers
    return [factory() for _ in range(acc.num_layers)]


def lru(acc: Accesses, slots: int, scope: str) -> np.ndarray:
    L = acc.num_layers
    caches = _pools(OrderedDict, acc, scope)
    hits = [0] * L
    for seq in acc.sequences():
        layer = 0
        for row in seq.tolist():
            c = caches[layer]
            missed = []
            for key in row:
                if key in c:
                    c.move_to_end(key)
                else:
                    missed.append(key)
            hits[layer] += len(row) - len(missed)
            for key in missed:
                if len(c) >= slots:
                    c.popitem(last=False)
                c[key] = None
            layer = layer + 1 if layer + 1 < L else 0
    return np.asarray(hits)


def lfu(acc: Accesses, slots: int, scope: str, keep_history: bool = True) -> np.ndarray:
    """Evict the resident expert with the fewest accesses, least recently used among ties.

    keep_history=True counts every access since the start (perfect LFU); False forgets an
    expert's count when it is evicted (in-cache LFU).
    """
    L = acc.num_layers
    count = [0] * (L * acc.num_experts)
    resident = _pools(dict, acc, scope)  # key -> row of last access
    heaps = [[] for _ in range(L)] if scope == "per_layer" else [[]] * L
    hits = [0] * L
    r = 0
    for seq in acc.sequences():
        layer = 0
        for row in seq.tolist():
            res, heap = resident[layer], heaps[layer]
            missed = []
            for key in row:
                count[key] += 1
                if key in res:
                    res[key] = r
                    heapq.heappush(heap, (count[key], r, key))
                else:
                    missed.append(key)
            hits[layer] += len(row) - len(missed)
            for key in missed:
                if len(res) >= slots:
                    while True:  # lazy deletion: an entry is live if it matches the key's count and last row
                        c, last, victim = heapq.heappop(heap)
                        if res.get(victim) == last and count[victim] == c:
                            break
                    del res[victim]
                    if not keep_history:
                        count[victim] = 0
                res[key] = r
                heapq.heappush(heap, (count[key], r, key))
            if len(heap) > 4 * slots + 64:  # drop stale entries
                heap[:] = [(count[k], last, k) for k, last in res.items()]
                heapq.heapify(heap)
            r += 1
            layer = layer + 1 if layer + 1 < L else 0
    return np.asarray(hits)


def belady(acc: Accesses, slots: int, scope: str, bypass: bool = True) -> np.ndarray:
    """Offline optimum without prefetch: evict the expert whose next use is farthest.

    bypass=True does not cache a missed expert whose own next use is farther than every
    resident's (the true optimum of hit count); False always caches it (demand paging MIN).
    """
    L, k = acc.num_layers, acc.top_k
    nxt_all = acc.next_use()
    resident = _pools(dict, acc, scope)  # key -> next-use row
    heaps = [[] for _ in range(L)] if scope == "per_layer" else [[]] * L  # max-heap via -next_use
    hits = [0] * L
    start = 0
    for seq in acc.sequences():
        layer = 0
        for row, nus in zip(seq.tolist(), nxt_all[start : start + len(seq)].tolist()):
            res, heap = resident[layer], heaps[layer]
            missed = []
            for key, nu in zip(row, nus):
                if key in res:
                    res[key] = nu
                    heapq.heappush(heap, (-nu, key))
                else:
                    missed.append((key, nu))
            hits[layer] += k - len(missed)
            for key, nu in missed:
                if len(res) >= slots:
                    while True:  # next-use rows only grow, so a stale entry never matches
                        neg, victim = heap[0]
                        if res.get(victim) == -neg:
                            break
                        heapq.heappop(heap)
                    if bypass and nu >= -neg:
                        continue
                    heapq.heappop(heap)
                    del res[victim]
                res[key] = nu
                heapq.heappush(heap, (-nu, key))
            if len(heap) > 4 * slots + 64:
                heap[:] = [(-nu, key) for key, nu in res.items()]
                heapq.heapify(heap)
            layer = layer + 1 if layer + 1 < L else 0
        start += len(seq)
    return np.asarray(hits)


def pinning(acc: Accesses, slots: int, scope: str, train_freq: np.ndarray) -> np.ndarray:
    """Static: the `slots` most frequent (layer, expert) of the train split stay resident; misses
    are loaded into a staging buffer and not cached. Pinned experts are loaded before serving."""
    L, E = acc.num_layers, acc.num_experts
    train_freq = np.asarray(train_freq, dtype=np.float64)
    if train_freq.shape != (L, E):
        raise ValueError(f"train_freq must be (L={L}, E={E}), got {train_freq.shape}")
    pinned = np.zeros(L * E, dtype=bool)
    if scope == "global":
        pinned[np.argsort(-train_freq.ravel(), kind="stable")[:slots]] = True
    else:
        top = np.argsort(-train_freq, axis=1, kind="stable")[:, :slots]
        pinned[(np.arange(L)[:, None] * E + top).ravel()] = True
    hit = pinned[acc.keys]  # (R, k)
    per_row = hit.sum(1)
    return np.bincount(np.tile(np.arange(L), acc.num_tokens), weights=per_row, minlength=L).astype(np.int64)
