"""Where a hybrid layer's host-run experts compute (`install(hybrid=...)`, `HybridRule.run`), by name:

thread  on the calling thread, once the device's experts are queued (torch's intra-op threads). The host
        thread launches nothing meanwhile: on a host-bound step, where every launch costs host time (the
        `h100_replay` preset), their time adds to the step's (docs/RESULTS.md, session 22).
pool    on a thread of its own, in the device stream's order (host_pool.py): the host thread goes on to the
        next layer's launches at once, and the stream, not the host, waits for the pool's outputs.
Both compute the same call on the same inputs under the caller's grad, inference and host autocast modes:
equal outputs to the bit (the pool's carry no autograd history). One exception: on CUDA under host
autocast the pool's terms come back in the buffer's wider dtype (`HostPool.start`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from integrate.runtime.host_pool import HostPool


class HostThread:
    """The host-run experts on the calling thread, after the device's part is queued."""

    name = "thread"

    def __init__(self, device: torch.device, host: torch.device, threads: int | None = None):
        self.device, self.host = device, host
        self.threads = threads  # as asked, unused: the pool's setting; the calling thread keeps torch's count

    def start(self, fn: Callable, inputs: Sequence[torch.Tensor], out_shape, out_dtype):
        # SYNC POINT (device -> host), before the device's part is queued, so that the two run side by side
        return fn, [t.to(self.host) for t in inputs]

    def finish(self, job, device: torch.device) -> torch.Tensor:
        fn, inputs = job
        return fn(*inputs).to(device, non_blocking=True)  # (from pageable memory: staged, no stream sync)

    def check(self, wait: bool = False) -> None:  # nothing runs elsewhere: nothing to raise, settle or close
        pass

    settle = close = check


HOST_RUNS = {c.name: c for c in (HostThread, HostPool)}
