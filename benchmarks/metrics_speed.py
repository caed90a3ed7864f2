"""What the evaluation's per-scorer work costs on one batch: `ExpertMetrics.update` with the compiled
counting pass and with the torch broadcast (the path other devices take), and the simulator's top-12
candidates by `top_stable` against the stable argsort it replaced.

    python -m benchmarks.metrics_speed [--rows 4096] [--threads 1] [--repeats 5]

A synthetic DeepSeek-V2-Lite-shaped batch (rows x 26 layers x 64 experts, 6 true experts per row,
half the scores tied at zero, as a count-based baseline's are); best of `--repeats`, after a warm-up
that compiles the numba passes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up (numba compilation, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    import predictor.metrics as pm
    from predictor.metrics import ExpertMetrics
    from predictor.metrics_counts import rank_counts
    from predictor.simulate.top import top_stable

    ap = argparse.ArgumentParser(prog="python -m benchmarks.metrics_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if min(args.rows, args.threads, args.repeats) < 1:
        ap.error("--rows, --threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    N, L, E, k = args.rows, 26, 64, 6
    rng = np.random.default_rng(0)
    s = rng.random((N, L, E), dtype=np.float32)
    s[s < 0.5] = 0  # ties, as a count-based baseline has
    experts = torch.from_numpy(np.argsort(rng.random((N, L, E)), -1)[..., :k])
    scores, probs = torch.from_numpy(s), torch.from_numpy(s / (1 + s))

    def update():
        ExpertMetrics(L, E, k, ks=(k, 2 * k)).update(scores, experts, torch.arange(N), probs=probs)

    compiled = best_ms(update, args.repeats)
    original = pm.rank_counts
    pm.rank_counts = lambda *a: rank_counts(*a, compiled=False)
    try:
        broadcast = best_ms(update, args.repeats)
    finally:
        pm.rank_counts = original
    top = best_ms(lambda: top_stable(s, 12), args.repeats)
    argsort = best_ms(lambda: np.argsort(-s, axis=-1, kind="stable")[..., :12], args.repeats)
    print(f"{N} rows x {L} layers x {E} experts, {args.threads} thread(s), best of {args.repeats}")
    print(f"ExpertMetrics.update: compiled {compiled:.1f} ms, torch broadcast {broadcast:.1f} ms "
          f"({broadcast / compiled:.1f}x)")
    print(f"top-12 candidates: top_stable {top:.1f} ms, stable argsort {argsort:.1f} ms ({argsort / top:.1f}x)")
    return 0


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
