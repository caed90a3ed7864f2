"""Host expert store: each expert's tensors packed into one contiguous host buffer.

All buffers are slices of one arena allocation: pinned when CUDA is available (so copies to the
GPU are true async DMA), plain host memory otherwise. One arena instead of one pinned allocation
per expert because PyTorch's pinned allocator rounds every request up to a power of two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ALIGN = 256  # bytes; keeps every tensor view aligned for any dtype and for fast DMA


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the start of the expert's buffer
    nbytes: int


class ExpertLayout:
    """Where each named tensor of one expert lies inside the expert's flat byte buffer."""

    def __init__(self, example: dict[str, torch.Tensor]):
        entries, offset = [], 0
        for name, t in example.items():
            nbytes = t.numel() * t.element_size()
            entries.append(Entry(name, tuple(t.shape), t.dtype, offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.entries = entries
        self.nbytes = offset

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed tensor views into a flat uint8 buffer (host or a GPU slot); no copy."""
        return {e.name: buf[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries}

    def pool_views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into every row of a [rows, slot_bytes] uint8 buffer at once: name -> (rows, *shape)."""
        return {e.name: buf[:, e.offset : e.offset + e.nbytes].view(e.dtype).view(len(buf), *e.shape)
                for e in self.entries}

    def pack(self, tensors: dict[str, torch.Tensor], buf: torch.Tensor) -> None:
        views = self.views(buf)
        for e in self.entries:
            t = tensors[e.name]
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise ValueError(
                    f"expert tensor {e.name}: got {tuple(t.shape)} {t.dtype}, layout has {e.shape} {e.dtype}"
                )
            views[e.name].copy_(t)


class ExpertStore:
    """All routed experts of a model in host memory: `buffer(layer, expert)` is one contiguous uint8 tensor."""

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, pin: bool | None = None):
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pinned = torch.cuda.is_available() if pin is None else pin
        total = num_layers * num_experts * layout.nbytes
        self.arena = torch.empty(total, dtype=torch.uint8, pin_memory=self.pinned)

    @property
    def expert_bytes(self) -> int:
        return self.layout.nbytes

    def buffer(self, layer: int, expert: int) -> torch.Tensor:
        start = (layer * self.num_experts + expert) * self.layout.nbytes
        return self.arena[start : start + self.layout.nbytes]

    def tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self.layout.views(self.buffer(layer, expert))

    def layer_views(self, layer: int) -> dict[str, torch.Tensor]:
        """Typed views over all of a layer's experts at once: name -> (num_experts, *shape); no copy."""
        rows = self.arena.view(self.num_layers, self.num_experts, self.layout.nbytes)[layer]
        return self.layout.pool_views(rows)

    @classmethod
    def from_experts(
        cls,
        get: Callable[[int, int], dict[str, torch.Tensor]],
        num_layers: int,
        num_experts: int,
        pin: bool | None = None,
    ) -> ExpertStore:
        """Copy every expert's tensors, `get(layer, expert)`, into a new store."""
        store = cls(ExpertLayout(get(0, 0)), num_layers, num_experts, pin)
        for layer in range(num_layers):
            for e in range(num_experts):
                store.layout.pack(get(layer, e), store.buffer(layer, e))
        return store
