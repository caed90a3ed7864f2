"""LFU eviction order for the replay engine: a binary min-heap of slots per slot group, lazily kept.

LFU evicts the resident key with the fewest uses (counts kept across evictions), ties to the least
recently used slot, then to the lowest slot index (the order a scan of every slot meets them in).
That scan is O(slots) per miss (~830 slots in one pool at half of DeepSeek-V2-Lite's 26 x 64
experts); the heap finds the same slot from its root. Groups of at most SCAN_MAX slots keep no
heap and are scanned (evict._victim): there a scan costs less than the heap's upkeep.

The heap orders slots by a stored key (uses, last use, slot). Between misses the engine only ever
raises a resident slot's true key: a use adds one to its key's count and stamps it with a later
last use. Those rises are left out of the heap, so the per-access loop pays nothing: a stored key
is then a lower bound of the true one, the heap's order is right wherever stored keys are true
ones, and `lfu_victim` re-places each out-of-date slot it meets before trusting it. Every other
change, which can lower a key (a new key in a slot, a prefetch turned cold), goes through
`lfu_fix` at once.

A victim never holds a key of the running row (cur_mark[key] == r), and a slot kept for a row >=
prot_row still to run (pend) is taken by a demand load only when nothing else is left (a prefetch
never takes it); `lfu_victim` walks the heap best first (a frontier heap of heap indices), so it
reads the slots that rank before the victim and their children, not the whole group.

The heap lives in extra columns of the LRU list's arrays (evict.new_order): every array argument
makes a call of a compiled helper dearer (layout.py), so a victim call takes none more. After LRU's
three columns: lst[i, _SLOT] is the slot at heap index i (group g's heap is lst[lo:lo + size, _SLOT],
root at lo = g x per_group, size = lgrp[g, _SIZE]); lst[s, _POS] is slot s's heap index (-1: not in
the heap); lst[s, _CNT] and lst[s, _LAST] its stored count and last use; lst[lo:hi, _SCRATCH] the
victim search's frontier.
Last uses are whole numbers (stamps, _NEG + stamp, 0.0), so int64 keeps their order and ties.
"""

from __future__ import annotations

import numba as nb

from .layout import _NEG
from .policy import LFU

_SLOT, _POS, _SCRATCH, _CNT, _LAST = 3, 4, 5, 6, 7  # columns of lst (0-2: the LRU list)
_SIZE = 3  # column of lgrp (0-2: the LRU list)
SLOT_COLS, GROUP_COLS = 8, 4
# a group of at most this many slots keeps no heap: there one scan of its slots per miss costs less
# than the heap's upkeep (an estimate: in a scratch timing, replaying DeepSeek-V2-Lite's traces on one core, they broke even
# at about 48 slots)
SCAN_MAX = 48


@nb.njit(cache=True)
def lfu_heaped(code, per_group):
    """Whether the replay keeps LFU heaps: LFU eviction, groups of more than SCAN_MAX slots."""
    return code == LFU and per_group > SCAN_MAX


@nb.njit(cache=True, _nrt=False)
def _before(a, b, lst):
    """Slot a goes before slot b by their stored keys: fewer uses, less recently used, lower index."""
    if lst[a, _CNT] != lst[b, _CNT]:
        return lst[a, _CNT] < lst[b, _CNT]
    if lst[a, _LAST] != lst[b, _LAST]:
        return lst[a, _LAST] < lst[b, _LAST]
    return a < b


@nb.njit(cache=True, _nrt=False)
def lfu_fix(s, per_group, uses, last, lst, lgrp):
    """Slot s's key is now (uses, last): store it and move s to its place in its group's heap
    (added to it the first time)."""
    g = s // per_group
    lo = g * per_group
    lst[s, _CNT], lst[s, _LAST] = uses, int(last)
    i = lst[s, _POS]
    if i < 0:  # new in the heap: at the end, then up
        i = lo + lgrp[g, _SIZE]
        lgrp[g, _SIZE] += 1
    while i > lo:  # up while it goes before its parent
        p = lo + (i - lo - 1) // 2
        q = lst[p, _SLOT]
        if not _before(s, q, lst):
            break
        lst[i, _SLOT], lst[q, _POS] = q, i
        i = p
    end = lo + lgrp[g, _SIZE]
    while True:  # down while a child goes before it
        c = lo + 2 * (i - lo) + 1
        if c >= end:
            break
        if c + 1 < end and _before(lst[c + 1, _SLOT], lst[c, _SLOT], lst):
            c += 1
        q = lst[c, _SLOT]
        if not _before(q, s, lst):
            break
        lst[i, _SLOT], lst[q, _POS] = q, i
        i = c
    lst[i, _SLOT], lst[s, _POS] = s, i


@nb.njit(cache=True, _nrt=False)
def _push(x, lo, m, lst):
    """Frontier heap (heap indices lst[lo:lo + m, _SCRATCH], by their slots' stored keys): add x."""
    j = m
    while j > 0:
        p = (j - 1) // 2
        if not _before(lst[x, _SLOT], lst[lst[lo + p, _SCRATCH], _SLOT], lst):
            break
        lst[lo + j, _SCRATCH] = lst[lo + p, _SCRATCH]
        j = p
    lst[lo + j, _SCRATCH] = x
    return m + 1


@nb.njit(cache=True, _nrt=False)
def _pop(lo, m, lst):
    """Frontier heap: drop its first index (lst[lo, _SCRATCH]); returns the new size."""
    m -= 1
    x = lst[lo + m, _SCRATCH]
    j = 0
    while True:
        c = 2 * j + 1
        if c >= m:
            break
        a, b = lst[lo + c, _SCRATCH], lst[lo + c + 1, _SCRATCH] if c + 1 < m else -1
        if b >= 0 and _before(lst[b, _SLOT], lst[a, _SLOT], lst):
            c, a = c + 1, b
        if not _before(lst[a, _SLOT], lst[x, _SLOT], lst):
            break
        lst[lo + j, _SCRATCH] = a
        j = c
    lst[lo + j, _SCRATCH] = x
    return m


@nb.njit(cache=True, _nrt=False, inline="always")  # one call site, evict._victim
def lfu_victim(lo, hi, r, for_prefetch, slot_key, pend, last_use, cnt, cur_mark, prot_row, lst, lgrp):
    """The first slot of the full group [lo, hi) in LFU order that holds no key of row r and is not
    kept for a row >= prot_row; else, for a demand load, the first kept one. Returns (slot, -uses
    of its key), or (-1, _NEG) when there is none: what the scan of every slot returns."""
    size = hi - lo
    end = lo + lgrp[lo // size, _SIZE]
    if end == lo:
        return -1, _NEG
    m, prot = 0, -1
    m = _push(lo, lo, m, lst)
    while m > 0:  # heap indices by stored key: each popped one goes before every one not yet seen
        x = lst[lo, _SCRATCH]
        m = _pop(lo, m, lst)
        s = lst[x, _SLOT]
        key = slot_key[s]
        if lst[s, _CNT] != cnt[key] or lst[s, _LAST] != int(last_use[s]):  # used since: re-place it
            lfu_fix(s, size, cnt[key], last_use[s], lst, lgrp)
            m, prot = 0, -1  # the heap changed: walk it again from the root
            m = _push(lo, lo, m, lst)
            continue
        if cur_mark[key] != r:
            if pend[s] < prot_row:
                return s, -float(cnt[key])
            if not for_prefetch and prot < 0:
                prot = s
        c = lo + 2 * (x - lo) + 1
        if c < end:
            m = _push(c, lo, m, lst)
        if c + 1 < end:
            m = _push(c + 1, lo, m, lst)
    return prot, (-float(cnt[slot_key[prot]]) if prot >= 0 else _NEG)
