"""The module swapped in for each MoE layer's `mlp.experts`: same call, weights streamed through the cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from integrate.adapters import WINDOWS_FROM, experts_implementation, pool_windows, span_window
from integrate.runtime.cache import ExpertCache


class OffloadedExperts(nn.Module):
    """Holds no expert weights: `fetch(e)` hands out the expert's tensors from a device slot.

    The original experts module is kept outside the module tree (not a submodule, so `model.to()`
    and `state_dict()` ignore it): `routed_forward` reads its activation and config, and
    `Runtime.uninstall()` puts it back.
    """

    def __init__(
        self,
        adapter,
        original: nn.Module,
        cache: ExpertCache,
        moe_layer: int,
        on_routed: Callable[[int, torch.Tensor], np.ndarray | None],  # -> the host copy of the routing, if read
        on_done: Callable[[int], None] | None = None,  # the layer's experts are issued
    ):
        super().__init__()
        object.__setattr__(self, "original", original)
        self.adapter = adapter
        self.cache = cache
        self.moe_layer = moe_layer
        self.on_routed = on_routed
        self.on_done = on_done
        self._fetch = partial(cache.fetch, moe_layer)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        read = self.on_routed(self.moe_layer, top_k_index)  # layer-ahead prefetch starts before this layer computes
        out = None
        impl = experts_implementation(self.original)
        if impl in ("grouped_mm", "batched_mm"):  # one call over the slot pool (batched_mm: generate() decoding on a GPU)
            # which experts to make resident and how many rows each: the driver's host copy of the routing
            # when there is a driver, else SYNC POINT (device -> host): the one readback of this layer's routing
            ids = (read.reshape(-1) if read is not None else top_k_index.flatten()).tolist()
            out = self._grouped(hidden_states, top_k_index, top_k_weights, ids, batched=impl == "batched_mm")
            if out is None and impl == "batched_mm":
                raise NotImplementedError(
                    f"batched_mm: MoE layer {self.moe_layer} routes {len(set(ids))} experts at once, more than the "
                    f"{self.cache.pool.group_size} slots a layer can use; raise the capacity, or call "
                    "model.set_experts_implementation('eager') before install"
                )
        if out is None:  # one expert at a time (eager, or more experts than the layer's slots)
            # the driver's host copy of the routing, else SYNC POINT (device -> host): the routed forward reads
            # it back too; while they are fetched no miss evicts another of the layer's experts
            ids = read.reshape(-1).tolist() if read is not None else top_k_index.flatten().tolist()
            with self.cache.layer_routing(self.moe_layer, ids):
                out = self.adapter.routed_forward(self.original, hidden_states, top_k_index, top_k_weights, self._fetch)
        self.cache.end_layer(self.moe_layer)
        if self.on_done is not None:
            self.on_done(self.moe_layer)
        return out

    def _grouped(self, hidden, top_k_index, top_k_weights, ids: list[int], batched: bool = False) -> torch.Tensor | None:
        """The layer in grouped calls: the device's experts in one over the slot pool and, hybrid, the
        misses the host finishes first in one over the host store's layer, side by side (on this thread or
        a pool's: `cache.host_run`); their terms add before the sum over the k picks. `batched`: a layer
        all on the device runs transformers' batched_mm over the pool (bitwise its output); a hybrid one
        as grouped_mm (within rounding). None: the device's experts do not fit the layer's slots."""
        routed = sorted(set(ids))
        host, device = self.cache.split_host(self.moe_layer, routed)  # hybrid: misses the host finishes first
        if len(device) > self.cache.pool.group_size:  # fetch_group's refusal, known before the host's part starts
            return None
        if batched and not host:
            self.cache.fetch_group(self.moe_layer, device)
            slot_of = self.cache.slot_table[self.moe_layer].to(hidden.device, non_blocking=True)
            return self.adapter.routed_pool_batched(
                self.original, hidden, top_k_index, top_k_weights, slot_of, self.cache.pool_views()
            )
        on_host = set(host)
        part = lambda mine: torch.tensor([i for i, e in enumerate(ids) if (e in on_host) == mine], dtype=torch.long)
        job = None
        if host:  # one grouped call over the store's whole layer (expert e at row e), on the host, started first
            views, arange = self.cache.store.layer_views(self.moe_layer), torch.arange(self.cache.store.num_experts)
            mine = part(True) if device else None
            job = self.cache.host_run.start(
                lambda *args: self.adapter.routed_pool_pairs(self.original, *args, arange, views, None, mine, ordered=True),
                (hidden, top_k_index, top_k_weights), (*top_k_index.shape, hidden.shape[-1]),
                torch.promote_types(hidden.dtype, top_k_weights.dtype),  # the terms' dtype (fp32 router weights: fp32)
            )
        terms = None
        if device:
            slots = self.cache.fetch_group(self.moe_layer, device)  # not None: they fit (checked above)
            slot_of = self.cache.slot_table[self.moe_layer].to(hidden.device, non_blocking=True)
            # grouped calls over the used slots only (a grouped GEMM costs per group, used or not, and takes at
            # most MAX_GROUPS): windows in a large pool, the used span in a small one (integrate/grouping.py)
            pairs = part(False) if host else None
            if self.cache.pool.num_slots > WINDOWS_FROM:
                rows = Counter(ids)
                windows = pool_windows([(s, rows[e]) for s, e in zip(slots, device)])
            else:
                windows = span_window(slots, len(ids) if pairs is None else len(pairs), self.cache.pool.num_slots)
            pairs = pairs.to(hidden.device, non_blocking=True) if host else None
            terms = self.adapter.routed_pool_pairs(
                self.original, hidden, top_k_index, top_k_weights, slot_of, self.cache.pool_views(), windows, pairs,
                ordered=slots == sorted(slots),  # `device` is in id order: slot order too, no second sort
            )
        if host:
            self.cache.fetch_host_group(self.moe_layer, host)  # each access counts as a miss run on the host
            host_terms = self.cache.host_run.finish(job, hidden.device)
            terms = host_terms if terms is None else terms + host_terms
        return terms.sum(dim=1).to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"moe_layer={self.moe_layer}, original={type(self.original).__name__}"
