"""The module swapped in for each MoE layer's `mlp.experts`: same call, weights streamed through the cache."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

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
        on_routed: Callable[[int, torch.Tensor], None],
    ):
        super().__init__()
        object.__setattr__(self, "original", original)
        self.adapter = adapter
        self.cache = cache
        self.moe_layer = moe_layer
        self.on_routed = on_routed
        self._fetch = partial(cache.fetch, moe_layer)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        self.on_routed(self.moe_layer, top_k_index)  # layer-ahead prefetch starts before this layer computes
        out = self.adapter.routed_forward(
            self.original, hidden_states, top_k_index, top_k_weights, self._fetch
        )
        self.cache.end_layer(self.moe_layer)
        return out

    def extra_repr(self) -> str:
        return f"moe_layer={self.moe_layer}, original={type(self.original).__name__}"
