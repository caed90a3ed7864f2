"""Slot residency for the replay engine: which slot a miss or a prefetch evicts, and moving a key in.

LRU keeps its order in a linked list per slot group and LFU, in groups of more than lfu.SCAN_MAX
slots, in a heap per group (lfu.py), so their misses do not scan the slots; Belady, the learned
expected distance and LFU in small groups rate the slots (all, or a sampled window), and rank the
best few: the next misses and prefetches of the same host event take them without a new scan.

The replay's helpers compile without numba's reference counting (`_nrt=False`): with it, each call
of a compiled helper paid an atomic increment and decrement per array argument (55-65 % of the
replay's time in a profile taken when this was changed, not kept as a benchmark). None of them
allocates: only engine.replay, which allocates the state, keeps it. A call still passes each array as its ~7 fields, so the state is packed into a few tables (layout.py)
and `_victim`, small and on the hottest paths, is inlined (in Numba's IR: no call).
"""

# ruff: noqa: F403, F405  (the array index names come from layout.py by a star import)
from __future__ import annotations

import numba as nb
import numpy as np

from .layout import *  # the column names of the slot and key tables (layout.py)
from .layout import _NEG
from .lfu import _SIZE, GROUP_COLS, SCAN_MAX, SLOT_COLS, lfu_fix, lfu_heaped, lfu_victim
from .policy import BELADY, LEARNED, LFU, LRU, learned_score

# LRU order as a doubly linked list per slot group (eviction code LRU only), so a victim is found at
# the head instead of by a scan: lst[s] = (prev, next, state) with state 0 out, 1 warm, 2 cold; grp[g]
# = (head, tail, last cold). Cold slots (predicted, released unrouted) form a prefix, oldest first.
# The columns after these hold the LFU heaps (lfu.py).
_P, _N, _ST = 0, 1, 2
_HEAD, _TAIL, _COLD = 0, 1, 2
_UNKNOWN = 2.0**40  # a Belady score past every row (a next use beyond what the schedule may know), small
# enough that an expected distance added to it keeps a ten-thousandth of a row


@nb.njit(cache=True)
def new_order(num_slots, num_groups):
    """(lst, grp) of an empty LRU order and empty LFU heaps: every slot out of both, every group
    empty."""
    lst = np.full((num_slots, SLOT_COLS), -1, np.int64)
    lst[:, _ST] = 0
    grp = np.full((num_groups, GROUP_COLS), -1, np.int64)
    grp[:, _SIZE] = 0
    return lst, grp


@nb.njit(cache=True, _nrt=False)
def _unlink(s, g, lst, grp):
    p, q = lst[s, _P], lst[s, _N]
    if grp[g, _COLD] == s:
        grp[g, _COLD] = p if p >= 0 and lst[p, _ST] == 2 else -1
    if p >= 0:
        lst[p, _N] = q
    else:
        grp[g, _HEAD] = q
    if q >= 0:
        lst[q, _P] = p
    else:
        grp[g, _TAIL] = p
    lst[s, _ST] = 0


@nb.njit(cache=True, _nrt=False)
def _insert_after(a, s, g, lst, grp):
    """Put s after slot a (a = -1: at the head)."""
    q = grp[g, _HEAD] if a < 0 else lst[a, _N]
    lst[s, _P], lst[s, _N] = a, q
    if a < 0:
        grp[g, _HEAD] = s
    else:
        lst[a, _N] = s
    if q >= 0:
        lst[q, _P] = s
    else:
        grp[g, _TAIL] = s


@nb.njit(cache=True, _nrt=False)
def _touch(s, g, lst, grp):
    """s was used now: most recent."""
    if lst[s, _ST] != 0:
        _unlink(s, g, lst, grp)
    _insert_after(grp[g, _TAIL], s, g, lst, grp)
    lst[s, _ST] = 1


@nb.njit(cache=True, _nrt=False)
def _make_cold(s, g, lst, grp):
    """s was predicted and not routed: evicted before every warm slot, after older cold ones."""
    if lst[s, _ST] != 0:
        _unlink(s, g, lst, grp)
    _insert_after(grp[g, _COLD], s, g, lst, grp)
    lst[s, _ST] = 2
    grp[g, _COLD] = s


USED, FILLED, COLD = 0, 1, 2  # how a slot changed, for _reorder


@nb.njit(cache=True, _nrt=False, inline="always")
def _reorder(s, how, code, per_group, cnt, last, lst, lgrp):
    """Slot s's place in its policy's eviction order after a change: USED (its key was used: its count
    and last use only rise), FILLED (it got a new key; LRU: most recent) or COLD (a prefetch released
    unrouted; LRU: evicted first). Every change of a slot goes through here: only LRU reads the list,
    and LFU's heap (groups over SCAN_MAX) must see at once every change that can lower a key, a use
    staying lazy (lfu.py); the other policies read the slot and key tables alone. cnt, last: the key's
    uses and the slot's last use after the change."""
    if code == LRU:
        if how == COLD:
            _make_cold(s, s // per_group, lst, lgrp)
        else:
            _touch(s, s // per_group, lst, lgrp)
    elif how != USED and lfu_heaped(code, per_group):
        lfu_fix(s, per_group, cnt, last, lst, lgrp)


@nb.njit(cache=True, _nrt=False, inline="always")  # the scans it calls are not inlined
def _victim(lo, hi, r, layer, L, ip, fp, for_prefetch, lst, lgrp, si, sv, kt, kp, lknown, lfloor, hazard, tok, tok0,
            prot_row, depth, cand, cval, n):
    """The slot to evict in [lo, hi) and its eviction score: a free slot first; never a key of the
    current row; a prefetch never takes a slot predicted for a row >= prot_row still to run (a
    demand load does, last). Returns (-1, 0) when there is none. (lst, lgrp): the LRU list and
    the LFU heaps (lfu.py; kept only where lfu_heaped); si, sv, kt: the slot and key tables (layout.py);
    cand, cval, n: the last scan's ranking (_rated_victim), whose next victim it is while it holds;
    depth: how many victims a new scan ranks."""
    n[N_CH] = -1
    if n[N_CI] >= 0 and n[N_CG] == lo and n[N_CP] == prot_row:
        vs, score = _ranked(for_prefetch, cand, cval, n)
        if vs != -2:
            return vs, score
    if si[S_KEY, hi - 1] < 0:  # slots fill in order: a free one exists
        for s in range(lo, hi):
            if si[S_KEY, s] < 0:
                return s, 1e18
    code = ip[I_EVICT]
    if code == LRU:  # walk the list from the least recent end
        prot = -1
        s = lgrp[lo // (hi - lo), _HEAD]
        while s >= 0:
            if kt[si[S_KEY, s], K_MARK] != r:
                if si[S_PEND, s] < prot_row:
                    return s, -sv[V_LAST, s]
                if not for_prefetch and prot < 0:
                    prot = s
            s = lst[s, _N]
        return prot, (-sv[V_LAST, prot] if prot >= 0 else 0.0)
    if code == LFU and hi - lo > SCAN_MAX:  # the heap's order: the scan's below, without the scan
        return lfu_victim(lo, hi, r, for_prefetch, si[S_KEY], si[S_PEND], sv[V_LAST], kt[:, K_CNT],
                          kt[:, K_MARK], prot_row, lst, lgrp)
    return _rated_victim(lo, hi, r, layer, L, ip, fp, for_prefetch, si, sv, kt, kp, lknown, lfloor, hazard, tok, tok0,
                         prot_row, depth, cand, cval, n)


@nb.njit(cache=True, _nrt=False)
def _known_next(key, known_end, base, by_after, r, layer, L, fp, kt, hazard, tok, tok0):
    """Belady's score: the key's next use (a row; with `by_after`, ties, keys next used in the same
    row, by the use after it, as a fraction of `base`, Accesses.next_uses). An oracle schedule that
    knows the routing only `horizon` tokens ahead (the running one and H - 1 after it, never past its sequence: rows before
    `known_end`) knows a next use inside that window; past it, every key ranks after the known ones, by
    the learned expected distance (its reuse hazard), the most a predictor of those tokens could know
    without their routing."""
    nxt, after = divmod(kt[key, K_NEXT], base)  # the next use, and the one after it for ties
    if nxt < known_end:
        if not by_after:
            return float(nxt)
        return nxt + (after / base if after < known_end else 1.0 - 1.0 / base)
    return _UNKNOWN + learned_score(key, kt[key, K_LAYER], layer, r, L, kt.shape[0] // L, kt[key, K_TOK], tok, tok0,
                                    -1, 0.0, -1, 0.0, hazard, fp[P_QMIN])  # fmt: skip


@nb.njit(cache=True, _nrt=False)
def _better(score, age, than_score, than_age):
    """A victim goes before another by a higher score, ties by a higher age (less recently used)."""
    return score > than_score or (score == than_score and age > than_age)


@nb.njit(cache=True, _nrt=False)
def _rated_victim(lo, hi, r, layer, L, ip, fp, for_prefetch, si, sv, kt, kp, lknown, lfloor, hazard, tok, tok0,
                  prot_row, depth, cand, cval, n):
    """_victim of a full group by a score per slot: Belady's next use, the learned expected distance
    (a sampled window of slots) or, in groups of at most SCAN_MAX slots, LFU's fewest uses.

    Ranks the m = min(depth, k) best slots not kept (list 0) and, for a demand load, the m best kept
    ones (list 1) into cand (2, k) and cval (2, 2, k) (score, age; n[N_C0], n[N_C1] of each): while
    nothing but taking its victims changes the slots, each next scan would find the next of them
    (`_ranked`, `_taken`), so the engine drops the ranking (n[N_CI] = -1) at every other change (a
    new row, new predictions, the row's routing). A miss or a prefetch so costs one scan per host event
    rather than one each, where a scan rates up to `Policy.sample` slots (learned, 128) or all of a group's (Belady)."""
    code = ip[I_EVICT]
    m = min(depth, cand.shape[1])
    n[N_C0], n[N_C1], n[N_CI], n[N_CK], n[N_CG], n[N_CP], n[N_CM] = 0, 0, 0, 0 if for_prefetch else 1, lo, prot_row, m
    size = hi - lo
    window = size
    offset = 0
    if code == LEARNED and size > ip[I_SAMPLE]:
        # the learned score is an estimate: rate a random window of slots, not all (a sampled
        # eviction, as Redis and hyperbolic caching do), so a miss costs O(sample), not O(slots)
        window = ip[I_SAMPLE]
        offset = (r * 2654435761 + tok * 40503) % size
    # Belady's window: with a horizon, the running token and H - 1 after it, within the sequence
    known_end = min(r - layer + ip[I_HORIZON] * L, n[N_END]) if code == BELADY and ip[I_HORIZON] > 0 else 1 << 62
    # Belady without prefetch counts hits: a tie goes by the use after it. A timed schedule copies ahead,
    # so a tie goes to the slot free soonest (the least recently used), as any other.
    by_after = ip[I_SOURCE] == NO_PREFETCH
    E = kt.shape[0] // L
    s = lo + offset - 1
    for _ in range(window):  # slots lo + (offset + i) % size, i < window <= size
        s += 1
        if s == hi:
            s = lo
        key = si[S_KEY, s]
        kept = si[S_PEND, s] >= prot_row
        if kt[key, K_MARK] == r or (kept and for_prefetch):
            continue
        if code == LFU:
            score = -float(kt[key, K_CNT])
        elif code == BELADY:
            score = _known_next(key, known_end, ip[I_NEXT_BASE], by_after, r, layer, L, fp, kt, hazard, tok, tok0)
        else:
            kl = kt[key, K_LAYER]  # the same score as the runtime's learned eviction (policy.learned_ranking)
            score = learned_score(key, kl, layer, r, L, E, kt[key, K_TOK], tok, tok0, kt[key, K_ROW], kp[key], lknown[kl],
                                  lfloor[kl], hazard, fp[P_QMIN])
        age = -sv[V_LAST, s]  # ties: least recently used first
        g = 1 if kept else 0
        c = n[N_C0 + g]
        if not _better(score, age, _NEG, _NEG):  # never taken (a NaN score), as by a scan for one best
            continue
        if c == m and not _better(score, age, cval[g, 0, m - 1], cval[g, 1, m - 1]):
            continue
        j = min(c, m - 1)  # its place: after every slot met before it that is not worse
        while j > 0 and _better(score, age, cval[g, 0, j - 1], cval[g, 1, j - 1]):
            cand[g, j], cval[g, 0, j], cval[g, 1, j] = cand[g, j - 1], cval[g, 0, j - 1], cval[g, 1, j - 1]
            j -= 1
        cand[g, j], cval[g, 0, j], cval[g, 1, j] = s, score, age
        n[N_C0 + g] = min(c + 1, m)
    return _ranked(for_prefetch, cand, cval, n)


@nb.njit(cache=True, _nrt=False)
def _ranked(for_prefetch, cand, cval, n):
    """The next victim of _rated_victim's ranking, n[N_CI] of them taken: the best slot not kept, else
    (a demand load) the best kept one, (-1, _NEG) if none; (-2, 0) where it ranked too few to tell."""
    i, c0, m = n[N_CI], n[N_C0], n[N_CM]
    if i < c0:
        n[N_CH] = cand[0, i]
        return cand[0, i], cval[0, 0, i]
    if c0 == m:  # more slots than it ranked
        return -2, 0.0
    if for_prefetch:
        return -1, _NEG
    if n[N_CK] == 0:  # ranked for a prefetch: not the kept slots
        return -2, 0.0
    i -= c0
    if i < n[N_C1]:
        n[N_CH] = cand[1, i]
        return cand[1, i], cval[1, 0, i]
    if n[N_C1] == m:
        return -2, 0.0
    return -1, _NEG


@nb.njit(cache=True, _nrt=False)
def _fill_slot(s, key, ready, kept, si, sv, kt, counts, n):
    """Put `key` into slot `s` (evicting what is there), landing at `ready`, for the running row or (kept)
    a prefetch. If s was the victim ranking's next, the one after it is next; a prefetch's slot is kept,
    so the kept ranked for a demand load are not all of them any more."""
    if s == n[N_CH]:
        n[N_CI] += 1
        n[N_CH] = -1
        if kept:
            n[N_CK] = 0
    old = si[S_KEY, s]
    if old >= 0:
        kt[old, K_SLOT] = -1
        if si[S_UNUSED, s]:
            counts[C_WASTED] += 1
    si[S_KEY, s] = key
    kt[key, K_SLOT] = s
    sv[V_LAND, s] = ready
    si[S_PEND, s] = -1
    si[S_UNUSED, s] = 0
