"""The pool's round trip on this host: what handing a layer's host experts to hybrid's pool thread costs
beyond computing them on the calling thread (`hybrid="pool"` against `"thread"`, integrate/runtime/host_run.py).

    python -m benchmarks.host_pool [--jobs 3000] [--runs 5] [--threads 1] [--layer-jobs 40 --experts 6]

On a CPU device the calling thread plays the stream: each job is queued to the pool, computed there (one
tiny op) and waited for on its semaphore, so a job's time is two thread wake-ups, the job's bookkeeping
and the op. Printed: the median µs per job on the thread and on the pool over `--runs` runs, and their
difference, the round trip the simulator's `sim.cpu_handoff_ms` stands for (on a GPU one wake-up is the
driver's host-function thread instead; the GPU check measures that).

Then what the pool's work costs the host thread, which shares the interpreter's lock (GIL) with it: the
host thread runs small ops in a loop (as it launches a layer's kernels) alone, then while the pool
computes `--layer-jobs` layers of `--experts` DeepSeek-V2-Lite experts for one token (bf16 weights as the
store keeps them, torch releasing the GIL inside each op). Printed: the loop's µs per op alone and beside
the pool (median over `--runs`), and the host time lost per pool layer; the simulator charges none.
Needs a core free for each thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from integrate.runtime.host_run import HostPool, HostThread
from predictor.cli import positive_int

CPU = torch.device("cpu")


def per_job_us(run, jobs: int, x: torch.Tensor) -> float:
    """Mean µs of start + finish of a one-op job, after 200 to warm up."""
    fn = lambda h: h + 1  # noqa: E731
    for _ in range(200):
        run.finish(run.start(fn, [x], x.shape, x.dtype), CPU)
    t0 = time.perf_counter()
    for _ in range(jobs):
        run.finish(run.start(fn, [x], x.shape, x.dtype), CPU)
    return (time.perf_counter() - t0) / jobs * 1e6


def measure(jobs: int, runs: int) -> dict[str, list[float]]:
    """µs per job on the thread and on the pool, `runs` times each, in turn (so both see the same load)."""
    x = torch.ones(1, 2048)  # one token's hidden state (DeepSeek-V2-Lite's width)
    thread, pool = HostThread(CPU, CPU), HostPool(CPU, CPU)
    times = {"thread": [], "pool": []}
    for _ in range(runs):
        times["thread"].append(per_job_us(thread, jobs, x))
        times["pool"].append(per_job_us(pool, jobs, x))
    pool.close()
    return times


def expert_layer(experts: int, hidden: int = 2048, inter: int = 1408):
    """A layer's host job: `experts` experts (gate and up stacked, down; bf16) applied to one token."""
    gate_up = [torch.randn(2 * inter, hidden).mul_(0.02).bfloat16() for _ in range(experts)]
    down = [torch.randn(hidden, inter).mul_(0.02).bfloat16() for _ in range(experts)]

    def run(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for gu, d in zip(gate_up, down):
            g, u = F.linear(x, gu).chunk(2, dim=-1)
            out += F.linear(F.silu(g) * u, d)
        return out

    return run


def host_loop_us(ops: int) -> float:
    """µs per small op (a 1 x 2048 add, as a launch-like step of the host thread), over `ops` of them."""
    x, y = torch.ones(1, 2048), torch.empty(1, 2048)
    t0 = time.perf_counter()
    for _ in range(ops):
        torch.add(x, 1, out=y)
    return (time.perf_counter() - t0) / ops * 1e6


def contention(layer_jobs: int, experts: int, runs: int) -> dict[str, float]:
    """The host loop's µs per op alone and while the pool computes `layer_jobs` layers, the pool's ms per
    layer, and the host µs lost per layer the pool ran during the loop (medians over `runs`)."""
    pool, fn = HostPool(CPU, CPU), expert_layer(experts)
    x = torch.randn(1, 2048).bfloat16()
    with torch.inference_mode():
        pool.finish(pool.start(fn, [x], x.shape, x.dtype), CPU)  # warm up
        t0 = time.perf_counter()
        pool.finish(pool.start(fn, [x], x.shape, x.dtype), CPU)
        layer_ms = (time.perf_counter() - t0) * 1e3
        ops = max(1000, int(1.5 * layer_jobs * layer_ms * 1e3 / host_loop_us(2000)))  # past the pool's busy time
        alone, beside, lost, busy = [], [], [], []
        for _ in range(runs):
            alone.append(host_loop_us(ops))
            t0 = time.perf_counter()
            jobs = [pool.start(fn, [x], x.shape, x.dtype) for _ in range(layer_jobs)]
            beside.append(host_loop_us(ops))
            done = sum(job.done for job in jobs)  # the layers the loop ran beside
            for job in jobs:
                pool.finish(job, CPU)
            busy.append((time.perf_counter() - t0) * 1e3 / layer_jobs)
            lost.append((beside[-1] - alone[-1]) * ops / max(done, 1))
    pool.close()
    return {"alone_us": statistics.median(alone), "beside_us": statistics.median(beside),
            "layer_ms": statistics.median(busy), "lost_us_per_layer": statistics.median(lost)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_pool", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=positive_int, default=3000)
    ap.add_argument("--runs", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch's intra-op threads")
    ap.add_argument("--layer-jobs", type=positive_int, default=40, help="pool layers beside the host loop")
    ap.add_argument("--experts", type=positive_int, default=6, help="experts per pool layer")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    times = measure(args.jobs, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>6}: {med[k]:.1f} µs per job (median of {args.runs} runs, range {min(v):.1f}-{max(v):.1f})")
    print(f"the pool's round trip: {med['pool'] - med['thread']:.1f} µs per job")
    c = contention(args.layer_jobs, args.experts, args.runs)
    print(f"host loop: {c['alone_us']:.2f} µs per op alone, {c['beside_us']:.2f} beside the pool computing "
          f"{args.experts} experts a layer ({c['layer_ms']:.2f} ms a layer): "
          f"{c['lost_us_per_layer']:.1f} µs of host time lost per pool layer")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
