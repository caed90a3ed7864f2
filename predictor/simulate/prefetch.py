"""Prediction-driven prefetch with prediction-aware eviction, under the time model.

Per (token t, layer l) the scorer's top-`budget` experts are prefetched:
- token_ahead: all layers of token t are known at the token's start (+ prediction latency); the
  first `window` layers are issued then, layer l + window when layer l runs (default: all at once);
- layer_ahead with lookahead h: layer l is issued when the router of layer l - h has run
  (layers l < h at the token's start);
- zero-latency mode: layer l is issued just before it runs and copies are instant.
A prefetch reserves its slot when issued and lands when the copy engine has moved it; one that
has not landed when its layer runs is a miss (a queued one is promoted to a demand load, one in
flight is waited for). Eviction order: experts whose prediction was wrong ("cold", oldest first),
then least recently used, then, for demand loads only, experts predicted for a pending layer
(prefetches never evict those). The current row's experts are never evicted for a prefetch. A
prediction that finds every slot predicted or in use waits, in order, until a layer that runs
releases slots (it is dropped once its own layer has run). With no predictions this is exactly LRU plus the time model (tested).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

import numpy as np

from .accesses import Accesses
from .result import SimResult
from .timing import TimeModel


class _Pool:
    """Resident (or reserved) experts of one pool in three eviction classes; `home` maps a key to its class."""

    __slots__ = ("slots", "cold", "warm", "prot", "home")

    def __init__(self, slots: int):
        self.slots = slots
        self.cold: OrderedDict = OrderedDict()  # predicted, released without being routed
        self.warm: OrderedDict = OrderedDict()  # LRU order
        self.prot: OrderedDict = OrderedDict()  # predicted for a layer that has not run yet
        self.home: dict = {}

    def victim(self, exclude, allow_prot: bool):
        for group in (self.cold, self.warm, self.prot) if allow_prot else (self.cold, self.warm):
            for key in group:
                if key not in exclude:
                    return key
        return None

    def put(self, key, group: OrderedDict) -> None:
        """Move `key` (resident or not) to the most recent end of `group`."""
        old = self.home.get(key)
        if old is group:
            group.move_to_end(key)
            return
        if old is not None:
            del old[key]
        group[key] = None
        self.home[key] = group


def simulate_prefetch(
    acc: Accesses,
    slots: int,
    scope: str,
    tm: TimeModel,
    predictions: Iterable[np.ndarray] | None,
    mode: str = "token_ahead",
    lookahead: int | None = None,
    name: str = "prefetch",
    window: int | None = None,
    capacity: float = 0.0,
) -> SimResult:
    """`predictions`: per sequence (T, L, B) expert ids, best first (None: no prefetch)."""
    L, E = acc.num_layers, acc.num_experts
    if mode not in ("token_ahead", "layer_ahead"):
        raise ValueError(f"mode must be token_ahead or layer_ahead, got {mode!r}")
    h = int(lookahead or 0) if mode == "layer_ahead" else 0
    if mode == "layer_ahead" and h < 1:
        raise ValueError(f"layer_ahead needs lookahead >= 1, got {lookahead}")
    if window is not None and window < 1:
        raise ValueError(f"prefetch window must be >= 1 layer, got {window}")
    # layers issued ahead of the running one: h in layer_ahead mode, the window (default: the whole
    # token) in token_ahead mode, whose predictions are all known at the token's start
    lead = h if h else min(window or L, L)
    zero = tm.zero_latency
    d, c, lat = tm.copy_s, tm.compute_s, tm.prediction_s
    pools = [_Pool(slots)] * L if scope == "global" else [_Pool(slots) for _ in range(L)]
    INF = float("inf")
    land: dict = {}  # key -> landing time (inf while queued) for every resident or reserved key
    queued: dict = {}  # key -> issue time, copies not yet started
    queue: deque = deque()  # (key, issue time) FIFO; entries no longer in `queued` are skipped
    pcount: dict = {}  # key -> pending predictions that name it
    pending: list = [()] * L  # keys predicted for the next run of each layer
    deferred: list = []  # (layer, key, issue time) predicted but not issued for lack of a free slot
    unused: set = set()  # prefetched keys not routed yet
    busy = 0.0  # when the last started copy lands
    now = 0.0
    stall = 0.0
    demand = issued = used = late = wasted = cancelled = 0
    hits_l = [0] * L
    pred_iter = iter(predictions) if predictions is not None else None
    parts = [(p, p.home, p.prot, p.warm, p.cold) for p in pools]  # one lookup per row, not five

    def evict(pool, victim):
        nonlocal cancelled, wasted
        del pool.home.pop(victim)[victim]
        del land[victim]
        if victim in queued:
            del queued[victim]
            cancelled += 1
        if victim in unused:
            unused.discard(victim)
            wasted += 1

    def copy_in(pool, key, t_issue, in_use) -> bool:
        """Reserve a slot for `key` and queue its copy; False if every slot is predicted or in use."""
        nonlocal issued
        home, prot = pool.home, pool.prot
        if len(home) >= pool.slots:
            victim = pool.victim(in_use, allow_prot=False)
            if victim is None:
                return False
            evict(pool, victim)
        prot[key] = None
        home[key] = prot
        land[key] = INF
        queued[key] = t_issue
        queue.append((key, t_issue))
        unused.add(key)
        issued += 1
        return True

    def issue(layer, keys, t_issue, in_use):
        pending[layer] = keys
        pool = pools[layer]
        prot, home = pool.prot, pool.home
        for key in keys:
            pcount[key] = pcount.get(key, 0) + 1
            old = home.get(key)
            if old is not None:
                if old is not prot:  # resident: keep it for the layer that is predicted to need it
                    del old[key]
                    prot[key] = None
                    home[key] = prot
            elif not copy_in(pool, key, t_issue, in_use):
                # no free slot yet: retried as earlier layers release theirs
                deferred.append((layer, key, t_issue))

    def retry_deferred(layer, t_issue, in_use):
        kept = []
        for item in deferred:
            later, key, first = item
            # a layer that has run (or runs now) needs it no more
            if (
                later > layer
                and key not in land
                and not copy_in(pools[later], key, max(first, t_issue), in_use)
            ):
                kept.append(item)
        deferred[:] = kept

    for seq_i, seq in enumerate(acc.sequences()):
        rows = seq.tolist()
        T = len(rows) // L
        if pred_iter is not None:
            pred = next(pred_iter)
            if pred.shape[:2] != (T, L):
                raise ValueError(
                    f"sequence {seq_i}: predictions {pred.shape} do not match ({T}, {L}, budget)"
                )
            pred = (pred + (np.arange(L) * E)[None, :, None]).tolist()
        for t in range(T):
            if pred_iter is not None and not zero:
                token_ready = now + lat
                for layer in range(min(lead, L)):
                    issue(layer, pred[t][layer], token_ready, ())
            for layer in range(L):
                row = rows[t * L + layer]
                pool, home, prot, warm, cold = parts[layer]
                if pred_iter is not None and zero:
                    issue(layer, pred[t][layer], now, ())  # the row has not run: nothing is in use
                while queue:  # start every queued copy whose start time has come
                    key, t_issue = queue[0]
                    if queued.get(key) != t_issue:
                        queue.popleft()
                        continue
                    start = busy if busy > t_issue else t_issue
                    if start > now:
                        break
                    busy = land[key] = start + d
                    del queued[key]
                    queue.popleft()
                for key in pending[layer]:  # this layer runs now: its predictions are released
                    n = pcount[key] - 1
                    if n:
                        pcount[key] = n
                        continue
                    del pcount[key]
                    if home.get(key) is prot:
                        group = warm if key in row else cold
                        del prot[key]
                        group[key] = None
                        home[key] = group
                pending[layer] = ()
                ready = now
                missed = []
                row_hits = 0
                for key in row:
                    lt = land.get(key)
                    if lt is None:
                        missed.append(key)  # demand miss, loaded below
                        continue
                    if key in queued:  # not started: promoted ahead of the other prefetches
                        del queued[key]
                        start = busy if busy > now else now
                        busy = lt = land[key] = start + d
                    if lt > now:
                        if lt > ready:
                            ready = lt
                        if key in unused:
                            late += 1
                            unused.remove(key)
                    else:
                        row_hits += 1
                        if key in unused:
                            used += 1
                            unused.remove(key)
                    group = prot if key in pcount else warm
                    old = home[key]
                    if old is group:
                        group.move_to_end(key)
                    else:
                        del old[key]
                        group[key] = None
                        home[key] = group
                hits_l[layer] += row_hits
                for key in missed:
                    if len(home) >= pool.slots:
                        victim = pool.victim(row, allow_prot=True)
                        if victim is None:  # fewer slots than top_k: evict one of this row, already used
                            victim = pool.victim((), allow_prot=True)
                        evict(pool, victim)
                    group = prot if key in pcount else warm
                    group[key] = None
                    home[key] = group
                    start = busy if busy > now else now
                    busy = land[key] = start + d
                    if busy > ready:
                        ready = busy
                    demand += 1
                stall += ready - now
                if pred_iter is not None and not zero and layer + lead < L:
                    t_issue = ready + lat if h else max(ready, token_ready)
                    issue(layer + lead, pred[t][layer + lead], t_issue, row)
                if deferred:  # this layer released its predictions: their slots may take deferred ones
                    retry_deferred(layer, ready, row)
                now = ready + c
    wasted += len(unused)
    return SimResult(
        policy=name,
        capacity=capacity,
        slots=slots * (1 if scope == "global" else L),
        scope=scope,
        tokens=acc.num_tokens,
        accesses=acc.num_accesses,
        hits=sum(hits_l),
        stall_s=stall,
        compute_s=acc.num_tokens * L * c,
        demand_loads=demand,
        prefetch_issued=issued,
        prefetch_used=used,
        prefetch_late=late,
        prefetch_wasted=wasted,
        prefetch_cancelled=cancelled,
        expert_bytes=tm.expert_bytes,
        hits_per_layer=hits_l,
        accesses_per_layer=[acc.num_tokens * acc.top_k] * L,
    )
