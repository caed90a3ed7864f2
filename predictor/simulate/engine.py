"""The replay engine: one compiled event loop that runs every policy under the time model.

Rows replay in decode order (sequence by sequence, the cache warm across them; token by token;
MoE layer by MoE layer). Per layer (timing.py describes the three timelines):
  1. the host issues the layer's fixed part, the GPU runs it, the router is read back (host waits);
  2. the predictions that become known now are queued as prefetches (layer_ahead: layer l + h);
  3. fetch: the row's resident experts first, then its misses, each a demand copy evicting per
     policy (or, hybrid, computed on the host CPU when that is done before the copy would land);
     queued prefetches are committed to the link at each host event while fewer than
     `max_inflight` are in flight (with `demand_first`, only after the row's demand copies), and
     the policy's admission may drop them instead;
  4. the GPU runs the experts in that order, each once its copy has landed;
  5. the row's predictions are spent: prefetched experts never routed turn "cold" (evicted first).
The oracle schedule (`ORACLE`) copies each miss as soon as the link is free and the compute that
last read its victim's slot has run, the earliest any schedule with that eviction could; with a
`horizon` of H tokens, not before the token H - 1 tokens earlier started (what knowing the routing
only H tokens ahead allows: H = 1 is a perfect predictor of the running token).

An access is a *hit* when its expert is on the device by the time the GPU reaches it (a prefetch
still in flight is a late miss). Keys are `layer * E + expert`; slots form one pool or one group
per layer. Scalar state lives in two small arrays (`f`, `n`) so helpers can update it in place.
"""

# ruff: noqa: F403, F405  (the array index names come from layout.py by a star import)
from __future__ import annotations

import numba as nb
import numpy as np

from .evict import _fill_slot, _make_cold, _touch, _victim, new_order
from .layout import *  # the index names of every array below (layout.py)
from .layout import _NEG
from .lfu import lfu_fix, lfu_heaped
from .policy import ALL, BELADY, LEARNED, cpu_is_faster, prefetch_value


@nb.njit(cache=True)
def _note(row, s, plist, pcount):
    """Remember that slot `s` is kept for `row`, so the row's end releases it without a scan."""
    i = row % plist.shape[0]
    if pcount[i] < plist.shape[1]:
        plist[i, pcount[i]] = s
        pcount[i] += 1


@nb.njit(cache=True)
def _queue(row, layer_of_row, E, B, ready, min_p, pred_ids, pred_p, key_slot, pend, q_key, q_row, q_ready, q_p, n,
           plist, pcount):
    """Queue the predicted experts of `row` (probability >= min_p) as prefetches; resident ones are
    kept for it (pending)."""
    qcap = len(q_key)
    for b in range(B):
        if pred_p[row, b] < min_p:
            continue
        kk = layer_of_row * E + pred_ids[row, b]
        s = key_slot[kk]
        if s >= 0:
            pend[s] = max(pend[s], row)
            _note(row, s, plist, pcount)
        elif n[N_QT] - n[N_QH] < qcap:
            i = n[N_QT] % qcap
            q_key[i], q_row[i], q_ready[i], q_p[i] = kk, row, ready, pred_p[row, b]
            n[N_QT] += 1


@nb.njit(cache=True)
def _learn(row, layer_of_row, E, B, pred_ids, pred_p, kp, krow, lknown, lfloor):
    """Record what the predictor now says about `row` (for the learned eviction)."""
    lknown[layer_of_row] = row
    lfloor[layer_of_row] = pred_p[row, B - 1] * 0.5  # an expert outside the list: below the last listed
    for b in range(B):
        kk = layer_of_row * E + pred_ids[row, b]
        kp[kk] = pred_p[row, b]
        krow[kk] = row


@nb.njit(cache=True)
def _pump(r, stale_below, started, row_s, r0, layer, L, E, S, n_groups, per_group, fp, ip, f, n, slot_key, key_slot, land, free_at, last_use,
          pend, unused, cnt, next_row, cur_mark, kp, krow, lknown, lfloor, hazard, last_tok, q_key, q_row, q_ready,
          q_p, infl, counts, times, plist, pcount, lst, lgrp):
    """Commit queued prefetches to the link: with max_inflight N (ip[I_INFLIGHT] > 0) the host
    commits while fewer than N are in flight, each starting no earlier than now; with 0 (an ideal
    engine queue) every queued copy that the free link would have started before now, back to
    back: the host calls this before each demand copy, which so goes ahead of all not started."""
    copy_s = fp[P_COPY]
    qcap = len(q_key)
    # the GPU reaches a later row no earlier than when this row's work and demand copies are done
    base = max(f[F_G], f[F_H], f[F_LINK])
    ideal = ip[I_INFLIGHT] == 0
    while n[N_QH] < n[N_QT]:
        while n[N_IH] < n[N_IT] and infl[n[N_IH] % (S + 1)] <= f[F_H]:  # landed: off the link
            n[N_IH] += 1
        if not ideal and n[N_IT] - n[N_IH] >= ip[I_INFLIGHT]:
            return
        qi = n[N_QH] % qcap
        kk, qrow = q_key[qi], q_row[qi]
        if qrow < stale_below or key_slot[kk] >= 0:  # its layer has run or runs now, or it is resident
            n[N_QH] += 1
            if key_slot[kk] < 0:
                counts[C_CANCELLED] += 1
            continue
        # when the GPU reaches row qrow's experts: each row ahead takes row_s, and row r's fixed part
        # is still to come if it has not started (at the token's start)
        deadline = base + (qrow - r) * row_s + (0.0 if started else fp[P_LAYER] + fp[P_HOST_LAYER] + fp[P_HOST_ROUTE])
        if ip[I_ADMIT] != ALL:  # not worth it even with a free slot: drop before looking for a victim
            # the copies ahead on the link are for earlier rows: the GPU waits for them too
            deadline = max(deadline, max(f[F_LINK], f[F_H]) + fp[P_LAYER] + fp[P_HOST_LAYER] + fp[P_HOST_ROUTE])
            land0 = max(f[F_LINK], f[F_H], q_ready[qi]) + copy_s
            if prefetch_value(float(q_p[qi]), 0.0, fp[P_LINK_W], land0, deadline, copy_s) <= 0.0:
                n[N_QH] += 1
                counts[C_REJECTED] += 1
                continue
        if ideal and copy_s > 0.0 and max(f[F_LINK], q_ready[qi]) >= f[F_H]:
            return  # the link takes it up after this host event (checked before the victim scan)
        grp = (qrow - r0) % L if n_groups > 1 else 0
        vs, vscore = _victim(grp * per_group, (grp + 1) * per_group, r, layer, L, E, ip, fp, True, slot_key, pend,
                             last_use, cnt, next_row, cur_mark, kp, krow, lknown, lfloor, hazard, last_tok,
                             n[N_TOK], n[N_TOK0], stale_below, lst, lgrp)
        if vs < 0:
            return  # every slot is in use or predicted: retry at the next host event
        if ideal:
            start = max(f[F_LINK], q_ready[qi], free_at[vs])
            if copy_s == 0.0:  # zero latency: inserted now, instantly
                start = max(start, f[F_H])
            elif start >= f[F_H]:  # the link takes it up after this host event: the next one commits it
                return
        else:
            start = max(f[F_LINK], f[F_H], q_ready[qi], free_at[vs])
        if ip[I_ADMIT] != ALL:
            p_victim = 0.0
            if slot_key[vs] >= 0 and ip[I_EVICT] == LEARNED:
                p_victim = min(1.0, L / max(vscore, 1.0))
            if prefetch_value(float(q_p[qi]), p_victim, fp[P_LINK_W], start + copy_s, deadline, copy_s) <= 0.0:
                n[N_QH] += 1
                counts[C_REJECTED] += 1
                continue
        n[N_QH] += 1
        _fill_slot(vs, kk, start + copy_s, slot_key, key_slot, land, pend, unused, counts)
        f[F_LINK] = start + copy_s
        pend[vs] = qrow
        _note(qrow, vs, plist, pcount)
        unused[vs] = True
        last_use[vs] = f[F_STAMP]
        f[F_STAMP] += 1.0
        _touch(vs, vs // per_group, lst, lgrp)
        if lfu_heaped(ip[I_EVICT], per_group):
            lfu_fix(vs, per_group, cnt[kk], last_use[vs], lst, lgrp)
        f[F_H] += fp[P_COPY_ISSUE]
        times[T_HOST] += fp[P_COPY_ISSUE]
        infl[n[N_IT] % (S + 1)] = start + copy_s
        n[N_IT] += 1
        counts[C_ISSUED] += 1


@nb.njit(cache=True, nogil=True)
def replay(keys, seq_rows, L, E, n_groups, per_group, fp, ip, next_use, first_use, pred_ids, pred_p, hazard,
           counts, times, hits_layer):
    """Run one policy over `keys` (R, k) in place into counts / times / hits_layer (C_*, T_* indices)."""
    R, k = keys.shape
    S = n_groups * per_group
    LE = L * E
    B = pred_ids.shape[1]
    source, mode, lead, code = ip[I_SOURCE], ip[I_MODE], ip[I_LEAD], ip[I_EVICT]
    slot_key = np.full(S, -1, np.int64)
    key_slot = np.full(LE, -1, np.int64)
    land = np.zeros(S)
    free_at = np.zeros(S)
    last_use = np.zeros(S)
    pend = np.full(S, -1, np.int64)
    unused = np.zeros(S, np.bool_)
    cnt = np.zeros(LE, np.int64)
    next_row = first_use.copy()
    cur_mark = np.full(LE, -1, np.int64)
    kp = np.zeros(LE, np.float32)
    krow = np.full(LE, -1, np.int64)
    lknown = np.full(L, -1, np.int64)
    lfloor = np.zeros(L, np.float32)
    last_tok = np.full(LE, -1, np.int64)
    qcap = 4 * LE + 16
    q_key = np.zeros(qcap, np.int64)
    q_row = np.zeros(qcap, np.int64)
    q_ready = np.zeros(qcap)
    q_p = np.zeros(qcap, np.float32)
    infl = np.zeros(S + 1)
    f = np.zeros(5)
    f[F_STAMP] = 1.0
    n = np.zeros(6, np.int64)
    n[N_TOK] = -1
    order = np.zeros(k, np.int64)
    tok_start = np.zeros(R // L + 1)
    lst, lgrp = new_order(S, n_groups)  # the LRU list, and the LFU heaps (lfu.py) where heaped:
    heaped = lfu_heaped(code, per_group)  # lfu_fix where a slot's key may drop; a use (a rise) stays lazy
    plist = np.zeros((2 * L + 2, 2 * B + 2), np.int64)  # slots kept for each upcoming row
    pcount = np.zeros(2 * L + 2, np.int64)
    ready = np.zeros(k)
    h_at = np.zeros(k)
    on_cpu = np.zeros(k, np.bool_)
    demand = np.zeros(k, np.bool_)
    prefetched = np.zeros(k, np.bool_)
    slot_of = np.zeros(k, np.int64)
    row_s = fp[P_LAYER] + fp[P_HOST_LAYER] + fp[P_HOST_ROUTE] + k * (fp[P_EXPERT] + fp[P_HOST_EXPERT])  # a layer

    if ip[I_WARM_ALL]:  # every expert resident before the first token (all-resident bound)
        for key in range(LE):
            grp = key // E if n_groups > 1 else 0
            s = grp * per_group + (key % E if n_groups > 1 else key)
            if s < (grp + 1) * per_group and s < S:
                slot_key[s] = key
                key_slot[key] = s
                land[s] = _NEG
                _touch(s, grp, lst, lgrp)
                if heaped:
                    lfu_fix(s, per_group, cnt[slot_key[s]], last_use[s], lst, lgrp)

    for si in range(len(seq_rows) - 1):
        r0, r1 = seq_rows[si], seq_rows[si + 1]
        n[N_TOK0] = n[N_TOK] + 1
        for r in range(r0, r1):
            layer = (r - r0) % L
            grp = layer if n_groups > 1 else 0
            lo, hi = grp * per_group, (grp + 1) * per_group
            if layer == 0:  # token start: the previous token's logits have been read (sync)
                n[N_TOK] += 1
                f[F_H] = max(f[F_H], f[F_G])
                f[F_G] = f[F_H]
                tok_start[n[N_TOK]] = f[F_H]
                if source == PREDICTED and mode != ZERO_LATENCY:
                    cost = fp[P_PRED_STEP] if mode == TOKEN_AHEAD else fp[P_PRED_LAYER] * min(lead, L)
                    f[F_H] += cost
                    times[T_HOST] += cost
                    f[F_G] = f[F_H]
                    known = min(L, r1 - r) if mode == TOKEN_AHEAD else min(lead, L, r1 - r)
                    for l2 in range(known):
                        _learn(r + l2, l2, E, B, pred_ids, pred_p, kp, krow, lknown, lfloor)
                    for l2 in range(min(lead, L, r1 - r)):
                        _queue(r + l2, l2, E, B, f[F_H] + fp[P_PRED_LAT], fp[P_MIN_P], pred_ids, pred_p, key_slot, pend,
                               q_key, q_row, q_ready, q_p, n, plist, pcount)
                    # issued before the forward starts, as the runtime does
                    _pump(r, r, False, row_s, r0, layer, L, E, S, n_groups, per_group, fp, ip, f, n, slot_key, key_slot,
                          land, free_at, last_use, pend, unused, cnt, next_row, cur_mark, kp, krow, lknown,
                          lfloor, hazard, last_tok, q_key, q_row, q_ready, q_p, infl, counts, times, plist, pcount, lst, lgrp)
            # 1. the layer's fixed part, then the router readback
            h_issue = f[F_H]
            f[F_H] += fp[P_HOST_LAYER]
            times[T_HOST] += fp[P_HOST_LAYER]
            f[F_G] = max(f[F_G], h_issue) + fp[P_LAYER]
            times[T_GPU] += fp[P_LAYER]
            f[F_H] = max(f[F_H], f[F_G])
            # the host's work on the routing it read (after the wait: it cannot overlap the fixed part)
            f[F_H] += fp[P_HOST_ROUTE]
            times[T_HOST] += fp[P_HOST_ROUTE]
            if source == PREDICTED and n[N_QH] < n[N_QT]:  # copies the link started during the fixed part
                _pump(r, r, True, row_s, r0, layer, L, E, S, n_groups, per_group, fp, ip, f, n, slot_key, key_slot,
                      land, free_at, last_use, pend, unused, cnt, next_row, cur_mark, kp, krow, lknown,
                      lfloor, hazard, last_tok, q_key, q_row, q_ready, q_p, infl, counts, times, plist, pcount, lst, lgrp)
            # 2. predictions that become known now (before the row's own routing is marked: a
            # zero-latency prediction is inserted without knowing it)
            if source == PREDICTED:
                target = -1
                if mode == LAYER_AHEAD and layer + lead < L and r + lead < r1:
                    target = r + lead
                    f[F_H] += fp[P_PRED_LAYER]
                    times[T_HOST] += fp[P_PRED_LAYER]
                    f[F_G] = max(f[F_G], f[F_H])
                    _learn(target, layer + lead, E, B, pred_ids, pred_p, kp, krow, lknown, lfloor)
                elif mode == TOKEN_AHEAD and layer + lead < L and r + lead < r1:
                    target = r + lead
                elif mode == ZERO_LATENCY:
                    target = r
                    _learn(r, layer, E, B, pred_ids, pred_p, kp, krow, lknown, lfloor)
                if target >= 0:
                    lat = 0.0 if mode == ZERO_LATENCY else fp[P_PRED_LAT]
                    _queue(target, (target - r0) % L, E, B, f[F_H] + lat, fp[P_MIN_P], pred_ids, pred_p, key_slot, pend,
                           q_key, q_row, q_ready, q_p, n, plist, pcount)
                    if mode == ZERO_LATENCY:  # inserted just before use, copies instant: commit now
                        _pump(r, r, True, row_s, r0, layer, L, E, S, n_groups, per_group, fp, ip, f, n, slot_key, key_slot,
                              land, free_at, last_use, pend, unused, cnt, next_row, cur_mark, kp, krow, lknown,
                              lfloor, hazard, last_tok, q_key, q_row, q_ready, q_p, infl, counts, times, plist, pcount, lst, lgrp)
            for j in range(k):
                cur_mark[keys[r, j]] = r
            # 3. fetch: resident experts first, then the misses
            n_res = 0
            for j in range(k):
                if key_slot[keys[r, j]] >= 0:
                    order[n_res] = j
                    n_res += 1
            m = n_res
            for j in range(k):
                if key_slot[keys[r, j]] < 0:
                    order[m] = j
                    m += 1
            cpu_done_layer = 0.0
            for oi in range(k):
                if not ip[I_DEMAND_FIRST] or (oi == 0 and n_res == k):
                    _pump(r, r + 1, True, row_s, r0, layer, L, E, S, n_groups, per_group, fp, ip, f, n, slot_key, key_slot, land,
                          free_at, last_use, pend, unused, cnt, next_row, cur_mark, kp, krow, lknown, lfloor,
                          hazard, last_tok, q_key, q_row, q_ready, q_p, infl, counts, times, plist, pcount, lst, lgrp)
                j = order[oi]
                key = keys[r, j]
                s = key_slot[key]
                on_cpu[oi] = False
                demand[oi] = False
                prefetched[oi] = False
                if s >= 0:
                    ready[oi] = land[s]
                    if unused[s]:
                        unused[s] = False
                        counts[C_USED] += 1
                        prefetched[oi] = True
                else:
                    vs, vscore = _victim(lo, hi, r, layer, L, E, ip, fp, False, slot_key, pend, last_use, cnt, next_row,
                                    cur_mark, kp, krow, lknown, lfloor, hazard, last_tok, n[N_TOK], n[N_TOK0], r + 1,
                                    lst, lgrp)
                    free = free_at[vs] if vs >= 0 else 0.0
                    start = max(f[F_LINK], free) if source == ORACLE else max(f[F_LINK], f[F_H], free)
                    if source == ORACLE and ip[I_HORIZON] > 0:  # known only `horizon` tokens ahead
                        start = max(start, tok_start[max(n[N_TOK] - ip[I_HORIZON] + 1, n[N_TOK0])])
                    cpu_done = max(f[F_CPU_FREE], f[F_H]) + fp[P_CPU]
                    if ip[I_HYBRID] and cpu_is_faster(start + fp[P_COPY], cpu_done):
                        on_cpu[oi] = True
                        f[F_CPU_FREE] = cpu_done
                        times[T_CPU] += fp[P_CPU]
                        cpu_done_layer = max(cpu_done_layer, cpu_done)
                        counts[C_CPU] += 1
                    else:
                        ready[oi] = start + fp[P_COPY]
                        demand[oi] = fp[P_COPY] == 0.0  # instant copies (zero latency): residency decides
                        f[F_LINK] = ready[oi]
                        f[F_H] += fp[P_COPY_ISSUE]
                        times[T_HOST] += fp[P_COPY_ISSUE]
                        counts[C_DEMAND] += 1
                        skip = False
                        if vs >= 0 and ip[I_BYPASS] and slot_key[vs] >= 0:
                            if code == BELADY:  # cheaper not to cache it at all (a staging buffer)
                                skip = next_use[r, j] >= next_row[slot_key[vs]]
                            elif code == LEARNED:  # ... by the expected next use after this one
                                h1 = max(hazard[layer, 1], fp[P_QMIN])
                                skip = L + L * (1.0 - h1) / h1 >= vscore
                        if skip:
                            counts[C_BYPASS] += 1
                        elif vs >= 0:
                            _fill_slot(vs, key, ready[oi], slot_key, key_slot, land, pend, unused, counts)
                            s = vs
                            if heaped:
                                lfu_fix(s, per_group, cnt[slot_key[s]], last_use[s], lst, lgrp)
                slot_of[oi] = s if not on_cpu[oi] else -1
                f[F_H] += fp[P_HOST_EXPERT]
                times[T_HOST] += fp[P_HOST_EXPERT]
                h_at[oi] = f[F_H]
                if ip[I_DEMAND_FIRST] and oi == k - 1 and n_res < k:
                    _pump(r, r + 1, True, row_s, r0, layer, L, E, S, n_groups, per_group, fp, ip, f, n, slot_key, key_slot, land,
                          free_at, last_use, pend, unused, cnt, next_row, cur_mark, kp, krow, lknown, lfloor,
                          hazard, last_tok, q_key, q_row, q_ready, q_p, infl, counts, times, plist, pcount, lst, lgrp)
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
                    if slot_of[oi] >= 0:
                        free_at[slot_of[oi]] = f[F_G]
                        last_use[slot_of[oi]] = f[F_STAMP]
                        _touch(slot_of[oi], slot_of[oi] // per_group, lst, lgrp)
                f[F_STAMP] += 1.0
                cnt[key] += 1
                if next_use.shape[0] > 0:
                    next_row[key] = next_use[r, j]
                last_tok[key] = n[N_TOK]
            if cpu_done_layer > f[F_G]:  # the CPU's experts join the layer's output
                times[T_STALL] += cpu_done_layer - f[F_G]
                f[F_G] = cpu_done_layer
            # 5. this row's predictions are spent: unrouted prefetches turn cold
            if source == PREDICTED:
                i = r % plist.shape[0]
                for c in range(pcount[i]):
                    s = plist[i, c]
                    if pend[s] == r:
                        pend[s] = -1
                        if unused[s]:
                            last_use[s] = _NEG + f[F_STAMP]
                            _make_cold(s, s // per_group, lst, lgrp)
                            if heaped:
                                lfu_fix(s, per_group, cnt[slot_key[s]], last_use[s], lst, lgrp)
                pcount[i] = 0
        f[F_H] = max(f[F_H], f[F_G])  # the sequence's last token is read
    times[T_ELAPSED] = max(f[F_H], f[F_G])
    for s in range(S):  # prefetched, never routed, still resident at the end
        if unused[s]:
            counts[C_WASTED] += 1
