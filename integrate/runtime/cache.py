"""Expert residency: `fetch` an expert for compute (hit, or synchronous demand load on a miss) and
`prefetch` experts ahead of use. Ties together the host store, the slot pool, the copier and the counters;
the copies themselves, batched, and the stream's waits on them are `Transfers` (transfers.py), whole-layer
access `GroupedAccess` (grouped.py), where hybrid's host experts compute `HybridHost` (hybrid.py).

Ordering on CUDA, all on the device, never a host-wide sync on the hot path:
  * compute waits on a slot's copy event before using it (only if the copy has not yet landed);
  * a copy into a slot waits on the event recorded on the compute stream after the slot's last use
    (recorded when the next expert is fetched, because the adapter's contract is that an expert's
    tensors are used before the next fetch call) and on the slot's previous copy.
The expert in use is never evicted. Prefetches never evict an issued-but-unused prefetch nor a
resident expert that is predicted too, so a long prediction list cannot thrash itself: what does not
fit waits in the host-side queue and is issued as slots free up.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from contextlib import contextmanager

import torch

from integrate.runtime.copier import Copier
from integrate.runtime.counters import Counters
from integrate.runtime.expected_use import ExpectedUse
from integrate.runtime.grouped import GroupedAccess
from integrate.runtime.hybrid import HybridHost, HybridRule
from integrate.runtime.interrupts import deferred_interrupt
from integrate.runtime.slots import Key, SlotPool
from integrate.runtime.store import ExpertStore
from integrate.runtime.transfers import Transfers

MAX_INFLIGHT = 8  # prefetch copies committed to the copy stream at once, by default


class ExpertCache(GroupedAccess, Transfers, HybridHost):
    def __init__(
        self,
        store: ExpertStore,
        num_slots: int,
        device: torch.device | str = "cpu",
        policy: str = "lru",
        per_layer: bool = False,
        max_inflight: int | None = MAX_INFLIGHT,
        counters: Counters | None = None,
        hybrid: HybridRule | None = None,
        expected: ExpectedUse | None = None,
    ):
        """`policy` names the eviction (slots.POLICIES); "learned" rates experts by `expected`."""
        if expected is not None and (expected.L, expected.E) != (store.num_layers, store.num_experts):
            raise ValueError(f"the learned eviction is for L={expected.L}, E={expected.E}; the store holds "
                             f"L={store.num_layers}, E={store.num_experts}")  # fmt: skip
        max_inflight = MAX_INFLIGHT if max_inflight is None else max_inflight
        if type(max_inflight) is not int or max_inflight < 1:
            raise ValueError(f"max_inflight (--max-inflight) = {max_inflight!r}: copies in flight, must be >= 1")
        self.store = store
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pool = SlotPool(
            num_slots, store.expert_bytes, self.device, policy, store.num_layers if per_layer else None, expected
        )
        self.copier = Copier(self.device)
        self.counters = counters if counters is not None else Counters()
        self.max_inflight = max_inflight  # prefetch copies on the stream at once; the rest wait on the host
        self.hybrid = hybrid  # None: every miss is copied
        self._host_run = self._host_rule = None  # where hybrid's host experts compute, made on first use (`host_run`)
        self._ready: list[torch.cuda.Event | None] = [None] * num_slots  # last copy into the slot
        self._free: list[torch.cuda.Event | None] = [None] * num_slots  # compute after the slot's last use
        self._in_use: list[tuple[Key, int]] = []  # experts handed out for the current compute
        self._routing: set[Key] = set()  # the layer's routed experts while fetch_group makes them resident
        self._unused: dict[Key, None] = {}  # issued prefetches not yet routed
        self._queue: OrderedDict[Key, None] = OrderedDict()  # requested prefetches not yet issued
        self._queued: dict[int, set[Key]] = {}  # the same keys by layer (Transfers._enqueue)
        self._inflight: deque[torch.cuda.Event] = deque()  # issued prefetch copies, oldest first
        self._stalls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._views = [None] * num_slots  # typed tensor views of each slot, built once
        self._pool_views = None
        # (layer, expert) -> slot of resident experts (stale for others; only resident ones are read)
        self.slot_table = torch.zeros(store.num_layers, store.num_experts, dtype=torch.long)

    # -- hot path ---------------------------------------------------------------------------------
    def fetch(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The expert's tensors in a device slot, ready for compute on the current stream; with a
        hybrid rule, a miss it prefers to compute on the host gets the host store's tensors instead."""
        self._release()
        if self.on_host(layer, expert):
            self.counters.misses += 1
            self.counters.host_experts += 1
            self.pool.used_on_host((layer, expert))
            return self.store.tensors(layer, expert)
        slot = self._acquire((layer, expert))
        self._pump()
        if self._views[slot] is None:
            self._views[slot] = self.store.layout.views(self.pool.buffer[slot])
        return self._views[slot]

    def _acquire(self, key: Key, batch: list[tuple[Key, int]] | None = None) -> int:
        """Make `key` resident and ready for compute (a hit, a landed prefetch, or a demand load) and
        mark it in use until the next fetch or the end of its layer. With `batch`, a demand load only
        takes its slot and joins the batch; the caller copies the batch in one call and waits for it."""
        c = self.counters
        slot = self.pool.lookup(key)
        if slot is None:
            self._unqueue(key)
            with deferred_interrupt():  # the slot gets its copy call (a batch's: in its caller's block)
                slot = self._allocate(key, demand=True)
                if batch is None:
                    self._copy([(key, slot)], demand=True)
                else:
                    batch.append((key, slot))
            c.misses += 1
            c.demand_loads += 1
            if batch is None:
                self._wait(slot)
        else:
            if key in self._unused:
                del self._unused[key]
                c.prefetches_used += 1
            if self._landed(slot):
                c.hits += 1
            else:
                c.misses += 1
                c.late_prefetches += 1
                self._wait(slot)
        self.pool.used(key)
        self._in_use.append((key, slot))
        return slot

    def end_layer(self, layer: int) -> None:
        """The layer's experts are done: release the last one, expire its unused prefetches."""
        self._routing = set()
        self._release()
        self.pool.layer_done(layer)
        for key in [k for k in self._unused if k[0] == layer]:
            del self._unused[key]
            self.counters.prefetches_wasted += 1
        self._drop_layer(layer)
        self._pump()

    def end_step(self) -> None:
        """Fold device-side stall timings into the counters.

        SYNC POINT: waits for the last stall event; call it once per decode step, where generation
        synchronises anyway to read the sampled token.
        """
        for start, end in self._stalls:
            end.synchronize()
            self.counters.stall_ms += start.elapsed_time(end)
        self._stalls.clear()
        self.pool.step_done()

    def abort_step(self) -> None:
        """The last step raised before its end (a Ctrl-C in generate): its issued prefetches never routed
        are wasted, its queued ones dropped and its predictions spent, so none of them counts in the next
        step; its stall timings are folded as `end_step` does. (A slot given to an expert always got its
        copy call: the interrupt waited for it, `deferred_interrupt`.)"""
        self._routing = set()
        self._release()
        self._drop_pending()
        self.pool.predicted = set()
        try:
            if self._host_run is not None:
                self._host_run.settle()
        finally:
            self.end_step()

    @contextmanager
    def layer_routing(self, layer: int, experts):
        """While the layer's routed `experts` are fetched, no miss of it evicts another of them (as in the
        simulator); a layer routing more experts than its slots hold gets no such guard."""
        self.guard_routing(layer, experts)
        try:
            yield
        finally:
            self._routing = set()

    def guard_routing(self, layer: int, experts) -> None:
        """From the routing's readback until the layer ends (end_layer), no copy evicts the layer's routed
        `experts` (prefetches for later layers take other slots, as in the simulator, where a row's keys
        are never evicted), and the layer's other queued picks are dropped: no longer of use, not copied."""
        keys = {(layer, int(e)) for e in experts if e >= 0}
        self._routing = keys if len(keys) <= self.pool.group_size else set()
        self._drop_layer(layer, keep=keys)  # too late to help the layer

    def new_sequence(self) -> None:
        """New sequences start with the next step (generate() with a fresh KV cache, a replayed sequence)."""
        self.pool.new_sequence()

    def warm(self, keys) -> None:
        """Load `keys` before timing starts (e.g. all experts for the all-resident bound). SYNC POINT."""
        for key in keys:
            if self.pool.lookup(key) is None:
                with deferred_interrupt():
                    self._copy([(key, self._allocate(key, demand=True))], demand=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
