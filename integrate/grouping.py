"""How one layer's routed experts split into grouped GEMM calls over a slot pool (plain Python: the
runtime, the adapters and the trace replay share it without importing transformers)."""

from __future__ import annotations

Window = tuple[int, int, int, int]  # slots [lo, hi) and, in slot order, the rows [r0, r1) routed to them
MAX_GROUPS = 512  # slots per grouped call: torch's CUDA grouped GEMM refuses 1024 groups and more
WINDOWS_FROM = 64  # smaller pools take one call over the span of the used slots (`span_window`): there
# pool_windows' bookkeeping costs more than the empty groups it skips (CPU, demo model: ~1 us per group)


def pool_windows(slot_rows: list[tuple[int, int]], max_groups: int = MAX_GROUPS, max_gap: int = 16) -> list[Window]:
    """The grouped calls over a slot pool for one layer: slot_rows [(slot, rows routed to it)], any order
    -> windows (lo, hi, r0, r1) over the used slots in slot order. A grouped GEMM costs per group, used
    or not (on CPU about 1 us each), and takes at most `max_groups` groups: a window closes before a run
    of `max_gap` or more unused slots, and spans at most `max_groups` slots."""
    out: list[Window] = []
    rows = 0
    for slot, n in sorted(slot_rows):
        if out and slot - out[-1][1] < max_gap and slot - out[-1][0] < max_groups:
            lo, _, r0, _ = out[-1]
            out[-1] = (lo, slot + 1, r0, rows + n)
        else:
            out.append((slot, slot + 1, rows, rows + n))
        rows += n
    return out


def span_window(slots: list[int], rows: int, num_slots: int) -> list[Window] | None:
    """A pool of at most WINDOWS_FROM slots: one grouped call over the span of the used `slots`, [min, max],
    with all the layer's `rows`; None when that span is the whole pool."""
    lo, hi = min(slots), max(slots) + 1
    return None if hi - lo == num_slots else [(lo, hi, 0, rows)]
