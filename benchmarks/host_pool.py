"""The pool's round trip on this host: what handing a layer's host experts to hybrid's pool thread costs
beyond computing them on the calling thread (`hybrid="pool"` against `"thread"`, integrate/runtime/host_run.py).

    python -m benchmarks.host_pool [--jobs 3000] [--runs 5] [--threads 1] [--experts 6] [--ops 200000]

On a CPU device the calling thread plays the stream: each job is queued to the pool, computed there (one
tiny op) and waited for on its semaphore, so a job's time is two thread wake-ups, the job's bookkeeping
and the op. Printed: the median µs per job on the thread and on the pool over `--runs` runs, and their
difference, the round trip the simulator's `sim.cpu_handoff_ms` stands for (on a GPU one wake-up is the
driver's host-function thread instead; the GPU check measures that).

Then what the pool's work costs the host thread, which shares the interpreter's lock (GIL) with it: the
host thread runs small ops in a loop (as it launches a layer's kernels) alone, then while the pool
computes layers of `--experts` DeepSeek-V2-Lite experts for one token the whole time (bf16 weights as
the store keeps them), then while a process of its own computes the same (no lock shared: what sharing
the CPU costs by itself). Printed: the loop's µs per op in each case (medians over `--runs`) and the
share of the host thread's time each takes (the simulator's `sim.cpu_host_share`); and the pool's ms
per layer alone and beside the loop, against a plain thread's beside it (no queue, no semaphore), with
the pool's intra-op threads and left at OpenMP's default team, a thread per core, as the pool was before
it set its own (session 26). The pool and the process compute on `--threads`, at most every core
but the host thread's (`HostPool`'s default). Needs a core free for each thread. First, where torch's
OpenMP runtime can be read: the OpenMP count a new thread starts with, and the pool's own.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable

import torch

from benchmarks.cpu_expert import expert_forward, make_experts
from integrate.runtime.host_pool import HostPool, pool_threads
from integrate.runtime.host_run import HostThread
from predictor.cli import positive_int

CPU = torch.device("cpu")


def torch_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (libgomp or libiomp under torch's own directory: scikit-learn may load
    another), to read its per-thread count; None where it cannot be found (not Linux, another backend)."""
    home = os.path.realpath(os.path.dirname(torch.__file__))
    try:
        with open("/proc/self/maps") as f:
            libs = {p for line in f if ("libgomp" in (p := line.split()[-1]) or "libiomp" in p) and p.startswith(home)}
    except OSError:
        return None
    return ctypes.CDLL(libs.pop()) if len(libs) == 1 else None


def openmp_counts(threads: int) -> tuple[int, int] | None:
    """(OpenMP's count in a thread started now, before any torch call; in the pool's thread, which sets its
    own): what oneDNN's kernels use there. None where torch's OpenMP runtime cannot be read."""
    omp = torch_openmp()
    if omp is None:
        return None
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(omp.omp_get_max_threads()))
    t.start()
    t.join()
    pool = HostPool(CPU, CPU, threads)
    try:
        x = torch.zeros(1)
        return fresh[0], int(pool.finish(pool.start(lambda y: y + omp.omp_get_max_threads(), [x], (1,), x.dtype), CPU))
    finally:
        pool.close()


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
    """A layer's host job: `experts` DeepSeek-V2-Lite experts (bf16, as the store keeps them) on one token."""
    weights = make_experts(experts, hidden, inter, torch.bfloat16)
    return lambda x: sum(expert_forward(x, *w) for w in weights)


def _layers(fn, x: torch.Tensor, going: Callable[[], bool], ready=None) -> int:
    """Compute layers back to back while `going()`; `ready` is set after the first. The number done."""
    done = 0
    with torch.inference_mode():
        fn(x)
        if ready is not None:
            ready.set()
        while going():
            fn(x)
            done += 1
    return done


def host_loop_us(ops: int) -> float:
    """µs per small op (a 1 x 2048 add, as a launch-like step of the host thread), over `ops` of them."""
    x, y = torch.ones(1, 2048), torch.empty(1, 2048)
    t0 = time.perf_counter()
    for _ in range(ops):
        torch.add(x, 1, out=y)
    return (time.perf_counter() - t0) / ops * 1e6


def _compute_for(experts: int, seconds: float, threads: int, ready) -> None:
    """In a process of its own (no GIL shared with the host loop): the pool's work for `seconds`."""
    torch.set_num_threads(threads)
    end = time.perf_counter() + seconds
    _layers(expert_layer(experts), torch.randn(1, 2048).bfloat16(), lambda: time.perf_counter() < end, ready)


def _beside_pool(fn, x: torch.Tensor, runs: int, ops: int) -> dict[str, list[float]]:
    """The host loop alone and beside the pool thread, which has more layers queued than the loop lasts
    (checked), and the pool's ms per layer alone and beside the loop."""
    pool, t = HostPool(CPU, CPU), {"alone_us": [], "thread_us": [], "layer_alone_ms": [], "layer_beside_ms": []}
    t["threads"] = [pool.threads]
    try:
        with torch.inference_mode():
            pool.finish(pool.start(fn, [x], x.shape, x.dtype), CPU)  # warm up
            loop_ms = host_loop_us(ops // 10) * ops / 1e3
            for _ in range(runs):
                for _ in range(5):
                    t0 = time.perf_counter()
                    pool.finish(pool.start(fn, [x], x.shape, x.dtype), CPU)
                    t["layer_alone_ms"].append((time.perf_counter() - t0) * 1e3)
                t["alone_us"].append(host_loop_us(ops))
                jobs = [pool.start(fn, [x], x.shape, x.dtype) for _ in range(int(4 * loop_ms / t["layer_alone_ms"][-1]) + 2)]
                t["thread_us"].append(host_loop_us(ops))
                if jobs[-1].done:
                    warnings.warn("the pool ran out of work before the host loop ended: its share is understated", stacklevel=2)
                t["layer_beside_ms"].append(t["thread_us"][-1] * ops / 1e3 / max(sum(job.done for job in jobs), 1))
                for job in jobs:
                    pool.finish(job, CPU)
    finally:
        pool.close()
    return t


def _plain_thread_ms(fn, x: torch.Tensor, ops: int, threads: int | None) -> float:
    """ms per layer (the loop's time over the layers done in it, as for the pool) of a plain thread (no
    queue, no semaphore) computing layers back to back beside the host loop, on `threads` intra-op threads
    (None: as a new thread starts, OpenMP's default team)."""
    stop, started, done = threading.Event(), threading.Event(), []

    def work():
        if threads is not None:
            torch.set_num_threads(threads)
        done.append(_layers(fn, x, lambda: not stop.is_set(), started))

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    try:
        loop_ms = host_loop_us(ops) * ops / 1e3
    finally:
        stop.set()
        worker.join()
    return loop_ms / max(done[0], 1)  # (counting the layer in flight when the loop ended)


def contention(experts: int, runs: int, ops: int = 200_000) -> dict[str, float]:
    """Medians over `runs`: the host loop's µs per op alone, while the pool thread computes layers of
    `experts` experts the whole time, and while a process computes them on as many intra-op threads (the
    same work, no GIL shared; busier than the pool thread, which also waits for the lock: an upper bound
    on the hardware's part); the pool's ms per layer alone and beside the loop, and a plain thread's beside
    it on the pool's intra-op threads and on OpenMP's default team."""
    x, fn = torch.randn(1, 2048).bfloat16(), expert_layer(experts)
    t = _beside_pool(fn, x, runs, ops)
    threads = t["threads"][0]
    t["plain_beside_ms"] = [_plain_thread_ms(fn, x, ops, threads) for _ in range(runs)]
    t["default_beside_ms"] = [_plain_thread_ms(fn, x, ops, None) for _ in range(runs)]
    loop_s = statistics.median(t["alone_us"]) * ops / 1e6
    spawn, t["process_us"] = mp.get_context("spawn"), []
    for _ in range(runs):
        ready = spawn.Event()
        worker = spawn.Process(target=_compute_for, args=(experts, 2 * loop_s + 1, threads, ready), daemon=True)
        worker.start()
        while not ready.wait(0.2):
            if not worker.is_alive():
                raise RuntimeError(f"the reference process exited with code {worker.exitcode} before computing")
        t["process_us"].append(host_loop_us(ops))
        worker.join()
    return {k: statistics.median(v) for k, v in t.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_pool", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=positive_int, default=3000)
    ap.add_argument("--runs", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch's intra-op threads")
    ap.add_argument("--experts", type=positive_int, default=6, help="experts per pool layer")
    ap.add_argument("--ops", type=positive_int, default=200_000, help="small ops in each host loop")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # it needs a core free for each thread: say how busy the machine was
    print(f"{os.cpu_count()} cores, load average {load:.2f} over the last minute at the start")
    times = measure(args.jobs, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>6}: {med[k]:.1f} µs per job (median of {args.runs} runs, range {min(v):.1f}-{max(v):.1f})")
    print(f"the pool's round trip: {med['pool'] - med['thread']:.1f} µs per job")
    counts = openmp_counts(pool_threads())
    if counts is not None:  # what oneDNN's bf16 matmul computes on in each
        print(f"OpenMP threads: {counts[0]} in a new thread (torch's count {torch.get_num_threads()}), "
              f"{counts[1]} in the pool's, which sets its own")
    c = contention(args.experts, args.runs, args.ops)
    lost = lambda us: 1 - c["alone_us"] / us  # noqa: E731  (the share of the host thread's time lost)
    print(f"host loop: {c['alone_us']:.2f} µs per op alone; beside the pool thread computing {args.experts} experts a "
          f"layer {c['thread_us']:.2f} µs ({lost(c['thread_us']):.0%} of its time lost); beside a process doing the "
          f"same {c['process_us']:.2f} µs ({lost(c['process_us']):.0%})")
    print(f"the pool ({c['threads']:.0f} intra-op threads): {c['layer_alone_ms']:.1f} ms a layer alone, "
          f"{c['layer_beside_ms']:.1f} ms beside the host loop; a plain thread computing layers back to back beside "
          f"it: {c['plain_beside_ms']:.1f} ms a layer, {c['default_beside_ms']:.1f} ms on OpenMP's default team")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
