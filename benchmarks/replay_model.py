"""The model a trace replay (benchmarks/bench_replay.py) runs: random full-size experts in the runtime's
host store, a dense stand-in per layer on the device, routing forced from a recorded trace.

Per layer, as the runtime's grouped path (integrate/runtime/offloaded_experts.py) runs it:
  dense stand-in (attention + shared experts: two matmuls, plus `dense_ms` of fixed device time),
  the router's readback (the one device -> host sync per layer the routing needs; with a prefetch
  driver, the driver's readback of the routing, which a layer_ahead predictor's picks share),
  the hybrid split (`ExpertCache.split_host`: misses the host CPU finishes before their copy lands),
  the device experts resident in slots at once (`fetch_group`) and computed in one grouped GEMM per
  matrix over the slot pool (`torch._grouped_mm`, rows grouped by slot), while the host computes its
  experts from the pinned store; their sum joins the device result.
`grouped=False` keeps the old path (one `fetch` and four launches per expert) for comparison.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.replay_data import ReplayData
from integrate.grouping import WINDOWS_FROM, pool_windows, span_window
from integrate.runtime.cache import ExpertCache
from integrate.runtime.prefetcher import Prefetcher
from integrate.runtime.store import ExpertLayout, ExpertStore


class OraclePrefetcher(Prefetcher):
    """Prefetch the token's true experts before its forward (perfect token-ahead prediction): the
    schedule the same cache settings reach when the prediction is the true routing."""

    def __init__(self, cache: ExpertCache, num_layers: int, top_k: int):
        super().__init__(cache, num_layers, top_k)
        self.truth: np.ndarray | None = None  # (L, k), set by the replay loop before begin_step

    def begin_step(self, token_ids: torch.Tensor, padding=None) -> None:
        super().begin_step(token_ids, padding)
        keys = [(layer, int(e)) for layer in range(self.num_layers) for e in self.truth[layer]]
        self.cache.pool.predict(keys, replace=True)
        for layer in range(self.num_layers):  # certain: for the learned eviction, probability 1
            self.cache.pool.learn(layer, [int(e) for e in self.truth[layer]], [1.0] * self.top_k)
        self.cache.prefetch(keys)


def cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles of `torch.cuda._sleep` per millisecond, measured once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (n, in) rows grouped by offs, w (G, in, out): torch's grouped GEMM where it runs (CUDA bf16),
    else the same product one group at a time (CPU tests, where speed is not measured)."""
    if x.is_cuda:
        return torch._grouped_mm(x, w, offs=offs)
    out, start = x.new_empty(len(x), w.shape[-1]), 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


class ReplayModel:
    """Random full-size experts in a host store, plus per-layer dense stand-in weights on the device."""

    def __init__(
        self, data: ReplayData, device: torch.device, dtype: torch.dtype, dense_mb: float, seed: int = 0,
        grouped: bool = True,
    ):
        self.data, self.device, self.dtype, self.grouped = data, device, dtype, grouped
        L, E, H, inter = data.num_layers, data.num_experts, data.hidden, data.intermediate
        gen = torch.Generator(device=device).manual_seed(seed)
        # gate and up stored stacked as one [2I, H] matrix (as transformers does): one matmul for both
        example = {
            "gate_up": torch.empty(2 * inter, H, dtype=dtype),
            "down": torch.empty(H, inter, dtype=dtype),
        }
        self.store = ExpertStore(ExpertLayout(example), L, E)
        per_layer = E * self.store.expert_bytes // torch.empty((), dtype=dtype).element_size()
        layer_bytes = E * self.store.expert_bytes
        # random weights made on the device, one layer at a time (fast even for 28.8 GB)
        for layer in range(L):
            w = torch.randn(per_layer, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
            self.store.arena[layer * layer_bytes : (layer + 1) * layer_bytes].copy_(w.view(torch.uint8))
        d = max(1, int(dense_mb * 2**20 / (2 * H * torch.empty((), dtype=dtype).element_size())))
        self.dense = (
            [
                (
                    torch.randn(d, H, generator=gen, device=device).mul_(H**-0.5).to(dtype),
                    torch.randn(H, d, generator=gen, device=device).mul_(d**-0.5).to(dtype),
                )
                for _ in range(L)
            ]
            if dense_mb > 0
            else []
        )
        self.cycles_per_ms = cycles_per_ms(device) if device.type == "cuda" else 0.0
        self.busy_cycles = 0.0  # per layer; set by bench() from dense_ms
        self.router = torch.randn(E, H, generator=gen, device=device).to(dtype)
        self.inputs = torch.randn(64, 1, H, generator=gen, device=device).to(dtype)

    @staticmethod
    def expert(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
        """One routed expert (SwiGLU) on x (n, H), wherever its weights are."""
        gate, up = F.linear(x, w["gate_up"]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w["down"])

    def token(
        self, cache: ExpertCache, driver: Prefetcher | None, token_id: int, experts: np.ndarray, t: int
    ):
        """One decode step of one token; experts (L, k) forced from the trace."""
        x = self.inputs[t % len(self.inputs)]
        if driver is not None:
            driver.begin_step(torch.tensor([[token_id]]))  # (B, S) = one sequence, one token
        for layer in range(self.data.num_layers):
            if self.dense:
                w1, w2 = self.dense[layer]
                x = x + F.linear(F.silu(F.linear(x, w1)), w2)
            if self.busy_cycles:  # fixed device time standing in for attention kernels (no host cost)
                torch.cuda._sleep(int(self.busy_cycles))
            choice = F.linear(x, self.router).argmax()  # the router's work (its choice is forced from the trace)
            if driver is None:
                int(choice)  # SYNC POINT, deliberately: the real router's decision reaches the host every layer
            else:  # the routing born on the device, as a real router's: the driver's readback is the layer's sync
                # (a layer_ahead predictor beside it reads its picks back in the same one)
                driver.routed(layer, torch.from_numpy(experts[layer]).view(1, -1).to(self.device, non_blocking=True))
            routed = sorted(set(experts[layer].tolist()))
            y = self.routed(cache, layer, x, routed) if self.grouped else self.one_by_one(cache, layer, x, routed)
            cache.end_layer(layer)
            if driver is not None:
                driver.layer_done(layer)
            x = F.rms_norm(x + y / self.data.top_k, (x.shape[-1],))
        if driver is not None:
            driver.end_step()
        cache.end_step()
        return x

    def one_by_one(self, cache: ExpertCache, layer: int, x: torch.Tensor, routed: list[int]) -> torch.Tensor:
        y = torch.zeros_like(x)
        with cache.layer_routing(layer, routed):  # as the runtime's eager path: no miss evicts another of them
            for e in routed:
                y.add_(self.expert(x, cache.fetch(layer, e)))
        return y

    def routed(self, cache: ExpertCache, layer: int, x: torch.Tensor, routed: list[int]) -> torch.Tensor:
        """The layer's routed experts: device ones in one grouped call per matrix over the slot pool,
        host ones (hybrid) on the CPU meanwhile; x (1, H), returns the sum of their outputs (1, H)."""
        host, on_device = cache.split_host(layer, routed)
        y = torch.zeros_like(x)
        job = None
        if host:  # started before the device's experts are queued (on the thread: the hidden state's readback,
            # a SYNC POINT; read after them, it would wait for their copies and serialise host and device, as
            # the first H200 run did: docs/RESULTS.md), computed while the GPU runs them (`cache.host_run`)
            views = cache.store.layer_views(layer)
            job = cache.host_run.start(
                lambda xh: sum(self.expert(xh, {n: v[e] for n, v in views.items()}) for e in host), [x], x.shape, x.dtype
            )
        if on_device:
            slots = cache.fetch_group(layer, on_device)
            if slots is None:  # more experts than the layer's slots: one at a time
                y = self.one_by_one(cache, layer, x, on_device)
            else:
                y = self.pool_experts(x, slots, cache.pool_views(), cache.pool.num_slots)
        if host:
            cache.fetch_host_group(layer, host)  # each access counts as a miss run on the host
            y = y + cache.host_run.finish(job, x.device)
        return y

    @staticmethod
    def pool_experts(x: torch.Tensor, slots: list[int], pool: dict, num_slots: int) -> torch.Tensor:
        """Sum over `slots` of each slot's expert on x (1, H): one grouped GEMM per matrix over all the
        used slots' span, or, for a pool above WINDOWS_FROM slots, per window of the used ones
        (`pool_windows`), as the runtime does."""
        one = num_slots <= WINDOWS_FROM
        windows = span_window(slots, len(slots), num_slots) if one else pool_windows([(s, 1) for s in slots])
        windows = windows or [(0, num_slots, 0, len(slots))]
        slots = sorted(slots)
        out = 0
        for lo, hi, r0, r1 in windows:
            rows = [s - lo for s in slots[r0:r1]]
            offs = torch.from_numpy(np.cumsum(np.bincount(rows, minlength=hi - lo)).astype(np.int32))
            offs = offs.to(x.device, non_blocking=True)
            xs = x.expand(r1 - r0, -1).contiguous()  # (n, H): one row per routed expert
            gate, up = grouped_mm(xs, pool["gate_up"][lo:hi].transpose(-2, -1), offs).chunk(2, dim=-1)  # (n, I)
            down = grouped_mm(F.silu(gate) * up, pool["down"][lo:hi].transpose(-2, -1), offs)  # (n, H)
            out = out + down.sum(0, keepdim=True)
        return out


def host_expert_ms(model: ReplayModel, repeats: int = 16) -> float:
    """One routed expert of one token on the host CPU, from the store (a different expert each time, so
    the weights come from memory, as a miss's would), with torch's intra-op threads: the median."""
    x = model.inputs[0].to("cpu")
    L, E = model.store.num_layers, model.store.num_experts
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):  # the first two warm the threads up
            t0 = time.perf_counter()
            model.expert(x, model.store.tensors(i % L, (7 * i + 1) % E))
            times.append(time.perf_counter() - t0)
    return float(sorted(times[2:])[len(times[2:]) // 2]) * 1e3


def h2d_gbps(store: ExpertStore, device: torch.device, n: int = 32) -> float:
    """Measured host -> device bandwidth for expert-sized copies (the transfer cost behind every miss)."""
    dst = torch.empty(store.expert_bytes, dtype=torch.uint8, device=device)
    dst.copy_(store.buffer(0, 0), non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(n):
        dst.copy_(store.buffer(0, i % store.num_experts), non_blocking=True)
    torch.cuda.synchronize(device)
    return n * store.expert_bytes / (time.perf_counter() - t0) / 1e9
