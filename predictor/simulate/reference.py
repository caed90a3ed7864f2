"""The most hits any eviction can make, by exhaustive search: the reference the simulator's Belady is
checked against (tests/test_simulator.py, research/belady_optimality.py). Exponential: tiny traces only.
"""

from __future__ import annotations

from functools import cache


def brute_optimum(rows: list[tuple[int, ...]], slots: int, keep_row: bool = True) -> int:
    """Max hits over every eviction / bypass choice for `rows` of keys (one step's experts each) and
    `slots` cache slots, empty at the start; with keep_row (the engine's rule) a miss never evicts a
    key of its own row."""

    @cache
    def best(i: int, resident: frozenset) -> int:
        if i == len(rows):
            return 0
        row = rows[i]
        hits = sum(key in resident for key in row)
        states = {resident}
        for key in (x for x in row if x not in resident):
            nxt = set()
            for s in states:
                nxt.add(s)  # bypass
                if len(s) < slots:
                    nxt.add(s | {key})
                else:
                    nxt.update((s - {v}) | {key} for v in s if not (keep_row and v in row))
            states = nxt
        return hits + max(best(i + 1, s) for s in states)

    return best(0, frozenset())
