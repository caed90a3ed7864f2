"""One entry point: `simulate(acc, tm, policy, capacity, ...)` runs any policy and returns a SimResult.

The compiled engine (engine.py) replays every policy; static frequency pinning, which needs no
event loop, stays vectorised here. `Predictions` carries a scorer's top-B experts and their
probabilities per row, with when the scorer may know them (mode, lookahead).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from predictor.config import check_lookahead

from . import layout as lay
from .accesses import Accesses
from .engine import replay
from .policy import ADMISSIONS, EVICTIONS, POLICIES, Policy, ReuseHazard
from .result import SimResult
from .timing import TimeModel
from .top import top_stable

DEMAND_POLICIES = ("lru", "lfu", "pinning", "belady", "hybrid_lru")  # no predictor (hybrid_lru: misses on the CPU)
MODES = ("token_ahead", "layer_ahead", "layer_output")  # when a scorer's prediction for a row is known


SCORE_KINDS = ("logits", "probs", "odds")


def score_probs(s: np.ndarray, kind: str) -> np.ndarray:
    """Probabilities (float64) of a scorer's scores: sigmoid of `logits` (the predictor); `probs`, a
    baseline's own estimates of P(routed), as they are (clipped to [0, 1]); `odds` (and non-negative
    scores that only rank) by the monotone s / (1 + s)."""
    s = np.asarray(s, dtype=np.float64)
    if kind == "logits":
        return 1.0 / (1.0 + np.exp(-s))
    if kind == "probs":
        return np.clip(s, 0.0, 1.0)
    if kind == "odds":
        return s / (1.0 + s)
    raise ValueError(f"score kind {kind!r}; choose from {SCORE_KINDS}")


@dataclass
class Predictions:
    """A scorer's prefetch candidates per row of `Accesses` (decode order): ids (R, B) best first,
    probs (R, B) in [0, 1]; mode token_ahead (known at the token's start), layer_ahead (known once
    layer l - lookahead has routed) or layer_output (known once layer l - 1 has run: made from its
    output, as the cross-layer gate is; layer 0's at the token's start)."""

    ids: np.ndarray
    probs: np.ndarray
    mode: str
    lookahead: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"predictions: mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "layer_ahead":
            check_lookahead(self.lookahead, key="Predictions.lookahead")
        if self.ids.ndim != 2 or self.ids.shape[1] < 1 or self.probs.shape != self.ids.shape:
            raise ValueError(
                f"predictions: ids {self.ids.shape} and probs {self.probs.shape} must both be (rows, B >= 1)"
            )
        if not np.all((self.probs >= 0) & (self.probs <= 1)):  # also refuses NaN
            raise ValueError("predictions: probabilities must lie in [0, 1] (NaN found or out of range)")

    @classmethod
    def from_sequences(cls, ids: list, probs: list | None, mode: str, lookahead: int | None = None):
        """From per-sequence (T, L, B) arrays (probs None: every candidate counts as certain)."""
        flat = np.concatenate([np.asarray(a).reshape(-1, np.shape(a)[-1]) for a in ids]).astype(np.int32)
        if probs is None:
            p = np.ones(flat.shape, np.float32)
        else:
            p = np.concatenate([np.asarray(a).reshape(-1, np.shape(a)[-1]) for a in probs]).astype(np.float32)
        if p.shape != flat.shape:
            raise ValueError(f"prediction probs {p.shape} do not match ids {flat.shape}")
        return cls(flat, p, mode, lookahead if mode == "layer_ahead" else None)


    @classmethod
    def from_scores(cls, scores: list, budget: int, mode: str, lookahead: int | None = None, kind: str = "logits",
                    calibration=None):  # fmt: skip
        """From per-sequence (T, L, E) scores: the top-`budget` experts and their probabilities
        (`score_probs` of the scores' `kind`), mapped by `calibration` (predictor/calibration.py) when
        one is given; the ranking stays the scores'."""
        ids, probs = [], []
        for s in scores:
            s = np.asarray(s)
            top = top_stable(s, budget)  # np.argsort(-s, kind="stable")[..., :budget], compiled
            ids.append(top)
            p = score_probs(np.take_along_axis(s, top, -1), kind)
            probs.append(p if calibration is None else calibration(p))
        return cls.from_sequences(ids, probs, mode, lookahead)

    @classmethod
    def truth(cls, acc: Accesses, mode: str, lookahead: int | None = None, recall: float = 1.0, seed: int = 0):
        """A perfect predictor's: every row's true experts, certain. Run under a policy, it is the ceiling
        of any predictor that knows what `mode` lets it know (the running token, or layer l - h). With
        `recall` < 1, each true expert is swapped, with chance 1 - recall, for a random expert outside the
        row (no repeats), and every listed expert gets probability `recall`: a calibrated predictor of
        exactly that expected recall@k, for asking what recall a target needs."""
        if not 0.0 < recall <= 1.0:
            raise ValueError(f"recall must be in (0, 1], got {recall}")
        E = acc.num_experts
        if recall < 1 and E < 2 * acc.top_k:  # a row's swaps need k experts outside it: no draw would end
            raise ValueError(f"recall < 1 needs num_experts >= 2 top_k, got E = {E}, k = {acc.top_k}")
        true = (np.asarray(acc.keys) % E).astype(np.int64)
        ids = true.copy()
        rng = np.random.default_rng(seed)
        redo = rng.random(ids.shape) >= recall
        while redo.any():
            ids[redo] = rng.integers(0, E, int(redo.sum()))
            clash = (ids[:, :, None] == true[:, None, :]).any(-1) | ((ids[:, :, None] == ids[:, None, :]).sum(-1) > 1)
            redo &= clash  # keep the draws that are wrong and unrepeated; draw the others again
        return cls(ids.astype(np.int32), np.full(ids.shape, recall, np.float32), mode,
                   lookahead if mode == "layer_ahead" else None)  # fmt: skip


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


def first_use(acc: Accesses) -> np.ndarray:
    """(L * E,) each key's first two uses packed as `Accesses.next_uses` packs them (R + 1 for none):
    Belady's next uses before any access."""
    R = len(acc.keys)
    base = R + 2
    first = np.full(acc.num_layers * acc.num_experts, R + 1, dtype=np.int64)
    second = first.copy()
    flat = acc.keys.ravel().astype(np.int64)
    rows = np.repeat(np.arange(R, dtype=np.int64), acc.top_k)
    np.minimum.at(first, flat, rows)
    later = rows > first[flat]
    np.minimum.at(second, flat[later], rows[later])
    return first * base + second


def simulate(
    acc: Accesses,
    tm: TimeModel,
    policy: Policy | str,
    capacity: float,
    scope: str = "global",
    predictions: Predictions | None = None,
    oracle: bool = False,
    horizon: int = 0,
    window: int | None = None,
    hazard: ReuseHazard | np.ndarray | None = None,
    warm_all: bool = False,
    name: str | None = None,
) -> SimResult:
    """Replay `acc` under `tm` with `policy` (a Policy or a name in POLICIES).

    predictions: prefetch candidates (None: no prefetch); oracle: the oracle schedule (each miss
    copied as early as its victim's slot is free; with horizon H > 0, not before the token H - 1
    tokens earlier started, its Belady eviction knowing next uses only inside the running token and
    the H - 1 after it, and past them ranking by the learned expected distance from `hazard`);
    window: token_ahead layers issued ahead of the running one (None: the whole token); hazard: the
    learned eviction's reuse hazard (policy.reuse_hazard of the train split, or a rate table (L, G)
    with every expert's factor 1; default: the mean rate k / E everywhere); warm_all: every expert
    resident before the first token.
    """
    if isinstance(policy, str) and policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {sorted(POLICIES)}")
    pol = POLICIES[policy] if isinstance(policy, str) else policy
    label = name or (policy if isinstance(policy, str) else pol.evict)
    L, E, k = acc.num_layers, acc.num_experts, acc.top_k
    per_group, total = slots_for(capacity, acc, scope)
    n_groups = L if scope == "per_layer" else 1
    if predictions is not None and oracle:
        raise ValueError("the oracle schedule takes no predictions")
    if predictions is not None and predictions.lookahead is not None:  # h >= L leaves no layer to predict
        check_lookahead(predictions.lookahead, L, key="Predictions.lookahead")
    if window is not None and window < 1:
        raise ValueError(f"prefetch window must be >= 1 layer, got {window}")
    fp = np.zeros(lay.N_FP)
    fp[lay.P_COPY] = tm.copy_s
    fp[lay.P_LAYER] = tm.compute_s
    fp[lay.P_EXPERT] = tm.expert_ms * 1e-3
    fp[lay.P_HOST_LAYER] = tm.host_layer_ms * 1e-3
    fp[lay.P_HOST_ROUTE] = tm.host_route_ms * 1e-3
    fp[lay.P_HOST_EXPERT] = tm.host_expert_ms * 1e-3
    fp[lay.P_COPY_ISSUE] = tm.copy_issue_ms * 1e-3
    fp[lay.P_PRED_STEP] = tm.predict_step_ms * 1e-3
    fp[lay.P_PRED_LAYER] = tm.predict_layer_ms * 1e-3
    fp[lay.P_PRED_LAT] = tm.prediction_s
    fp[lay.P_STEP_LAT] = 0.0 if tm.zero_latency else tm.prediction_step_ms * 1e-3
    if fp[lay.P_STEP_LAT] and predictions is not None and predictions.mode not in ("layer_ahead", "token_ahead"):
        raise ValueError(f"sim.prediction_step_ms models a token_ahead or layer_ahead predictor in a worker process; "
                         f"these predictions are {predictions.mode!r}")
    fp[lay.P_CPU] = tm.cpu_expert_ms * 1e-3
    fp[lay.P_CPU_HANDOFF] = tm.cpu_handoff_ms * 1e-3  # (the engine charges both under cpu_async only)
    fp[lay.P_CPU_HOST_SHARE] = tm.cpu_host_share
    fp[lay.P_LINK_W], fp[lay.P_QMIN], fp[lay.P_MIN_P] = pol.link_weight, pol.qmin, pol.min_prob
    if pol.hybrid and not tm.cpu_expert_ms > 0:
        raise ValueError("a hybrid policy needs sim.cpu_expert_ms > 0 (the CPU's time for one routed expert)")
    ip = np.zeros(lay.N_IP, dtype=np.int64)
    ip[lay.I_EVICT] = EVICTIONS[pol.evict]
    ip[lay.I_ADMIT] = ADMISSIONS[pol.admit]
    # 0: the ideal engine queue; N: host-committed, the policy's cap where lower
    ip[lay.I_INFLIGHT] = 0 if tm.max_inflight is None else min(tm.max_inflight, pol.max_inflight or tm.max_inflight)
    ip[lay.I_BYPASS] = pol.bypass and (pol.evict == "learned" or (predictions is None and not oracle))
    ip[lay.I_HYBRID] = pol.hybrid
    ip[lay.I_CPU_ASYNC] = tm.cpu_async
    ip[lay.I_WARM_ALL] = warm_all
    ip[lay.I_DEMAND_FIRST] = pol.demand_first
    ip[lay.I_SAMPLE] = pol.sample
    if horizon < 0 or (horizon and not oracle):
        raise ValueError(f"horizon={horizon}: a number of tokens >= 1, for the oracle schedule only")
    ip[lay.I_HORIZON] = horizon
    ip[lay.I_LINK_LOAD] = pol.link_load
    if predictions is not None:
        if predictions.ids.shape[0] != len(acc.keys):
            raise ValueError(f"predictions cover {predictions.ids.shape[0]} rows, the replay has {len(acc.keys)}")
        if predictions.ids.size and (predictions.ids.min() < 0 or predictions.ids.max() >= E):
            raise ValueError(f"prediction expert ids outside [0, {E})")
        ip[lay.I_SOURCE] = lay.PREDICTED
        if tm.zero_latency:
            ip[lay.I_MODE], ip[lay.I_LEAD] = lay.ZERO_LATENCY, 0
        elif predictions.mode == "layer_ahead":
            ip[lay.I_MODE], ip[lay.I_LEAD] = lay.LAYER_AHEAD, int(predictions.lookahead)
        elif predictions.mode == "layer_output":
            ip[lay.I_MODE], ip[lay.I_LEAD] = lay.LAYER_OUTPUT, 1
        else:
            ip[lay.I_MODE], ip[lay.I_LEAD] = lay.TOKEN_AHEAD, min(window or L, L)
        ids, probs = predictions.ids, predictions.probs
    else:
        ip[lay.I_SOURCE] = lay.ORACLE if oracle else lay.NO_PREFETCH
        ids, probs = np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32)
    need_future = pol.evict == "belady" or oracle
    nxt, ip[lay.I_NEXT_BASE] = acc.next_uses() if need_future else (np.zeros((0, k), np.int64), 1)
    first = first_use(acc) if need_future else np.zeros(L * E, np.int64)
    hazard = ReuseHazard.of(hazard, L, E, k).packed()
    seq_rows = np.concatenate([[0], np.cumsum(acc.seq_tokens) * L]).astype(np.int64)
    counts = np.zeros(lay.N_COUNTS, dtype=np.int64)
    times = np.zeros(lay.N_TIMES)
    hits_layer = np.zeros(L, dtype=np.int64)
    t0 = time.perf_counter()
    replay(
        np.ascontiguousarray(acc.keys, dtype=np.int64), seq_rows, L, E, n_groups, per_group, fp, ip, nxt, first,
        np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(probs, dtype=np.float32),
        hazard, counts, times, hits_layer,
    )  # fmt: skip
    return SimResult(
        policy=label,
        capacity=capacity,
        slots=total,
        scope=scope,
        tokens=acc.num_tokens,
        accesses=acc.num_accesses,
        hits=int(counts[lay.C_HITS]),
        stall_s=float(times[lay.T_STALL]),
        compute_s=float(times[lay.T_GPU]),
        elapsed_s=float(times[lay.T_ELAPSED]),
        host_s=float(times[lay.T_HOST]),
        demand_loads=int(counts[lay.C_DEMAND]),
        prefetch_issued=int(counts[lay.C_ISSUED]),
        prefetch_used=int(counts[lay.C_USED]),
        prefetch_late=int(counts[lay.C_LATE]),
        prefetch_wasted=int(counts[lay.C_WASTED]),
        prefetch_cancelled=int(counts[lay.C_CANCELLED]),
        prefetch_rejected=int(counts[lay.C_REJECTED]),
        cpu_experts=int(counts[lay.C_CPU]),
        cpu_s=float(times[lay.T_CPU]),
        expert_bytes=tm.expert_bytes,
        hits_per_layer=hits_layer.tolist(),
        accesses_per_layer=[acc.num_tokens * k] * L,
        sim_seconds=time.perf_counter() - t0,
    )


def pinning(acc: Accesses, tm: TimeModel, capacity: float, scope: str, train_freq: np.ndarray) -> SimResult:
    """Static: the most frequent (layer, expert) of the train split stay resident; a miss is loaded
    into a staging buffer and not cached. Without prefetch the link is idle when a layer starts, so
    its misses load back to back: stall = misses x copy time (a `plain` time model only: no host
    costs, and no GPU time per expert that a copy could overlap)."""
    if not tm.plain:
        raise ValueError("pinning's closed form (stall = misses x copy time) needs a plain time model: no host "
                         f"costs and expert_ms = 0 (got expert_ms={tm.expert_ms}, host costs: {tm.host_costs})")
    L, E = acc.num_layers, acc.num_experts
    slots, total = slots_for(capacity, acc, scope)
    train_freq = np.asarray(train_freq, dtype=np.float64)
    if train_freq.shape != (L, E):
        raise ValueError(f"train_freq must be (L={L}, E={E}), got {train_freq.shape}")
    t0 = time.perf_counter()
    pinned = np.zeros(L * E, dtype=bool)
    if scope == "global":
        pinned[np.argsort(-train_freq.ravel(), kind="stable")[:slots]] = True
    else:
        top = np.argsort(-train_freq, axis=1, kind="stable")[:, :slots]
        pinned[(np.arange(L)[:, None] * E + top).ravel()] = True
    per_row = pinned[acc.keys].sum(1)
    hits = np.bincount(np.tile(np.arange(L), acc.num_tokens), weights=per_row, minlength=L).astype(np.int64)
    misses = acc.num_accesses - int(hits.sum())
    compute = acc.num_tokens * L * (tm.compute_s + acc.top_k * tm.expert_ms * 1e-3)
    return SimResult(
        policy="pinning",
        capacity=capacity,
        slots=total,
        scope=scope,
        tokens=acc.num_tokens,
        accesses=acc.num_accesses,
        hits=int(hits.sum()),
        stall_s=misses * tm.copy_s,
        compute_s=compute,
        demand_loads=misses,
        expert_bytes=tm.expert_bytes,
        hits_per_layer=hits.tolist(),
        accesses_per_layer=[acc.num_tokens * acc.top_k] * L,
        sim_seconds=time.perf_counter() - t0,
    )


def fewest_loads(acc: Accesses, per_pool: int) -> int:
    """Copies no schedule avoids with `per_pool` slots per pool: every key once, and in a row of n keys at
    least n - per_pool (no more than per_pool of them can be resident when it starts)."""
    real = acc.keys >= 0
    return int(max(len(np.unique(acc.keys[real])), np.maximum(real.sum(1) - per_pool, 0).sum()))


def lower_bound(
    acc: Accesses, tm: TimeModel, capacity: float, scope: str = "global", resident: SimResult | None = None
) -> SimResult:
    """No copy-only schedule stalls less: Belady's misses are the fewest copies any schedule with
    this many slots makes, and at best the link moves them while everything else runs, i.e. during
    the all-resident replay's time (GPU compute, and host time where the host is the bottleneck)
    plus the host's time to issue them (`copy_issue_ms` each; a copy more moves longer than it
    hides, unless issuing takes longer than moving, when the bound is 0). So stall >= max(0,
    misses x (copy time - issue time) - all-resident time), and elapsed >= max(all-resident time,
    misses x copy time). The stall bound is for schedules without a predictor's host time (which
    hides copies too: compare those in elapsed time). `resident`: the all-resident run of the same
    replay, if the caller has it (it does not depend on the capacity)."""
    bel = simulate(acc, tm, "belady", capacity, scope, name="lower_bound")
    per_pool, _ = slots_for(capacity, acc, scope)
    if per_pool < acc.top_k:  # a row outnumbers its pool: Belady's ties are no longer optimal (it can load
        bel.demand_loads = fewest_loads(acc, per_pool)  # more than LRU), so a count no schedule beats, and
        bel.hits, bel.hits_per_layer = bel.accesses - bel.demand_loads, []  # its hits (no per-layer split)
    free = resident or simulate(acc, tm, "lru", 1.0, warm_all=True)
    link_s = bel.demand_loads * tm.copy_s
    bel.stall_s = max(0.0, bel.demand_loads * (tm.copy_s - tm.copy_issue_ms * 1e-3) - free.elapsed_s)
    bel.elapsed_s = max(free.elapsed_s, link_s)
    bel.compute_s, bel.host_s = free.compute_s, free.host_s
    return bel
