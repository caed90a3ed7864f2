"""The replay engine: one compiled event loop that runs every policy under the time model.

Rows replay in decode order (sequence by sequence, the cache warm across them; token by token;
MoE layer by MoE layer). Per layer (timing.py describes the three timelines):
  1. the host issues the layer's fixed part, the GPU runs it, the router is read back (host waits);
  2. the predictions that become known now are queued as prefetches (layer_ahead: layer l + h);
  3. fetch: the row's resident experts first, then its misses, each a demand copy evicting per
     policy (or, hybrid, computed on the host CPU when that is done before the copy would land: by
     the host thread once it has launched the device's experts, or with `cpu_async` by a pool of
     its own from when the host reaches it);
     queued prefetches are committed to the link at each host event while fewer than
     `max_inflight` are in flight (with `demand_first`, only after the row's demand copies), and
     the policy's admission may drop them instead (with `link_load`, weighing a wrong copy by the
     link's busy share over the tokens so far, measured at each token start and halved per token);
  4. the GPU runs the experts in that order, each once its copy has landed;
  5. the row's predictions are spent: prefetched experts never routed turn "cold" (evicted first).
The oracle schedule (`ORACLE`) copies each miss as soon as the link is free and the compute that
last read its victim's slot has run, the earliest any schedule with that eviction could; with a
`horizon` of H tokens, not before the token H - 1 tokens earlier started, and evicting by the next
uses inside those H tokens alone (past them, by the learned expected distance): what knowing the
routing only H tokens ahead allows, H = 1 being a perfect predictor of the running token (for H >= 2
an upper estimate: a copy may start H - 1 tokens early, its victim chosen at the miss from the window
there; the window never passes the sequence's end).

An access is a *hit* when its expert is on the device by the time the GPU reaches it (a prefetch
still in flight is a late miss). Keys are `layer * E + expert`; slots form one pool or one group
per layer. The state per slot and per key lives in a few tables (layout.py), scalars in two small
arrays (`f`, `n`), so helpers update it in place: `replay` allocates it all and hands it to `_run`,
the loop, compiled like every helper it calls without numba's reference counting (evict.py).
"""

# ruff: noqa: F403, F405  (the array index names come from layout.py by a star import)
from __future__ import annotations

import numba as nb
import numpy as np

from .evict import COLD, FILLED, USED, _fill_slot, _reorder, _victim, new_order
from .layout import *  # the index names of every array below (layout.py)
from .layout import _NEG
from .policy import BELADY, LEARNED, cpu_is_faster, hazard_rate
from .prefetch import _learn, _pump, _queue


@nb.njit(cache=True, nogil=True)
def replay(keys, seq_rows, L, E, n_groups, per_group, fp, ip, next_use, first_use, pred_ids, pred_p, hazard,
           counts, times, hits_layer):
    """Run one policy over `keys` (R, k) in place into counts / times / hits_layer (C_*, T_* indices):
    allocates the state (layout.py's tables), then runs the loop, compiled without reference counts."""
    R, k = keys.shape
    S = n_groups * per_group
    LE = L * E
    B = pred_ids.shape[1]
    lst, lgrp = new_order(S, n_groups)  # the LRU list, and the LFU heaps (lfu.py) where heaped
    si = np.full((3, S), -1, np.int64)  # per slot: key, pend, unused (layout.py)
    si[S_UNUSED] = 0
    sv = np.zeros((3, S))
    kt = np.full((LE, K_COLS), -1, np.int64)
    for key in range(LE):
        kt[key, K_CNT], kt[key, K_NEXT], kt[key, K_LAYER] = 0, first_use[key], key // E
    kp = np.zeros(LE, np.float32)
    lknown = np.full(L, -1, np.int64)
    lfloor = np.zeros(L, np.float32)
    qcap = 4 * LE + 16
    qi = np.zeros((qcap, 2), np.int64)
    qf = np.zeros((qcap, 2))
    infl = np.zeros(S + 1)
    f = np.zeros(N_F)
    f[F_STAMP] = 1.0
    f[F_LOAD] = 1.0  # the link's load before any token is measured: as if busy
    f[F_ROUTED_ROW] = -1.0
    n = np.zeros(N_N, np.int64)
    n[N_TOK], n[N_CI], n[N_CH] = -1, -1, -1
    tok_start = np.zeros(R // L + 1)
    plist = np.zeros((2 * L + 2, 2 * B + 3), np.int64)  # slots kept for each upcoming row (_note)
    order = np.zeros(k, np.int64)
    slot_of = np.zeros(k, np.int64)
    ready = np.zeros(k)
    h_at = np.zeros(k)
    on_cpu = np.zeros(k, np.bool_)
    demand = np.zeros(k, np.bool_)
    prefetched = np.zeros(k, np.bool_)
    cand = np.zeros((2, k), np.int64)  # a scan's ranking of the victims (evict._rated_victim)
    cval = np.zeros((2, 2, k))
    _run(keys, seq_rows, L, E, n_groups, per_group, fp, ip, next_use, pred_ids, pred_p, hazard, counts, times,
         hits_layer, lst, lgrp, si, sv, kt, kp, lknown, lfloor, qi, qf, infl, f, n, tok_start, plist, order, slot_of,
         ready, h_at, on_cpu, demand, prefetched, cand, cval)


@nb.njit(cache=True, _nrt=False)
def _run(keys, seq_rows, L, E, n_groups, per_group, fp, ip, next_use, pred_ids, pred_p, hazard, counts, times,
         hits_layer, lst, lgrp, si, sv, kt, kp, lknown, lfloor, qi, qf, infl, f, n, tok_start, plist, order, slot_of,
         ready, h_at, on_cpu, demand, prefetched, cand, cval):
    """replay's event loop, over the state replay allocated; order, slot_of, ready, h_at, on_cpu,
    demand and prefetched describe the running row's experts in the order they are fetched."""
    k = keys.shape[1]
    S = n_groups * per_group
    LE = L * E
    B = pred_ids.shape[1]
    source, mode, lead, code = ip[I_SOURCE], ip[I_MODE], ip[I_LEAD], ip[I_EVICT]
    by_next = code == BELADY and source == NO_PREFETCH
    fixed_s = fp[P_LAYER] + fp[P_HOST_LAYER] + fp[P_HOST_ROUTE]  # a layer's fixed part
    row_s = fixed_s + k * (fp[P_EXPERT] + fp[P_HOST_EXPERT])  # a layer

    if ip[I_WARM_ALL]:  # every expert resident before the first token (all-resident bound)
        for key in range(LE):
            grp = key // E if n_groups > 1 else 0
            s = grp * per_group + (key % E if n_groups > 1 else key)
            if s < (grp + 1) * per_group and s < S:
                si[S_KEY, s] = key
                kt[key, K_SLOT] = s
                sv[V_LAND, s] = _NEG
                _reorder(s, FILLED, code, per_group, kt[key, K_CNT], sv[V_LAST, s], lst, lgrp)

    for sq in range(len(seq_rows) - 1):
        r0, r1 = seq_rows[sq], seq_rows[sq + 1]
        n[N_TOK0] = n[N_TOK] + 1
        n[N_END] = r1
        for r in range(r0, r1):
            # a scan's ranking of victims (evict._rated_victim) holds while only taking them changes the
            # slots: dropped at each row, at new predictions and at the row's routing
            n[N_CI] = -1
            layer = (r - r0) % L
            grp = layer if n_groups > 1 else 0
            lo, hi = grp * per_group, (grp + 1) * per_group
            if layer == 0:  # token start: the previous token's logits have been read (sync)
                n[N_TOK] += 1
                f[F_H] = max(f[F_H], f[F_G])
                f[F_G] = f[F_H]
                tok_start[n[N_TOK]] = f[F_H]
                if n[N_TOK] > 0:  # the link's load over the token just done (its busy share), smoothed; the
                    # timeline runs on across sequences, so the last token of the one before counts too
                    copies = counts[C_DEMAND] + counts[C_ISSUED]
                    dt = f[F_H] - tok_start[n[N_TOK] - 1]
                    if dt > 0.0:
                        busy = min(1.0, (copies - f[F_COPIES]) * fp[P_COPY] / dt)
                        f[F_LOAD] = 0.5 * f[F_LOAD] + 0.5 * busy
                    f[F_COPIES] = copies
                if source == PREDICTED and mode != ZERO_LATENCY:
                    cost = fp[P_PRED_STEP] if mode == TOKEN_AHEAD else fp[P_PRED_LAYER] * min(lead, L)
                    f[F_H] += cost
                    times[T_HOST] += cost
                    f[F_G] = f[F_H]
                    known = min(L, r1 - r) if mode == TOKEN_AHEAD else min(lead, L, r1 - r)
                    for l2 in range(known):
                        _learn(r + l2, l2, E, B, k, pred_ids, pred_p, kp, kt, lknown, lfloor)
                    at = f[F_H] + fp[P_PRED_LAT]
                    if fp[P_STEP_LAT] > 0.0:  # a worker: its last step and the call in progress, then this
                        # token's step; the calls queued behind them are stale and skipped
                        busy = max(f[F_STEP_END], min(f[F_WORKER], f[F_H] + fp[P_PRED_LAT]))
                        f[F_WORKER] = f[F_STEP_END] = max(busy, f[F_H]) + fp[P_STEP_LAT]
                        at = f[F_WORKER]
                    for l2 in range(min(lead, L, r1 - r)):
                        if fp[P_STEP_LAT] > 0.0 and mode == LAYER_AHEAD:  # its calls, one after the other
                            f[F_WORKER] += fp[P_PRED_LAT]
                            at = f[F_WORKER]
                        _queue(r + l2, l2, E, B, at, fp[P_MIN_P], pred_ids, pred_p, si, kt, qi, qf, n, plist)
                    # issued before the forward starts, as the runtime does
                    _pump(r, r, fixed_s, row_s, r0, layer, L, n_groups, per_group, fp, ip, f, n, lst, lgrp, si, sv, kt, kp,
                          lknown, lfloor, hazard, qi, qf, infl, counts, times, plist, cand, cval)
            # 1. the layer's fixed part, then the router readback
            h_issue = f[F_H]
            f[F_H] += fp[P_HOST_LAYER]
            times[T_HOST] += fp[P_HOST_LAYER]
            f[F_G] = max(f[F_G], h_issue) + fp[P_LAYER]
            times[T_GPU] += fp[P_LAYER]
            f[F_H] = max(f[F_H], f[F_G])
            f[F_ROUTED_ROW], f[F_ROUTED_AT] = r, f[F_H]  # picks for this row that come later are dropped (_pump)
            # the host's work on the routing it read (after the wait: it cannot overlap the fixed part)
            f[F_H] += fp[P_HOST_ROUTE]
            times[T_HOST] += fp[P_HOST_ROUTE]
            if source == PREDICTED and n[N_QH] < n[N_QT]:  # copies the link started during the fixed part
                _pump(r, r, 0.0, row_s, r0, layer, L, n_groups, per_group, fp, ip, f, n, lst, lgrp, si, sv, kt, kp,
                      lknown, lfloor, hazard, qi, qf, infl, counts, times, plist, cand, cval)
            # 2. predictions that become known now (before the row's own routing is marked: a
            # zero-latency prediction is inserted without knowing it)
            if source == PREDICTED:
                n[N_CI] = -1  # new predictions, slots kept for them
                target = -1
                if mode == LAYER_AHEAD and layer + lead < L and r + lead < r1:
                    target = r + lead
                    f[F_H] += fp[P_PRED_LAYER]
                    times[T_HOST] += fp[P_PRED_LAYER]
                    f[F_G] = max(f[F_G], f[F_H])
                    _learn(target, layer + lead, E, B, k, pred_ids, pred_p, kp, kt, lknown, lfloor)
                elif mode == TOKEN_AHEAD and layer + lead < L and r + lead < r1:
                    target = r + lead
                elif mode == ZERO_LATENCY:
                    target = r
                    _learn(r, layer, E, B, k, pred_ids, pred_p, kp, kt, lknown, lfloor)
                if target >= 0:
                    at = f[F_H] + (0.0 if mode == ZERO_LATENCY else fp[P_PRED_LAT])
                    if fp[P_STEP_LAT] > 0.0:  # a worker: the call once it is free (token_ahead: made at the step)
                        if mode == LAYER_AHEAD:
                            f[F_WORKER] = max(f[F_WORKER], f[F_H]) + fp[P_PRED_LAT]
                        at = max(f[F_H], f[F_WORKER])
                    _queue(target, (target - r0) % L, E, B, at, fp[P_MIN_P], pred_ids, pred_p, si, kt, qi, qf, n, plist)
                    if mode == ZERO_LATENCY:  # inserted just before use, copies instant: commit now
                        _pump(r, r, 0.0, row_s, r0, layer, L, n_groups, per_group, fp, ip, f, n, lst, lgrp, si, sv, kt,
                              kp, lknown, lfloor, hazard, qi, qf, infl, counts, times, plist, cand, cval)
            for j in range(k):
                kt[keys[r, j], K_MARK] = r
            n[N_CI] = -1  # the row's keys are not evicted
            # 3. fetch: resident experts first, then the misses
            n_res = 0
            for j in range(k):
                if kt[keys[r, j], K_SLOT] >= 0:
                    order[n_res] = j
                    n_res += 1
            m = n_res
            for j in range(k):
                if kt[keys[r, j], K_SLOT] < 0:
                    order[m] = j
                    m += 1
                    i = m - 1  # Belady (hits): the misses soonest needed again first, so that a free slot
                    while by_next and i > n_res and next_use[r, order[i]] < next_use[r, order[i - 1]]:
                        order[i], order[i - 1] = order[i - 1], order[i]  # (or a victim) goes to the most useful
                        i -= 1
            n_cpu = 0  # the layer's misses run on the host CPU (hybrid), and when the last is done (cpu_async)
            cpu_done_layer = 0.0
            # queued prefetches are committed before each expert, or (demand first) once after the
            # row's demand copies: before the first expert if there are none
            pump_at = (0 if n_res == k else k) if ip[I_DEMAND_FIRST] else -1
            for oi in range(k + 1):
                if (oi == pump_at or (pump_at < 0 and oi < k)) and n[N_QH] < n[N_QT]:
                    _pump(r, r + 1, 0.0, row_s, r0, layer, L, n_groups, per_group, fp, ip, f, n, lst, lgrp, si, sv, kt,
                          kp, lknown, lfloor, hazard, qi, qf, infl, counts, times, plist, cand, cval)
                if oi == k:
                    break
                j = order[oi]
                key = keys[r, j]
                s = kt[key, K_SLOT]
                on_cpu[oi] = False
                demand[oi] = False
                prefetched[oi] = False
                if s >= 0:
                    ready[oi] = sv[V_LAND, s]
                    if si[S_UNUSED, s]:
                        si[S_UNUSED, s] = 0
                        counts[C_USED] += 1
                        prefetched[oi] = True
                else:
                    depth = k if source == PREDICTED else k - oi  # to rank: the misses left (prefetches take more)
                    vs, vscore = _victim(lo, hi, r, layer, L, ip, fp, False, lst, lgrp, si, sv, kt, kp, lknown, lfloor,
                                         hazard, n[N_TOK], n[N_TOK0], r + 1, depth, cand, cval, n)
                    free = sv[V_FREE, vs] if vs >= 0 else 0.0
                    start = max(f[F_LINK], free) if source == ORACLE else max(f[F_LINK], f[F_H], free)
                    if source == ORACLE and ip[I_HORIZON] > 0:  # known only `horizon` tokens ahead
                        start = max(start, tok_start[max(n[N_TOK] - ip[I_HORIZON] + 1, n[N_TOK0])])
                    cpu_done = max(f[F_CPU_FREE], f[F_H]) + fp[P_CPU]  # after the layer's CPU experts so far
                    if ip[I_HYBRID] and cpu_is_faster(start + fp[P_COPY], cpu_done):  # the runtime's rule (no round trip)
                        on_cpu[oi] = True
                        f[F_CPU_FREE] = cpu_done
                        times[T_CPU] += fp[P_CPU]
                        n_cpu += 1
                        cpu_done_layer = cpu_done
                        counts[C_CPU] += 1
                    else:
                        ready[oi] = start + fp[P_COPY]
                        demand[oi] = fp[P_COPY] == 0.0  # instant copies (zero latency): residency decides
                        f[F_LINK] = ready[oi]
                        f[F_H] += fp[P_COPY_ISSUE]
                        times[T_HOST] += fp[P_COPY_ISSUE]
                        counts[C_DEMAND] += 1
                        skip = False
                        if vs >= 0 and ip[I_BYPASS] and si[S_KEY, vs] >= 0:
                            if code == BELADY:  # cheaper not to cache it at all (a staging buffer)
                                skip = next_use[r, j] >= kt[si[S_KEY, vs], K_NEXT]
                            elif code == LEARNED:  # ... by the expected next use after this one
                                h1 = max(hazard_rate(hazard, key, layer, E, 1), fp[P_QMIN])
                                skip = L + L * (1.0 - h1) / h1 >= vscore
                        if skip:
                            counts[C_BYPASS] += 1
                        elif vs >= 0:
                            _fill_slot(vs, key, ready[oi], False, si, sv, kt, counts, n)
                            s = vs
                            _reorder(s, FILLED, code, per_group, kt[key, K_CNT], sv[V_LAST, s], lst, lgrp)
                slot_of[oi] = s if not on_cpu[oi] else -1
                f[F_H] += fp[P_HOST_EXPERT]
                times[T_HOST] += fp[P_HOST_EXPERT]
                h_at[oi] = f[F_H]
            # the host thread computes the CPU's experts once it has queued the device's (the runtime's
            # hybrid="thread": torch's threads on the calling thread), so it launches nothing else meanwhile;
            # a pool of their own (cpu_async, hybrid="pool") ran each from when the host reached it, and the
            # layer's output waits for its round trip (P_CPU_HANDOFF: the pool's and the stream's wake-ups),
            # and the host thread, going on to the next launches, loses a share of the pool's time (the
            # interpreter lock and the cores they share: P_CPU_HOST_SHARE)
            h_ready = f[F_H]
            if n_cpu > 0 and not ip[I_CPU_ASYNC]:
                cpu_done_layer = h_ready + n_cpu * fp[P_CPU]
                f[F_H] = f[F_CPU_FREE] = cpu_done_layer
            elif n_cpu > 0:
                cpu_done_layer += fp[P_CPU_HANDOFF]
                lost = n_cpu * fp[P_CPU] * fp[P_CPU_HOST_SHARE]
                f[F_H] += lost
                times[T_HOST] += lost
            # 4. the GPU runs them in that order
            for oi in range(k):
                j = order[oi]
                key = keys[r, j]
                if not on_cpu[oi]:
                    t0 = max(f[F_G], h_at[oi])
                    if ready[oi] <= t0 and not demand[oi]:
                        counts[C_HITS] += 1
                        hits_layer[layer] += 1
                    elif ready[oi] > t0:
                        if prefetched[oi]:  # a prefetch still in flight when the GPU got there
                            counts[C_LATE] += 1
                        times[T_STALL] += ready[oi] - t0
                        t0 = ready[oi]
                    f[F_G] = t0 + fp[P_EXPERT]
                    times[T_GPU] += fp[P_EXPERT]
                    s = slot_of[oi]
                    if s >= 0:
                        sv[V_FREE, s] = f[F_G]
                        sv[V_LAST, s] = f[F_STAMP]
                        _reorder(s, USED, code, per_group, 0, 0.0, lst, lgrp)
                f[F_STAMP] += 1.0
                kt[key, K_CNT] += 1
                if next_use.shape[0] > 0:
                    kt[key, K_NEXT] = next_use[r, j]
                kt[key, K_TOK] = n[N_TOK]
            if n_cpu > 0:  # the CPU's experts join the layer's output; the GPU's wait for them is stall
                # past the time it would have waited for the host anyway
                if cpu_done_layer > max(f[F_G], h_ready):
                    times[T_STALL] += cpu_done_layer - max(f[F_G], h_ready)
                f[F_G] = max(f[F_G], cpu_done_layer)
            # predictions made from the layer's output (the cross-layer gate): the host reads them back
            # once the GPU has run the layer, and commits their copies before it launches the next layer
            if source == PREDICTED and mode == LAYER_OUTPUT and layer + 1 < L and r + 1 < r1:
                n[N_CI] = -1
                f[F_H] = max(f[F_H], f[F_G]) + fp[P_PRED_LAYER]
                times[T_HOST] += fp[P_PRED_LAYER]
                f[F_G] = max(f[F_G], f[F_H])
                _learn(r + 1, layer + 1, E, B, k, pred_ids, pred_p, kp, kt, lknown, lfloor)
                _queue(r + 1, layer + 1, E, B, f[F_H] + fp[P_PRED_LAT], fp[P_MIN_P], pred_ids, pred_p, si, kt, qi, qf,
                       n, plist)
                _pump(r + 1, r + 1, fixed_s, row_s, r0, layer + 1, L, n_groups, per_group, fp, ip, f, n, lst, lgrp, si,
                      sv, kt, kp, lknown, lfloor, hazard, qi, qf, infl, counts, times, plist, cand, cval)
            # 5. this row's predictions are spent: unrouted prefetches turn cold
            if source == PREDICTED:
                i = r % plist.shape[0]
                for c in range(1, plist[i, 0] + 1):
                    s = plist[i, c]
                    if si[S_PEND, s] == r:
                        si[S_PEND, s] = -1
                        if si[S_UNUSED, s]:
                            sv[V_LAST, s] = _NEG + f[F_STAMP]
                            _reorder(s, COLD, code, per_group, kt[si[S_KEY, s], K_CNT], sv[V_LAST, s], lst, lgrp)
                plist[i, 0] = 0
        f[F_H] = max(f[F_H], f[F_G])  # the sequence's last token is read
    times[T_ELAPSED] = max(f[F_H], f[F_G])
    for s in range(S):  # prefetched, never routed, still resident at the end
        if si[S_UNUSED, s]:
            counts[C_WASTED] += 1
