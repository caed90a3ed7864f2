"""How many expert slots a capacity setting means, and the expert weights the model gives up while
they live in the host store (released on install, restored on uninstall)."""

from __future__ import annotations

import numbers
import re

import torch
from torch import nn

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def resolve_capacity(capacity, num_layers: int, num_experts: int, expert_bytes: int, per_layer: bool) -> int:
    """Slots for `capacity`: a fraction of all routed experts (float in (0, 1]), a number of experts
    (int), or a size ("4GiB", "500MB"). Per-layer pools round down to a multiple of the layers."""
    total = num_layers * num_experts
    if isinstance(capacity, str) and re.fullmatch(r"\s*[\d.]+\s*", capacity):  # no unit: read as the CLI does
        try:
            capacity = int(capacity)
        except ValueError:
            capacity = float(capacity) if capacity.count(".") == 1 else capacity
    if isinstance(capacity, numbers.Integral) and not isinstance(capacity, bool):
        capacity = int(capacity)  # numpy's ints too
    elif isinstance(capacity, numbers.Real) and not isinstance(capacity, bool):
        capacity = float(capacity)
    if isinstance(capacity, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", capacity)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"capacity {capacity!r}: expected a fraction, an expert count or a size like '4GiB'"
            )
        slots = int(float(m.group(1)) * _UNITS[m.group(2).lower()] // expert_bytes)
    elif isinstance(capacity, float):
        if not 0 < capacity <= 1:
            raise ValueError(f"capacity fraction {capacity} must lie in (0, 1]")
        slots = max(round(capacity * total), num_layers if per_layer else 1)  # a fraction never means none
    elif isinstance(capacity, int) and not isinstance(capacity, bool):
        slots = capacity
    else:
        raise ValueError(f"capacity {capacity!r}: expected a fraction, an expert count or a size like '4GiB'")
    slots = min(slots, total)
    if per_layer:
        slots -= slots % num_layers
    if slots < (num_layers if per_layer else 1):
        raise ValueError(
            f"capacity {capacity!r} gives {slots} expert slots; at least "
            f"{num_layers if per_layer else 1} needed (one expert is {expert_bytes} bytes)"
        )
    return slots


def release_expert_weights(adapter, experts: nn.Module) -> dict[str, tuple]:
    """Free `experts`' routed weights (the host store holds a copy); return what `restore` needs.

    Without this the weights would sit in memory twice (three times if the model was on the GPU
    before `install`): in the original module and in the store.
    """
    kept = {}
    for name in adapter.tensor_names:
        p = getattr(experts, name)
        kept[name] = (tuple(p.shape), p.dtype, p.device)
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return kept


def restore_expert_weights(adapter, experts: nn.Module, kept: dict[str, tuple], store, moe_index: int) -> None:
    """Re-allocate the weights freed by `release_expert_weights` and copy them back from the store."""
    for name, (shape, dtype, device) in kept.items():
        getattr(experts, name).data = torch.empty(shape, dtype=dtype, device=device)
    with torch.no_grad():
        for e in range(store.num_experts):
            views = adapter.expert_tensors(experts, e)  # views into the re-allocated parameters
            for name, t in store.tensors(moe_index, e).items():
                views[name].copy_(t)
