"""Whole-layer access for one grouped compute call: every routed expert of a layer resident in the
slot pool at once (`fetch_group`, `pool_views`), or, for hybrid execution, read where the host
store keeps them (`on_host`, `fetch_host_group`). A mixin of ExpertCache (integrate/runtime/cache.py),
whose `_acquire`, `_release` and `_pump` it uses."""

from __future__ import annotations

import torch

from integrate.runtime.interrupts import deferred_interrupt


class GroupedAccess:
    def fetch_group(self, layer: int, experts: list[int]) -> list[int] | None:
        """Slots holding all of `experts` at once, ready for one grouped compute call over the pool
        (`pool_views`); None when the layer cannot hold them together (fetch them one by one then)."""
        if len(experts) > self.pool.group_size:
            return None
        self._release()
        misses = []  # the layer's demand loads: one copy call for all of them, one wait
        keys = [(layer, e) for e in experts]
        # resident ones first, then the misses, none evicting another of the layer's (as the simulator)
        order = sorted(range(len(keys)), key=lambda i: self.pool.lookup(keys[i]) is None)
        slots = [0] * len(keys)
        # a Ctrl-C waits until every slot taken has its copy call: none is left holding another's weights
        with deferred_interrupt(), self.layer_routing(layer, experts):
            for i in order:
                slots[i] = self._acquire(keys[i], misses)  # cannot fail: they fit, nothing else is in use
            if misses:
                self._copy(misses, demand=True)
        if misses:
            self._wait(misses[0][1])
        self._pump()
        return slots

    def on_host(self, layer: int, expert: int) -> bool:
        """Would this access run on the host CPU? `split_host` for one expert: only a miss, and only when
        the host finishes it before a copy queued behind the prefetches in flight would land."""
        return bool(self.split_host(layer, [expert])[0])

    def split_host(self, layer: int, experts: list[int]) -> tuple[list[int], list[int]]:
        """(on the host, on the device) for one layer's routed experts, deciding misses in order: each
        miss goes to the host when the host, running the misses already given to it, finishes before
        its copy, queued behind the prefetches in flight and the layer's earlier demand copies, lands."""
        if self.hybrid is None:
            return [], list(experts)
        self._pump()  # drops landed copies from the in-flight count
        host, device, copies = [], [], len(self._inflight) if self.cuda else 0
        for e in experts:
            if (layer, e) in self.pool.slot_of:
                device.append(e)
            elif self.hybrid.host_first(copies, self.store.expert_bytes, len(host)):
                host.append(e)
            else:
                device.append(e)
                copies += 1
        return host, device

    def fetch_host_group(self, layer: int, experts: list[int]) -> dict[str, torch.Tensor]:
        """Hybrid, every routed expert of the layer on the host: the store's views of the whole layer
        (expert e at row e) for one grouped call there; each access counts as a miss run on the host."""
        self._release()
        self.counters.misses += len(experts)
        self.counters.host_experts += len(experts)
        for e in experts:
            self.pool.used_on_host((layer, e))
        return self.store.layer_views(layer)

    def pool_views(self) -> dict[str, torch.Tensor]:
        """Typed views over every slot at once: name -> (num_slots, *shape); no copy."""
        if self._pool_views is None:
            self._pool_views = self.store.layout.pool_views(self.pool.buffer)
        return self._pool_views

