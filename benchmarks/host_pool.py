"""The pool's round trip on this host: what handing a layer's host experts to hybrid's pool thread costs
beyond computing them on the calling thread (`hybrid="pool"` against `"thread"`, integrate/runtime/host_run.py).

    python -m benchmarks.host_pool [--jobs 3000] [--runs 5] [--threads 1]

On a CPU device the calling thread plays the stream: each job is queued to the pool, computed there (one
tiny op) and waited for on its semaphore, so a job's time is two thread wake-ups, the job's bookkeeping
and the op. Printed: the median µs per job on the thread and on the pool over `--runs` runs, and their
difference, the round trip the simulator's `sim.cpu_handoff_ms` stands for (on a GPU one wake-up is the
driver's host-function thread instead; the GPU check measures that).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_pool", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=positive_int, default=3000)
    ap.add_argument("--runs", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch's intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    times = measure(args.jobs, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>6}: {med[k]:.1f} µs per job (median of {args.runs} runs, range {min(v):.1f}-{max(v):.1f})")
    print(f"the pool's round trip: {med['pool'] - med['thread']:.1f} µs per job")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
