"""The trunk's decode step (`ExpertPredictor.step`) by how many tokens its KV cache holds.

    python -m benchmarks.predictor_step --predictor RUN/predictor.safetensors [--positions 64 1024 2000]
        [--device cpu] [--threads 1] [--repeats 3]

Feeds one sequence of `max(positions) + 32` tokens, step by step (routing all expert 0: the cost
does not depend on the ids), and prints the mean step time over the 32 steps from each position, best
of `--repeats` sequences, and the whole sequence's time. A step's cost should grow with the
attention alone, not with copying the cache (predictor/blocks.py `append_kv`).
"""

from __future__ import annotations

import argparse
import time

import torch

from predictor.cli import positive_int, resolve_device
from predictor.export import load_predictor


def time_steps(model, positions: list[int], device: torch.device) -> tuple[dict[int, float], float]:
    """ms per step over the `window` steps from each position, and the whole sequence's seconds."""
    L, k = model.config.num_layers, model.config.top_k
    state, prev, window = model.init_state(1), None, 32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ms, start, t0 = {}, {}, time.perf_counter()
    for t in range(max(positions) + window):
        if t in positions:
            sync()
            start[t] = time.perf_counter()
        model.step(state, torch.tensor([t % 100 + 1], device=device), prev)
        prev = torch.zeros(1, L, k, dtype=torch.long, device=device)
        if t - window + 1 in start:
            sync()
            ms[t - window + 1] = (time.perf_counter() - start[t - window + 1]) / window * 1e3
    sync()
    return ms, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.predictor_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictor", required=True)
    ap.add_argument("--positions", type=int, nargs="+", default=[64, 1024, 2000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--repeats", type=positive_int, default=3)
    args = ap.parse_args(argv)
    if min(args.positions) < 0:  # (--repeats and --threads are positive_int)
        ap.error("--positions must be >= 0")
    try:
        device = resolve_device(args.device, "--device")  # one this machine has, before any work
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    model = load_predictor(args.predictor, map_location=device).to(device).eval()
    best, total = {}, float("inf")
    for _ in range(args.repeats):
        ms, seconds = time_steps(model, sorted(set(args.positions)), device)
        best = {p: min(best.get(p, float("inf")), v) for p, v in ms.items()}
        total = min(total, seconds)
    steps = max(args.positions) + 32
    print(f"{args.predictor}: {model.config.mode}, {args.device}, {args.threads} thread(s), best of {args.repeats}")
    print(" | ".join(f"step at {p}: {v:.3f} ms" for p, v in sorted(best.items())) + f" | {steps} steps: {total:.2f} s")
    return 0


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
