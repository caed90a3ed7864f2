"""The replay engine's prefetch queue: predictions queued as copies, committed to the link.

`_queue` turns a row's predicted experts into queued copies (resident ones are kept for the row,
`pend`), `_learn` records what the predictor says for the learned eviction, and `_pump` commits
queued copies at a host event (timing.py: the ideal engine queue or the host's max_inflight cap),
each evicting per policy (evict._victim) unless the policy's admission drops it.

Like every helper of the replay loop these compile without numba's reference counting (engine.py).
"""

# ruff: noqa: F403, F405  (the array index names come from layout.py by a star import)
from __future__ import annotations

import numba as nb

from .evict import FILLED, _fill_slot, _reorder, _victim
from .layout import *  # the index names of every array below (layout.py)
from .policy import ALL, LEARNED, prefetch_value


@nb.njit(cache=True, _nrt=False)
def _note(row, s, plist):
    """Remember that slot `s` is kept for `row` (plist[i, 0]: how many, then the slots), so the row's end
    releases it without a scan."""
    i = row % plist.shape[0]
    c = plist[i, 0]
    if c + 1 < plist.shape[1]:
        plist[i, c + 1] = s
        plist[i, 0] = c + 1


@nb.njit(cache=True, _nrt=False)
def _queue(row, layer_of_row, E, B, ready, min_p, pred_ids, pred_p, si, kt, qi, qf, n, plist):
    """Queue the predicted experts of `row` (probability >= min_p) as prefetches; resident ones are
    kept for it (pending)."""
    qcap = qi.shape[0]
    for b in range(B):
        if pred_p[row, b] < min_p:
            continue
        kk = layer_of_row * E + pred_ids[row, b]
        s = kt[kk, K_SLOT]
        if s >= 0:
            si[S_PEND, s] = max(si[S_PEND, s], row)
            _note(row, s, plist)
        elif n[N_QT] - n[N_QH] < qcap:
            i = n[N_QT] % qcap
            qi[i, Q_KEY], qi[i, Q_ROW], qf[i, Q_READY], qf[i, Q_P] = kk, row, ready, pred_p[row, b]
            n[N_QT] += 1


@nb.njit(cache=True, _nrt=False)
def _learn(row, layer_of_row, E, B, k, pred_ids, pred_p, kp, kt, lknown, lfloor):
    """Record what the predictor now says about `row` (for the learned eviction). An expert outside its
    list is used with the probability the list leaves: the row routes k experts, the list is expected to
    hold sum(p) of them, and the rest fall on the E - B unlisted ones (0 for a certain list)."""
    lknown[layer_of_row] = row
    listed = 0.0
    for b in range(B):
        kk = layer_of_row * E + pred_ids[row, b]
        kp[kk] = pred_p[row, b]
        kt[kk, K_ROW] = row
        listed += pred_p[row, b]
    lfloor[layer_of_row] = max(0.0, k - listed) / max(1, E - B)


@nb.njit(cache=True, _nrt=False)
def _pump(r, stale_below, to_come, row_s, r0, layer, L, n_groups, per_group, fp, ip, f, n, lst, lgrp, si, sv, kt, kp,
          lknown, lfloor, hazard, qi, qf, infl, counts, times, plist, cand, cval):
    """Commit queued prefetches to the link: with max_inflight N (ip[I_INFLIGHT] > 0) the host
    commits while fewer than N are in flight, each starting no earlier than now; with 0 (an ideal
    engine queue) every queued copy that the free link would have started before now, back to
    back: the host calls this before each demand copy, which so goes ahead of all not started."""
    copy_s = fp[P_COPY]
    lw = fp[P_LINK_W] * f[F_LOAD] if ip[I_LINK_LOAD] else fp[P_LINK_W]  # a wrong copy costs as the link is busy
    qcap = qi.shape[0]
    ring = infl.shape[0]  # the copies in flight (at most one per slot)
    # the GPU reaches a later row no earlier than when this row's work and demand copies are done
    base = max(f[F_G], f[F_H], f[F_LINK])
    ideal = ip[I_INFLIGHT] == 0
    # picks for the row whose routing the host has read are late if they came back after it (zero latency:
    # inserted just before use, never late)
    late_row = -1.0 if ip[I_MODE] == ZERO_LATENCY else f[F_ROUTED_ROW]
    while n[N_QH] < n[N_QT]:
        while n[N_IH] < n[N_IT] and infl[n[N_IH] % ring] <= f[F_H]:  # landed: off the link
            n[N_IH] += 1
        if not ideal and n[N_IT] - n[N_IH] >= ip[I_INFLIGHT]:
            return
        q = n[N_QH] % qcap
        kk, qrow = qi[q, Q_KEY], qi[q, Q_ROW]
        # its layer has run or runs now, or it is resident, or it came back after its row's routing was read
        # (a prediction that late helps nothing; the runtime drops it too, integrate/runtime/async_prefetch.py)
        late = qrow == late_row and qf[q, Q_READY] > f[F_ROUTED_AT]
        if qrow < stale_below or kt[kk, K_SLOT] >= 0 or late:
            n[N_QH] += 1
            if kt[kk, K_SLOT] < 0:
                counts[C_CANCELLED] += 1
            continue
        # when the GPU reaches row qrow's experts: each row ahead takes row_s, after what is still to
        # come of row r's fixed part (all of it at the token's start, before it has started)
        deadline = base + (qrow - r) * row_s + to_come
        if ip[I_ADMIT] != ALL:  # not worth it even with a free slot: drop before looking for a victim
            # the copies ahead on the link are for earlier rows: the GPU waits for them too
            deadline = max(deadline, max(f[F_LINK], f[F_H]) + fp[P_LAYER] + fp[P_HOST_LAYER] + fp[P_HOST_ROUTE])
            land0 = max(f[F_LINK], f[F_H], qf[q, Q_READY]) + copy_s
            if prefetch_value(qf[q, Q_P], 0.0, lw, land0, deadline, copy_s) <= 0.0:
                n[N_QH] += 1
                counts[C_REJECTED] += 1
                continue
        if ideal and copy_s > 0.0 and max(f[F_LINK], qf[q, Q_READY]) >= f[F_H]:
            return  # the link takes it up after this host event (checked before the victim scan)
        grp = (qrow - r0) % L if n_groups > 1 else 0
        vs, vscore = _victim(grp * per_group, (grp + 1) * per_group, r, layer, L, ip, fp, True, lst, lgrp, si, sv, kt, kp,
                             lknown, lfloor, hazard, n[N_TOK], n[N_TOK0], stale_below, cand.shape[1], cand, cval, n)
        if vs < 0:
            return  # every slot is in use or predicted: retry at the next host event
        if ideal:
            start = max(f[F_LINK], qf[q, Q_READY], sv[V_FREE, vs])
            if copy_s == 0.0:  # zero latency: inserted now, instantly
                start = max(start, f[F_H])
            elif start >= f[F_H]:  # the link takes it up after this host event: the next one commits it
                return
        else:
            start = max(f[F_LINK], f[F_H], qf[q, Q_READY], sv[V_FREE, vs])
        if ip[I_ADMIT] != ALL:
            p_victim = 0.0
            if si[S_KEY, vs] >= 0 and ip[I_EVICT] == LEARNED:
                p_victim = min(1.0, L / max(vscore, 1.0))
            if prefetch_value(qf[q, Q_P], p_victim, lw, start + copy_s, deadline, copy_s) <= 0.0:
                n[N_QH] += 1
                counts[C_REJECTED] += 1
                continue
        n[N_QH] += 1
        _fill_slot(vs, kk, start + copy_s, True, si, sv, kt, counts, n)
        f[F_LINK] = start + copy_s
        si[S_PEND, vs] = qrow
        _note(qrow, vs, plist)
        si[S_UNUSED, vs] = 1
        sv[V_LAST, vs] = f[F_STAMP]
        f[F_STAMP] += 1.0
        _reorder(vs, FILLED, ip[I_EVICT], per_group, kt[kk, K_CNT], sv[V_LAST, vs], lst, lgrp)
        f[F_H] += fp[P_COPY_ISSUE]
        times[T_HOST] += fp[P_COPY_ISSUE]
        infl[n[N_IT] % ring] = start + copy_s
        n[N_IT] += 1
        counts[C_ISSUED] += 1
