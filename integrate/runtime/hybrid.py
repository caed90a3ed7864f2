"""Hybrid execution of misses: compute a routed expert on the host CPU, from the host store, when that
finishes before its copy would land (llama.cpp's `--n-cpu-moe` and kTransformers run MoE this way).

The decision is the simulator's (`predictor.simulate.policy.cpu_is_faster`), with the runtime's own
figures: the copy lands after the prefetches already on the link plus its own transfer; the CPU is done
after one expert's host time. On a CPU device the store already sits in the memory the model computes
from, so a miss is never worth a copy: it always runs from the store (no transfer at all).

Where the host's experts compute, `run`: on the calling thread ("thread") or on a pool thread of their own
in the stream's order ("pool"), integrate/runtime/host_run.py. The rule is the same for both; the expert
is timed where it will run (the pool computes on its own intra-op threads, one core fewer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from integrate.adapters import experts_implementation
from integrate.runtime.host_pool import HostPool, check_threads, pool_threads
from integrate.runtime.host_run import HOST_RUNS
from integrate.runtime.interrupts import deferred_interrupt
from predictor.simulate.policy import cpu_is_faster


@dataclass(frozen=True)
class HybridRule:
    link_gbps: float | None = None  # host -> device bandwidth (GB/s); None on a CPU device
    cpu_expert_ms: float = 0.0  # one routed expert (one token) on the host CPU
    run: str = "thread"  # where the host's experts compute (host_run.HOST_RUNS)
    threads: int | None = None  # the pool's intra-op threads (None: host_pool.pool_threads())

    def __post_init__(self):
        if self.run not in HOST_RUNS:
            raise ValueError(f"hybrid run {self.run!r}: choose from {sorted(HOST_RUNS)}")
        check_threads(self.threads)

    def host_first(self, copies_ahead: int, expert_bytes: int, host_ahead: int = 0) -> bool:
        """Run this miss on the host? Its copy lands after the `copies_ahead` already on the link and its
        own; the host finishes it after the `host_ahead` experts it already runs for this layer and it."""
        if self.link_gbps is None:  # CPU device: the store is where the compute is
            return True
        copy_land_s = (copies_ahead + 1) * expert_bytes / (self.link_gbps * 1e9)
        return bool(cpu_is_faster(copy_land_s, (host_ahead + 1) * self.cpu_expert_ms / 1e3))


def measure_rule(cache, adapter, experts_module, hidden_size: int, repeats: int = 5, run: str = "thread",
                 threads: int | None = None) -> HybridRule:  # fmt: skip
    """Time one expert copy into a slot and one expert's math on the host (one token), on this machine."""
    if not cache.cuda:
        return HybridRule(run=run, threads=threads)
    store, slot = cache.store, cache.pool.buffer[0]
    torch.cuda.synchronize(cache.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        slot.copy_(store.buffer(0, 0), non_blocking=True)
    torch.cuda.synchronize(cache.device)
    link_gbps = repeats * store.expert_bytes / (time.perf_counter() - t0) / 1e9
    t = store.tensors(0, 0)
    x = torch.randn(1, hidden_size, dtype=next(iter(t.values())).dtype)
    index, weights = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=x.dtype)
    if experts_implementation(experts_module) == "batched_mm":  # its own call over the store's layer
        ids = torch.arange(store.num_experts)
        call = partial(adapter.routed_pool_batched, experts_module, x, index, weights, ids, store.layer_views(0))
    else:
        call = partial(adapter.routed_forward, experts_module, x, index, weights, lambda e: t)
    return HybridRule(link_gbps, host_ms(call, run, repeats, threads), run, threads)


def host_ms(call, run: str, repeats: int, threads: int | None = None) -> float:
    """ms per `call()` after a warm-up, timed where `run` computes the host's experts (`where_it_runs`)."""

    def timed() -> float:
        call()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - t0) / repeats * 1e3

    return where_it_runs(timed, run, threads)


def where_it_runs(timing: Callable[[], float], run: str, threads: int | None = None) -> float:
    """`timing()` on the thread where `run` computes the host's experts: this one, or a pool's, with the
    pool's intra-op threads (`threads`; None: its default)."""
    if run != "pool":
        return timing()
    cpu = torch.device("cpu")
    pool = HostPool(cpu, cpu, threads)
    try:
        job = pool.start(lambda: torch.tensor([timing()], dtype=torch.float64), [], (1,), torch.float64)
        return pool.finish(job, cpu).item()
    finally:
        pool.close()


class HybridHost:
    """Where the hybrid rule's host experts compute, for the cache: made on first use, remade when the
    rule changes where (or, for the pool, on how many threads), settled and ended with it. A mixin of ExpertCache
    (integrate/runtime/cache.py), whose `hybrid`, `_host_run`, `_host_rule` (the rule it was made for),
    `device` and `store` it uses."""

    def check_host_run(self) -> None:
        """Raise what hybrid's pool raised; call it once the stream has run the step (every wait then ran)."""
        if self._host_run is not None:
            self._host_run.check(wait=True)

    def close_host_run(self) -> None:
        """Wait for hybrid's pool and the stream's waits on it, then end its thread (an uncollected failure
        warns; the thread ends even when settling raises: a warning made an error, a CUDA error)."""
        run, self._host_run = self._host_run, None
        if run is not None:
            with deferred_interrupt():  # a Ctrl-C waits: the stream may still wait on the jobs' semaphores
                try:
                    run.settle()
                finally:
                    run.close()

    @property
    def host_run(self):
        """Where the hybrid rule's host experts compute (`HybridRule.run`: host_run.HOST_RUNS)."""
        if self._host_run is not None and self._host_rule is self.hybrid:  # the hot path: twice a hybrid layer
            return self._host_run
        run = self.hybrid.run if self.hybrid is not None else "thread"
        threads = getattr(self.hybrid, "threads", None)
        if threads is None and run == "pool":
            threads = pool_threads()  # the count the rule was timed on (`HybridRule.threads`: None, the default)
        now = self._host_run
        if now is None or now.name != run or now.threads != threads:
            self.close_host_run()  # its jobs and the stream's waits on them done first (a new rule: a new pool)
            self._host_run = HOST_RUNS[run](self.device, self.store.arena.device, threads)
        self._host_rule = self.hybrid
        return self._host_run
