"""The module swapped in for each MoE layer's `mlp.experts`: same call, weights streamed through the cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from integrate.adapters import WINDOWS_FROM, experts_implementation, pool_windows
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
    ):
        super().__init__()
        object.__setattr__(self, "original", original)
        self.adapter = adapter
        self.cache = cache
        self.moe_layer = moe_layer
        self.on_routed = on_routed
        self._fetch = partial(cache.fetch, moe_layer)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        read = self.on_routed(self.moe_layer, top_k_index)  # layer-ahead prefetch starts before this layer computes
        out = None
        if experts_implementation(self.original) == "grouped_mm":  # one grouped call over the slot pool
            # which experts to make resident and how many rows each: the driver's host copy of the routing
            # when there is a driver, else SYNC POINT (device -> host): the one readback of this layer's routing
            ids = (read.reshape(-1) if read is not None else top_k_index.flatten()).tolist()
            routed = sorted(set(ids))
            host, _ = self.cache.split_host(self.moe_layer, routed)  # hybrid: misses the host finishes first
            if host == routed:  # one grouped call over the host store's layer, on the host
                out = self._on_host(hidden_states, top_k_index, top_k_weights, routed)
            elif not host and (slots := self.cache.fetch_group(self.moe_layer, routed)) is not None:
                slot_of = self.cache.slot_table[self.moe_layer].to(hidden_states.device, non_blocking=True)
                # a large pool: grouped calls over windows of the used slots only (a grouped GEMM costs per
                # group, used or not, and takes at most MAX_GROUPS: integrate/grouping.py)
                big = self.cache.pool.num_slots > WINDOWS_FROM
                rows = Counter(ids) if big else None
                windows = pool_windows([(s, rows[e]) for s, e in zip(slots, routed)]) if big else None
                out = self.adapter.routed_pool_forward(
                    self.original, hidden_states, top_k_index, top_k_weights, slot_of, self.cache.pool_views(), windows
                )
        if out is None:  # one expert at a time (eager, more experts than the layer's slots, or host and device mixed)
            out = self.adapter.routed_forward(self.original, hidden_states, top_k_index, top_k_weights, self._fetch)
        self.cache.end_layer(self.moe_layer)
        return out

    def _on_host(self, hidden, top_k_index, top_k_weights, routed: list[int]) -> torch.Tensor:
        views = self.cache.fetch_host_group(self.moe_layer, routed)
        host = next(iter(views.values())).device
        out = self.adapter.routed_pool_forward(
            self.original, hidden.to(host), top_k_index.to(host), top_k_weights.to(host),
            torch.arange(self.cache.store.num_experts, device=host), views,
        )
        return out.to(hidden.device)

    def extra_repr(self) -> str:
        return f"moe_layer={self.moe_layer}, original={type(self.original).__name__}"
