"""Copies into the slot pool: take a slot (`_allocate`), move a batch of experts in one copy call
(`_copy`), issue queued prefetches under the in-flight cap (`prefetch`, `_pump`), order them against
compute (`_release`: a copy waits for the slot's last use; `_wait`: compute waits for the copy), and let
go of it all once the copies are done (`close`, which also ends the host run: `HybridHost.close_host_run`).
A mixin of ExpertCache (integrate/runtime/cache.py), whose pool, store, copier, events and counters it uses.

Batches: a layer's demand misses on the grouped path (`fetch_group`) and the prefetches one pump
issues each take one copy call and share one ready event, so the host issues one call per batch,
not one `copy_` per expert; slot choice stays per expert (it is the eviction policy).
"""

from __future__ import annotations

import time

import torch

from integrate.runtime.interrupts import deferred_interrupt
from integrate.runtime.slots import Key


class Transfers:
    def prefetch(self, keys) -> None:
        """Queue copies of (layer, expert) keys, in order; already resident or queued keys are skipped."""
        for key in keys:
            if key not in self.pool.slot_of and key not in self._queue:
                self._enqueue(key)
        self._pump()

    # the queue is in issue order; `_queued` indexes it by layer, so dropping a layer's keys (at its
    # readback, every layer) costs its own keys, not a scan of every layer's queued picks
    def _enqueue(self, key: Key, first: bool = False) -> None:
        self._queue[key] = None
        if first:
            self._queue.move_to_end(key, last=False)
        self._queued.setdefault(key[0], set()).add(key)

    def _unqueue(self, key: Key) -> None:
        if key in self._queue:
            del self._queue[key]
            self._queued[key[0]].discard(key)

    def _drop_layer(self, layer: int, keep=frozenset()) -> None:
        """Drop the layer's queued keys but `keep`."""
        for key in self._queued.get(layer, set()) - keep:
            self._unqueue(key)

    def _drop_pending(self) -> None:
        """Issued prefetches never routed count as wasted; queued ones are dropped (an aborted step, close)."""
        with deferred_interrupt():  # a second Ctrl-C does not count them twice
            self.counters.prefetches_wasted += len(self._unused)
            self._unused.clear()
            self._queue.clear()
            self._queued.clear()

    def _allocate(self, key: Key, demand: bool) -> int | None:
        """Take a slot for `key` (evicting its holder); the caller copies it in with `_copy`. None: no slot."""
        in_use = {k for k, _ in self._in_use} | self._routing
        if demand:  # may take an unused prefetch's slot, but only as a last resort
            got = self.pool.allocate(key, in_use, self._unused) or self.pool.allocate(key, in_use)
        else:  # a prefetch never evicts what is predicted too: it would only trade one miss for another
            got = self.pool.allocate(key, in_use, self._unused, self.pool.predicted)
        if got is None:
            return None
        slot, evicted = got
        self.slot_table[key] = slot
        if evicted in self._unused:  # only a demand load evicts an unused prefetch
            del self._unused[evicted]
            self.counters.prefetches_wasted += 1
        return slot

    def _copy(self, batch: list[tuple[Key, int]], demand: bool) -> torch.cuda.Event | None:
        """Copy a batch of (key, slot) from the host store in one copy call; every slot's ready event is
        the batch's (the grouped call needs them all anyway; prefetches land in issue order)."""
        slots = [s for _, s in batch]
        t0 = time.perf_counter()
        done = self.copier.copy(
            [self.pool.buffer[s] for s in slots], [self.store.buffer(*k) for k, _ in batch], demand,
            [ev for s in slots for ev in (self._ready[s], self._free[s])],
        )  # fmt: skip
        for s in slots:
            self._ready[s], self._free[s] = done, None
        self.counters.bytes_moved += len(batch) * self.store.expert_bytes
        if demand and not self.cuda:  # a CPU copy is synchronous: its duration is the stall
            self.counters.stall_ms += (time.perf_counter() - t0) * 1e3
        return done

    def _pump(self) -> None:
        """Issue queued prefetches, in one copy call, while fewer than `max_inflight` are on the copy stream."""
        while self._inflight and self._inflight[0].query():
            self._inflight.popleft()
        if not self._queue:
            return
        batch = []
        with deferred_interrupt():  # every slot taken gets its copy call before a Ctrl-C is raised
            while self._queue and (not self.cuda or len(self._inflight) + len(batch) < self.max_inflight):
                key, _ = self._queue.popitem(last=False)
                self._queued[key[0]].discard(key)
                if key in self.pool.slot_of:
                    continue
                slot = self._allocate(key, demand=False)
                if slot is None:  # every slot holds something in use or an unused prefetch: retry later
                    self._enqueue(key, first=True)
                    break
                batch.append((key, slot))
                self.counters.prefetches_issued += 1
                self._unused[key] = None
            if batch:
                done = self._copy(batch, demand=False)
                if self.cuda:
                    self._inflight.extend([done] * len(batch))  # one entry per copy: max_inflight counts copies

    def _release(self) -> None:
        """The experts handed out for compute are done with: a copy into their slots waits for that compute."""
        for _, slot in self._in_use:
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self._free[slot] = ev
        self._in_use = []

    def _landed(self, slot: int) -> bool:
        """Has the slot's last copy landed? (forgets its event once it has)"""
        ev = self._ready[slot]
        if ev is None or ev.query():  # query() asks the driver, it does not block
            self._ready[slot] = None
            return True
        return False

    def _wait(self, slot: int) -> None:
        """Make the compute stream wait for the slot's copy; on CUDA time the wait with events."""
        ev = self._ready[slot]
        if ev is None:
            return
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        stream.wait_event(ev)
        end.record(stream)
        self._stalls.append((start, end))

    def close(self) -> None:
        """Uninstall: wait for the copies in flight, then drop the device slots and the host store (the whole
        model's experts, pinned on CUDA), which a kept `Runtime` would otherwise hold; counters stay readable
        (prefetches never routed count as wasted). All of it is let go even if a wait raises."""
        try:
            self.copier.synchronize()
        finally:
            try:
                self.close_host_run()  # hybrid's pool thread, once its jobs are done
            finally:
                self._let_go()

    def _let_go(self) -> None:
        """close's last part: count the prefetches never routed, drop the bookkeeping, the slots and the store."""
        self._drop_pending()
        with deferred_interrupt():
            self._inflight.clear()
            self._in_use = []
            self._ready = self._free = self._views = []
            self._pool_views = None
            self.pool.buffer = self.store.arena = None
