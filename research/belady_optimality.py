"""How often does the simulator's Belady (no prefetch) miss the most hits any eviction can make, with
k experts per step? Random small traces against the exhaustive search (predictor/simulate/reference.py).

    python research/belady_optimality.py [--traces 400] [--seed 0]

One MoE layer, E in 4..6 experts, k in 2..3 per step, 6..9 steps, slots k .. min(E - 1, k + 2); hits
only (a time model where copies cost time but never change hits). Prints the cells short of the
optimum and the first few of them.
"""

from __future__ import annotations

import argparse

import numpy as np

from predictor.simulate import TimeModel, build_accesses, simulate
from predictor.simulate.reference import brute_optimum
from predictor.traces import TraceRecord

TIME = TimeModel(expert_bytes=1_000_000, bandwidth_GBps=1.0, compute_ms_per_layer=0.5, max_inflight=10**6)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    short, cells = [], 0
    for i in range(args.traces):
        rng = np.random.default_rng(args.seed + i)
        E, k, T = int(rng.integers(4, 7)), int(rng.integers(2, 4)), int(rng.integers(6, 10))
        experts = np.array([[sorted(rng.choice(E, k, replace=False))] for _ in range(T)])  # (T, 1, k)
        acc = build_accesses([TraceRecord(0, np.arange(T), experts, T)], 1, E, k)
        rows = [tuple(r) for r in acc.keys.tolist()]
        for slots in range(k, min(E, k + 3)):
            cells += 1
            best, got = brute_optimum(rows, slots), simulate(acc, TIME, "belady", slots / E).hits
            if got != best:
                short.append((args.seed + i, E, k, slots, got, best, rows))
    print(f"Belady short of the optimum in {len(short)} of {cells} cells ({args.traces} traces)")
    for seed, E, k, slots, got, best, rows in short[:5]:
        print(f"  seed {seed}: E {E}, k {k}, {slots} slots: {got} hits, optimum {best}; steps {rows}")


if __name__ == "__main__":
    main()
