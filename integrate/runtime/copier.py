"""Host -> device expert copies.

CUDA: two dedicated copy streams, one for demand loads (highest stream priority) and one for
prefetches, so a demand load never queues behind prefetches already on the prefetch stream. Every
copy call moves a batch (a layer's demand misses, or the prefetches issued together): it first waits
(on the device, not the host) for the events that guard its destination slots, and records one event
that compute waits on. CPU: a plain synchronous copy, no events.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Copier:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            _, high = torch.cuda.Stream.priority_range()
            self.demand_stream = torch.cuda.Stream(device, priority=high)
            self.prefetch_stream = torch.cuda.Stream(device)

    def copy(
        self,
        dst: list[torch.Tensor],
        src: list[torch.Tensor],
        demand: bool,
        after: Iterable[torch.cuda.Event | None] = (),
    ) -> torch.cuda.Event | None:
        """Copy every `src[i]` (host) into `dst[i]` (a slot) once every event in `after` has fired, in one
        call (`torch._foreach_copy_`: one dispatch for the batch, not one Python `copy_` per expert);
        return one event that fires when the whole batch has landed."""
        if not self.cuda:
            torch._foreach_copy_(dst, src)
            return None
        stream = self.demand_stream if demand else self.prefetch_stream
        for ev in after:
            if ev is not None:
                stream.wait_event(ev)
        with torch.cuda.stream(stream):
            torch._foreach_copy_(dst, src, non_blocking=True)  # async only because src is pinned
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def synchronize(self) -> None:
        """Wait for every copy issued so far (before their buffers are freed: a copy stream is not the
        stream the caching allocator tracks them on)."""
        if self.cuda:
            self.demand_stream.synchronize()
            self.prefetch_stream.synchronize()
