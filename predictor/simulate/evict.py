"""Slot residency for the replay engine: which slot a miss or a prefetch evicts, and moving a key in.

LRU keeps its order in a linked list per slot group and LFU, in groups of more than lfu.SCAN_MAX
slots, in a heap per group (lfu.py), so their misses do not scan the slots; Belady, the learned
expected distance and LFU in small groups rate the slots (all, or a sampled window) per victim.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .layout import _NEG, C_WASTED, I_EVICT, I_SAMPLE, P_QMIN
from .lfu import _SIZE, GROUP_COLS, SCAN_MAX, SLOT_COLS, lfu_victim
from .policy import BELADY, LEARNED, LFU, LRU, expected_distance

# LRU order as a doubly linked list per slot group (eviction code LRU only), so a victim is found at
# the head instead of by a scan: lst[s] = (prev, next, state) with state 0 out, 1 warm, 2 cold; grp[g]
# = (head, tail, last cold). Cold slots (predicted, released unrouted) form a prefix, oldest first.
# The columns after these hold the LFU heaps (lfu.py).
_P, _N, _ST = 0, 1, 2
_HEAD, _TAIL, _COLD = 0, 1, 2


@nb.njit(cache=True)
def new_order(num_slots, num_groups):
    """(lst, grp) of an empty LRU order and empty LFU heaps: every slot out of both, every group
    empty."""
    lst = np.full((num_slots, SLOT_COLS), -1, np.int64)
    lst[:, _ST] = 0
    grp = np.full((num_groups, GROUP_COLS), -1, np.int64)
    grp[:, _SIZE] = 0
    return lst, grp


@nb.njit(cache=True)
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


@nb.njit(cache=True)
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


@nb.njit(cache=True)
def _touch(s, g, lst, grp):
    """s was used now: most recent."""
    if lst[s, _ST] != 0:
        _unlink(s, g, lst, grp)
    _insert_after(grp[g, _TAIL], s, g, lst, grp)
    lst[s, _ST] = 1


@nb.njit(cache=True)
def _make_cold(s, g, lst, grp):
    """s was predicted and not routed: evicted before every warm slot, after older cold ones."""
    if lst[s, _ST] != 0:
        _unlink(s, g, lst, grp)
    _insert_after(grp[g, _COLD], s, g, lst, grp)
    lst[s, _ST] = 2
    grp[g, _COLD] = s


@nb.njit(cache=True)
def _usage(key, kl, layer, last_tok, tok, tok0, hazard):
    """Per-token usage rate of `key` (of layer `kl`) at its layer's next run: the learned reuse
    hazard of its layer at the tokens between its last use in this sequence and that run (column 0:
    not used yet in this sequence)."""
    if last_tok[key] < tok0:
        return hazard[kl, 0]
    nxt = tok + 1 if kl <= layer else tok  # its layer has run this token: next token
    return hazard[kl, min(nxt - last_tok[key], hazard.shape[1] - 1)]


@nb.njit(cache=True)
def _victim(lo, hi, r, layer, L, E, ip, fp, for_prefetch, slot_key, pend, last_use, cnt, next_row, cur_mark,
            kp, krow, lknown, lfloor, hazard, last_tok, tok, tok0, prot_row, lst, lgrp):
    """The slot to evict in [lo, hi) and its eviction score: a free slot first; never a key of the
    current row; a prefetch never takes a slot predicted for a row >= prot_row still to run (a
    demand load does, last). Returns (-1, 0) when there is none. (lst, lgrp): the LRU list and
    the LFU heaps (lfu.py; kept only where lfu_heaped)."""
    code = ip[I_EVICT]
    best, best_score, best_age = -1, _NEG, _NEG
    prot, prot_score, prot_age = -1, _NEG, _NEG
    if slot_key[hi - 1] < 0:  # slots fill in order: a free one exists
        for s in range(lo, hi):
            if slot_key[s] < 0:
                return s, 1e18
    if code == LRU:  # walk the list from the least recent end
        s = lgrp[lo // (hi - lo), _HEAD]
        while s >= 0:
            key = slot_key[s]
            if cur_mark[key] != r:
                if pend[s] < prot_row:
                    return s, -last_use[s]
                if not for_prefetch and prot < 0:
                    prot = s
            s = lst[s, _N]
        return prot, (-last_use[prot] if prot >= 0 else 0.0)
    if code == LFU and hi - lo > SCAN_MAX:  # the heap's order: the scan's below, without the scan
        return lfu_victim(lo, hi, r, for_prefetch, slot_key, pend, last_use, cnt, cur_mark, prot_row, lst, lgrp)
    size = hi - lo
    window = size
    offset = 0
    if code == LEARNED and size > ip[I_SAMPLE]:
        # the learned score is an estimate: rate a random window of slots, not all (a sampled
        # eviction, as Redis and hyperbolic caching do), so a miss costs O(sample), not O(slots)
        window = ip[I_SAMPLE]
        offset = (r * 2654435761 + tok * 40503) % size
    for i in range(window):
        s = lo + (offset + i) % size
        key = slot_key[s]
        if cur_mark[key] == r:
            continue
        if code == LRU:
            score = -last_use[s]
        elif code == LFU:
            score = -float(cnt[key])
        elif code == BELADY:
            score = float(next_row[key])
        else:
            kl = key // E
            q = _usage(key, kl, layer, last_tok, tok, tok0, hazard)
            score = expected_distance(kl, layer, r, L, krow[key], kp[key], lknown[kl], lfloor[kl], q, fp[P_QMIN])
        age = -last_use[s]  # ties: least recently used first
        if pend[s] >= prot_row:
            if for_prefetch:
                continue
            if score > prot_score or (score == prot_score and age > prot_age):
                prot, prot_score, prot_age = s, score, age
        elif score > best_score or (score == best_score and age > best_age):
            best, best_score, best_age = s, score, age
    if best >= 0:
        return best, best_score
    return prot, prot_score


@nb.njit(cache=True)
def _fill_slot(s, key, ready, slot_key, key_slot, land, pend, unused, counts):
    """Put `key` into slot `s` (evicting what is there), landing at `ready`."""
    old = slot_key[s]
    if old >= 0:
        key_slot[old] = -1
        if unused[s]:
            counts[C_WASTED] += 1
    slot_key[s] = key
    key_slot[key] = s
    land[s] = ready
    pend[s] = -1
    unused[s] = False
